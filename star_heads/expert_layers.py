"""Building blocks of the fused expert bank: N independent layers evaluated as one kernel each.

Axis legend (features-major layout used inside the bank, so no layer needs a copy):
    n: experts            i: input features of a layer     o: output features of a layer
    b: batch

Activations inside the bank are stored as ``[n, o, b]`` (contiguous). Then

* the first layer, whose input is shared by every expert, is one wide GEMM
  ``W[(n o), i] @ x^T[i, b] -> [(n o), b]``;
* every later layer is one batched matmul ``W[n, o, i] @ h[n, i, b] -> [n, o, b]``;
* per-expert BatchNorm is one ``BatchNorm1d(n·o)`` applied to the free view ``[1, (n o), b]``
  (BatchNorm1d on a 3-D input normalises each channel over the batch and length axes, here the
  single length axis is the batch);
* per-expert LayerNorm normalises over ``o`` for each ``(n, b)``.

None of these steps materialises a permuted copy of the activations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from star_heads._checks import check_positive_int

__all__ = ["ExpertLinear", "ExpertLayerNorm", "make_expert_norm", "apply_expert_norm"]


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
            h: ``[i, b]`` (input shared by all experts, e.g. ``x.T``) or ``[n, i, b]`` (one input per expert).

        Returns:
            ``[(n o), b]`` for a shared input, ``[n, o, b]`` otherwise; contiguous base tensors.
        """
        n, o = self.num_experts, self.out_features
        if h.ndim == 2:  # shared input: one wide GEMM  [(n o), i] @ [i, b]
            w = self.weight.reshape(n * o, self.in_features)
            return w @ h if self.bias is None else torch.addmm(self.bias.unsqueeze(1), w, h)
        if self.bias is None:  # per-expert input: one batched matmul  [n, o, i] @ [n, i, b]
            return torch.bmm(self.weight, h)
        return torch.baddbmm(self.bias.view(n, o, 1), self.weight, h)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class ExpertLayerNorm(nn.Module):
    """Per-expert ``nn.LayerNorm(features)`` over the feature axis of ``[n, o, b]`` activations.

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

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)  # [n, 1, b]
        y = (h - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            shape = (self.num_experts, self.features, 1)
            y = torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))
        return y


def _is_batch_norm(norm_layer: type[nn.Module]) -> bool:
    return isinstance(norm_layer, type) and issubclass(norm_layer, nn.modules.batchnorm._NormBase)


def make_expert_norm(
    norm_layer: type[nn.Module] | None, num_experts: int, features: int, **factory
) -> nn.Module | None:
    """Builds the fused per-expert norm for ``norm_layer`` (a class, or ``functools.partial`` of one).

    BatchNorm-like classes (``nn.BatchNorm1d``, ``nn.SyncBatchNorm`` or a partial of them) become one
    norm over ``num_experts·features`` channels; ``nn.LayerNorm`` becomes :class:`ExpertLayerNorm`;
    ``None`` / ``nn.Identity`` mean no norm.

    Raises:
        TypeError: any other norm layer.
    """
    cls, kwargs = norm_layer, {}
    if hasattr(norm_layer, "func") and hasattr(norm_layer, "keywords"):  # functools.partial
        cls, kwargs = norm_layer.func, dict(norm_layer.keywords)
    if cls is None or cls is nn.Identity:
        return None
    if _is_batch_norm(cls):
        return cls(num_experts * features, **kwargs, **factory)
    if cls is nn.LayerNorm:
        return ExpertLayerNorm(num_experts, features, **kwargs, **factory)
    raise TypeError(
        "norm_layer must be a BatchNorm class (nn.BatchNorm1d, nn.SyncBatchNorm), nn.LayerNorm, nn.Identity "
        f"or None (optionally wrapped in functools.partial), got {norm_layer!r}"
    )


def apply_expert_norm(norm: nn.Module | None, h: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Applies a fused per-expert norm to layer outputs ``h`` (``[(n o), b]`` or ``[n, o, b]``).

    The input is only *viewed* (free); the result is a new base tensor (``[1, (n o), b]`` for BatchNorm,
    ``[n, o, b]`` for LayerNorm, ``h`` itself without a norm), so an in-place activation on it never
    touches a view (which would make autograd copy the whole tensor in backward).
    """
    if norm is None or isinstance(norm, nn.Identity):
        return h
    b = h.shape[-1]
    if isinstance(norm, ExpertLayerNorm):
        return norm(h.view(num_experts, -1, b))
    return norm(h.view(1, -1, b))
