"""Depth-wise convolutions with large kernels, dispatched to the fastest exact method.

Why this exists: with PyTorch's CPU kernels a depth-wise ``K x K`` convolution is fast
(oneDNN, 100-180 GFLOP/s on this machine) only for some shapes: in NCHW for ``K <= 13``,
in channels-last for every ``K`` we tried (up to 31). A 15x15 or 31x31 in NCHW falls
back to a generic kernel at ~5 GFLOP/s. Worse, the *weight* gradient of a depth-wise
convolution runs at 0.2-7 GFLOP/s in every memory format and for every ``K``, so in
training it dominates the whole LRD module. The method used here on CPU:

- forward: ``F.conv2d`` in the memory format that oneDNN runs fast for ``K`` (the input's
  own format if it is fast, else channels-last), returned in the input's format;
- input gradient: the same fast forward convolution of the output gradient with the
  flipped kernel (the exact adjoint of a stride-1 'same' convolution);
- weight gradient: the cross-correlation of the input with the output gradient, evaluated
  at the ``K x K`` lags only, through real FFTs (cost independent of ``K``), summed over
  the batch in the frequency domain, in channel chunks to bound the temporaries.

All three are exact in real arithmetic; in float32 they match ``F.conv2d``'s values and
gradients to ~1e-6 relative (the FFT rounds differently, not less accurately). bf16
inputs are convolved in bf16 and the weight gradient is computed in float32 and cast.
On other devices (CUDA has cuDNN) ``"auto"`` is the plain ``F.conv2d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

METHODS: tuple[str, ...] = ("auto", "direct", "fast")

# Largest kernel that oneDNN runs fast for a depth-wise conv in NCHW on CPU (measured,
# benchmarks/results/lrd_kernels.md); channels-last is fast for all sizes measured.
NCHW_FAST_MAX_KERNEL = 13
# Below this the weight gradient is small enough that PyTorch's own backward is fine.
FFT_GRAD_MIN_KERNEL = 7
# Float32 elements per FFT chunk (~128 MiB of real plane per transform).
FFT_CHUNK_ELEMENTS = 1 << 25


def next_fast_len(n: int) -> int:
    """The smallest ``m >= n`` whose prime factors are all 2, 3, 5 or 7 (fast for pocketfft)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _is_channels_last(x: Tensor) -> bool:
    """True when ``x`` is laid out channels-last (and not also plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def native_bf16_cpu() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _conv_fast_format(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depth-wise 'same' conv in a memory format oneDNN runs fast, returned in ``x``'s format.

    On a CPU without native bf16 a bf16 depth-wise convolution runs at 0.2 GFLOP per CPU-second
    (EHSNet-W18's LRD at 2048 x 2048, an AVX2 EPYC: 28x its floor, two thirds of the bf16
    prediction's time, ``benchmarks/inference_profile.py --bf16``), so it runs in float32 there
    and is rounded back to bf16.
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16_cpu():
        with torch.autocast("cpu", enabled=False):
            out = _conv_fast_format(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)
    if torch.is_autocast_enabled("cpu") and x.device.type == "cpu" and x.dtype == torch.float32 \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not native_bf16_cpu():
        with torch.autocast("cpu", enabled=False):
            out = _conv_fast_format(x, weight.float(), None if bias is None else bias.float())
        return out.to(torch.bfloat16)
    kernel = weight.shape[-1]
    channels_last_in = _is_channels_last(x)
    if channels_last_in or kernel <= NCHW_FAST_MAX_KERNEL:
        return F.conv2d(x, weight, bias, padding=kernel // 2, groups=x.shape[1])
    out = F.conv2d(
        x.contiguous(memory_format=torch.channels_last),
        weight.contiguous(memory_format=torch.channels_last),
        bias,
        padding=kernel // 2,
        groups=x.shape[1],
    )
    return out.contiguous()


def depthwise_weight_grad_fft(x: Tensor, grad_out: Tensor, kernel_size: int) -> Tensor:
    """Weight gradient of a depth-wise 'same' convolution, through real FFTs.

    ``dW[c, i, j] = sum_{b, y, x} g[b, c, y, x] * x[b, c, y + i - p, x + j - p]`` with
    ``p = K // 2`` (zero outside the image), i.e. the cross-correlation of input and output
    gradient at lags ``-p..p``. Zero-padding the FFT to ``>= H + p`` rows and ``>= W + p``
    columns makes the circular correlation equal the linear one at those lags.

    Args:
        x: ``(B, C, H, W)`` the convolution's input.
        grad_out: ``(B, C, H, W)`` the gradient of its output.
        kernel_size: ``K``, odd.

    Returns:
        ``(C, 1, K, K)`` in ``x``'s dtype.
    """
    batch, channels, height, width = x.shape
    pad = kernel_size // 2
    fft_h, fft_w = next_fast_len(height + pad), next_fast_len(width + pad)
    rows = torch.cat([torch.arange(fft_h - pad, fft_h), torch.arange(0, pad + 1)]).to(x.device)
    cols = torch.cat([torch.arange(fft_w - pad, fft_w), torch.arange(0, pad + 1)]).to(x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    chunk = max(1, FFT_CHUNK_ELEMENTS // (batch * fft_h * fft_w))
    out = []
    for start in range(0, channels, chunk):
        xs = x[:, start : start + chunk].to(compute)
        gs = grad_out[:, start : start + chunk].to(compute)
        spec = torch.fft.rfft2(xs, s=(fft_h, fft_w)) * torch.fft.rfft2(gs, s=(fft_h, fft_w)).conj()
        spec = spec.sum(0)  # (c, fft_h, fft_w // 2 + 1): batch summed before inverting
        # Inverse along H for all rows, keep only the 2p+1 lag rows, then along W: half
        # the cost of a full irfft2 for the K x K lags we need.
        spec = torch.fft.ifft(spec, dim=-2).index_select(-2, rows)
        corr = torch.fft.irfft(spec, n=fft_w, dim=-1).index_select(-1, cols)
        out.append(corr)
    return torch.cat(out).unsqueeze(1).to(x.dtype)


class _FastDepthwise(torch.autograd.Function):
    """Depth-wise conv with a fast-format forward/input-gradient and an FFT weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _conv_fast_format(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Adjoint of a stride-1 'same' conv with odd K: the conv with the flipped kernel.
            # Under autocast the forward ran in the autocast dtype while x and weight are
            # saved in their own: convolve in the gradient's dtype, return in x's.
            grad_x = _conv_fast_format(grad_out, weight.to(grad_out.dtype).flip(-2, -1), None).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad_fft(x, grad_out, weight.shape[-1]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            accumulate = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            grad_b = grad_out.sum(dim=(0, 2, 3), dtype=accumulate).to(grad_out.dtype)
        return grad_x, grad_w, grad_b


def resolve_method(method: str, kernel_size: int, device: torch.device) -> str:
    """What ``method`` means for this kernel and device: ``"direct"`` or ``"fast"``.

    ``"auto"`` is ``"fast"`` on CPU for ``K >= 7`` (measured faster in forward and backward
    for 7, 15 and 31) and ``"direct"`` otherwise (small kernels, CUDA/cuDNN).
    """
    if method != "auto":
        return method
    if device.type == "cpu" and kernel_size >= FFT_GRAD_MIN_KERNEL:
        return "fast"
    return "direct"


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, method: str = "auto") -> Tensor:
    """Depth-wise 'same' convolution (odd kernel, stride 1, zero padding ``K // 2``).

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(C, 1, K, K)`` with ``K`` odd.
        bias: ``(C,)`` or None.
        method: ``"auto"`` picks the fastest exact method for the kernel size and device
            (:func:`resolve_method`); ``"direct"`` is ``F.conv2d(..., groups=C)`` with
            PyTorch's own backward; ``"fast"`` is the fast-format forward and FFT weight
            gradient described in the module docstring.

    Returns:
        ``(B, C, H, W)`` in ``x``'s memory format, equal to
        ``F.conv2d(x, weight, bias, padding=K // 2, groups=C)``.

    Raises:
        ValueError: unknown method, non-square or even kernel, or channel mismatch.
    """
    if method not in METHODS:
        raise ValueError(f"depthwise_conv2d: unknown method {method!r}; choose from {METHODS}")
    kernel = weight.shape[-1]
    if kernel % 2 == 0 or weight.shape[-2] != kernel or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d: weight must be (C, 1, K, K) with K odd, got {tuple(weight.shape)}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise_conv2d: weight has {weight.shape[0]} channels, input {x.shape[1]}")
    if resolve_method(method, kernel, x.device) == "fast":
        return _FastDepthwise.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=kernel // 2, groups=x.shape[1])


class DepthwiseConv2d(nn.Module):
    """A ``K x K`` depth-wise 'same' convolution that runs the fastest exact method.

    The parameters have the standard layout of ``nn.Conv2d(C, C, K, padding=K // 2,
    groups=C)`` (``weight (C, 1, K, K)``, ``bias (C,)``), so state dicts are interchangeable.

    Args:
        channels: ``C``, input = output channels.
        kernel_size: ``K``, odd.
        bias: whether to add a learned bias.
        method: see :func:`depthwise_conv2d`.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, method: str = "auto") -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"DepthwiseConv2d: kernel_size must be odd and positive, got {kernel_size}")
        if method not in METHODS:
            raise ValueError(f"DepthwiseConv2d: unknown method {method!r}; choose from {METHODS}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.method = method
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as ``nn.Conv2d`` does (Kaiming-uniform, fan-in ``K * K``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.kernel_size * self.kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return depthwise_conv2d(x, self.weight, self.bias, self.method)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, method={self.method}"
