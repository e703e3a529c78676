"""Kernels of the fused expert bank (private): the expert matmul and a fused BatchNorm + ReLU.

Axis legend:
    b: batch    n: experts    i: input features    o: output features    c: channels ``(n o)``

Activations are contiguous ``[b, n, o]`` (= ``[b, c]``). Eagerly, two ``torch.autograd.Function``\\ s keep
every layer a single pass over memory with no copies:

* :func:`expert_linear` — one GEMM for the shared first layer, one batched matmul over experts after that,
  reading and writing strided ``[n, b, ·]`` views (BLAS takes row strides), and the same in backward;
* :func:`batch_norm_relu_linear` — training-mode BatchNorm1d over ``c``, ReLU and the next expert matmul
  as one node. Forward is the native BatchNorm kernel (running statistics updated by it, exactly as
  ``nn.BatchNorm1d``), an in-place ReLU and the matmul; only the BatchNorm input is kept, the ReLU output is
  recomputed in backward (one pass) instead of stored. Backward is written out per channel in ``[b, c]``
  (``dβ = Σ_b g``, ``dγ = Σ_b g·x̂``, ``∂a = γ·σ⁻¹·(g − dβ/B − x̂·dγ/B)`` with ``g`` the ReLU-masked
  gradient): a handful of vectorised passes over two buffers, where the native backward kernel walks this
  layout channel by channel (about 10x slower here).

Under ``torch.compile`` the same maths is written with plain differentiable ops, so inductor sees (and
fuses) one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from star_heads._precision import autocast_dtype

__all__ = ["expert_linear", "batch_norm_relu_linear", "is_compiling"]


def is_compiling() -> bool:
    """Whether dynamo is tracing (``torch.compiler.is_compiling`` where it exists, torch >= 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch 2.1 / 2.2


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


def _matmul(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Forward of :class:`_ExpertMatmul` (no autograd): a new contiguous ``[b, n, o]``."""
    n, o, i = weight.shape
    b = h.shape[0]
    out = h.new_empty(b, n, o)
    if h.ndim == 2:  # one GEMM  [b, i] @ [i, (n o)]
        w = weight.view(n * o, i).t()
        if bias is None:
            torch.mm(h, w, out=out.view(b, n * o))
        else:
            torch.addmm(bias, h, w, out=out.view(b, n * o))
    else:  # one batched matmul over experts, on strided [n, b, ·] views of the [b, n, ·] tensors
        torch.bmm(h.transpose(0, 1), weight.transpose(1, 2), out=out.transpose(0, 1))
        if bias is not None:
            out.view(b, n * o).add_(bias)
    return out


class _ExpertMatmul(torch.autograd.Function):
    """``[b, i] | [b, n, i]`` × ``[n, o, i]`` (+ ``[n·o]``) → contiguous ``[b, n, o]``; no copies either way."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return _matmul(h, weight, bias)

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


# ------------------------------------------------------------------------- BatchNorm + ReLU + Linear
def batch_norm_relu_linear(
    a: torch.Tensor,
    bn: tuple,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``expert_linear(relu(batch_norm(a)))`` in training mode for a contiguous ``a [b, (n i)]``.

    Args:
        a: The previous layer's output, ``[b, n·i]``.
        bn: ``(weight, bias, running_mean, running_var, factor, eps)`` of the BatchNorm, ``factor`` being the
            exponential-average factor ``nn.BatchNorm1d`` computed for this step; the running statistics are
            updated in place by the native kernel, exactly as by ``F.batch_norm``.
        weight: ``[n, o, i]`` expert weights of the next Linear.
        bias: ``[n·o]`` or None.

    Returns:
        ``[b, n, o]``. Only ``a`` (and per-channel statistics) are kept for backward: the ReLU output is
        recomputed there from ``a`` in one pass instead of being stored (half the saved activations).
    """
    dtype = autocast_dtype(a.device.type)
    if dtype is not None:
        weight, bias = weight.to(dtype), (None if bias is None else bias.to(dtype))
    if is_compiling():
        if _CUSTOM_OP:  # one opaque node: inductor calls these kernels instead of generating its own
            out, _, _, new_mean, new_var = _bn_relu_linear_op(a, *bn, weight, bias)
            if bn[2] is not None:
                with torch.no_grad():
                    bn[2].copy_(new_mean)
                    bn[3].copy_(new_var)
            return out
        bn_w, bn_b, mean, var, factor, eps = bn
        y = torch.relu(F.batch_norm(a, mean, var, bn_w, bn_b, True, factor, eps))
        return _expert_linear_ops(y.view(a.shape[0], weight.shape[0], -1), weight, bias)
    if dtype is not None:
        with torch.autocast(a.device.type, enabled=False):
            return _BatchNormReLULinear.apply(a, *bn, weight, bias)
    return _BatchNormReLULinear.apply(a, *bn, weight, bias)


class _BatchNormReLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, bn_w, bn_b, running_mean, running_var, factor, eps, weight, bias):
        y, mean, invstd = torch.native_batch_norm(a, bn_w, bn_b, running_mean, running_var, True, factor, eps)
        y.relu_()
        out = _matmul(y.view(a.shape[0], weight.shape[0], -1), weight, bias)
        ctx.save_for_backward(a, bn_w, bn_b, mean, invstd, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g_out):
        need = ctx.needs_input_grad
        g_a, d_weight, d_bias, g_w, g_b = _bn_relu_linear_backward(g_out, *ctx.saved_tensors, need[7], ctx.has_bias and need[8])
        return (g_a, d_weight if need[1] else None, d_bias if need[2] else None,
                None, None, None, None, g_w, g_b)


def _bn_relu_linear_backward(g_out, a, bn_w, bn_b, mean, invstd, weight, need_w: bool, need_b: bool):
    """Gradients of :func:`batch_norm_relu_linear` w.r.t. ``a``, the BatchNorm affine and the Linear."""
    n, o, i = weight.shape
    b = a.shape[0]
    low = a.dtype
    scale = invstd if bn_w is None else invstd * bn_w  # γ·σ⁻¹ per channel
    shift = -mean * scale if bn_b is None else bn_b - mean * scale
    y = torch.addcmul(shift.to(low), a, scale.to(low)).relu_()  # the forward's ReLU output, recomputed
    g_w = torch.bmm(g_out.permute(1, 2, 0), y.view(b, n, i).transpose(0, 1)) if need_w else None
    g_b = g_out.reshape(b, n * o).sum(0) if need_b else None
    g = a.new_empty(b, n, i)
    torch.bmm(g_out.transpose(0, 1), weight, out=g.transpose(0, 1))  # ∂y, a fresh buffer of ours
    g = g.view(b, n * i)
    torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)  # ReLU mask, in place
    stat = mean.dtype  # float32 statistics under bf16/fp16 inputs, as the native kernels keep them
    d_bias = g.sum(0, dtype=stat)
    t = torch.sub(a, mean.to(low), out=y)  # a − μ, reusing y's buffer (centred, as the native kernel)
    t.mul_(g)
    d_weight = t.sum(0, dtype=stat) * invstd  # Σ_b g·x̂
    k_a = -scale * invstd * d_weight / b  # ∂a = scale·g + k_a·(a − μ) − scale·dβ/B
    k_0 = -scale * d_bias / b - k_a * mean
    g_a = torch.addcmul(k_0.to(low), a, k_a.to(low), out=t)
    g_a.addcmul_(g, scale.to(low))
    return g_a, d_weight, d_bias, g_w, g_b


# ------------------------------------------------------------------- the same as a custom op (compile)
_CUSTOM_OP = hasattr(torch.library, "custom_op")  # torch >= 2.4; older versions trace the plain ops

if _CUSTOM_OP:
    from typing import Optional

    @torch.library.custom_op("star_heads::bn_relu_linear", mutates_args=())
    def _bn_relu_linear_op(
        a: torch.Tensor, bn_w: Optional[torch.Tensor], bn_b: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], factor: float, eps: float,
        weight: torch.Tensor, bias: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Functional: returns ``(out, mean, invstd, new_running_mean, new_running_var)`` (empty when untracked)."""
        rm = a.new_empty(0) if running_mean is None else running_mean.clone()
        rv = a.new_empty(0) if running_var is None else running_var.clone()
        tracked = running_mean is not None
        y, mean, invstd = torch.native_batch_norm(
            a, bn_w, bn_b, rm if tracked else None, rv if tracked else None, True, factor, eps
        )
        return _matmul(y.relu_().view(a.shape[0], weight.shape[0], -1), weight, bias), mean, invstd, rm, rv

    @_bn_relu_linear_op.register_fake
    def _(a, bn_w, bn_b, running_mean, running_var, factor, eps, weight, bias):
        stat = torch.float32 if a.dtype in (torch.bfloat16, torch.float16) else a.dtype
        c = a.shape[1]
        rm = a.new_empty(0) if running_mean is None else torch.empty_like(running_mean)
        rv = a.new_empty(0) if running_var is None else torch.empty_like(running_var)
        out = a.new_empty(a.shape[0], weight.shape[0], weight.shape[1])
        return out, a.new_empty(c, dtype=stat), a.new_empty(c, dtype=stat), rm, rv

    @torch.library.custom_op("star_heads::bn_relu_linear_backward", mutates_args=())
    def _bn_relu_linear_backward_op(
        g_out: torch.Tensor, a: torch.Tensor, bn_w: Optional[torch.Tensor], bn_b: Optional[torch.Tensor],
        mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, need_b: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g_a, d_weight, d_bias, g_w, g_b = _bn_relu_linear_backward(g_out, a, bn_w, bn_b, mean, invstd, weight, True, need_b)
        return g_a, d_weight, d_bias, g_w, g_b if need_b else g_out.new_empty(0)

    @_bn_relu_linear_backward_op.register_fake
    def _(g_out, a, bn_w, bn_b, mean, invstd, weight, need_b):
        n, o, _ = weight.shape
        return (torch.empty_like(a), torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(weight),
                g_out.new_empty(n * o if need_b else 0))

    def _setup_context(ctx, inputs, output):
        a, bn_w, bn_b, _, _, _, _, weight, bias = inputs
        _, mean, invstd, _, _ = output
        ctx.save_for_backward(a, bn_w, bn_b, mean, invstd, weight)
        ctx.has_bias = bias is not None

    def _op_backward(ctx, g_out, *_):
        a, bn_w, bn_b, mean, invstd, weight = ctx.saved_tensors
        g_a, d_w, d_b, g_w, g_b = _bn_relu_linear_backward_op(g_out, a, bn_w, bn_b, mean, invstd, weight, ctx.has_bias)
        return (g_a, None if bn_w is None else d_w, None if bn_b is None else d_b, None, None, None, None, g_w,
                g_b if ctx.has_bias else None)

    _bn_relu_linear_op.register_autograd(_op_backward, setup_context=_setup_context)
