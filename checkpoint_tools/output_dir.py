"""The output directory of a conversion: checked first, written aside, published whole."""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from checkpoint_tools.errors import ConversionError
from megatron_geno.files import (DirectoryLock, DirectoryLocked, free_bytes, fresh_temp_dir,
                                 out_of_space, publish_dir)
from megatron_geno.units import format_bytes


def check_out(out: Path) -> None:
    """Refuses an --out that is a file, the current directory, or a non-empty directory."""
    if str(out) in (".", "..") or out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ConversionError(f"--out {out} names the current directory or one above it; name "
                              f"a new directory")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; name a new directory")
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory {out} exists and is not empty")


@contextmanager
def claimed_out(out: Path):
    """Checks --out (check_out), then holds OUT's writer lock for the whole conversion: a file
    beside OUT (.geno-out-NAME.lock), so a second conversion into OUT is refused at start. With the
    lock held, temporary directories that killed conversions into OUT left beside it are removed
    (only a conversion into OUT makes them, and none other runs)."""
    check_out(out)
    parent = out.absolute().parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # removed again if left empty
    lock = None
    try:  # (taken inside: a Ctrl-C as soon as the lock exists still releases it)
        try:
            lock = DirectoryLock(parent, f"out-{out.name}")
        except DirectoryLocked as err:
            raise ConversionError(f"--out {out}: {err}") from None
        except OSError as err:
            raise ConversionError(f"cannot write --out {out}: {err.strerror}") from None
        leftover = re.compile(rf"\.{re.escape(out.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
        for path in out.absolute().parent.iterdir():
            if path.is_dir() and leftover.fullmatch(path.name):
                shutil.rmtree(path, ignore_errors=True)
        yield
    finally:
        if lock is not None:
            lock.release()
        for directory in made:  # innermost first; a refused conversion leaves no new directory
            try:
                directory.rmdir()
            except OSError:
                break


def write_into_new_dir(out: Path, write) -> Path:
    """Runs write(tmp) in a fresh temporary directory beside OUT, then publishes it as OUT.

    On any failure (or interruption) only that temporary directory is removed; OUT is never
    replaced if it holds anything.
    """
    tmp = fresh_temp_dir(out)
    try:
        write(tmp)
        publish_dir(tmp, out)
    except FileExistsError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"output directory {out} was filled by something else while "
                              f"converting; nothing was replaced ({err})") from None
    except BaseException as err:
        free = free_bytes(tmp)  # before the partial output is removed
        shutil.rmtree(tmp, ignore_errors=True)
        reason = out_of_space(err) if isinstance(err, Exception) else None
        if reason:
            raise ConversionError(f"writing {out} failed: {reason} ({format_bytes(free)} free "
                                  f"there); the partial output was removed") from None
        raise
    return out
