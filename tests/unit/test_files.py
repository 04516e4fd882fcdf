"""What is published honours the umask, like any other new file: a team shares checkpoints,
corpora and exports by its umask (tempfile alone would make them 0600 / 0700)."""

import os
import stat

import pytest

from megatron_geno.files import (fresh_temp_dir, publish_dir, write_files_atomic,
                                 write_text_atomic)


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_published_files_and_directories_get_the_umask_mode(tmp_path, umask):
    write_text_atomic(tmp_path / "latest", "5\n")
    write_files_atomic([tmp_path / "a.bin", tmp_path / "a.idx"],
                       lambda temps: [t.write_bytes(b"x") for t in temps])
    made = fresh_temp_dir(tmp_path / "hf")
    (made / "config.json").write_text("{}")
    publish_dir(made, tmp_path / "hf")
    for name in ("latest", "a.bin", "a.idx"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert _mode(tmp_path / "hf") == 0o777 & ~umask
    assert (tmp_path / "latest").read_text() == "5\n"


def test_directory_lock_falls_back_to_an_exclusive_lock_file_without_flock(tmp_path, monkeypatch,
                                                                            caplog):
    import errno
    import socket
    import subprocess
    import sys

    from megatron_geno import files

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    first = files.DirectoryLock(tmp_path)
    lockfile = tmp_path / ".geno-writer.lockfile"
    assert lockfile.read_text().strip() == f"host {socket.gethostname()} pid {os.getpid()}"
    assert not (tmp_path / ".geno-writer.lock").exists()
    assert "flock is not supported" in caplog.text
    with pytest.raises(files.DirectoryLocked, match=f"pid {os.getpid()}.*no flock"):
        files.DirectoryLock(tmp_path)  # a live holder: refused
    first.release()
    assert not lockfile.exists()
    # a holder on this host that has died (SIGKILL left its file): taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lockfile.write_text(f"host {socket.gethostname()} pid {dead}\n")
    second = files.DirectoryLock(tmp_path)
    assert lockfile.read_text().strip().endswith(f"pid {os.getpid()}")
    second.release()
    # a holder on another host is never taken over
    lockfile.write_text("host elsewhere-node pid 1\n")
    with pytest.raises(files.DirectoryLocked, match="elsewhere-node"):
        files.DirectoryLock(tmp_path)
    assert lockfile.read_text() == "host elsewhere-node pid 1\n"
