"""A bank of same-shape MLP experts evaluated with fused kernels (STAR, arXiv 2510.27222, Sec. 3).

Axis legend:
    b: batch    n: experts    t: tasks    d: input features    o: output features

Each expert is ``Linear → norm → act`` repeated ``num_layers - 1`` times, then ``Linear`` (no norm at the
output unless ``last_norm_layer`` is given); by default the hidden Linears have no bias and the last one has.
With dense soft routing every sample reaches every expert, so the bank never needs a ragged grouped GEMM:
see :mod:`star_heads.expert_layers` for the layout that keeps every layer a single kernel with no copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from star_heads import _expert_kernels as kernels
from star_heads._checks import check_float_tensor, check_positive_int
from star_heads._precision import autocast_dtype
from star_heads.expert_layers import ExpertLinear, export_norm, is_batch_norm, load_norm, make_expert_norm
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
            ``nn.LayerNorm``, ``None``; ``functools.partial`` for options).
        act_layer: Elementwise activation after each hidden norm: a class, a ``functools.partial`` of one,
            a configured instance (copied per layer, e.g. ``nn.LeakyReLU(0.3)``) or ``None``.
        hidden_bias: Whether the hidden Linears have a bias: one bool for all, or one per hidden layer.
        last_bias: Whether the last Linear has a bias.
        last_norm_layer: Optional norm after the last Linear (e.g. EquiMod's ``BatchNorm1d(affine=False)``).
        check_finite: Also reject NaN/Inf in ``x`` and ``gates`` (one host-device sync per call).
        device: Factory kwarg.
        dtype: Factory kwarg.

    Shapes:
        ``forward(x)``: ``x [B, d] -> [B, N, output_dim]`` (every expert's output).
        ``forward(x, gates)``: ``gates [B, T, N] -> [T, B, output_dim]``, the routed mixture
        ``z_t(x) = Σ_k s_{t,k}(x) · E_k(x)`` (STAR, Sec. 3, task embedding). Experts are computed once
        however many tasks read them; ``return_expert_outputs=True`` also returns them as ``[B, N, o]``.

    Inputs must have the parameters' dtype, except under ``torch.autocast``, where the Linears run in the
    autocast dtype as ``nn.Linear`` does (and ``gates`` are cast to it for the mixture).
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
        self.check_finite = bool(check_finite)
        biases = [*_hidden_biases(hidden_bias, num_layers - 1), bool(last_bias)]
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

        Raises:
            TypeError: ``x``/``gates`` not floating-point tensors, or of another dtype than the bank's
                parameters outside autocast.
            ValueError: wrong shapes, an empty batch, a single sample while a BatchNorm uses batch
                statistics, or (``check_finite``) NaN/Inf values.
        """
        self._check(x, gates)
        out = self._run_experts(x)  # [b, n, o]
        if gates is None:
            return out
        mixed = torch.bmm(gates.to(out.dtype), out).transpose(0, 1)  # [b, t, n] @ [b, n, o] -> [t, b, o]
        return (mixed, out) if return_expert_outputs else mixed

    def _run_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on ``x [B, d]``: ``[B, N, o]``, contiguous."""
        h = self.linears[0](x)  # [b, n, h], a base tensor: an activation may run in place on it
        for i, linear in enumerate(self.linears[1:]):
            norm, act = self.norms[i], self.acts[i]
            if type(norm) is nn.BatchNorm1d and type(act) is nn.ReLU and _uses_batch_stats(norm):
                h = kernels.batch_norm_relu_linear(h.reshape(h.shape[0], -1), _batch_norm_args(norm), linear.weight, linear.bias)
            else:
                h = linear(_norm_act(h, norm, act))
        return _norm_act(h, self.norms[-1], None)

    # --------------------------------------------------------------- validation
    def _check(self, x: torch.Tensor, gates: torch.Tensor | None) -> None:
        """Shape and dtype checks (free); values only with ``check_finite``."""
        check_float_tensor(x, "x", sizes=(None, self.input_dim), finite=self.check_finite)
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one sample, got shape {list(x.shape)}")
        if x.shape[0] == 1 and any(_uses_batch_stats(m) for m in self.norms):
            raise ValueError(
                f"x has a single sample (shape {list(x.shape)}), but a BatchNorm in training mode needs more "
                "than one sample per batch: pass a larger batch or call .eval()"
            )
        param = self.linears[0].weight.dtype
        autocast = autocast_dtype(x.device.type) is not None
        if not autocast and x.dtype != param:
            raise TypeError(
                f"x has dtype {x.dtype} but the bank's parameters are {param}: cast one of them "
                "(or run under torch.autocast)"
            )
        if gates is not None:
            check_float_tensor(gates, "gates", sizes=(x.shape[0], None, self.num_experts), finite=self.check_finite)
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
def _norm_act(h: torch.Tensor, norm: nn.Module, act: nn.Module | None) -> torch.Tensor:
    """One hidden (or last) norm and activation on ``h [b, n, o]``; returns a contiguous ``[b, n, o]``."""
    b, n, o = h.shape
    if is_batch_norm(norm):
        h = norm(h.reshape(b, n * o))  # BatchNorm1d / SyncBatchNorm over n·o channels: its own kernel
    elif not isinstance(norm, nn.Identity):
        h = norm(h)
    if act is not None:
        h = act(h)  # in place where the activation supports it: h is always a base tensor here
    return h.view(b, n, o) if h.is_contiguous() else h.reshape(b, n, o)


def _uses_batch_stats(norm: nn.Module) -> bool:
    return is_batch_norm(norm) and (norm.training or norm.running_mean is None)


def _batch_norm_args(bn: nn.BatchNorm1d) -> tuple:
    """``(weight, bias, running_mean, running_var, factor, eps)`` as ``nn.BatchNorm1d.forward`` computes them
    for a training-mode call (``num_batches_tracked`` incremented, cumulative average when momentum is None)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    track = not bn.training or bn.track_running_stats
    return bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None, factor, bn.eps


def _hidden_biases(hidden_bias: bool | Sequence[bool], count: int) -> list[bool]:
    if isinstance(hidden_bias, bool):
        return [hidden_bias] * count
    flags = list(hidden_bias) if isinstance(hidden_bias, Sequence) else None
    if flags is None or not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"hidden_bias must be a bool or a sequence of bools, got {hidden_bias!r}")
    if len(flags) != count:
        raise ValueError(f"hidden_bias must have one entry per hidden layer ({count}), got {len(flags)}: {flags}")
    return flags
