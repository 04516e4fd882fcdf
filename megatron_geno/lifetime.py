"""Child processes die with the process that started them (Linux), so a killed run leaves nothing.

megatron-core's checkpoint saving starts helper processes: forked writers during each save and a
spawned multiprocessing manager that lives as long as the trainer. A SIGKILLed trainer (OOM killer,
scheduler, `kill -9`) gives them no chance to clean up, and they pile up over restarts at hundreds
of MB each. The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) ends them instead:

- ``tie_forked_children()``: every child forked from here on gets SIGKILL when its parent dies;
- ``die_with_parent_if_spawned()``: run at import of each command-line entry module (geno-train,
  geno-preprocess, geno-convert, geno-eval, geno-launch), so a multiprocessing "spawn" child
  (which imports the parent's main module) does the same. The package itself does nothing at
  import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_owner_pid: int | None = None  # the process whose forked children are tied to it


def _set_parent_death_signal(expected_parent: int | None) -> bool:
    """Asks the kernel to SIGKILL this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except OSError:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the signal was armed
    return True


_forking_pid: int | None = None  # the process now forking (set just before each fork)


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    # tied to the process that forked it, which is the trainer or, for a grandchild (the
    # asynchronous checkpoint writer forks its file writers), one of its forked children
    _set_parent_death_signal(_forking_pid)


def tie_forked_children() -> None:
    """Every process forked from this one (or from its forked children) from now on dies when
    its parent dies."""
    global _owner_pid
    if _owner_pid is None and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _owner_pid = os.getpid()


def die_with_parent_if_spawned() -> None:
    """In a multiprocessing spawn child: die with the parent.

    A spawn child is started as ``python -c ... --multiprocessing-fork``; multiprocessing then
    replaces sys.argv with the parent's, so the interpreter's own command line tells.
    """
    if "--multiprocessing-fork" in getattr(sys, "orig_argv", sys.argv):
        _set_parent_death_signal(None)
        if os.getppid() == 1:
            os._exit(1)
