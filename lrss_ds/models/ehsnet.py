"""EHSNet (holistic large-image segmentation): HRNet -> LRD -> auxiliary head -> ECR -> main head."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import Resize, SegHead, SegmentationModel
from lrss_ds.models.ecr import ECRModule
from lrss_ds.models.hrnet import HRNet, concat_branches, hrnet_width
from lrss_ds.models.lrd import LRDModule


class EHSNet(SegmentationModel):
    """EHSNet (EHSNet paper, §3): backbone, LRD module, auxiliary head, ECR module, main head.

    Data flow at the output stride ``os`` (8 by default, §4.2)::

        x -> normaliser + pad -> HRNet -> 4 branches -> upsample + concat (15w channels)
          -> LRD (1x1 to k, act, LRDU(5x5 + dw 7/15/31, concat, 1x1), 1x1 to d)  = F_in
          -> aux head -> aux logits (deep supervision, weight 0.4 in the loss)
          -> ECR(F_in, aux logits): the a = 10 % positions with the smallest top-2 margin
             are enhanced by efficient attention over all positions and scattered back
          -> main head -> logits

    The ECR runs on the positions that cover the input only (the padding margin is passed
    through untouched): padded positions would otherwise compete for the hard set and act as
    keys. The BAE module is part of the loss (``build_loss("ehsnet")``), as is the auxiliary
    weight. Every knob of the paper's Tables 4-6 is an option: ``use_lrd``/``use_ecr`` (Table
    4; with ``use_lrd=False`` a 1x1 conv-BN-ReLU maps the branches to ``d``), ``hard_ratio``
    (a, Table 5), ``lrd_k`` (k, Table 6), ``lrd_d``, ``dw_kernels``, ``dense_kernel``.

    Segments: the backbone's (see :class:`HRNet`), then the LRD's ``lrd.reduce`` (concatenation
    + reduce), ``lrd.unit.0..4`` (one per fused term), ``lrd.increase`` (see
    :class:`LRDModule`; ``lrd`` whole when ``use_lrd=False``), then ``aux_head``, ``ecr``, ``head``.
    Every granularity checkpoints the LRD term by term: at whole-scene sizes its backward
    was the step's memory peak when checkpointed as one piece.

    Args:
        num_classes: K (>= 2: the ECR needs two logits to form a margin).
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        backbone: ``hrnet_w18`` (default), ``hrnet_w32`` or ``hrnet_w48``.
        output_stride: 8 (the paper's choice for memory) or 4.
        use_lrd: build the LRD module.
        lrd_k: channels inside the LRDU (k, paper 256).
        lrd_d: channels out of the LRD module (d, paper 256).
        dw_kernels: the LRDU's depth-wise kernel sizes (paper 7, 15, 31).
        dense_kernel: the LRDU's dense kernel size (paper 5).
        activation: the LRD's activation (``relu``, ``gelu``, ``silu``).
        dw_method: how the depth-wise convolutions are computed (see ``lrss_ds.models.lrd``).
        use_ecr: build the ECR module.
        hard_ratio: a, the fraction of least confident positions the ECR enhances (paper 0.1).
        ecr_key_channels: key/query channels of the efficient attention (``None``: d / 2).
        ecr_value_channels: value channels (``None``: d / 2).
        ecr_heads: attention heads.
        head_channels: hidden channels of the two heads (``None``: d).

    Raises:
        ConfigError: for an unknown backbone or an out-of-range option.
    """

    name = "ehsnet"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        backbone: str = "hrnet_w18",
        output_stride: int = 8,
        use_lrd: bool = True,
        lrd_k: int = 256,
        lrd_d: int = 256,
        dw_kernels: Sequence[int] = (7, 15, 31),
        dense_kernel: int = 5,
        activation: str = "relu",
        dw_method: str = "auto",
        use_ecr: bool = True,
        hard_ratio: float = 0.1,
        ecr_key_channels: int | None = None,
        ecr_value_channels: int | None = None,
        ecr_heads: int = 1,
        head_channels: int | None = None,
    ) -> None:
        if num_classes < 2:
            raise ConfigError("num_classes", f"EHSNet needs >= 2 classes (the ECR ranks a top-2 margin), got {num_classes}")
        if not 0.0 < hard_ratio <= 1.0:
            raise ConfigError("hard_ratio", f"must be in (0, 1], got {hard_ratio}")
        for key, value in (("lrd_k", lrd_k), ("lrd_d", lrd_d), ("dense_kernel", dense_kernel), *[("dw_kernels", k) for k in dw_kernels]):
            if int(value) < 1:
                raise ConfigError(key, f"must be >= 1, got {value}")
        super().__init__(
            num_classes,
            in_channels,
            band_mean,
            band_std,
            backbone=backbone,
            output_stride=output_stride,
            use_lrd=bool(use_lrd),
            lrd_k=int(lrd_k),
            lrd_d=int(lrd_d),
            dw_kernels=tuple(int(k) for k in dw_kernels),
            dense_kernel=int(dense_kernel),
            activation=activation,
            dw_method=dw_method,
            use_ecr=bool(use_ecr),
            hard_ratio=float(hard_ratio),
            ecr_key_channels=ecr_key_channels,
            ecr_value_channels=ecr_value_channels,
            ecr_heads=int(ecr_heads),
            head_channels=head_channels,
        )
        self.backbone = HRNet(hrnet_width(backbone), in_channels, output_stride)
        self.output_stride = output_stride
        self.pad_multiple = self.backbone.total_stride
        branches = sum(self.backbone.out_channels)
        self.lrd: nn.Module
        if use_lrd:
            try:
                self.lrd = LRDModule(branches, lrd_k, lrd_d, tuple(dw_kernels), dense_kernel, activation, dw_method)
                self.lrd.segment_prefix = "lrd."
            except ValueError as error:  # the module's own validation: report it as a config problem
                raise ConfigError("lrd", str(error)) from error
        else:
            self.lrd = nn.Sequential(nn.Conv2d(branches, lrd_d, 1, bias=False), nn.BatchNorm2d(lrd_d), nn.ReLU(inplace=True))
        hidden = head_channels or lrd_d
        self.aux_head = SegHead(lrd_d, num_classes, hidden)
        self.ecr: ECRModule | None = None
        if use_ecr:
            try:
                self.ecr = ECRModule(lrd_d, hard_ratio, ecr_key_channels, ecr_value_channels, ecr_heads)
            except ValueError as error:
                raise ConfigError("ecr", str(error)) from error
        self.head = SegHead(lrd_d, num_classes, hidden)
        self.resize = Resize()

    def _ecr_on_valid(self, features: Tensor, aux_logits: Tensor, valid: tuple[int, int]) -> Tensor:
        """ECR on the positions covering the input; the padding margin passes through.

        Args:
            features: ``(B, d, h, w)``; ``aux_logits``: ``(B, K, h, w)``.
            valid: ``(hv, wv)`` positions that cover input pixels (``ceil(H / os)``).

        Returns:
            ``(B, d, h, w)``.
        """
        assert self.ecr is not None
        hv, wv = valid
        height, width = features.shape[-2:]
        if (hv, wv) == (height, width):
            return self.ecr(features, aux_logits)
        inner = self.ecr(features[..., :hv, :wv].contiguous(), aux_logits[..., :hv, :wv].contiguous())
        top = torch.cat([inner, features[..., :hv, wv:]], dim=-1)
        return torch.cat([top, features[..., hv:, :]], dim=-2)

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)`` logits; train: ``dict(logits=(B, K, Hp/os, Wp/os),
            aux=[aux_logits (B, K, Hp/os, Wp/os)], input_size=(H, W), padded_size=(Hp, Wp))``.
        """
        input_size, padded = self.sizes(x)
        features = self.backbone(x, input_transform=self.prepare_input)
        resize = getattr(self, "resize", None)  # getattr: models pickled before the slot existed
        if isinstance(self.lrd, LRDModule):
            f_in = self.lrd(*features, merge=lambda *fs: concat_branches(list(fs), resize))
        else:
            f_in = self.segment("lrd", lambda *fs: self.lrd(concat_branches(list(fs), resize)), *features)
        aux_logits = self.segment("aux_head", self.aux_head, f_in)
        f_out = f_in
        if self.ecr is not None:
            valid = (-(-input_size[0] // self.output_stride), -(-input_size[1] // self.output_stride))
            f_out = self.segment("ecr", lambda f, a: self._ecr_on_valid(f, a, valid), f_in, aux_logits)
        logits = self.segment("head", self.head, f_out)
        return self.outputs(logits, [aux_logits], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """The backbone's plan for ``granularity``, then the LRD's segments, ``aux_head``, ``ecr``, ``head``."""
        lrd = self.lrd.segment_names() if isinstance(self.lrd, LRDModule) else ["lrd"]
        tail = [*lrd, "aux_head"] + (["ecr"] if self.ecr is not None else []) + ["head"]
        return [*self.backbone.segment_plan(granularity), *tail]
