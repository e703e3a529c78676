"""Building blocks of the fused expert bank: N independent layers evaluated as one kernel each.

Axis legend:
    b: batch    n: experts    i: input features of a layer    o: output features of a layer

Inside the bank an activation is stored feature-major, ``[n, o, b]`` = ``[(n o), b]``: one wide layer of
``n·o`` channels grouped by expert, each channel's ``b`` values contiguous. Every layer is plain torch ops,
so autograd, autocast, ``torch.compile``, the ``meta`` device and ``nn.SyncBatchNorm`` see ordinary
operators, and no layer copies an activation:

* the first layer, whose input is shared by every expert, is one GEMM ``W[(n o), i] @ x[b, i]^T``;
* every later layer is one batched matmul over experts, ``W[n, o, i] @ h[n, i, b]`` (the weight gradient
  comes out in the parameter's own layout, ``[n, o, i]``);
* per-expert BatchNorm is one ``BatchNorm1d(n·o)`` on the free view ``[1, (n o), b]``: BatchNorm1d (and
  SyncBatchNorm) normalise each channel over the batch and length axes, here ``1 × b`` = the batch, so
  their own kernels compute exactly the per-expert ``nn.BatchNorm1d(o)`` statistics;
* per-expert LayerNorm normalises over ``o`` for each ``(n, b)`` on the ``[n, b, o]`` view.

Each layer can export expert ``k`` as a standard module and load it back (:meth:`ExpertLinear.export_expert`,
:func:`export_norm`), so the bank never needs to know how a layer stores its experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from star_heads._checks import check_positive_int

__all__ = ["ExpertLinear", "ExpertLayerNorm", "make_expert_norm", "export_norm", "load_norm", "is_batch_norm"]


class ExpertLinear(nn.Module):
    """``num_experts`` independent ``nn.Linear(in_features, out_features)`` layers, fused.

    Weights are stored stacked as ``weight[n, out, in]`` (each slice is exactly an ``nn.Linear``
    weight) and the bias flat as ``bias[n·out]`` so that it stays 1-D (optimiser rules that skip
    weight decay for ``ndim <= 1`` or names ending in ``bias`` keep working).

    Args:
        num_experts: Number of experts N.
        in_features: Input size of each expert.
        out_features: Output size of each expert.
        bias: Whether each expert has a bias.
        device: Factory kwarg.
        dtype: Factory kwarg.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts * out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises every expert exactly like ``nn.Linear(in, out)``.

        ``nn.Linear`` uses ``kaiming_uniform_(a=sqrt(5))`` on its weight, i.e. U(-1/sqrt(in), 1/sqrt(in)),
        and U(-1/sqrt(in), 1/sqrt(in)) for the bias. The fan must be the per-expert input size: default fan
        inference on the stacked 3-D tensor would use ``out·in`` and give weights ~sqrt(out) times too small.
        """
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Applies every expert.

        Args:
            h: ``[b, i]`` (input shared by all experts) or ``[b, n, i]`` (one input per expert).

        Returns:
            ``[b, n, o]``, a view of the feature-major ``[n, o, b]`` result. Under autocast the matmuls run
            in the autocast dtype, as ``nn.Linear``'s. The bank itself calls :meth:`shared` and
            :meth:`per_expert`, which keep the feature-major layout.
        """
        if h.ndim == 2:
            return self.shared(h).view(self.num_experts, self.out_features, -1).permute(2, 0, 1)
        return self.per_expert(h.permute(1, 2, 0)).permute(2, 0, 1)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on one shared input: ``x [b, i] -> [(n o), b]``, one GEMM, a new contiguous tensor."""
        n, o, i = self.weight.shape
        w = self.weight.view(n * o, i)
        return torch.mm(w, x.t()) if self.bias is None else torch.addmm(self.bias.view(n * o, 1), w, x.t())

    def per_expert(self, h: torch.Tensor) -> torch.Tensor:
        """Expert ``k`` on ``h[k]``: ``h [n, i, b]`` (any strides BLAS takes, e.g. a transposed view)
        ``-> [n, o, b]``, one batched matmul, a new contiguous tensor."""
        n, o, _ = self.weight.shape
        if self.bias is None:
            return torch.bmm(self.weight, h)
        return torch.baddbmm(self.bias.view(n, o, 1), self.weight, h)

    @torch.no_grad()
    def export_expert(self, k: int) -> nn.Linear:
        """Expert ``k`` as a standalone ``nn.Linear`` (a copy, on this layer's device and dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.weight[k])
        if self.bias is not None:
            linear.bias.copy_(self.bias.view(self.num_experts, -1)[k])
        return linear

    @torch.no_grad()
    def load_expert(self, k: int, linear: nn.Linear) -> None:
        """Copies an ``nn.Linear`` of matching shape and bias into expert ``k``.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
            ValueError: its shape or its having a bias differs from this layer's.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expert {k}: expected nn.Linear, got {type(linear).__name__}")
        want = (self.out_features, self.in_features, self.bias is not None)
        got = (linear.out_features, linear.in_features, linear.bias is not None)
        if want != got:
            raise ValueError(f"expert {k}: expected Linear(out, in, bias) = {want}, got {got}")
        self.weight[k].copy_(linear.weight)
        if self.bias is not None:
            self.bias.view(self.num_experts, -1)[k].copy_(linear.bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class ExpertLayerNorm(nn.Module):
    """Per-expert ``nn.LayerNorm(features)`` over the feature axis of ``[b, n, o]`` activations.

    Args:
        num_experts: Number of experts N.
        features: Normalised size of each expert.
        eps: Added to the variance, as in ``nn.LayerNorm``.
        elementwise_affine: Learn a per-expert scale and shift (stored flat, ``[n·o]``).
    """

    def __init__(
        self,
        num_experts: int,
        features: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.features, self.eps = num_experts, features, eps
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_experts * features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_experts * features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, h: torch.Tensor, expert_axis: int = 1) -> torch.Tensor:
        """``h [b, n, o] -> [b, n, o]``, or ``[n, b, o] -> [n, b, o]`` with ``expert_axis=0`` (a new tensor)."""
        y = torch.nn.functional.layer_norm(h, (self.features,), eps=self.eps)
        if self.weight is not None:
            shape = (self.num_experts, self.features) if expert_axis == 1 else (self.num_experts, 1, self.features)
            y = torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
        return y

    @torch.no_grad()
    def export_expert(self, k: int) -> nn.LayerNorm:
        """Expert ``k`` as a standalone ``nn.LayerNorm`` (a copy)."""
        single = nn.LayerNorm(self.features, eps=self.eps, elementwise_affine=self.weight is not None)
        if self.weight is not None:
            single = single.to(device=self.weight.device, dtype=self.weight.dtype)
            single.weight.copy_(self.weight.view(self.num_experts, -1)[k])
            single.bias.copy_(self.bias.view(self.num_experts, -1)[k])
        return single

    @torch.no_grad()
    def load_expert(self, k: int, norm: nn.LayerNorm) -> None:
        """Copies a matching ``nn.LayerNorm`` into expert ``k`` (see :func:`load_norm` for the checks)."""
        if self.weight is not None:
            self.weight.view(self.num_experts, -1)[k].copy_(norm.weight)
            self.bias.view(self.num_experts, -1)[k].copy_(norm.bias)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, features={self.features}, eps={self.eps}, " \
               f"elementwise_affine={self.weight is not None}"


#: The BatchNorm classes the bank computes exactly like its ``to_modules()`` experts: per-channel
#: statistics of a ``[b, c]`` batch (``nn.BatchNorm2d``/``3d`` want images, ``nn.InstanceNorm1d``
#: normalises each sample on its own, neither is a per-expert ``nn.BatchNorm1d``).
BATCH_NORMS = (nn.BatchNorm1d, nn.SyncBatchNorm)


def is_batch_norm(layer: object) -> bool:
    """Whether ``layer`` is ``nn.BatchNorm1d`` / ``nn.SyncBatchNorm`` (a class, a ``functools.partial`` of
    one, or a module)."""
    layer = getattr(layer, "func", layer)
    if isinstance(layer, nn.Module):
        return type(layer) in BATCH_NORMS
    return layer in BATCH_NORMS


def make_expert_norm(
    norm_layer: type[nn.Module] | None, num_experts: int, features: int, **factory
) -> nn.Module | None:
    """Builds the fused per-expert norm for ``norm_layer`` (a class, or ``functools.partial`` of one).

    BatchNorm-like classes (``nn.BatchNorm1d``, ``nn.SyncBatchNorm`` or a partial of them) become one
    norm over ``num_experts·features`` channels; ``nn.LayerNorm`` becomes :class:`ExpertLayerNorm`;
    ``None`` / ``nn.Identity`` mean no norm.

    Raises:
        TypeError: any other norm layer (e.g. ``nn.BatchNorm2d``, ``nn.InstanceNorm1d``, ``nn.GroupNorm``, a
            subclass), which the bank could not compute exactly like its per-expert ``to_modules()``.
    """
    cls, kwargs = norm_layer, {}
    if hasattr(norm_layer, "func") and hasattr(norm_layer, "keywords"):  # functools.partial
        cls, kwargs = norm_layer.func, dict(norm_layer.keywords)
    if cls is None or cls is nn.Identity:
        return None
    if is_batch_norm(cls):
        return cls(num_experts * features, **kwargs, **factory)
    if cls is nn.LayerNorm:
        return ExpertLayerNorm(num_experts, features, **kwargs, **factory)
    from star_heads.expert_spec import check_norm_layer  # the grammar's one list of norms (it imports this module)

    check_norm_layer(norm_layer, "norm_layer")  # raises: every norm the grammar accepts is handled above
    raise AssertionError(f"expert_spec.NORMS accepts {norm_layer!r}, which make_expert_norm does not build")


@torch.no_grad()
def export_norm(norm: nn.Module, k: int, num_experts: int) -> nn.Module:
    """Expert ``k``'s slice of a fused norm (from :func:`make_expert_norm`) as a standalone module (a copy).

    A fused BatchNorm over ``n·o`` channels gives an ``nn.BatchNorm1d(o)`` with the same options, the
    expert's affine parameters and running statistics, ``num_batches_tracked`` and train/eval mode.
    """
    if isinstance(norm, ExpertLayerNorm):
        return norm.export_expert(k)
    features = norm.num_features // num_experts
    single = nn.BatchNorm1d(
        features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    ref = norm.weight if norm.weight is not None else norm.running_mean
    if ref is not None:
        single = single.to(device=ref.device, dtype=ref.dtype)
    for name in ("weight", "bias", "running_mean", "running_var"):
        src = getattr(norm, name)
        if src is not None:
            getattr(single, name).copy_(src.view(num_experts, -1)[k])
    if norm.num_batches_tracked is not None:
        single.num_batches_tracked.copy_(norm.num_batches_tracked)
    single.train(norm.training)
    return single


@torch.no_grad()
def load_norm(fused: nn.Module, k: int, num_experts: int, single: nn.Module) -> None:
    """Copies a standalone norm into expert ``k``'s slice of ``fused`` (inverse of :func:`export_norm`).

    Raises:
        ValueError: ``single`` is not the kind of norm ``fused`` holds, or has other options or width.
    """
    want = norm_options(export_norm(fused, k, num_experts))
    got = norm_options(single)
    if want != got:
        raise ValueError(f"expert {k}: expected a norm with options {want}, got {got} ({single!r})")
    if isinstance(fused, ExpertLayerNorm):
        fused.load_expert(k, single)
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        dst = getattr(fused, name)
        if dst is not None:
            dst.view(num_experts, -1)[k].copy_(getattr(single, name))
    if fused.num_batches_tracked is not None:
        fused.num_batches_tracked.copy_(single.num_batches_tracked)


def norm_options(m: nn.Module) -> tuple | None:
    """The options that identify a standalone norm module, or None when it is not a supported norm.

    ``("batch_norm", features, eps, momentum, affine, track_running_stats)`` for ``nn.BatchNorm1d``,
    ``("layer_norm", features, eps, elementwise_affine)`` for an ``nn.LayerNorm`` over the last axis
    with a bias (or no affine at all).
    """
    if type(m) in (nn.BatchNorm1d, nn.SyncBatchNorm):
        return ("batch_norm", m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1 and (m.weight is None) == (m.bias is None):
        return ("layer_norm", m.normalized_shape[0], m.eps, m.elementwise_affine)
    return None
