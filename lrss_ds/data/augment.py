"""Training augmentation: the 8 flips and right-angle turns of a sample, chosen per stream position.

On the synthetic river/lake task and on overhead imagery in general, a flipped or turned scene is
another valid scene: what tells river from lake (extent and shape) survives all eight. The
transform of a sample is a pure function of ``(seed, rank, position)`` in the rank's sample
stream, so a resumed run (which restarts the stream at its saved position) sees the same
transforms as an uninterrupted one, whatever the number of DataLoader workers.

Numbering: transform ``n`` turns the sample ``n % 4`` times by 90 degrees (``np.rot90`` over the
two spatial axes), then mirrors it left-right when ``n >= 4``. The shape-preserving ones are the
even numbers (identity, 180 degrees, left-right mirror, top-bottom mirror). A non-square sample
gets ``n`` with its lowest bit cleared, so it keeps its height and width (samples of one
micro-batch stay stackable and a model's size constraints per axis still hold) and each of the
four shape-preserving transforms still comes up equally often.
"""

from __future__ import annotations

import numpy as np

from lrss_ds.errors import ConfigError

# Values of ``train.augment``: no augmentation, or the dihedral group D4 (8 flips/turns).
AUGMENTATIONS = ("none", "d4")
DIHEDRAL = 8


def dihedral(image: np.ndarray, label: np.ndarray, number: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply transform ``number`` (0..7, see the module docstring) to an image and its label alike.

    Args:
        image: ``(C, H, W)``.
        label: ``(H, W)``.
        number: 0..7; turns ``number % 4`` quarter turns, then mirrors left-right if ``>= 4``.

    Returns:
        ``(image, label)``, contiguous; ``(C, W, H)`` / ``(W, H)`` after an odd number of turns.

    Raises:
        ConfigError: ``number`` is not in 0..7.
    """
    if not 0 <= number < DIHEDRAL:
        raise ConfigError("augment", f"transform number must be in 0..7, got {number}")
    turns, mirror = number % 4, number >= 4
    image, label = np.rot90(image, turns, axes=(1, 2)), np.rot90(label, turns)
    if mirror:
        image, label = image[:, :, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def shape_preserving(number: int, height: int, width: int) -> int:
    """``number`` for a square sample; its shape-preserving neighbour (lowest bit cleared) otherwise."""
    return number if height == width else number & ~1


def transform_number(seed: int, rank: int, position: int) -> int:
    """The transform of item ``position`` of ``rank``'s sample stream (0..7).

    Positions come in blocks of 8; each block is a permutation of the 8 transforms drawn from
    ``(seed, rank, block)``, so every 8 consecutive items of a stream see each transform once.
    """
    block, offset = divmod(position, DIHEDRAL)
    order = np.random.default_rng([seed, rank, block, 0xD4]).permutation(DIHEDRAL)
    return int(order[offset])

