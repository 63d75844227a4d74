"""EHSNet's ECR over a banded scene: the scene's hard positions and keys normalised over every position."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lrss_ds.models.ecr import ECRModule
from lrss_ds.parallel.group import SpatialGroup


class _GroupSum(torch.autograd.Function):
    """Sum over the group; the gradient of every rank's copy is the group's sum of gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: SpatialGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return group.comm.all_reduce(x.clone(), group=group.group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return ctx.group.comm.all_reduce(grad.clone(), group=ctx.group.group), None


def group_sum(x: Tensor, group: SpatialGroup) -> Tensor:
    """``x`` summed over the spatial group, differentiable (a collective)."""
    return _GroupSum.apply(x, group)


def spatial_efficient_attention(q: Tensor, k: Tensor, v: Tensor, group: SpatialGroup) -> Tensor:
    """:func:`lrss_ds.models.ecr.efficient_attention` with keys and values spread over the group.

    Keys are normalised over the scene's positions: the per-channel maximum, the sum of
    exponentials and the ``(Ck, Cv)`` context are reduced over the group, so the traffic does not
    depend on the number of pixels.

    Args:
        q: ``(B, nq, Ck)`` this rank's queries.
        k: ``(B, Ck, nk)`` this rank's keys, channels first.
        v: ``(B, Cv, nk)`` this rank's values, channels first.
        group: the spatial group.

    Returns:
        ``(B, nq, Cv)`` in ``v``'s dtype.
    """
    compute = torch.promote_types(v.dtype, torch.float32)
    q = q.to(compute).softmax(dim=-1)
    k = k.to(compute)
    local_max = k.detach().amax(dim=-1) if k.shape[-1] else torch.full_like(k[..., 0], float("-inf"))
    shift = group.comm.all_reduce(local_max.clone(), op=dist.ReduceOp.MAX, group=group.group)
    weights = torch.exp(k - shift.unsqueeze(-1))  # (B, Ck, nk)
    norm = group_sum(weights.sum(dim=-1), group)  # (B, Ck)
    context = group_sum(weights @ v.to(compute).transpose(-2, -1), group) / norm.unsqueeze(-1)  # (B, Ck, Cv)
    return (q @ context).to(v.dtype)


def _ordered_keys(values: Tensor) -> Tensor:
    """float32 values to int64 keys with the same order (the sign-magnitude bits made monotonic)."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


class SpatialECR(ECRModule):
    """:class:`ECRModule` on a band: the hard positions are the scene's, keys span the scene.

    The hard set is the ``num_hard`` positions of smallest margin over the whole scene, found
    exactly: a bisection over the margins' float32 bit patterns with all-reduced counts (32
    reductions of one number per sample), then ties at the threshold taken in scene order (one
    rank's ``topk`` takes tied positions in an order of its own). Queries come from this band's
    hard positions; keys and values from every position of every band.

    Build with :meth:`from_ecr`; ``spatial`` is the :class:`SpatialGroup`.
    """

    spatial: SpatialGroup

    @classmethod
    def from_ecr(cls, ecr: ECRModule, group: SpatialGroup) -> "SpatialECR":
        """The spatial version of ``ecr``, holding its parameters."""
        new = cls.__new__(cls)
        new.__dict__.update(ecr.__dict__)
        new.spatial = group
        return new

    @torch.no_grad()
    def select_hard_band(self, aux_logits: Tensor) -> list[Tensor]:
        """Per sample, this band's flat indices of the scene's least confident positions.

        Args:
            aux_logits: ``(B, K, h, w)``.

        Returns:
            ``B`` long tensors of indices into the band's ``h * w`` positions (ascending).
        """
        if aux_logits.shape[1] < 2:
            raise ValueError(f"ECRModule: need at least 2 classes in the aux logits, got {aux_logits.shape[1]}")
        group, comm = self.spatial, self.spatial.comm
        top2 = aux_logits.float().topk(2, dim=1).values
        margins = (top2[:, 0] - top2[:, 1]).flatten(1)  # (B, n)
        total = int(comm.all_reduce(torch.tensor([margins.shape[1]], dtype=torch.int64), group=group.group)[0])
        wanted = self.num_hard(total)
        chosen = []
        for keys in _ordered_keys(margins):
            low, high = -(2**31), 2**31 - 1  # the wanted-th smallest key lies in [low, high]
            while low < high:
                middle = (low + high) // 2
                count = comm.all_reduce(torch.tensor([int((keys <= middle).sum())], dtype=torch.int64), group=group.group)
                if int(count[0]) >= wanted:
                    high = middle
                else:
                    low = middle + 1
            below = keys < low
            ties = keys == low
            counts = torch.zeros(2, group.size, dtype=torch.int64)
            counts[0, group.rank] = int(below.sum())
            counts[1, group.rank] = int(ties.sum())
            counts = comm.all_reduce(counts, group=group.group)
            needed = wanted - int(counts[0].sum())  # tied positions to take, in rank (scene) order
            take = min(max(needed - int(counts[1, : group.rank].sum()), 0), int(ties.sum()))
            tie_positions = ties.nonzero().flatten()[:take]
            chosen.append(torch.cat([below.nonzero().flatten(), tie_positions]).sort().values)
        return chosen

    def forward(self, features: Tensor, aux_logits: Tensor, return_indices: bool = False) -> Tensor | tuple[Tensor, Any]:
        """Enhance the band's share of the scene's hard positions of ``features (B, C, h, w)``."""
        if features.shape[-2:] != aux_logits.shape[-2:]:
            raise ValueError(
                f"ECRModule: features {tuple(features.shape)} and aux logits {tuple(aux_logits.shape)} differ in size"
            )
        channels = features.shape[1]
        hard_idx = self.select_hard_band(aux_logits)
        flat = features.flatten(2)  # (B, C, N)
        keys = self.key(features).flatten(2)  # (B, Ck, N)
        values = self.value(features).flatten(2)  # (B, Cv, N)
        outs = []
        for b, idx in enumerate(hard_idx):
            gather_idx = idx.view(1, 1, -1).expand(1, channels, idx.numel())
            hard = flat[b : b + 1].gather(2, gather_idx).transpose(1, 2)  # (1, n_b, C)
            queries = self.query(hard)
            attended = self._spatial_heads(queries, keys[b : b + 1], values[b : b + 1])
            enhanced = hard + self.reproject(attended)
            outs.append(flat[b : b + 1].scatter(2, gather_idx, enhanced.transpose(1, 2).to(flat.dtype)))
        out = torch.cat(outs).view_as(features)
        return (out, hard_idx) if return_indices else out

    def _spatial_heads(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        chunks = zip(queries.chunk(self.heads, dim=-1), keys.chunk(self.heads, dim=1), values.chunk(self.heads, dim=1))
        return torch.cat([spatial_efficient_attention(q, k, v, self.spatial) for q, k, v in chunks], dim=-1)
