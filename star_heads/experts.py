"""A bank of same-shape MLP experts evaluated with fused kernels (STAR, arXiv 2510.27222, Sec. 3).

Axis legend:
    b: batch    n: experts    t: tasks    d: input features    o: output features

Each expert is ``Linear → norm → act`` repeated ``num_layers - 1`` times, then ``Linear`` (no norm at the
output unless ``last_norm_layer`` is given); by default the hidden Linears have no bias and the last one has.
With dense soft routing every sample reaches every expert, so the bank never needs a ragged grouped GEMM:
see :mod:`star_heads.expert_layers` for the layout that keeps every layer a single kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from star_heads._checks import (
    check_batch_for_batch_norm,
    check_bool,
    check_float_tensor,
    check_input_dtype,
    check_positive_int,
)
from star_heads._precision import autocast_dtype
from star_heads._running_stats import guarded_batch_norm
from star_heads._value_checks import value_checks_enabled
from star_heads.expert_layers import (
    ExpertLayerNorm,
    ExpertLinear,
    export_norm,
    is_batch_norm,
    load_norm,
    make_expert_norm,
)
from star_heads.expert_spec import export_activation, make_activation, parse_expert

__all__ = ["ExpertBank"]

class ExpertBank(nn.Module):
    """N identical-shape MLP experts, computed together with one GEMM / batched matmul per layer.

    Args:
        num_experts: Number of experts N (>= 1).
        input_dim: Input feature size d (backbone width).
        hidden_dim: Width of the hidden layers.
        output_dim: Output size of every expert.
        num_layers: Linear layers per expert (>= 1); ``1`` is a single Linear.
        norm_layer: Norm class after each hidden Linear (``nn.BatchNorm1d`` default, ``nn.SyncBatchNorm``,
            ``nn.LayerNorm``, ``None``; ``functools.partial`` for options). Other norms are refused.
        act_layer: Elementwise activation after each hidden norm: a class, a ``functools.partial`` of one,
            a configured instance (copied per layer, e.g. ``nn.LeakyReLU(0.3)``) or ``None``.
        hidden_bias: Whether the hidden Linears have a bias: one bool for all, or one per hidden layer.
        last_bias: Whether the last Linear has a bias.
        last_norm_layer: Optional norm after the last Linear (e.g. EquiMod's ``BatchNorm1d(affine=False)``).
        check_finite: Also reject NaN/Inf in ``x`` and ``gates`` (one host-device sync per call); the global
            switch :func:`star_heads.set_value_checks` turns it on for every module.
        device: Factory kwarg.
        dtype: Factory kwarg.

    Shapes:
        ``forward(x)``: ``x [B, d] -> [B, N, output_dim]`` (every expert's output).
        ``forward(x, gates)``: ``gates [B, T, N] -> [T, B, output_dim]``, the routed mixture
        ``z_t(x) = Σ_k s_{t,k}(x) · E_k(x)`` (STAR, Sec. 3, task embedding). Experts are computed once
        however many tasks read them; ``return_expert_outputs=True`` also returns them as ``[B, N, o]``.

    Inputs must have the parameters' dtype, except under ``torch.autocast``, where the Linears run in the
    autocast dtype as ``nn.Linear`` does (and the mixture too).

    Every BatchNorm's running statistics skip a training batch that holds NaN or Inf (the output still
    carries it), decided on the device without a host sync (see ``star_heads/_running_stats.py``).
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
        act_layer: type[nn.Module] | nn.Module | None = nn.ReLU,
        hidden_bias: bool | Sequence[bool] = False,
        last_bias: bool = True,
        last_norm_layer: type[nn.Module] | None = None,
        check_finite: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.output_dim = check_positive_int(output_dim, "output_dim")
        self.num_layers = check_positive_int(num_layers, "num_layers")
        self.check_finite = check_bool(check_finite, "check_finite")
        biases = [*_hidden_biases(hidden_bias, num_layers - 1), check_bool(last_bias, "last_bias")]
        factory = {"device": device, "dtype": dtype}
        sizes = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.linears = nn.ModuleList(
            ExpertLinear(num_experts, sizes[i], sizes[i + 1], bias=biases[i], **factory) for i in range(num_layers)
        )
        norms = [make_expert_norm(norm_layer, num_experts, hidden_dim, **factory) for _ in range(num_layers - 1)]
        norms.append(make_expert_norm(last_norm_layer, num_experts, output_dim, **factory))
        self.norms = nn.ModuleList(nn.Identity() if m is None else m for m in norms)
        self.acts = nn.ModuleList(make_activation(act_layer) for _ in range(num_layers - 1))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        gates: torch.Tensor | None = None,
        *,
        return_expert_outputs: bool = False,
        _checked: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Runs every expert once and, with ``gates``, mixes them per task.

        Args:
            x: ``[B, d]`` input features.
            gates: Optional ``[B, T, N]`` mixing weights (one row per task).
            return_expert_outputs: With ``gates``, also return every expert's output ``[B, N, o]``.
            _checked: Internal: the caller (a head) validated ``x`` and ``gates`` already. The bank is still
                called as a module, so hooks, profilers and wrappers see it.

        Returns:
            Without ``gates``: every expert's output ``[B, N, o]``. With ``gates``: the mixtures ``[T, B, o]``,
            or ``(mixtures, expert_outputs)`` when ``return_expert_outputs`` is set.

        Raises:
            TypeError: ``x``/``gates`` not floating-point tensors, or of another dtype than the bank's
                parameters outside autocast; ``return_expert_outputs`` not a bool.
            ValueError: wrong shapes, an empty batch, a single sample while a BatchNorm uses batch
                statistics, or (``check_finite``) NaN/Inf values.
        """
        if _checked:
            return self._forward(x, gates, return_expert_outputs)
        self._check(x, gates)
        return self._forward(x, gates, check_bool(return_expert_outputs, "return_expert_outputs"))

    def _forward(
        self, x: torch.Tensor, gates: torch.Tensor | None = None, return_expert_outputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` without the input checks, for callers that validated ``x`` and ``gates`` already."""
        param = self.linears[0].weight.dtype
        # autocast casts float32 operands, never float64 ones: an input of another dtype (only accepted under
        # autocast) is brought to the parameters' dtype first, and autocast takes it from there
        out = self._run_experts(x if x.dtype == param else x.to(param))  # [b, n, o]
        if gates is None:
            return out
        gates = gates if gates.dtype == param else gates.to(param)
        mixed = torch.bmm(gates, out).transpose(0, 1)  # [b, t, n] @ [b, n, o] -> [t, b, o]
        return (mixed, out) if return_expert_outputs else mixed

    def _run_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on ``x [B, d]``: ``[B, N, o]``, contiguous (one copy of the output from the feature-major
        ``[N, o, B]`` layout, so that the mixture's batched matmul reads whole rows)."""
        n = self.num_experts
        h = self.linears[0].shared(x)  # [(n h), b]
        for i, linear in enumerate(self.linears[1:]):
            h = linear.per_expert(_norm_act(h, n, self.norms[i], self.acts[i]))  # [n, o, b]
        return _norm_act(h, n, self.norms[-1], None).permute(2, 0, 1).contiguous()

    # --------------------------------------------------------------- validation
    def _check(self, x: torch.Tensor, gates: torch.Tensor | None) -> None:
        """Shape and dtype checks (they read ``.shape`` / ``.dtype`` only); values only with ``check_finite``."""
        finite = value_checks_enabled(self.check_finite)
        check_float_tensor(x, "x", sizes=(None, self.input_dim), finite=finite)
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one sample, got shape {list(x.shape)}")
        check_batch_for_batch_norm(x, self)
        check_input_dtype(x, self.linears[0].weight.dtype, "x", "bank")
        autocast = autocast_dtype(x.device.type) is not None
        if gates is not None:
            check_float_tensor(gates, "gates", sizes=(x.shape[0], None, self.num_experts), finite=finite)
            if not autocast and gates.dtype != x.dtype:
                raise TypeError(f"gates has dtype {gates.dtype} but x has {x.dtype}: they must match outside autocast")

    # ---------------------------------------------------------- module interop
    def to_modules(self) -> nn.ModuleList:
        """Unfuses the bank into an ``nn.ModuleList`` of standard ``nn.Sequential`` experts (copies of the
        weights, biases, norm running statistics and activation options). :meth:`from_modules` inverts it."""
        experts = nn.ModuleList()
        for k in range(self.num_experts):
            layers: list[nn.Module] = []
            for i, linear in enumerate(self.linears):
                layers.append(linear.export_expert(k))
                if not isinstance(self.norms[i], nn.Identity):
                    layers.append(export_norm(self.norms[i], k, self.num_experts))
                if i < len(self.acts) and not isinstance(self.acts[i], nn.Identity):
                    layers.append(export_activation(self.acts[i]))
            experts.append(nn.Sequential(*layers))
        return experts

    @classmethod
    def from_modules(cls, experts: Sequence[nn.Module], **kwargs) -> ExpertBank:
        """Fuses same-structure experts into a bank, exactly (weights, biases, norm statistics, activation).

        Each expert is an ``nn.Sequential`` in the grammar of :mod:`star_heads.expert_spec`
        (``Linear → [norm] → [activation]`` blocks); ``kwargs`` override constructor options (device, dtype, ...).

        Raises:
            TypeError: an expert is not an ``nn.Sequential``.
            ValueError: an empty list, a module the bank cannot represent (named with its position), or
                experts that differ in structure, options or shapes.
        """
        experts = list(experts)
        if not experts:
            raise ValueError("from_modules needs at least one expert, got an empty sequence")
        for j, e in enumerate(experts):
            if not isinstance(e, nn.Sequential):
                raise TypeError(
                    f"expert {j} must be an nn.Sequential of Linear/norm/activation modules, got {type(e).__name__}"
                )
        specs = [parse_expert(list(e), f"expert {j}") for j, e in enumerate(experts)]
        for j, spec in enumerate(specs[1:], start=1):
            if spec.signature() != specs[0].signature():
                raise ValueError(
                    f"expert {j} differs from expert 0 in structure, options or shapes: {experts[j]} vs {experts[0]}"
                )
        first = specs[0].blocks[0].linear.weight
        options = {
            **specs[0].options(),
            "num_layers": specs[0].num_layers,
            "device": first.device,
            "dtype": first.dtype,
        }
        options.update(kwargs)
        bank = cls(len(experts), specs[0].input_dim, specs[0].hidden_dim, specs[0].output_dim, **options)
        for k, spec in enumerate(specs):
            for i, block in enumerate(spec.blocks):
                bank.linears[i].load_expert(k, block.linear)
                if block.norm is not None:
                    load_norm(bank.norms[i], k, bank.num_experts, block.norm)
        return bank

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, sizes=({self.input_dim}, {self.hidden_dim}, {self.output_dim})"


# ------------------------------------------------------------------------------------------ helpers
def _norm_act(h: torch.Tensor, n: int, norm: nn.Module, act: nn.Module | None) -> torch.Tensor:
    """One hidden (or last) norm and activation; returns the ``[n, o, b]`` view of a new tensor.

    ``h`` is a new tensor holding the feature-major ``[n, o, b]`` activations (shaped ``[(n o), b]`` or
    ``[n, o, b]``), which no backward reads, so an in-place activation on the norm's output is exact and
    never rewrites a view. BatchNorm1d / SyncBatchNorm run on the view ``[1, (n o), b]``, with their running
    statistics guarded against non-finite batches (:func:`guarded_batch_norm`); LayerNorm on ``[n, b, o]``.
    """
    b = h.shape[-1]
    if is_batch_norm(norm):
        h = guarded_batch_norm(norm, h.view(1, -1, b))  # [1, (n o), b]
    elif isinstance(norm, ExpertLayerNorm):
        h = norm(h.view(n, -1, b).transpose(1, 2), expert_axis=0)  # [n, b, o], a new tensor
    elif not isinstance(norm, nn.Identity):
        raise TypeError(f"an ExpertBank cannot apply the norm module {type(norm).__name__}")
    if act is not None:
        h = act(h)  # in place where the activation supports it
    return h.transpose(1, 2) if isinstance(norm, ExpertLayerNorm) else h.view(n, -1, b)


def _hidden_biases(hidden_bias: bool | Sequence[bool], count: int) -> list[bool]:
    if isinstance(hidden_bias, bool):
        return [hidden_bias] * count
    flags = list(hidden_bias) if isinstance(hidden_bias, Sequence) else None
    if flags is None or not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"hidden_bias must be a bool or a sequence of bools, got {hidden_bias!r}")
    if len(flags) != count:
        raise ValueError(f"hidden_bias must have one entry per hidden layer ({count}), got {len(flags)}: {flags}")
    return flags
