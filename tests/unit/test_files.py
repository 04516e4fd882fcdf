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
