"""The one size parser every CLI uses."""

import pytest

from megatron_geno.units import parse_size


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                        ("1G", 10**9), ("4M", 4 * 10**6), ("1e9", 10**9),
                                        ("300Mbp", 3 * 10**8), ("0.5k", 500), ("64", 64),
                                        ("16 KiB", 16384)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5 XB", "-1G", "1.2.3", "ten"])
def test_not_sizes(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_progress_off_a_terminal_is_a_plain_line_not_a_bar(capsys):
    """In a log (stderr not a terminal) progress is plain lines, never carriage returns."""
    from megatron_geno.progress import PlainProgress, progress

    assert list(progress(range(3), desc="tensors")) == [0, 1, 2]  # pytest captures: no TTY
    with PlainProgress(total=10, desc="chunks", every=0) as bar:
        bar.update(4)
        bar.update(6)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["tensors: 3/3 it (100%), 0 s", "chunks: 4/10 it (40%), 0 s",
                                "chunks: 10/10 it (100%), 0 s"]
