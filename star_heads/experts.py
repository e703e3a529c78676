"""A bank of same-shape MLP experts evaluated with fused kernels (STAR, Sec. 3; STAR_METHOD.md "Forward pass").

Axis legend:
    b: batch    n: experts    t: tasks    d: input features    o: output features

Each expert is ``Linear(no bias) → norm → act`` repeated ``num_layers - 1`` times, then ``Linear(bias)``
(no norm at the output unless ``last_norm_layer`` is given). With dense soft routing every sample reaches
every expert, so the bank never needs a ragged grouped GEMM: see :mod:`star_heads.expert_layers` for the
layout that keeps every layer a single kernel with no copies in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from einops import rearrange
from torch import nn

from star_heads._checks import check_float_tensor, check_positive_int
from star_heads.expert_layers import ExpertLayerNorm, ExpertLinear, apply_expert_norm, make_expert_norm

__all__ = ["ExpertBank"]


class ExpertBank(nn.Module):
    """N identical-shape MLP experts, computed together with one GEMM / batched matmul per layer.

    Args:
        num_experts: Number of experts N (>= 1).
        input_dim: Input feature size d (backbone width).
        hidden_dim: Width of the hidden layers.
        output_dim: Output size of every expert.
        num_layers: Linear layers per expert (>= 1); ``1`` is a single Linear.
        norm_layer: Norm class after each hidden Linear (``nn.BatchNorm1d`` default, ``nn.LayerNorm``,
            ``None``; ``functools.partial`` for options).
        act_layer: Activation class after each hidden norm.
        last_bias: Whether the last Linear has a bias.
        last_norm_layer: Optional norm after the last Linear (e.g. EquiMod's ``BatchNorm1d(affine=False)``).
        device: Factory kwarg.
        dtype: Factory kwarg.

    Shapes:
        ``forward(x)``: ``x [B, d] -> [B, N, output_dim]`` (every expert's output).
        ``forward(x, gates)``: ``gates [B, T, N] -> [T, B, output_dim]``, the routed mixture
        ``z_t(x) = Σ_k s_{t,k}(x) · E_k(x)`` (STAR Eq. for the task embedding). Experts are computed once
        however many tasks read them; ``return_expert_outputs=True`` also returns them as ``[B, N, o]``.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int = 3,
        *,
        norm_layer: type[nn.Module] | None = nn.BatchNorm1d,
        act_layer: type[nn.Module] = nn.ReLU,
        last_bias: bool = True,
        last_norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.output_dim = check_positive_int(output_dim, "output_dim")
        self.num_layers = check_positive_int(num_layers, "num_layers")
        factory = {"device": device, "dtype": dtype}
        sizes = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.linears = nn.ModuleList(
            ExpertLinear(num_experts, sizes[i], sizes[i + 1], bias=(i == num_layers - 1) and last_bias, **factory)
            for i in range(num_layers)
        )
        norms = [make_expert_norm(norm_layer, num_experts, hidden_dim, **factory) for _ in range(num_layers - 1)]
        norms.append(make_expert_norm(last_norm_layer, num_experts, output_dim, **factory))
        self.norms = nn.ModuleList(nn.Identity() if m is None else m for m in norms)
        self.acts = nn.ModuleList(_make_act(act_layer) for _ in range(num_layers - 1))

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, gates: torch.Tensor | None = None, *, return_expert_outputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Runs every expert once and, with ``gates``, mixes them per task.

        Args:
            x: ``[B, d]`` input features.
            gates: Optional ``[B, T, N]`` mixing weights (one row per task).
            return_expert_outputs: With ``gates``, also return every expert's output ``[B, N, o]``.

        Returns:
            Without ``gates``: every expert's output ``[B, N, o]``. With ``gates``: the mixtures ``[T, B, o]``,
            or ``(mixtures, expert_outputs)`` when ``return_expert_outputs`` is set.
        """
        if gates is not None:
            self._check_gates(gates, x)
        out = self._run_experts(x)  # [n, o, b], the bank's private layout
        if gates is None:
            return rearrange(out, "n o b -> b n o")
        per_sample = rearrange(out, "n o b -> b n o").contiguous()  # bmm over B small matrices wants it dense
        mixed = rearrange(torch.bmm(gates.to(per_sample.dtype), per_sample), "b t o -> t b o")
        return (mixed, per_sample) if return_expert_outputs else mixed

    def _run_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on ``x [B, d]`` in the bank's features-major layout ``[N, o, B]`` (private)."""
        self._check_input(x)
        n, b = self.num_experts, x.shape[0]
        h = self.linears[0](x.t())  # one GEMM on the shared input (x.t() is a free view) -> [(n h), b]
        for i, linear in enumerate(self.linears):
            if i > 0:
                h = linear(h.view(n, -1, b))  # one batched matmul -> [n, o, b]
            h = apply_expert_norm(self.norms[i], h, n)
            if i < len(self.acts):
                h = self.acts[i](h)  # in place on a base tensor, never on a view
        return h.view(n, -1, b)

    # --------------------------------------------------------------- validation
    def _check_input(self, x: torch.Tensor) -> None:
        check_float_tensor(x, "x", sizes=(None, self.input_dim))

    def _check_gates(self, gates: torch.Tensor, x: torch.Tensor) -> None:
        self._check_input(x)
        check_float_tensor(gates, "gates", sizes=(x.shape[0], None, self.num_experts))

    # ---------------------------------------------------------- module interop
    def to_modules(self) -> nn.ModuleList:
        """Unfuses the bank into ``nn.ModuleList`` of standard ``nn.Sequential`` experts (copies of the weights,
        biases and norm running statistics). :meth:`from_modules` inverts it exactly."""
        experts = nn.ModuleList()
        for k in range(self.num_experts):
            layers: list[nn.Module] = []
            for i, linear in enumerate(self.linears):
                lin = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
                lin = lin.to(device=linear.weight.device, dtype=linear.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(linear.weight[k])
                    if linear.bias is not None:
                        lin.bias.copy_(linear.bias.view(self.num_experts, -1)[k])
                layers.append(lin)
                norm = self.norms[i]
                if not isinstance(norm, nn.Identity):
                    layers.append(_unfuse_norm(norm, k, self.num_experts, linear.out_features))
                if i < len(self.acts):
                    layers.append(self.acts[i].__class__())
            experts.append(nn.Sequential(*layers))
        return experts

    @classmethod
    def from_modules(cls, experts: Sequence[nn.Module], **kwargs) -> ExpertBank:
        """Fuses same-shape ``nn.Sequential`` experts (the format of :meth:`to_modules`) into a bank.

        Norm / activation classes are read from the first expert; ``kwargs`` override constructor options.

        Raises:
            ValueError: empty list, experts of different structure or shapes.
        """
        experts = list(experts)
        if not experts:
            raise ValueError("from_modules needs at least one expert, got an empty sequence")
        linears = [m for m in experts[0] if isinstance(m, nn.Linear)]
        hidden = [m for m in experts[0] if not isinstance(m, nn.Linear)]
        signature = [type(m) for m in experts[0]]
        for j, e in enumerate(experts[1:], start=1):
            if [type(m) for m in e] != signature or any(
                a.weight.shape != b.weight.shape for a, b in zip(linears, (m for m in e if isinstance(m, nn.Linear)))
            ):
                raise ValueError(f"expert {j} does not have the structure/shapes of expert 0: {e} vs {experts[0]}")
        norm_types = [_norm_spec(m) for m in hidden if not _is_act(m)]
        acts = [type(m) for m in hidden if _is_act(m)]
        num_layers = len(linears)
        n_hidden_norms = len(norm_types) - (1 if _has_last_norm(experts[0]) else 0)
        options = dict(
            num_layers=num_layers,
            norm_layer=norm_types[0] if n_hidden_norms > 0 else None,
            act_layer=acts[0] if acts else nn.ReLU,
            last_bias=linears[-1].bias is not None,
            last_norm_layer=norm_types[-1] if _has_last_norm(experts[0]) else None,
            device=linears[0].weight.device,
            dtype=linears[0].weight.dtype,
        )
        options.update(kwargs)
        bank = cls(
            len(experts),
            linears[0].in_features,
            linears[0].out_features,
            linears[-1].out_features,
            **options,
        )
        bank._load_experts(experts)
        return bank

    @torch.no_grad()
    def _load_experts(self, experts: Sequence[nn.Module]) -> None:
        for k, expert in enumerate(experts):
            lins = [m for m in expert if isinstance(m, nn.Linear)]
            norms = [m for m in expert if not isinstance(m, nn.Linear) and not _is_act(m)]
            fused_norms = [m for m in self.norms if not isinstance(m, nn.Identity)]
            for linear, lin in zip(self.linears, lins):
                linear.weight[k].copy_(lin.weight)
                if linear.bias is not None:
                    linear.bias.view(self.num_experts, -1)[k].copy_(lin.bias)
            for fused, norm in zip(fused_norms, norms):
                _load_norm(fused, norm, k, self.num_experts)


def _is_act(m: nn.Module) -> bool:
    return not isinstance(m, (nn.Linear, nn.LayerNorm, nn.modules.batchnorm._NormBase))


def _norm_spec(m: nn.Module):
    """The norm class of a standalone norm module, with its options bound (``functools.partial``)."""
    if isinstance(m, nn.LayerNorm):
        return partial(nn.LayerNorm, eps=m.eps, elementwise_affine=m.elementwise_affine)
    return partial(type(m), eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)


def _has_last_norm(expert: nn.Module) -> bool:
    return not isinstance(list(expert)[-1], nn.Linear)


def _unfuse_norm(norm: nn.Module, k: int, n: int, features: int) -> nn.Module:
    """Returns expert ``k``'s slice of a fused norm as a standalone module."""
    sl = slice(k * features, (k + 1) * features)
    if isinstance(norm, ExpertLayerNorm):
        single = nn.LayerNorm(features, eps=norm.eps, elementwise_affine=norm.weight is not None)
    else:
        single = nn.BatchNorm1d(
            features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
            track_running_stats=norm.track_running_stats,
        )
    ref = norm.weight if norm.weight is not None else next(iter(norm.buffers()), None)
    if ref is not None:
        single = single.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(norm, name, None)
            if src is not None:
                getattr(single, name).copy_(src[sl])
        if getattr(norm, "num_batches_tracked", None) is not None:
            single.num_batches_tracked.copy_(norm.num_batches_tracked)
    single.train(norm.training)
    return single


@torch.no_grad()
def _load_norm(fused: nn.Module, single: nn.Module, k: int, n: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        dst, src = getattr(fused, name, None), getattr(single, name, None)
        if dst is not None and src is not None:
            dst.view(n, -1)[k].copy_(src)
    if getattr(fused, "num_batches_tracked", None) is not None and getattr(single, "num_batches_tracked", None) is not None:
        fused.num_batches_tracked.copy_(single.num_batches_tracked)


def _make_act(act_layer: type[nn.Module]) -> nn.Module:
    """Instantiates ``act_layer`` in place when it supports it.

    Inside the bank an activation always follows a norm or a Linear, neither of whose backward needs its
    output, so running it in place is exact and skips allocating a second activation-sized tensor per layer
    in forward (autograd keeps the norm input for backward either way, so peak memory is unchanged).
    """
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()
