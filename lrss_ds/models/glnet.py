"""GLNet baseline: a downsampled global branch and a full-resolution patch branch sharing FPN maps.

Chen et al., "Collaborative Global-Local Networks for Memory-Efficient Segmentation of
Ultra-High Resolution Images", CVPR 2019 (the baseline of the GLSNet paper, Tables 3-6).

What is the same as the original (its ``fpn_global_local_fmreg_ensemble`` model):

* Both branches are ResNet-50 + FPN: laterals and top layer to 256 channels, top-down
  upsample-and-add, two 3x3 "smooth" layers per level (256 -> 256 -> 128), the four levels
  upsampled to stride 4 and concatenated (512 channels), a 3x3 classifier. Plain convolutions
  without BN in the FPN, initialised N(0, 0.01) as in the original.
* The global branch sees the whole image downsampled; the local branch sees full-resolution
  crops. Global-to-local sharing wherever the original shares: the global backbone maps
  c2..c5 and the four-level global FPN maps after the top-down pass (ps0) and after each
  smooth layer (ps1, ps2) are cut at the crop's location, resampled to the local map's size and
  concatenated to the local maps before the corresponding local layer (which therefore has
  twice the input channels), and the local ps3 passes a 3x3 "smooth" (1024 -> 512).
* The ensemble layer: a 3x3 conv on the concatenation of the local ps3 and the global ps3
  cut at the crop gives the main logits.

What differs (the simplification; say so when reporting GLNet numbers):

* **Single stage, global-to-local only.** The original trains in three stages (global alone,
  then global-to-local with the global branch frozen, then local-to-global where the merged
  local maps feed back into the global FPN). Here both branches train jointly in one stage
  and there is no local-to-global path. ``detach_global=True`` stops the local and ensemble
  losses from reaching the global branch, as in the original's second stage.
* **No feature-map regulariser.** The original adds an MSE between local and global ps3
  (weight 0.15); here the two auxiliary outputs (global logits, local logits) are returned
  instead, so the same loss as GLSNet's (main + 2 aux) applies.
* **Resampling.** The original crops the global map at rounded integer offsets and
  interpolates; here the crop window is resampled exactly with ``grid_sample`` (bilinear,
  pixel centres), which also handles windows smaller than one global pixel.
* **Global size.** The original resizes every image to a fixed 508 x 508 square; here the
  padded image is scaled so its longer side is ``global_size`` (aspect kept, sides rounded to
  multiples of 32); images already smaller are not enlarged.
* **Tiling.** Non-overlapping equal crops of at most ``crop_size`` (the same grid as GLSNet,
  :func:`lrss_ds.models.tiling.plan_tiling`) instead of the original's overlapping patches.

Outputs: main logits at stride 4 of the padded image (the local grid); aux = [global logits
(stride 4 of the downsampled global image, covering the padded image), local logits (stride 4)].
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel, refuse_unknown_options
from lrss_ds.models.multiscale import fit_longer_side
from lrss_ds.models.resnet import LAYOUTS, ResNet
from lrss_ds.models.tiling import TILE_MULTIPLE, Tiling, crop_raw, image_mask, plan_tiling, stitch

Maps = list[Tensor]
"""Four FPN levels, coarsest first: ``[p5 (stride 32), p4, p3, p2 (stride 4)]``."""


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)


def _upsample_add(top: Tensor, lateral: Tensor) -> Tensor:
    return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False) + lateral


def _concat_levels(levels: Maps) -> Tensor:
    """Upsample every level to the finest one's size and concatenate along channels."""
    size = levels[-1].shape[-2:]
    return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in levels[:-1]]
                     + [levels[-1]], dim=1)


class FPN(nn.Module):
    """GLNet's FPN; with ``shared=True`` every layer also takes the other branch's map.

    Args:
        in_channels: backbone channels ``[c2, c3, c4, c5]``.
        num_classes: K.
        width: FPN width (256 in GLNet); the second smooth layer has ``width // 2``.
        shared: double every layer's input for the concatenated global maps (local FPN).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 256, shared: bool = False) -> None:
        super().__init__()
        fold = 2 if shared else 1
        half = width // 2
        self.shared = shared
        self.toplayer = _conv(in_channels[3] * fold, width, 1)
        self.latlayer1 = _conv(in_channels[2] * fold, width, 1)
        self.latlayer2 = _conv(in_channels[1] * fold, width, 1)
        self.latlayer3 = _conv(in_channels[0] * fold, width, 1)
        self.smooth1 = nn.ModuleList([_conv(width * fold, width, 3) for _ in range(4)])
        self.smooth2 = nn.ModuleList([_conv(width * fold, half, 3) for _ in range(4)])
        if shared:
            self.smooth = _conv(half * 4 * 2, half * 4, 3)
        self.classify = _conv(half * 4, num_classes, 3)
        self.out_channels = half * 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Maps, ext: list[Maps] | None = None) -> tuple[Tensor, Tensor, list[Maps]]:
        """Run the FPN.

        Args:
            feats: backbone maps ``[c2, c3, c4, c5]`` (strides 4..32).
            ext: for a shared FPN, the other branch's maps resampled to this branch's sizes:
                ``[c-maps [c2, c3, c4, c5], ps0, ps1, ps2]`` (ps lists coarsest first).

        Returns:
            ``(logits (N, K, H/4, W/4), ps3 (N, 2 * width, H/4, W/4), [ps0, ps1, ps2])``.
        """

        def cat(a: Tensor, b: Tensor | None) -> Tensor:
            return a if b is None else torch.cat([a, b], dim=1)

        c_ext, ps0_ext, ps1_ext, ps2_ext = ext if ext is not None else ([None] * 4, [None] * 4, [None] * 4, [None] * 4)
        c2, c3, c4, c5 = feats
        p5 = self.toplayer(cat(c5, c_ext[3]))
        p4 = _upsample_add(p5, self.latlayer1(cat(c4, c_ext[2])))
        p3 = _upsample_add(p4, self.latlayer2(cat(c3, c_ext[1])))
        p2 = _upsample_add(p3, self.latlayer3(cat(c2, c_ext[0])))
        ps0 = [p5, p4, p3, p2]
        ps1 = [layer(cat(p, e)) for layer, p, e in zip(self.smooth1, ps0, ps0_ext)]
        ps2 = [layer(cat(p, e)) for layer, p, e in zip(self.smooth2, ps1, ps1_ext)]
        if self.shared:
            ps3 = self.smooth(_concat_levels([cat(p, e) for p, e in zip(ps2, ps2_ext)]))
        else:
            ps3 = _concat_levels(ps2)
        return self.classify(ps3), ps3, [ps0, ps1, ps2]


def window_grid(
    windows: Sequence[tuple[int, int, int, int]], padded: tuple[int, int], size: tuple[int, int], device: torch.device
) -> Tensor:
    """Sampling grids that resample each crop window of a whole-image map to ``size``.

    Args:
        windows: ``(r0, c0, ch, cw)`` per crop, in padded-image pixels.
        padded: ``(Hp, Wp)``, the extent the whole-image map covers.
        size: ``(h, w)`` of the output.
        device: where to build the grids.

    Returns:
        ``(N, h, w, 2)`` grids for ``grid_sample(..., align_corners=False)``: output pixel
        centres land on the window's corresponding pixel centres.
    """
    theta = torch.zeros(len(windows), 2, 3, device=device)
    for i, (r0, c0, ch, cw) in enumerate(windows):
        # normalised [-1, 1] window edges; the affine maps the output's [-1, 1] onto them
        x0, x1 = 2 * c0 / padded[1] - 1, 2 * (c0 + cw) / padded[1] - 1
        y0, y1 = 2 * r0 / padded[0] - 1, 2 * (r0 + ch) / padded[0] - 1
        theta[i, 0, 0], theta[i, 0, 2] = (x1 - x0) / 2, (x1 + x0) / 2
        theta[i, 1, 1], theta[i, 1, 2] = (y1 - y0) / 2, (y1 + y0) / 2
    return F.affine_grid(theta, [len(windows), 1, size[0], size[1]], align_corners=False)


class GLNet(SegmentationModel):
    """Simplified GLNet (global-to-local feature-map sharing; see the module docstring).

    Args:
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean for the normaliser (raw units), ``None`` = 0.
        band_std: per-band std, ``None`` = 1.
        crop_size: largest local crop side in pixels, a multiple of 32 (default 512).
        global_size: longer side of the downsampled global input (default 512, a multiple of 32).
        depth: ResNet depth of both branches (50 as in GLNet).
        fpn_width: FPN width (256 as in GLNet).
        detach_global: keep the local/ensemble losses out of the global branch.
        crop_batch: crops run through the local branch together (default 4).

    Raises:
        ConfigError: for an option out of range.
    """

    name = "glnet"
    output_stride = 4

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        crop_size: int = 512,
        global_size: int = 512,
        depth: int = 50,
        fpn_width: int = 256,
        detach_global: bool = False,
        crop_batch: int = 4,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            band_mean,
            band_std,
            crop_size=crop_size,
            global_size=global_size,
            depth=depth,
            fpn_width=fpn_width,
            detach_global=detach_global,
            crop_batch=crop_batch,
        )
        for key, value in (("crop_size", crop_size), ("global_size", global_size)):
            if value < TILE_MULTIPLE or value % TILE_MULTIPLE:
                raise ConfigError(key, f"must be a positive multiple of {TILE_MULTIPLE}, got {value}")
        if depth not in LAYOUTS:
            raise ConfigError("depth", f"must be one of {sorted(LAYOUTS)}, got {depth}")
        if fpn_width < 2 or fpn_width % 2:
            raise ConfigError("fpn_width", f"must be an even number >= 2, got {fpn_width}")
        if crop_batch < 1:
            raise ConfigError("crop_batch", f"must be >= 1, got {crop_batch}")
        self.crop_size = crop_size
        self.global_size = global_size
        self.detach_global = bool(detach_global)
        self.crop_batch = crop_batch
        self.pad_multiple = TILE_MULTIPLE
        self.global_backbone = ResNet(depth, self.in_channels)
        self.global_backbone.segment_prefix = "global."
        self.local_backbone = ResNet(depth, self.in_channels)
        self.local_backbone.segment_prefix = "local."
        self.global_fpn = FPN(self.global_backbone.out_channels, self.num_classes, fpn_width)
        self.local_fpn = FPN(self.local_backbone.out_channels, self.num_classes, fpn_width, shared=True)
        self.ensemble = _conv(self.local_fpn.out_channels * 2, self.num_classes, 3)
        nn.init.normal_(self.ensemble.weight, std=0.01)
        nn.init.zeros_(self.ensemble.bias)

    def tiling(self, size: tuple[int, int]) -> Tiling:
        """The crop grid used for an ``(H, W)`` input."""
        return plan_tiling(size, self.crop_size)

    def sizes(self, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(input_size, padded_size)`` of ``x (B, C, H, W)``: padded to the crop grid."""
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        return input_size, self.tiling(input_size).padded

    def global_input_size(self, padded: tuple[int, int]) -> tuple[int, int]:
        """Size of the downsampled global input for a padded image (sides multiples of 32)."""
        return fit_longer_side(padded, self.global_size, TILE_MULTIPLE)

    def param_groups(self, lr_global: float, lr_local: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups with GLNet's two learning rates.

        The freshly initialised ``ensemble`` layer takes ``lr_global``: the same split as the
        engine's name-prefix ``group_lrs: {global, local}`` with base ``lr`` = ``lr_global``.

        Args:
            lr_global: for ``global_backbone`` and ``global_fpn`` (1e-4 in GLNet/GLSNet).
            lr_local: for ``local_backbone`` and ``local_fpn`` (2e-5).

        Returns:
            ``[{"name", "params", "lr"}, ...]`` covering every parameter once.
        """
        glob = [*self.global_backbone.parameters(), *self.global_fpn.parameters()]
        loc = [*self.local_backbone.parameters(), *self.local_fpn.parameters()]
        return [
            {"name": "global", "params": glob, "lr": lr_global},
            {"name": "local", "params": loc, "lr": lr_local},
            {"name": "ensemble", "params": list(self.ensemble.parameters()), "lr": lr_global},
        ]

    def pretrained_backbones(self) -> dict[str, str]:
        """Submodule path -> torchvision architecture whose ImageNet file fits it."""
        arch = f"resnet{self.global_backbone.depth}"
        return {"global_backbone": arch, "local_backbone": arch}

    def _global(self, x: Tensor, padded: tuple[int, int]) -> tuple[Tensor, Maps, Tensor, list[Maps]]:
        size = self.global_input_size(padded)

        def prepare(t: Tensor) -> Tensor:
            t = self.normalizer(t)
            t = F.pad(t, (0, padded[1] - t.shape[-1], 0, padded[0] - t.shape[-2]))
            if tuple(t.shape[-2:]) == size:
                return t
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)

        feats = self.global_backbone(x, input_transform=prepare)
        logits, ps3, ps = self.segment("global.fpn", lambda *c: self.global_fpn(list(c)), *feats)
        return logits, feats, ps3, ps

    def _local(self, crops: Tensor, keep: Tensor | None, shared: list[Tensor], index: Tensor,
               grids: dict[tuple[int, int], Tensor]) -> tuple[Tensor, Tensor]:
        def prepare(t: Tensor) -> Tensor:
            t = self.normalizer(t)
            return t if keep is None else t * keep

        feats = self.local_backbone(crops, input_transform=prepare)

        def run(*args: Tensor) -> tuple[Tensor, Tensor]:
            c = list(args[:4])
            g = list(args[4:])

            def cut(m: Tensor, size: tuple[int, int]) -> Tensor:
                return F.grid_sample(m.index_select(0, index), grids[size], mode="bilinear", align_corners=False)

            # shared = [c2..c5, ps0 (p5..p2), ps1 (p5..p2), ps2 (p5..p2), ps3]
            c_sizes = [(int(ci.shape[-2]), int(ci.shape[-1])) for ci in c]
            p_sizes = c_sizes[::-1]
            c_ext = [cut(m, size) for m, size in zip(g[0:4], c_sizes)]
            ps_ext = [[cut(m, size) for m, size in zip(g[4 + 4 * j : 8 + 4 * j], p_sizes)] for j in range(3)]
            local_logits, ps3, _ = self.local_fpn(c, [c_ext, *ps_ext])
            global_ps3 = cut(g[16], c_sizes[0])
            return self.ensemble(torch.cat([ps3, global_ps3], dim=1)), local_logits

        return self.segment("local.fpn", run, *feats, *shared)

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment whole images.

        Args:
            x: ``(B, C, H, W)`` raw bands, any dtype and size.

        Returns:
            eval: logits ``(B, K, H, W)``. train: ``dict(logits=(B, K, Hp/4, Wp/4),
            aux=[global_logits (B, K, gh/4, gw/4), local_logits (B, K, Hp/4, Wp/4)],
            input_size, padded_size)`` where ``(gh, gw)`` is :meth:`global_input_size`.
        """
        input_size, padded = self.sizes(x)
        tiling = self.tiling(input_size)
        global_logits, feats, ps3, ps = self._global(x, padded)
        shared = [*feats, *ps[0], *ps[1], *ps[2], ps3]
        if self.detach_global:
            shared = [t.detach() for t in shared]
        jobs = [(b, window) for b in range(x.shape[0]) for window in tiling.windows()]
        ch, cw = tiling.crop
        # the local maps' sizes per crop are fixed by the tiling: strides 4..32 and the stem
        sizes = {(ch // s, cw // s) for s in (4, 8, 16, 32)}
        mains: list[Tensor] = []
        locals_: list[Tensor] = []
        for start in range(0, len(jobs), self.crop_batch):
            chunk = jobs[start : start + self.crop_batch]
            cut = [crop_raw(x[b], window) for b, window in chunk]
            windows = [w for _, w in chunk]
            grids = {s: window_grid(windows, padded, s, x.device) for s in sizes}
            index = torch.tensor([b for b, _ in chunk], device=x.device)
            keep = image_mask([v for _, v in cut], (ch, cw), x.device)
            main, local = self._local(torch.stack([c for c, _ in cut]), keep, shared, index, grids)
            mains.append(main)
            locals_.append(local)
        logits = stitch(torch.cat(mains), tiling, x.shape[0])
        local_logits = stitch(torch.cat(locals_), tiling, x.shape[0])
        return self.outputs(logits, [global_logits, local_logits], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """Segments to checkpoint: global backbone, ``global.fpn``, local backbone, ``local.fpn``."""
        return [
            *self.global_backbone.segment_plan(granularity),
            "global.fpn",
            *self.local_backbone.segment_plan(granularity),
            "local.fpn",
        ]


def build_glnet(
    num_classes: int,
    in_channels: int,
    band_mean: Sequence[float] | None = None,
    band_std: Sequence[float] | None = None,
    **options: Any,
) -> GLNet:
    """Build the simplified GLNet (the ``"glnet"`` entry of ``MODEL_BUILDERS``).

    Args:
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean (raw units) or ``None``.
        band_std: per-band std or ``None``.
        **options: :class:`GLNet` options (``crop_size``, ``global_size``, ``depth``,
            ``fpn_width``, ``detach_global``, ``crop_batch``).

    Returns:
        the model.

    Raises:
        ConfigError: for an unknown option or a value out of range.
    """
    refuse_unknown_options(GLNet, options)
    return GLNet(num_classes, in_channels, band_mean, band_std, **options)
