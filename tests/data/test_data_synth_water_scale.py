"""Tests of ``make_layout(water_scale=...)``: wider water; scale 1 is the default scene."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lrss_ds.data.synth import LAKE, RIVER, make_layout, render_scene
from lrss_ds.errors import ConfigError


def _square_fits(mask: np.ndarray, side: int) -> bool:
    """True when some ``side x side`` square lies wholly inside ``mask`` (summed-area table)."""
    table = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    return bool((sums == side * side).any())


# sha256 of image + label bytes of make_layout(4, 1, 300, 260) rendered by the code before
# water_scale existed (commit 8808a10): the default scenes, and the demo on them, must not change.
BEFORE_WATER_SCALE = "72782f8f2c37e971c3b8dd0871ff20af462cc2ef0fa7bed9213cba63ddc15b58"


def test_water_scale_one_renders_the_scenes_of_before() -> None:
    for layout in (make_layout(4, 1, 300, 260), make_layout(4, 1, 300, 260, water_scale=1.0)):
        image, label = render_scene(layout)
        assert hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest() == BEFORE_WATER_SCALE


@pytest.mark.parametrize("scale", [0.0, -1.0, 6.0])
def test_water_scale_out_of_range_is_refused(scale: float) -> None:
    with pytest.raises(ConfigError, match="water_scale"):
        make_layout(0, 0, 128, 128, water_scale=scale)


def test_water_scale_widens_the_river_and_lakes_beyond_a_patch() -> None:
    plain, wide = make_layout(0, 2, 512, 512), make_layout(0, 2, 512, 512, water_scale=2.5)
    assert wide.river_half_width == 2.5 * plain.river_half_width
    # Same course: the centre line differs only by the start/end overshoot of the wider river.
    assert np.abs(wide.river - plain.river).max() <= 2 * wide.river_half_width
    assert wide.lakes and min(lake[2] for lake in wide.lakes) > 2 * min(lake[2] for lake in plain.lakes)
    _, label_plain = render_scene(plain)
    _, label_wide = render_scene(wide)
    # The benchmark's point (64 px patches): a lake holds a whole 64 px square, the river (61-84 px
    # wide, narrowing by up to 18 %) a 56 px one; the default river holds neither.
    assert _square_fits(label_wide == RIVER, 56) and _square_fits(label_wide == LAKE, 64)
    assert not _square_fits(label_plain == RIVER, 56)
