"""The EHSNet efficient cross-correlation (ECR) module: efficient attention on hard positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lrss_ds.models.pointwise import PositionProjection


def efficient_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Efficient attention (Shen et al., WACV 2021) on already projected queries/keys/values.

    ``out = softmax_feat(q) @ (softmax_pos(k) @ v^T)``: queries are normalised over their
    feature dimension, keys over positions, and the ``(Ck, Cv)`` context is formed before
    the queries touch it, so memory is ``O(N * C + C^2)``, never ``O(Nq * Nk)``. Keys and
    values come channels-first, as a 1x1 projection of an NCHW map leaves them: the key
    softmax then runs over contiguous positions and its backward copies nothing.

    Args:
        q: ``(B, Nq, Ck)`` queries.
        k: ``(B, Ck, Nk)`` keys, channels first.
        v: ``(B, Cv, Nk)`` values, channels first.

    Returns:
        ``(B, Nq, Cv)`` in ``v``'s dtype.
    """
    # In at least float32 whatever the input dtype: the key softmax runs over up to ~10^6 positions
    # and the context sums over all of them.
    compute = torch.promote_types(v.dtype, torch.float32)
    q = q.to(compute).softmax(dim=-1)
    k = k.to(compute).softmax(dim=-1)
    context = k @ v.to(compute).transpose(-2, -1)  # (B, Ck, Cv)
    return (q @ context).to(v.dtype)


class ECRModule(nn.Module):
    """Gather the least confident positions, enhance them by efficient attention, scatter back.

    EHSNet §3.3, Eqs. (2)-(5). The confidence of a position is the margin between the top-2
    auxiliary logits. The paper says "sort the difference by descending and select the
    maximum a%", which would pick the *most* confident positions, but also calls the result
    the "hard region with low confidence"; we follow the latter: the ``hard_ratio`` fraction
    of positions with the *smallest* margin. Queries come from those positions, keys and
    values from all positions (Eq. 4, ``theta(F_in, F_hard)``). As in Shen et al.'s module,
    the attended values are re-projected by a 1x1 and *added* to the gathered features
    (residual), then scattered back; every other position is passed through bit-identical.

    Args:
        channels: ``C`` of the feature map.
        hard_ratio: fraction ``a`` of positions enhanced (paper: 0.1); at least one.
        key_channels: query/key channels (default ``max(1, C // 2)``).
        value_channels: value channels (default ``max(1, C // 2)``).
        heads: attention heads; key and value channels must divide by it.

    Raises:
        ValueError: ratio outside (0, 1] or channels not divisible by ``heads``.
    """

    def __init__(
        self,
        channels: int,
        hard_ratio: float = 0.1,
        key_channels: int | None = None,
        value_channels: int | None = None,
        heads: int = 1,
    ) -> None:
        super().__init__()
        if not 0.0 < hard_ratio <= 1.0:
            raise ValueError(f"ECRModule: hard_ratio must be in (0, 1], got {hard_ratio}")
        key_channels = key_channels or max(1, channels // 2)
        value_channels = value_channels or max(1, channels // 2)
        if key_channels % heads or value_channels % heads:
            raise ValueError(f"ECRModule: key/value channels {key_channels}/{value_channels} not divisible by heads {heads}")
        self.hard_ratio = hard_ratio
        self.heads = heads
        self.query = nn.Linear(channels, key_channels)
        self.key = PositionProjection(channels, key_channels)  # (B, Ck, N), channels first
        self.value = PositionProjection(channels, value_channels)
        self.reproject = nn.Linear(value_channels, channels)

    def num_hard(self, positions: int) -> int:
        """How many of ``positions`` are enhanced: ``max(1, round(hard_ratio * positions))``."""
        return min(positions, max(1, int(math.floor(self.hard_ratio * positions + 0.5))))

    @torch.no_grad()
    def select_hard(self, aux_logits: Tensor) -> Tensor:
        """Flat indices of the least confident positions (smallest top-1 minus top-2 margin).

        Args:
            aux_logits: ``(B, K, h, w)`` with ``K >= 2``.

        Returns:
            ``hard_idx`` ``(B, n)`` long, indices into the flattened ``h * w`` positions,
            sorted by increasing margin (ties in the order ``torch.topk`` returns them).
        """
        if aux_logits.shape[1] < 2:
            raise ValueError(f"ECRModule: need at least 2 classes in the aux logits, got {aux_logits.shape[1]}")
        top2 = aux_logits.float().topk(2, dim=1).values  # (B, 2, h, w)
        margin = (top2[:, 0] - top2[:, 1]).flatten(1)  # (B, h*w)
        n = self.num_hard(margin.shape[1])
        return margin.topk(n, dim=1, largest=False, sorted=True).indices

    def forward(self, features: Tensor, aux_logits: Tensor, return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Enhance the hard positions of ``features``.

        Args:
            features: ``F_in`` ``(B, C, h, w)``.
            aux_logits: ``(B, K, h, w)`` auxiliary logits at the same size.
            return_indices: also return ``hard_idx`` (for tests and inspection).

        Returns:
            ``F_out`` ``(B, C, h, w)``; with ``return_indices``, ``(F_out, hard_idx (B, n))``.
        """
        if features.shape[-2:] != aux_logits.shape[-2:]:
            raise ValueError(
                f"ECRModule: features {tuple(features.shape)} and aux logits {tuple(aux_logits.shape)} differ in size"
            )
        batch, channels = features.shape[:2]
        hard_idx = self.select_hard(aux_logits)  # (B, n)
        flat = features.flatten(2)  # (B, C, N)
        gather_idx = hard_idx.unsqueeze(1).expand(batch, channels, hard_idx.shape[1])  # (B, C, n)
        hard = flat.gather(2, gather_idx).transpose(1, 2)  # F_hard (B, n, C)
        keys = self.key(features).flatten(2)  # (B, Ck, N); flatten: a pickled model's plain 1x1 conv
        values = self.value(features).flatten(2)  # (B, Cv, N)
        queries = self.query(hard)  # (B, n, Ck)
        attended = self._multi_head(queries, keys, values)  # (B, n, Cv)
        enhanced = hard + self.reproject(attended)  # F_conf (B, n, C)
        out = flat.scatter(2, gather_idx, enhanced.transpose(1, 2).to(flat.dtype))
        out = out.view_as(features)
        return (out, hard_idx) if return_indices else out

    def _multi_head(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Efficient attention per head on channel slices, heads concatenated."""
        if self.heads == 1:
            return efficient_attention(queries, keys, values)
        outs = [
            efficient_attention(q, k, v)
            for q, k, v in zip(
                queries.chunk(self.heads, dim=-1), keys.chunk(self.heads, dim=1), values.chunk(self.heads, dim=1)
            )
        ]
        return torch.cat(outs, dim=-1)
