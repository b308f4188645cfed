"""Weight gradients of small-image convolutions as one matrix product, on CPU.

Why: profiling the CIFAR VGG19 training step on this project's CPU (2-core Xeon with AMX, torch
2.14.1, bf16 autocast, channels_last, batch 128) put 71% of the step in ``convolution_backward``,
and most of that in oneDNN's weight gradient of the late, wide layers on small images: for a
512->512 3x3 conv on 2x2 pixels it took 37-55 ms against 3.4-4.7 ms for the same sum done as
im2col + one GEMM (``benchmarks/conv_wgrad.py``). The input gradient stays with oneDNN, whose
kernel there is as fast as its forward.

The weight gradient of a conv is ``dW[k, c, i, j] = sum_{n, y, x} dY[n, k, y, x] *
Xpad[n, c, y*s + i, x*s + j]``: with the input patches laid out as a (N*Ho*Wo, kh*kw*C) matrix
(a strided view of the padded NHWC input, copied once), it is dY^T (K x N*Ho*Wo) times that
matrix. It pays only while the patch matrix is small, so it is used where the output has at most
``MAX_OUT_PIXELS`` pixels per image (measured crossover, per dtype), and only for plain convs
(groups 1, dilation 1, zero padding). Everything else, and all of the forward pass, is untouched:
the same kernels compute the same outputs, so only the weight gradient's rounding differs (bf16
products summed in fp32 in either case).

Used by ``ptd.train.loop.fit`` on CPU when ``Runtime.fast_wgrad`` (config key ``fast_wgrad``) is
on, through ``small_image_wgrad(unit)``, which patches the instances for the duration of the fit
only, so module names, state dicts, export and derivation never see it.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# Output pixels per image (Ho * Wo) up to which the GEMM form is faster than oneDNN's weight
# gradient on this CPU, measured per dtype at batch 128 (benchmarks/results/conv_wgrad.md, two
# runs): bf16 3.3-13x at 4x4 and smaller (3.4-3.8x and 7.3-7.7x for the demo's 128-wide convs on
# 3x3 and 1x1), 0.95-1.6x at 8x8 (the crossover, left to oneDNN) and 0.2-0.4x from 16x16; fp32
# 2.5-3.2x at 2x2, 0.95-1.3x at 4x4, 2.3-2.4x at 1x1.
MAX_OUT_PIXELS = {torch.bfloat16: 16, torch.float32: 4}


def patch_matrix(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int]) -> torch.Tensor:
    """The (N*Ho*Wo, kh*kw*C) matrix of input patches, rows in NHWC order, columns (i, j, c)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # N, H+2ph, W+2pw, C
    s = xp.stride()
    view = xp.as_strided((n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]))
    return view.reshape(n * ho * wo, kh * kw * c)


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size,
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """dL/dW of ``conv2d(x, W, stride, padding)`` (groups 1, dilation 1) from dL/dY, as one GEMM."""
    k, c, kh, kw = weight_shape
    cols = patch_matrix(x, (kh, kw), stride, padding)
    g = grad_out.permute(0, 2, 3, 1).reshape(-1, k)  # N*Ho*Wo, K (a view when dY is channels_last)
    return (g.t() @ cols).view(k, kh, kw, c).permute(0, 3, 1, 2)


class _Conv2dGemmWgrad(torch.autograd.Function):
    """conv2d whose backward takes dX from aten and dW from ``weight_grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            gw = weight_grad(grad_out, x, weight.shape, ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            acc = torch.promote_types(grad_out.dtype, torch.float32)  # bf16 summed in fp32, fp64 in fp64
            gb = grad_out.sum((0, 2, 3), dtype=acc).to(grad_out.dtype)
        return gx, gw, gb, None, None


def eligible(conv: nn.Module) -> bool:
    """A plain nn.Conv2d whose weight gradient ``weight_grad`` computes exactly."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _forward(self: nn.Conv2d, x: torch.Tensor, limits: dict[torch.dtype, int]) -> torch.Tensor:
    """Conv2d.forward, with the GEMM weight gradient where it pays (decided per call, by shape)."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad and x.dim() == 4:
        kh, kw = self.kernel_size
        ho = (x.shape[2] + 2 * self.padding[0] - kh) // self.stride[0] + 1
        wo = (x.shape[3] + 2 * self.padding[1] - kw) // self.stride[1] + 1
        # the dtype conv2d will compute in: autocast's where it is on, else the input's
        autocast = torch.is_autocast_enabled("cpu")
        dt = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        # without autocast, mismatched dtypes are left to conv2d's own error
        same = self.weight.dtype == dt or (autocast and self.weight.dtype == torch.float32)
        if ho * wo <= limits.get(dt, 0) and same:
            bias = self.bias.to(dt) if self.bias is not None else None
            with torch.autocast("cpu", enabled=False):  # cast as autocast would, then no second cast
                return _Conv2dGemmWgrad.apply(x.to(dt), self.weight.to(dt), bias, self.stride, self.padding)
    return nn.Conv2d.forward(self, x)


@contextlib.contextmanager
def small_image_wgrad(module: nn.Module, enabled: bool = True,
                      limits: dict[torch.dtype, int] | None = None) -> Iterator[int]:
    """Within the block, every eligible conv of ``module`` computes its weight gradient by
    ``weight_grad`` where its output has at most ``limits[dtype]`` pixels per image (default
    ``MAX_OUT_PIXELS``); yields how many convs were patched. The patch is an
    instance attribute removed on exit, so nothing outside the block (a state dict, a deepcopy, an
    export, a trace) sees it. A deepcopy made inside the block copies the patch bound to the copy
    (``copy`` rebinds methods of the object being copied): a working conv, patched for good."""
    patched = []
    if enabled:
        for m in module.modules():
            if eligible(m) and "forward" not in m.__dict__:
                m.forward = types.MethodType(functools.partial(_forward, limits=limits or MAX_OUT_PIXELS), m)
                patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
