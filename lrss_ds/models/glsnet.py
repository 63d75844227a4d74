"""GLSNet: a shallow global branch on the whole image, a deep local branch on crops, GL-Deep Fusion.

Liang, Huang & Mao, "Global-Local Deep Fusion: Semantic Integration with Enhanced Transformer
in Dual-Branch Networks for Ultra-High Resolution Image Segmentation" (preprint 2024; text in
``shared/papers/glsnet.txt``). Composition (segmentation_models_pytorch style)::

    global_branch : ResNet-18 on the WHOLE (padded) image, no downsampling
                    -> proj (1x1 conv + BN + ReLU to d_model) -> aux_head (global logits)
    local_branch  : ResNet-50 on every crop of the image
                    -> proj (1x1 conv + BN + ReLU to d_model) -> aux_head (local logits)
    fusion        : GL-Deep Fusion, per crop (two cross-attention encoders + one decoder)
    head          : 1x1 conv on the fused tokens (main logits)

Where the paper is vague, this is what we do and why:

* **Tokens.** No FPN (Table 4 lists FPN only for the Deep-Deep variant), so each branch
  gives its last-stage map (layer4). The local branch runs at ``local_stride`` (default 16:
  layer4 dilated as in DeepLabv3, because stride-32 logits are too coarse for 9 cm cars);
  the global branch at ``global_stride`` (default 32: the plain ResNet-18, cheap on the whole
  image). A crop of ``ch x cw`` pixels at ``(r0, c0)`` gives ``Ll = (ch/ls)(cw/ls)`` local
  tokens (its own layer4 map) and ``Lg = (ch + 2m)/gs * (cw + 2m)/gs`` global tokens: the
  whole-image global map inside the crop's window enlarged by ``m = global_context`` pixels on
  each side. Global positions outside the padded image are zeros and are masked out
  wherever global tokens serve as keys/values (their own query rows in the first encoder
  are computed and then never read). ``global_context=0`` is the literal reading (global
  tokens aligned with the crop, no mask).
* **Projections.** The paper takes Q from the global features and K = V from the local
  ones "directly", without W_Q/W_K/W_V. The two branches have 512 and 2048 channels, so a dot
  product needs one shared width: each branch has ONE projection (``proj``: 1x1 conv + BN +
  ReLU to ``d_model``), used for every role its tokens play. The attention itself has no
  Q/K/V/output projections. ``num_heads > 1`` splits the channels into groups (no
  projections either); the default 1 is Eq. (1) as written. No positional encoding (the
  paper mentions none; each token keeps its own position through the residual).
* **Encoders and decoder.** Each attention is followed by a residual Add & LayerNorm, and
  there is NO feed-forward network (§3.2)::

      GL  = LN_gl (G + Attn(Q=G,  K=L,  V=L))     global-local sequence, Lg tokens  (Eq. 2)
      LG  = LN_lg (L + Attn(Q=L,  K=G,  V=G))     local-global sequence, Ll tokens  (Eq. 3)
      OUT = LN_dec(LG + Attn(Q=LG, K=GL, V=GL))   decoder, Ll tokens on the crop's local grid

  The decoder queries with the local-global sequence so that its output lies on the crop's
  (finer) local grid and can be classified per pixel; it reads the global-local sequence as
  its memory, as a transformer decoder reads its encoder. Every attention is Ll x Lg per
  crop (<= 1024 x 1024 at the defaults), never quadratic in the image; all use
  :func:`torch.nn.functional.scaled_dot_product_attention`.
* **Outputs.** Main logits from ``head`` on the decoder output (stride ``local_stride``);
  the two auxiliary losses of §4.2 are on the global branch's logits (whole image, stride
  ``global_stride``) and the local branch's logits (crops stitched, stride ``local_stride``).
* **Tiling.** The image is cut into a grid of equal, non-overlapping crops of at most
  ``crop_size`` (default 512, a multiple of 32, the DeepGlobe/GLNet patch size rounded to the
  ResNet stride): per axis ``n = ceil(H32 / crop_size)`` crops of ``ceil(H32 / n / 32) * 32``
  pixels, where ``H32`` is H rounded up to 32, so the padding stays below ``32 n`` pixels.
  The image is normalised then zero-padded to ``n * crop`` (0 = the band mean). The global
  branch runs ONCE on the whole padded image; crops go through the local branch, fusion
  and head ``crop_batch`` at a time, each crop with its window of the shared global map.
* **Learning rates** (§4.2, after GLNet): the global branch (``global_branch.*``: ResNet-18,
  its proj and aux head) gets 1e-4 and the local branch (``local_branch.*``: ResNet-50, its
  proj and aux head) 2e-5. The paper does not place the fusion; ``fusion.*`` and ``head.*``
  are freshly initialised (no pretrained weights to protect), so they get the global/base
  rate 1e-4. This is what the engine's name-prefix ``group_lrs: {global: 1e-4, local: 2e-5}``
  with base ``lr: 1e-4`` does, and what :meth:`GLSNet.param_groups` returns.

BatchNorm in train mode normalises each chunk of ``crop_batch`` crops with that chunk's own
statistics, so train-mode outputs depend on ``crop_batch``; eval-mode outputs do not.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel, refuse_unknown_options
from lrss_ds.models.resnet import LAYOUTS, ResNet
from lrss_ds.models.tiling import TILE_MULTIPLE, Tiling, crop_raw, image_mask, plan_tiling, stitch

STRIDE_DILATION: dict[int, tuple[bool, bool, bool]] = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}
"""Output stride of layer4 -> torchvision's ``replace_stride_with_dilation`` flags."""


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def tokens(fmap: Tensor) -> Tensor:
    """``(N, d, h, w)`` feature map -> ``(N, h * w, d)`` token sequence (row-major)."""
    return fmap.flatten(2).transpose(1, 2)


class Branch(nn.Module):
    """A backbone, its projection to the fusion width and an auxiliary classifier.

    Args:
        depth: ResNet depth (18 for the global branch, 50 for the local one).
        in_channels: input bands.
        output_stride: layer4's stride (32, 16 or 8).
        d_model: token width.
        num_classes: K of the auxiliary logits.
        prefix: segment-name prefix of the backbone (``"global."`` / ``"local."``).
    """

    def __init__(
        self, depth: int, in_channels: int, output_stride: int, d_model: int, num_classes: int, prefix: str
    ) -> None:
        super().__init__()
        self.backbone = ResNet(depth, in_channels, STRIDE_DILATION[output_stride])
        self.backbone.segment_prefix = prefix
        self.proj = _conv_bn_relu(self.backbone.out_channels[-1], d_model)
        self.aux_head = nn.Conv2d(d_model, num_classes, 1)


class CrossAttention(nn.Module):
    """``LN(q + softmax(q k^T / sqrt(d_h)) k)`` with keys = values and no projections.

    Args:
        d_model: token width d.
        num_heads: channel groups attended separately (d must divide by it).
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, memory: Tensor, memory_valid: Tensor | None = None) -> Tensor:
        """Attend from ``query`` to ``memory``.

        Args:
            query: ``(N, Lq, d)``.
            memory: ``(N, Lk, d)``, used as both keys and values.
            memory_valid: ``(N, Lk)`` bool, False for memory tokens to ignore, or ``None``.

        Returns:
            ``(N, Lq, d)``.
        """
        n, lq, d = query.shape
        h = self.num_heads
        q = query.reshape(n, lq, h, d // h).transpose(1, 2)
        kv = memory.reshape(n, memory.shape[1], h, d // h).transpose(1, 2)
        mask = None if memory_valid is None else memory_valid[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)
        return self.norm(query + attended.transpose(1, 2).reshape(n, lq, d))


class GLDeepFusion(nn.Module):
    """GL-Deep Fusion (§3.2): two cross-attention encoders and one decoder, no FFN.

    Args:
        d_model: token width of both branches.
        num_heads: channel groups per attention.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.global_local = CrossAttention(d_model, num_heads)
        self.local_global = CrossAttention(d_model, num_heads)
        self.decoder = CrossAttention(d_model, num_heads)

    def forward(self, global_tokens: Tensor, local_tokens: Tensor, global_valid: Tensor | None) -> Tensor:
        """Fuse one crop's global and local tokens.

        Args:
            global_tokens: ``(N, Lg, d)``, the global map in the crop's (enlarged) window.
            local_tokens: ``(N, Ll, d)``, the crop's local map.
            global_valid: ``(N, Lg)`` bool (False = outside the image) or ``None`` (all valid).

        Returns:
            ``(N, Ll, d)`` fused tokens on the local grid.
        """
        global_local = self.global_local(global_tokens, local_tokens)  # Eq. (2)
        local_global = self.local_global(local_tokens, global_tokens, global_valid)  # Eq. (3)
        return self.decoder(local_global, global_local, global_valid)


class GLSNet(SegmentationModel):
    """GLSNet for whole-image segmentation (see the module docstring for every design choice).

    Args:
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean for the normaliser (raw units), ``None`` = 0.
        band_std: per-band std, ``None`` = 1.
        crop_size: largest local crop side in pixels, a multiple of 32 (default 512).
        d_model: token width of the fusion (default 256).
        num_heads: attention channel groups (default 1, Eq. 1 as written).
        global_depth: ResNet depth of the global branch (18; 50 gives the "Deep-Deep" ablation
            without its FPN).
        local_depth: ResNet depth of the local branch (50; 18 gives "Shallow-Shallow").
        global_stride: output stride of the global branch, 8, 16 or 32 (default 32).
        local_stride: output stride of the local branch and of the main logits (default 16).
        global_context: pixels of global map added on each side of a crop's window, a
            multiple of ``global_stride`` (default 256).
        crop_batch: crops run through the local branch together (default 4).

    Raises:
        ConfigError: for an option out of range.
    """

    name = "glsnet"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        crop_size: int = 512,
        d_model: int = 256,
        num_heads: int = 1,
        global_depth: int = 18,
        local_depth: int = 50,
        global_stride: int = 32,
        local_stride: int = 16,
        global_context: int = 256,
        crop_batch: int = 4,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            band_mean,
            band_std,
            crop_size=crop_size,
            d_model=d_model,
            num_heads=num_heads,
            global_depth=global_depth,
            local_depth=local_depth,
            global_stride=global_stride,
            local_stride=local_stride,
            global_context=global_context,
            crop_batch=crop_batch,
        )
        _check_options(
            crop_size, d_model, num_heads, global_depth, local_depth, global_stride, local_stride, crop_batch
        )
        if global_context < 0 or global_context % global_stride:
            raise ConfigError(
                "global_context", f"must be a multiple of global_stride={global_stride} >= 0, got {global_context}"
            )
        self.crop_size = crop_size
        self.global_stride = global_stride
        self.local_stride = local_stride
        self.output_stride = local_stride
        self.pad_multiple = TILE_MULTIPLE
        self.global_context = global_context
        self.crop_batch = crop_batch
        self.global_branch = Branch(global_depth, self.in_channels, global_stride, d_model, self.num_classes, "global.")
        self.local_branch = Branch(local_depth, self.in_channels, local_stride, d_model, self.num_classes, "local.")
        self.fusion = GLDeepFusion(d_model, num_heads)
        self.head = nn.Conv2d(d_model, self.num_classes, 1)

    # ----------------------------------------------------------------- sizes and groups
    def tiling(self, size: tuple[int, int]) -> Tiling:
        """The crop grid used for an ``(H, W)`` input."""
        return plan_tiling(size, self.crop_size)

    def sizes(self, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(input_size, padded_size)`` of ``x (B, C, H, W)``: padded to the crop grid."""
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        return input_size, self.tiling(input_size).padded

    def param_groups(self, lr_global: float, lr_local: float, lr_fusion: float | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups with the paper's two learning rates.

        Args:
            lr_global: for ``global_branch`` (ResNet-18, proj, aux head); 1e-4 in the paper.
            lr_local: for ``local_branch`` (ResNet-50, proj, aux head); 2e-5 in the paper.
            lr_fusion: for ``fusion`` and ``head``; ``None`` = ``lr_global``.

        Returns:
            ``[{"name", "params", "lr"}, ...]`` covering every parameter once.
        """
        fusion = [*self.fusion.parameters(), *self.head.parameters()]
        return [
            {"name": "global", "params": list(self.global_branch.parameters()), "lr": lr_global},
            {"name": "local", "params": list(self.local_branch.parameters()), "lr": lr_local},
            {"name": "fusion", "params": fusion, "lr": lr_global if lr_fusion is None else lr_fusion},
        ]

    def pretrained_backbones(self) -> dict[str, str]:
        """Submodule path -> torchvision architecture whose ImageNet file fits it."""
        return {
            "global_branch.backbone": f"resnet{self.global_branch.backbone.depth}",
            "local_branch.backbone": f"resnet{self.local_branch.backbone.depth}",
        }

    # ----------------------------------------------------------------- the two branches
    def global_features(self, x: Tensor, padded: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Run the global branch once on the whole image.

        Args:
            x: ``(B, C, H, W)`` raw bands.
            padded: ``(Hp, Wp)``, the tiling's padded size.

        Returns:
            ``(global_map (B, d, Hp/gs, Wp/gs), global_logits (B, K, Hp/gs, Wp/gs))``.
        """

        def prepare(t: Tensor) -> Tensor:
            t = self.normalizer(t)
            return F.pad(t, (0, padded[1] - t.shape[-1], 0, padded[0] - t.shape[-2]))

        features = self.global_branch.backbone(x, input_transform=prepare)
        global_map = self.segment("global.proj", self.global_branch.proj, features[-1])
        return global_map, self.segment("global.aux_head", self.global_branch.aux_head, global_map)

    def global_windows(
        self, global_map: Tensor, windows: list[tuple[int, tuple[int, int, int, int]]]
    ) -> tuple[Tensor, Tensor | None]:
        """Cut each crop's global tokens out of the shared global map.

        Args:
            global_map: ``(B, d, Hp/gs, Wp/gs)``.
            windows: ``[(image index, (r0, c0, ch, cw)), ...]`` in padded pixels.

        Returns:
            ``(N, d, (ch + 2m)/gs, (cw + 2m)/gs)`` windows (zeros outside the map) and an
            ``(N, Lg)`` bool validity mask, or ``None`` when every token is inside the map.
        """
        gs, margin = self.global_stride, self.global_context // self.global_stride
        map_h, map_w = int(global_map.shape[-2]), int(global_map.shape[-1])
        padded_map = F.pad(global_map, (margin, margin, margin, margin)) if margin else global_map
        parts, boxes = [], []
        for b, (r0, c0, ch, cw) in windows:
            rows = slice(r0 // gs, (r0 + ch) // gs + 2 * margin)
            cols = slice(c0 // gs, (c0 + cw) // gs + 2 * margin)
            parts.append(padded_map[b, :, rows, cols])
            boxes.append((rows, cols))
        window = torch.stack(parts)
        # decided from the geometry, not from data, so that the model also runs on meta tensors
        if all(r.start >= margin and r.stop <= map_h + margin and c.start >= margin and c.stop <= map_w + margin
               for r, c in boxes):
            return window, None
        inside = torch.ones(map_h, map_w, dtype=torch.bool, device=global_map.device)
        inside = F.pad(inside[None], (margin, margin, margin, margin), value=False)[0]
        return window, torch.stack([inside[r, c].reshape(-1) for r, c in boxes])

    def crop_forward(self, crops: Tensor, valid: Sequence[tuple[int, int]], global_window: Tensor,
                     global_valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Local branch, fusion and head for a batch of crops.

        Args:
            crops: ``(N, C, ch, cw)`` raw bands, zero beyond each crop's valid part.
            valid: per crop ``(valid_h, valid_w)``, the part that is image (the rest is
                set to 0 after normalisation, exactly as the padded whole image).
            global_window: ``(N, d, gh, gw)`` from :meth:`global_windows`.
            global_valid: ``(N, gh * gw)`` bool or ``None``.

        Returns:
            ``(main_logits (N, K, ch/ls, cw/ls), local_logits (N, K, ch/ls, cw/ls))``.
        """
        keep = image_mask(valid, (int(crops.shape[-2]), int(crops.shape[-1])), crops.device)

        def prepare(t: Tensor) -> Tensor:
            t = self.normalizer(t)
            return t if keep is None else t * keep

        features = self.local_branch.backbone(crops, input_transform=prepare)
        local_map = self.segment("local.proj", self.local_branch.proj, features[-1])
        local_logits = self.segment("local.aux_head", self.local_branch.aux_head, local_map)
        fused = self.segment("fusion", self._fuse, global_window, local_map, global_valid)
        return self.segment("head", self.head, fused), local_logits

    def _fuse(self, global_window: Tensor, local_map: Tensor, global_valid: Tensor | None) -> Tensor:
        n, d, h, w = local_map.shape
        fused = self.fusion(tokens(global_window), tokens(local_map), global_valid)
        return fused.transpose(1, 2).reshape(n, d, h, w)

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment whole images.

        Args:
            x: ``(B, C, H, W)`` raw bands, any dtype and size.

        Returns:
            eval: logits ``(B, K, H, W)``. train: ``dict(logits=(B, K, Hp/ls, Wp/ls),
            aux=[global_logits (B, K, Hp/gs, Wp/gs), local_logits (B, K, Hp/ls, Wp/ls)],
            input_size=(H, W), padded_size=(Hp, Wp))``.
        """
        input_size, padded = self.sizes(x)
        tiling = self.tiling(input_size)
        global_map, global_logits = self.global_features(x, padded)
        jobs = [(b, window) for b in range(x.shape[0]) for window in tiling.windows()]
        mains: list[Tensor] = []
        locals_: list[Tensor] = []
        for start in range(0, len(jobs), self.crop_batch):
            chunk = jobs[start : start + self.crop_batch]
            cut = [crop_raw(x[b], window) for b, window in chunk]
            window_tokens, window_valid = self.global_windows(global_map, chunk)
            main, local = self.crop_forward(
                torch.stack([c for c, _ in cut]), [v for _, v in cut], window_tokens, window_valid
            )
            mains.append(main)
            locals_.append(local)
        logits = stitch(torch.cat(mains), tiling, x.shape[0])
        local_logits = stitch(torch.cat(locals_), tiling, x.shape[0])
        return self.outputs(logits, [global_logits, local_logits], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """Segments to checkpoint: both backbones' plans (prefixed) plus ``fusion``.

        Args:
            granularity: ``"stage"``, ``"fine"`` or ``"block"`` (see :meth:`ResNet.segment_plan`).

        Returns:
            ``global.*`` names, then ``local.*`` names, then ``fusion``. The local ones are
            run once per crop chunk, so they checkpoint every chunk.
        """
        return [
            *self.global_branch.backbone.segment_plan(granularity),
            *self.local_branch.backbone.segment_plan(granularity),
            "fusion",
        ]


def _check_options(
    crop_size: int,
    d_model: int,
    num_heads: int,
    global_depth: int,
    local_depth: int,
    global_stride: int,
    local_stride: int,
    crop_batch: int,
) -> None:
    """Refuse options the model cannot honour, naming the option."""
    if crop_size < TILE_MULTIPLE or crop_size % TILE_MULTIPLE:
        raise ConfigError("crop_size", f"must be a positive multiple of {TILE_MULTIPLE}, got {crop_size}")
    if num_heads < 1 or d_model < 1 or d_model % num_heads:
        raise ConfigError("num_heads", f"d_model={d_model} must be a positive multiple of num_heads={num_heads}")
    for key, depth in (("global_depth", global_depth), ("local_depth", local_depth)):
        if depth not in LAYOUTS:
            raise ConfigError(key, f"must be one of {sorted(LAYOUTS)}, got {depth}")
    for key, stride in (("global_stride", global_stride), ("local_stride", local_stride)):
        if stride not in STRIDE_DILATION:
            raise ConfigError(key, f"must be one of {sorted(STRIDE_DILATION)}, got {stride}")
    if crop_batch < 1:
        raise ConfigError("crop_batch", f"must be >= 1, got {crop_batch}")


def build_glsnet(
    num_classes: int,
    in_channels: int,
    band_mean: Sequence[float] | None = None,
    band_std: Sequence[float] | None = None,
    **options: Any,
) -> GLSNet:
    """Build GLSNet (the ``"glsnet"`` entry of ``MODEL_BUILDERS``).

    Args:
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean (raw units) or ``None``.
        band_std: per-band std or ``None``.
        **options: :class:`GLSNet` options (``crop_size``, ``d_model``, ``num_heads``,
            ``global_depth``, ``local_depth``, ``global_stride``, ``local_stride``,
            ``global_context``, ``crop_batch``).

    Returns:
        the model.

    Raises:
        ConfigError: for an unknown option or a value out of range.
    """
    refuse_unknown_options(GLSNet, options)
    return GLSNet(num_classes, in_channels, band_mean, band_std, **options)
