"""ISDNet: a deep branch on the downsampled image and a shallow STDC branch on Laplacian residuals, fused by RAF.

Guo et al., "ISDNet: Integrating Shallow and Deep Networks for Efficient Ultra-high Resolution
Segmentation", CVPR 2022 (the EHSNet paper's Tables 1 and 3, modified there for 4 bands).

Data flow (strides relative to the padded full-resolution input)::

    x -> normaliser + pad --+-> average-pool by 4 -> ResNet-18 (dilated, stride 8) -> ASPP
                            |       -> deep features (stride 32, ``channels``)
                            |          [train: deep logits, FCN logits on layer3, SR decoder]
                            +-> Laplacian pyramid, 2 levels: residual 1 (full res) and
                                residual 2 (half res, upsampled), concatenated (2C bands)
                                -> STDC stem + stages 3, 4 -> shallow maps at strides 8, 16
    RAF(shallow 16, deep) -> fused 16 [train: aux logits from its context features]
    RAF(shallow 8, fused 16) -> fused 8 [train: aux logits] -> head -> logits (stride 8)

What is the same as the paper and its released configuration:

* Deep branch: DeepLabV3 (ASPP with an image-pooling branch and dilations 1, 12, 24, 36, 128
  channels, then a 3x3 conv-BN-ReLU) on a ResNet-18 with layers 3 and 4 dilated (output stride
  8), fed the image reduced 4x; its own classifier and an FCN auxiliary head on layer 3 (64
  channels) are trained (loss weights 1 and 0.4).
* Shallow branch: the STDC1 stem and stages 3-4 (:class:`~lrss_ds.models.stdc.STDCNet`, layers
  ``(2, 2)``) on the two highest Laplacian residuals of the full-resolution image (5x5 binomial
  Gaussian, reflect padding, decimation by 2, zero-insertion upsampling), i.e. ``2 C`` input
  bands: for N bands that is 2N, the change the EHSNet authors had to make for FBP's 4 bands.
* Relation-aware fusion (:class:`RelationAwareFusion`): each input gets a 3x3 conv-BN-ReLU and
  a channel attention vector (mean over positions, 1x1 conv); the two vectors are split into
  ``r = 16`` groups and their ``r x r`` group affinity feeds two MLPs whose outputs, scaled by
  zero-initialised gates, are added to each attention before the sigmoid; the re-weighted deep
  map is upsampled, passed through a 3x3 conv-BN-ReLU, added to the re-weighted shallow map and
  smoothed by a 3x3 conv-BN. Fusion at stride 16 (shallow 512 channels) and at stride 8
  (shallow 256 channels), a 3x3 + 1x1 classifier at stride 8, and auxiliary classifiers on each
  fusion's context features (weight 1 each).
* Super-resolution decoder (training only): three nearest x4, x2, x2 upsamplings (the first is
  ``downsample``) each followed
  by a 3x3 conv-BN-ReLU (``channels / 2``, ``channels / 2``, ``channels``) from the deep
  features to stride 2, then a 3x3 + 1x1 head to C bands. Its output, upsampled to full
  resolution, reconstructs the sum of the two Laplacian residuals (MSE, weight 0.1), and the
  structural affinity of the deep features is pulled towards that of the SR features (L1,
  weight 1, SR side detached). Both are terms of ``build_loss("isdnet")``
  (:mod:`lrss_ds.models.aux_losses`), which reads the ``sr`` and ``affinity`` outputs.

Where the paper is vague or does not fit, and what is done here:

* **4x reduction by averaging** (``avg_pool2d``) rather than the released code's nearest
  resampling, which aliases; the same reduction as the downsampled HRNet baseline.
* **ResNet-18 with the plain 7x7 stem** (the project's torchvision-named ResNet, so the
  torchvision ImageNet file loads), where the release used the three-conv "v1c" stem.
* **No BatchNorm on pooled vectors** (the ASPP image-pooling branch, the RAF attention
  vectors): with one whole scene per step BatchNorm cannot normalise one value per channel;
  those 1x1 convolutions have a bias instead. No dropout before the classifiers.
* **Group affinity MLP input ``r * r``** (the release hard-codes ``2 * channels``, equal only
  for 128 channels and r = 16).
* **Affinity normalised per position** (cosine similarity of two positions' feature vectors,
  the formula of the dual super-resolution work ISDNet takes the loss from) and computed on
  at most ``affinity_positions`` positions (average-pooled beyond), since the ``N x N`` matrix
  of a whole scene's stride-32 grid would not fit (47,700 positions for 6800 x 7200).
* Laplacian residuals are computed on the normalised, padded image.

Outputs (train mode): ``logits`` (stride 8); ``aux`` = [deep logits (stride 32), fusion-16
context logits (stride 16), fusion-8 context logits (stride 8), FCN logits on layer 3 (stride
32)]; ``sr`` = ``(prediction (B, C, Hp/2, Wp/2), target (B, C, Hp, Wp))``; ``affinity`` =
``(deep features (B, channels, Hp/32, Wp/32), SR features (B, channels, Hp/2, Wp/2))``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel
from lrss_ds.models.resnet import ResNet
from lrss_ds.models.stdc import ChannelAttention, ConvX, OutputHead, STDCNet

BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def gaussian_kernel(bands: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``(bands, 1, 5, 5)`` depth-wise binomial Gaussian (``outer([1, 4, 6, 4, 1]) / 256``)."""
    row = torch.tensor(BINOMIAL_5, device=device, dtype=dtype)
    return (torch.outer(row, row) / 256.0).expand(bands, 1, 5, 5).contiguous()


def _blur(x: Tensor, kernel: Tensor) -> Tensor:
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def laplacian_residuals(x: Tensor, levels: int = 2) -> list[Tensor]:
    """The high-frequency residuals of a Laplacian pyramid, finest first.

    Level ``i``: ``r_i = g_i - up(down(blur(g_i)))`` with ``g_0 = x``, ``g_{i+1} =
    down(blur(g_i))``, ``down`` taking every second pixel and ``up`` inserting zeros and blurring
    with 4x the kernel (Burt and Adelson's expand).

    Args:
        x: ``(B, C, H, W)`` with H, W divisible by ``2 ** levels`` and >= 3 at the coarsest level.
        levels: residuals to return.

    Returns:
        ``[(B, C, H, W), (B, C, H/2, W/2), ...]``.
    """
    kernel = gaussian_kernel(x.shape[1], x.device, x.dtype)
    residuals = []
    current = x
    for _ in range(levels):
        down = _blur(current, kernel)[..., ::2, ::2]
        zeros = down.new_zeros(*down.shape[:2], down.shape[2] * 2, down.shape[3] * 2)
        zeros[..., ::2, ::2] = down
        residuals.append(current - _blur(zeros, 4.0 * kernel))
        current = down
    return residuals


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling with its 3x3 bottleneck.

    Branches: image pooling (mean, 1x1 conv with bias, ReLU, broadcast), a 1x1 conv for
    dilation 1 and a 3x3 dilated conv for each other dilation (conv-BN-ReLU); concatenated and
    reduced by a 3x3 conv-BN-ReLU.

    Args:
        c_in: input channels.
        channels: width of every branch and of the output.
        dilations: dilation of each conv branch (ISDNet: 1, 12, 24, 36 at output stride 8).
    """

    def __init__(self, c_in: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.image_pool = nn.Conv2d(c_in, channels, 1)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(c_in, channels, 1 if d == 1 else 3, d) for d in dilations]
        )
        self.bottleneck = _conv_bn_relu((len(dilations) + 1) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, h, w) -> (B, channels, h, w)``."""
        pooled = F.relu(self.image_pool(x.mean(dim=(2, 3), keepdim=True))).expand(-1, -1, *x.shape[-2:])
        return self.bottleneck(torch.cat([pooled, *[branch(x) for branch in self.branches]], dim=1))


class RelationAwareFusion(nn.Module):
    """RAF: fuse a shallow (spatial) map with a coarser deep (context) map via their channel relations.

    Args:
        spatial_channels: channels of the shallow map.
        channels: channels of the context map and of the output (a multiple of ``groups``).
        groups: r, the groups the attention vectors are split into (paper 16).
        gate_init: initial value of the two gates on the relation terms (paper 0: the fusion
            starts as plain channel attention).
    """

    def __init__(self, spatial_channels: int, channels: int, groups: int = 16, gate_init: float = 0.0) -> None:
        super().__init__()
        if channels % groups:
            raise ConfigError("channels", f"ISDNet's channels ({channels}) must be a multiple of relation_groups ({groups})")
        self.groups = groups
        self.spatial_att = ChannelAttention(spatial_channels, channels)
        self.context_att = ChannelAttention(channels, channels)
        self.spatial_mlp = nn.Sequential(nn.Linear(groups * groups, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels))
        self.context_mlp = nn.Sequential(nn.Linear(groups * groups, channels), nn.ReLU(inplace=True), nn.Linear(channels, channels))
        self.g1 = nn.Parameter(torch.full((1,), float(gate_init)))
        self.g2 = nn.Parameter(torch.full((1,), float(gate_init)))
        self.context_head = ConvX(channels, channels, 3)
        self.smooth = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, spatial: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse.

        Args:
            spatial: ``(B, spatial_channels, h, w)``.
            context: ``(B, channels, h', w')`` with ``h' <= h``.

        Returns:
            ``(context features (B, channels, h, w), fused (B, channels, h, w))``.
        """
        s_feat, s_att = self.spatial_att(spatial)
        c_feat, c_att = self.context_att(context)
        batch, channels = s_att.shape[:2]
        s_groups = s_att.reshape(batch, self.groups, channels // self.groups)
        c_groups = c_att.reshape(batch, self.groups, channels // self.groups)
        relation = torch.bmm(s_groups, c_groups.transpose(1, 2)).reshape(batch, -1)  # (B, r * r)
        s_rel = F.relu(self.spatial_mlp(relation)).view(batch, channels, 1, 1)
        c_rel = F.relu(self.context_mlp(relation)).view(batch, channels, 1, 1)
        s_feat = s_feat * torch.sigmoid(s_att + self.g1 * s_rel)
        c_feat = c_feat * torch.sigmoid(c_att + self.g2 * c_rel)
        c_feat = F.interpolate(c_feat, size=s_feat.shape[-2:], mode="bilinear", align_corners=False)
        c_feat = self.context_head(c_feat)
        return c_feat, self.smooth(s_feat + c_feat)


class SRDecoder(nn.Module):
    """The super-resolution decoder: nearest x4, x2, x2 upsamplings with 3x3 conv-BN-ReLU, then a head to C bands.

    Args:
        channels: input (and last hidden) channels.
        bands: output bands (the image's).
        first_scale: the first upsampling (paper 4: from stride 32 to stride 2 in all).
    """

    def __init__(self, channels: int, bands: int, first_scale: int = 4) -> None:
        super().__init__()
        self.first_scale = first_scale
        half = max(1, channels // 2)
        self.conv1 = ConvX(channels, half, 3)
        self.conv2 = ConvX(half, half, 3)
        self.conv3 = ConvX(half, channels, 3)
        self.conv_sr = OutputHead(channels, half, bands, bias=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, channels, h, w) -> (features (B, channels, sh, sw), image (B, bands, sh, sw))``, ``s = 4 first_scale``."""
        if self.first_scale > 1:
            x = F.interpolate(x, scale_factor=self.first_scale, mode="nearest")
        x = self.conv1(x)
        x = self.conv2(F.interpolate(x, scale_factor=2, mode="nearest"))
        feats = self.conv3(F.interpolate(x, scale_factor=2, mode="nearest"))
        return feats, self.conv_sr(feats)


class ISDNet(SegmentationModel):
    """ISDNet (see the module docstring): deep DeepLabV3 branch, shallow STDC branch, two RAFs, SR decoder.

    Segments: ``input`` (normaliser, padding, Laplacian residuals and the 4x reduction), the
    deep backbone's (prefix ``deep.``), ``aspp``, the shallow backbone's (prefix ``shallow.``),
    ``fuse16``, ``fuse8``, ``head`` and, in training, ``deep_heads``, ``aux_heads``, ``sr_decoder``.

    Args:
        num_classes: K.
        in_channels: input bands C (the shallow branch takes 2C).
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        downsample: reduction of the deep branch's input (paper 4).
        channels: width of the ASPP, the fusions and the SR decoder (paper 128).
        aspp_dilations: the ASPP's dilations (paper 1, 12, 24, 36).
        shallow_base: stem width of the STDC branch (paper 64).
        relation_groups: r of the RAF (paper 16).
        gate_init: initial value of the RAF's relation gates (paper 0).

    Raises:
        ConfigError: for an out-of-range option.
    """

    name = "isdnet"
    output_stride = 8

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        downsample: int = 4,
        channels: int = 128,
        aspp_dilations: Sequence[int] = (1, 12, 24, 36),
        shallow_base: int = 64,
        relation_groups: int = 16,
        gate_init: float = 0.0,
    ) -> None:
        if int(downsample) != downsample or downsample < 1 or 16 % int(downsample):
            raise ConfigError("downsample", f"must be 1, 2, 4, 8 or 16 (a divisor of 16), got {downsample}")
        if int(channels) < 2 or int(relation_groups) < 1:
            raise ConfigError("channels", f"channels must be >= 2 and relation_groups >= 1, got {channels}/{relation_groups}")
        dilations = tuple(int(d) for d in aspp_dilations)
        if not dilations or min(dilations) < 1:
            raise ConfigError("aspp_dilations", f"needs dilations >= 1, got {list(aspp_dilations)}")
        super().__init__(num_classes, in_channels, band_mean, band_std, downsample=int(downsample),
                         channels=int(channels), aspp_dilations=dilations, shallow_base=int(shallow_base),
                         relation_groups=int(relation_groups), gate_init=float(gate_init))
        channels = int(channels)
        self.downsample = int(downsample)
        # The deep branch's stride-8 map and the shallow stride-16 map must tile the padded image.
        self.pad_multiple = max(8 * self.downsample, 16)
        self.deep_stride = 8 * self.downsample
        self.deep = ResNet(18, in_channels, replace_stride_with_dilation=(False, True, True))
        self.deep.segment_prefix = "deep."
        self.aspp = ASPP(self.deep.out_channels[3], channels, dilations)
        self.deep_cls = nn.Conv2d(channels, num_classes, 1)
        self.fcn_aux = OutputHead(self.deep.out_channels[2], 64, num_classes, bias=True)
        self.shallow = STDCNet(2 * in_channels, (2, 2), int(shallow_base))
        self.shallow.segment_prefix = "shallow."
        c8, c16 = self.shallow.out_channels
        self.fuse16 = RelationAwareFusion(c16, channels, int(relation_groups), gate_init)
        self.fuse8 = RelationAwareFusion(c8, channels, int(relation_groups), gate_init)
        half = max(1, channels // 2)
        self.head = OutputHead(channels, half, num_classes, bias=True)
        self.aux_head16 = OutputHead(channels, half, num_classes, bias=True)
        self.aux_head8 = OutputHead(channels, half, num_classes, bias=True)
        # Back to stride 2 as in the paper (x4, x2, x2 from stride 32).
        self.sr_decoder = SRDecoder(channels, in_channels, first_scale=self.downsample)

    def _input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw ``(B, C, H, W)`` -> ``(deep input (B, C, Hp/4, Wp/4), residuals (B, 2C, Hp, Wp))``."""
        x = self.prepare_input(x)
        fine, coarse = laplacian_residuals(x, 2)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        small = F.avg_pool2d(x, self.downsample) if self.downsample > 1 else x
        return small, torch.cat([fine, coarse], dim=1)

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` and the module docstring for the outputs."""
        input_size, padded = self.sizes(x)
        small, residuals = self.segment("input", self._input, x)
        deep_maps = self.deep(small)
        deep_feat = self.segment("aspp", self.aspp, deep_maps[3])
        shallow8, shallow16 = self.shallow(residuals)
        context16, fused16 = self.segment("fuse16", self.fuse16, shallow16, deep_feat)
        context8, fused8 = self.segment("fuse8", self.fuse8, shallow8, fused16)
        logits = self.segment("head", self.head, fused8)
        if not self.training:
            return self.outputs(logits, [], input_size, padded)
        deep_logits, fcn_logits = self.segment(
            "deep_heads", lambda f, l3: (self.deep_cls(f), self.fcn_aux(l3)), deep_feat, deep_maps[2])
        aux16, aux8 = self.segment("aux_heads", lambda a, b: (self.aux_head16(a), self.aux_head8(b)), context16, context8)
        sr_feats, sr_image = self.segment("sr_decoder", self.sr_decoder, deep_feat)
        out = self.outputs(logits, [deep_logits, aux16, aux8, fcn_logits], input_size, padded)
        assert isinstance(out, dict)
        # The SR target: the two residuals summed at full resolution (no gradient: no parameters).
        target = (residuals[:, : self.in_channels] + residuals[:, self.in_channels :]).detach()
        out["sr"] = (sr_image, target)
        out["affinity"] = (deep_feat, sr_feats)
        return out

    def segment_plan(self, granularity: str) -> list[str]:
        """``input``, the deep backbone's plan, ``aspp``, the shallow backbone's plan, the fusions and heads."""
        return ["input", *self.deep.segment_plan(granularity), "aspp", *self.shallow.segment_plan(granularity),
                "fuse16", "fuse8", "head", "deep_heads", "aux_heads", "sr_decoder"]
