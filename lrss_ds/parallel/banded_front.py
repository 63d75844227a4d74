"""HRNet's front in row bands within a rank's band: one input halo exchange, then the one-rank banded front.

In eval mode the front (stem, ``layer1``, ``transition1``) is a local function of its input rows
(BatchNorm uses its running statistics), so a rank that holds its band of the transformed input
plus the rows the front reads across each boundary (:attr:`BandedFront.halo`, fetched once with
:func:`~lrss_ds.parallel.halo_rows`) can run the one-rank banded front
(:func:`~lrss_ds.memory.banded_inference.banded_front`) on that block with its halo layers
switched to their one-rank selves (:meth:`SpatialGroup.local_layers`), and keep its own rows of
the two branch maps. The front's largest maps (the stem's 64 channels at half resolution,
``layer1``'s 256 at a quarter) then never exist for the whole band, as in one-rank prediction;
stages 2-4 and the model's tail run on the band with their halo layers as before.

The halo is rounded up to the backbone's total stride, so the block's height stays a multiple
of it: the front then pads nothing at the block's bottom, and at the scene's bottom edge the
block ends where the padded scene does, as on one rank. Rows next to a block edge inside the
scene read zeros instead of their neighbours' rows, and lie within the halo, which is dropped.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from torch import Tensor, nn

from lrss_ds.memory.banded_inference import BAND_ROWS, FRONT_BAND_ROWS, STEM_BAND_ROWS, banded_front
from lrss_ds.memory.banded_stem import BandedStem
from lrss_ds.models.hrnet import HRNet
from lrss_ds.parallel.group import SpatialGroup
from lrss_ds.parallel.halo import halo_rows


def _spatial_forward(backbone: HRNet, group: SpatialGroup, band_rows: int,
                     front_rows: int) -> Callable[..., list[Tensor]]:
    """An eval forward for ``backbone`` on a band whose front runs in row bands of a halo block."""
    front = banded_front(backbone, 1, band_rows, front_rows)  # on the transformed input: stride 1
    halo = front.halo + -front.halo % backbone.total_stride

    def forward(x: Tensor, input_transform: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        # the band transformed whole (normalised and, for the bottom band, padded): a few
        # channels, where the front's maps hold 64 and 256
        z = x if input_transform is None else input_transform(x)
        rows = z.shape[-2]
        block, missing_top, _ = halo_rows(z, group, halo, halo)
        del z
        with group.local_layers():
            ys = front.forward(block, None)
        del block
        top = halo - missing_top  # rows of the block above the band
        return backbone.after_front(*(y[..., top // s : (top + rows) // s, :] for y, s in zip(ys, front.strides)))

    return forward


@contextlib.contextmanager
def banded_fronts(model: nn.Module, group: SpatialGroup, band_rows: int | None = None,
                  front_rows: int | None = None, stem_rows: int | None = None) -> Iterator[None]:
    """Within the context every HRNet of the spatialized eval-mode ``model`` runs its front banded.

    Args:
        model: a spatialized model in eval mode.
        group: its spatial group.
        band_rows: output rows per band of ``layer1`` (None: ``BAND_ROWS``).
        front_rows: rows of the stem's input per front band (None: ``FRONT_BAND_ROWS``).
        stem_rows: half-resolution rows per band of the stem (None: ``STEM_BAND_ROWS``).

    Raises:
        RuntimeError: ``model`` is in train mode (BatchNorm would need the band's statistics).
    """
    if model.training:
        raise RuntimeError("banded_fronts needs an eval-mode model; call model.eval() first")
    restore: list[Callable[[], Any]] = []
    try:
        for module in model.modules():
            if isinstance(module, HRNet):
                if BandedStem.supports(module.conv1, module.bn1, module.conv2):
                    old_core = module.stem_core
                    module.stem_core = BandedStem(STEM_BAND_ROWS if stem_rows is None else stem_rows)
                    restore.append(lambda m=module, core=old_core: setattr(m, "stem_core", core))
                module.forward = _spatial_forward(  # type: ignore[method-assign]
                    module, group, BAND_ROWS if band_rows is None else band_rows,
                    FRONT_BAND_ROWS if front_rows is None else front_rows,
                )
                restore.append(lambda m=module: delattr(m, "forward"))
        yield
    finally:
        for undo in reversed(restore):
            undo()
