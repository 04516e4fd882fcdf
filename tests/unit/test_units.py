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
