"""Kernels of the fused expert bank (private): the expert matmul and a fused BatchNorm + ReLU.

Axis legend:
    b: batch    n: experts    i: input features    o: output features    c: channels ``(n o)``

Activations are contiguous ``[b, n, o]`` (= ``[b, c]``). Eagerly, two ``torch.autograd.Function``\\ s keep
every layer a single pass over memory with no copies:

* :func:`expert_linear` — one GEMM for the shared first layer, one batched matmul over experts after that,
  reading and writing strided ``[n, b, ·]`` views (BLAS takes row strides), and the same in backward;
* :func:`batch_norm_relu` — training-mode BatchNorm1d over ``c`` followed by ReLU. Forward is the native
  BatchNorm kernel (running statistics updated by it, exactly as ``nn.BatchNorm1d``) and an in-place ReLU.
  Backward is written out per channel in ``[b, c]`` (``dβ = Σ_b g``, ``dγ = Σ_b g·x̂``,
  ``∂a = γ·σ⁻¹·(g − dβ/B − x̂·dγ/B)`` with ``g`` the ReLU-masked gradient): a handful of vectorised passes
  that reuse the incoming gradient's buffer, where the native backward kernel walks this layout per
  channel with a strided inner loop.

Under ``torch.compile`` the same maths is written with plain differentiable ops, so inductor sees (and
fuses) one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["expert_linear", "batch_norm_relu", "is_compiling", "autocast_dtype"]


def is_compiling() -> bool:
    """Whether dynamo is tracing (``torch.compiler.is_compiling`` where it exists, torch >= 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch 2.1 / 2.2


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for ``device_type``, or None when autocast is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions without arguments
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


# ---------------------------------------------------------------------------------------------- linear
def expert_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Every expert's Linear: ``h [b, i]`` (shared) or ``[b, n, i]`` with ``weight [n, o, i]``, ``bias [n·o]``.

    Returns ``[b, n, o]``. Under autocast the operands are cast to the autocast dtype first, as autocast
    does for ``nn.Linear`` (gradients flow back through the casts to the parameters' dtype).
    """
    dtype = autocast_dtype(h.device.type)
    if dtype is not None and h.is_floating_point():
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if is_compiling():
        return _expert_linear_ops(h, weight, bias)
    if dtype is not None:
        with torch.autocast(h.device.type, enabled=False):
            return _ExpertMatmul.apply(h, weight, bias)
    return _ExpertMatmul.apply(h, weight, bias)


def _expert_linear_ops(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same with plain differentiable ops (what ``torch.compile`` traces)."""
    n, o, i = weight.shape
    if h.ndim == 2:
        return F.linear(h, weight.reshape(n * o, i), bias).view(h.shape[0], n, o)
    out = torch.bmm(h.transpose(0, 1), weight.transpose(1, 2))  # [n, b, o]
    if bias is not None:
        out = out + bias.view(n, 1, o)
    return out.transpose(0, 1)


class _ExpertMatmul(torch.autograd.Function):
    """``[b, i] | [b, n, i]`` × ``[n, o, i]`` (+ ``[n·o]``) → contiguous ``[b, n, o]``; no copies either way."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        n, o, i = weight.shape
        b = h.shape[0]
        out = h.new_empty(b, n, o)
        if h.ndim == 2:  # one GEMM  [b, i] @ [i, (n o)]
            w = weight.view(n * o, i).t()
            if bias is None:
                torch.mm(h, w, out=out.view(b, n * o))
            else:
                torch.addmm(bias, h, w, out=out.view(b, n * o))
        else:  # one batched matmul over experts, strided views of the [b, n, ·] tensors
            torch.bmm(h.transpose(0, 1), weight.transpose(1, 2), out=out.transpose(0, 1))
            if bias is not None:
                out.view(b, n * o).add_(bias)
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight = ctx.saved_tensors
        n, o, i = weight.shape
        b = g.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad
        gh = gw = gb = None
        if h.ndim == 2:
            g2 = g.reshape(b, n * o)
            if need_h:
                gh = torch.mm(g2, weight.view(n * o, i))
            if need_w:
                gw = torch.mm(g2.t(), h).view(n, o, i)
        else:
            if need_h:
                gh = g.new_empty(b, n, i)
                torch.bmm(g.transpose(0, 1), weight, out=gh.transpose(0, 1))
            if need_w:
                gw = torch.bmm(g.permute(1, 2, 0), h.transpose(0, 1))
        if ctx.has_bias and need_b:
            gb = g.reshape(b, n * o).sum(0)
        return gh, gw, gb


# ------------------------------------------------------------------------------------ BatchNorm + ReLU
def batch_norm_relu(
    a: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """``relu(batch_norm(a))`` in training mode (batch statistics) for a contiguous ``a [b, c]``.

    ``momentum`` is the exponential-average factor ``nn.BatchNorm1d`` computed for this step; the running
    statistics (when given) are updated in place exactly as by ``F.batch_norm``.
    """
    if is_compiling():
        return torch.relu(F.batch_norm(a, running_mean, running_var, weight, bias, True, momentum, eps))
    return _BatchNormReLU.apply(a, weight, bias, running_mean, running_var, momentum, eps)


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(a, weight, bias, running_mean, running_var, True, momentum, eps)
        y.relu_()
        ctx.save_for_backward(a, y, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        a, y, weight, mean, invstd = ctx.saved_tensors
        if not gy.is_contiguous():
            gy = gy.contiguous()
        # g = gy · [y > 0], in place: the incoming gradient is the next ExpertLinear's fresh input gradient
        g = torch.ops.aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
        stat = mean.dtype  # float32 statistics under bf16/fp16 inputs, as the native kernels keep them
        scale = invstd if weight is None else invstd * weight
        d_bias = g.sum(0, dtype=stat)
        t = torch.sub(a, mean.to(a.dtype))  # a - μ (centred, as the native backward kernel computes it)
        t.mul_(g)
        dot = t.sum(0, dtype=stat)  # Σ_b g·(a − μ)
        d_weight = dot * invstd  # Σ_b g·x̂
        count = a.shape[0]
        k_a = -scale * invstd * d_weight / count  # ∂a = scale·g + k_a·(a − μ) − scale·dβ/B
        k_0 = -scale * d_bias / count - k_a * mean
        grad_a = torch.addcmul(k_0.to(a.dtype), a, k_a.to(a.dtype), out=t)
        grad_a.addcmul_(g, scale.to(a.dtype))
        need_w, need_b = ctx.needs_input_grad[1:3]
        return grad_a, (d_weight if need_w else None), (d_bias if need_b else None), None, None, None, None
