"""Durable file publication: the one way this project makes a written file or directory visible.

Everything is written under a temporary name, flushed to disk (fsync), then renamed; the rename is
made durable by syncing the parent directory. A crash leaves either the old content or the new,
never a half file under the final name.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

# flock's errors on filesystems without it (NFS without lockd, Lustre mounted without flock)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


_OUT_OF_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large (the filesystem's or ulimit -f's limit)"}


def out_of_space(err: BaseException) -> Optional[str]:
    """'no space left on device' (or the quota or file-size reason) when err, or anything it
    wraps, is that OSError; None otherwise. Follows __cause__/__context__ and the per-rank
    failures of torch.distributed.checkpoint's CheckpointException. Writers that lose the errno
    (torch's C++ file writer says only "file write failed") are judged by the caller from the
    free space left."""
    stack, seen = [err], set()
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:
            return _OUT_OF_SPACE[exc.errno]
        if "No space left on device" in str(exc) or "os error 28" in str(exc):  # Rust, C writers
            return _OUT_OF_SPACE[errno.ENOSPC]
        stack += [exc.__cause__, exc.__context__]
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def free_bytes(path: str | Path) -> int:
    """Free space (for this user) on the filesystem holding path, or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: str | Path) -> Path:
    """Gives a file or directory made by tempfile (0600 / 0700 whatever the umask) the mode any
    other new file gets (0666 / 0777 less the umask), so that what is published can be shared
    as the user's umask says: a team's checkpoints, corpora and exports."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def fsync_path(path: str | Path) -> None:
    """Flushes a file's or a directory's content (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsyncs every file and directory under root (root included)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(directory)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Writes data to path through a unique temporary file beside it, fsynced, then renamed."""
    write_files_atomic([path], lambda temps: temps[0].write_bytes(data))


def write_files_atomic(finals: list[str | Path], write) -> None:
    """Publishes files a library writes by path (megatron-core's .bin/.idx builder): write(temps)
    writes unique temporary files beside the finals; each is fsynced, then renamed in the order
    given (the last one is the one readers look for). On failure the temporaries are removed."""
    finals = [Path(f) for f in finals]
    temps = []
    try:
        for final in finals:
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            temps.append(shareable(tmp))
        write(temps)
        for tmp in temps:
            fsync_path(tmp)
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for parent in {final.parent for final in finals}:
        fsync_path(parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """write_bytes_atomic for UTF-8 text."""
    write_bytes_atomic(path, text.encode())


def fresh_temp_dir(beside: str | Path) -> Path:
    """Creates and returns a new, uniquely named directory next to `beside` (same filesystem).

    It is this process's own: only the process that made it removes it.
    """
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    return shareable(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=".tmp", dir=beside.parent))


def publish_dir(tmp: str | Path, final: str | Path, replace: bool = False,
                aside: Optional[str | Path] = None) -> Optional[Path]:
    """Makes the complete directory tmp visible as final (fsynced, one rename): the one way a
    checkpoint, a corpus's assembly group and a conversion's output are published.

    Without replace, final must not exist or be an empty directory; anything else raises
    FileExistsError (a non-empty final is never replaced, even if it appeared while tmp was
    written). With replace, an existing final is first moved aside (to ``aside``, by default
    FINAL.replaced; a leftover there from a publish killed after its rename is removed first) and
    that path is returned: the caller removes it once nothing needs the old copy (a checkpoint
    after ``latest`` names the new one), so a kill at any moment leaves a complete copy.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if replace:
        old = Path(aside) if aside is not None else final.with_name(final.name + ".replaced")
        if final.exists():
            if old.exists():  # an earlier publish was killed after moving aside: final is newer
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
    else:
        try:
            os.rename(tmp, final)  # replaces an empty directory, refuses a non-empty one
        except OSError as err:
            if final.exists():
                raise FileExistsError(f"{final} exists and is not empty") from err
            raise
    fsync_path(final.parent)
    return old if old is not None and old.exists() else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLocked(RuntimeError):
    """Another process holds the directory's writer lock; the message names it."""


class DirectoryLock:
    """One writer per output directory: an advisory lock (``fcntl.flock``) on DIR/.geno-NAME.lock,
    which holds the holder's host and pid. The kernel releases it when the holder exits, however
    it ends (a SIGKILLed writer leaves no stale lock). On a shared filesystem it holds across
    nodes where the filesystem supports flock (NFSv4, Lustre mounted with ``flock``). Where
    flock is not supported (ENOLCK, EOPNOTSUPP), the lock is DIR/.geno-NAME.lockfile, created
    exclusively (O_EXCL), holding host and pid, with a warning: a holder killed by SIGKILL leaves
    it, taken over only from a dead process on the same host."""

    def __init__(self, directory: str | Path, name: str = "writer") -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f".geno-{name}.lock"
        self.fd = None
        self.lockfile: Optional[Path] = None
        fd = None
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = (os.pread(fd, 200, 0).decode(errors="replace").strip()
                              or "another process")
                    os.close(fd)
                    fd = None
                    raise DirectoryLocked(f"{directory} is being written by {holder}; wait for "
                                          f"it to end or write elsewhere") from None
                except OSError as err:
                    if err.errno not in _NO_FLOCK:
                        raise
                    os.close(fd)
                    fd = None
                    if self.path.stat().st_size == 0:  # the file just made for flock
                        self.path.unlink(missing_ok=True)
                    self._take_lockfile(directory, name, err)
                    return
                try:  # a releasing holder unlinks the file: the lock taken must be on the live one
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
                fd = None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        except BaseException:
            # interrupted (Ctrl-C) while taking the lock: a file this process locks, or may
            # lock now, is removed as release() would; one another process holds is left alone
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        self.path.unlink()
                except OSError:
                    pass
                os.close(fd)
            raise
        self.fd = fd

    def _take_lockfile(self, directory: Path, name: str, why: OSError) -> None:
        path = directory / f".geno-{name}.lockfile"
        me = f"host {socket.gethostname()} pid {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = path.read_text(errors="replace").strip() or "another process"
                match = re.fullmatch(r"host (\S+) pid (\d+)", holder)
                if match and match.group(1) == socket.gethostname() \
                        and not _process_alive(int(match.group(2))):
                    path.unlink(missing_ok=True)  # its holder died without releasing it
                    continue
                raise DirectoryLocked(
                    f"{directory} is being written by {holder} (this filesystem has no flock; "
                    f"the lock is {path}: remove it if that process is gone)") from None
            os.write(fd, f"{me}\n".encode())
            os.fsync(fd)
            os.close(fd)
            self.lockfile = path
            log.warning("%s: flock is not supported here (%s); locked with the file %s instead "
                        "(a writer killed with SIGKILL leaves it behind)", directory,
                        os.strerror(why.errno), path)
            return
        raise DirectoryLocked(f"{directory}: could not take the lock file {path}")

    def release(self) -> None:
        """Removes the lock file (while still holding it) and releases the lock. A writer that
        dies without this leaves the file, holding its last holder's name, but no lock."""
        if self.lockfile is not None:
            self.lockfile.unlink(missing_ok=True)
            self.lockfile = None
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
