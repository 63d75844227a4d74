"""Sizes on command lines: one parser for ``lrss-ds synth``, ``lrss-ds models`` and the benchmarks."""

from __future__ import annotations

import pytest

from lrss_ds.errors import ConfigError
from lrss_ds.sizes import parse_size


@pytest.mark.parametrize(("text", "size"), [("6800x7200", (6800, 7200)), ("512", (512, 512)),
                                            (" 64 X 32 ", (64, 32)), ("3×4", (3, 4))])
def test_sizes_parse_as_height_by_width(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "minimum", "problem"), [
    ("big", 1, "--size: 'big' is not a size; expected HxW, e.g. 6800x7200"),
    ("2x3x4", 1, "--size: '2x3x4' is not a size"),
    ("0x5", 1, "--size: '0x5': sides must be positive"),
    ("8x64", 16, "--size: '8x64': sides must be at least 16 px"),
])
def test_bad_sizes_name_the_option_and_the_problem(text: str, minimum: int, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_size(text, minimum=minimum)
    assert str(caught.value).startswith(problem)


def test_the_commands_share_it() -> None:
    import lrss_ds.data.synth as synth
    import lrss_ds.models.listing as listing

    assert synth.parse_size is parse_size and listing.parse_size is parse_size
