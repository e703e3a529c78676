"""A bank of same-shape MLP experts evaluated with fused kernels (STAR, arXiv 2510.27222, Sec. 3).

Axis legend:
    b: batch    n: experts    t: tasks    d: input features    o: output features

Each expert is ``Linear → norm → act`` repeated ``num_layers - 1`` times, then ``Linear`` (no norm at the
output unless ``last_norm_layer`` is given); by default the hidden Linears have no bias and the last one has.
With dense soft routing every sample reaches every expert, so the bank never needs a ragged grouped GEMM:
see :mod:`star_heads.expert_layers` for the layout that keeps every layer a single kernel.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from star_heads._checks import check_bool, check_float_tensor, check_positive_int
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
    norm_options,
)

__all__ = ["ExpertBank"]

#: Activations the bank accepts: elementwise and deterministic, so applying one to the fused ``[B, N·h]``
#: activations is exactly applying it to each expert.
ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.Softshrink, nn.Hardshrink, nn.Identity,
)


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

        Raises:
            TypeError: ``x``/``gates`` not floating-point tensors, or of another dtype than the bank's
                parameters outside autocast; ``return_expert_outputs`` not a bool.
            ValueError: wrong shapes, an empty batch, a single sample while a BatchNorm uses batch
                statistics, or (``check_finite``) NaN/Inf values.
        """
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
                    layers.append(_export_act(self.acts[i]))
            experts.append(nn.Sequential(*layers))
        return experts

    @classmethod
    def from_modules(cls, experts: Sequence[nn.Module], **kwargs) -> ExpertBank:
        """Fuses same-structure experts into a bank, exactly (weights, biases, norm statistics, activation).

        Each expert must be an ``nn.Sequential`` of blocks ``nn.Linear → [norm] → [activation]`` (with or
        without a bias at every Linear), the norms ``nn.BatchNorm1d`` / ``nn.SyncBatchNorm`` /
        ``nn.LayerNorm(width)`` and the activations elementwise (``ELEMENTWISE_ACTIVATIONS``, options kept);
        the hidden blocks must agree with each other and the last block has no activation. ``kwargs``
        override constructor options (device, dtype, ...).

        Raises:
            TypeError: an expert is not an ``nn.Sequential``.
            ValueError: an empty list, a module the bank cannot represent (named with its position), or
                experts that differ in structure, options or shapes.
        """
        experts = list(experts)
        if not experts:
            raise ValueError("from_modules needs at least one expert, got an empty sequence")
        specs = [_parse_expert(e, j) for j, e in enumerate(experts)]
        for j, spec in enumerate(specs[1:], start=1):
            if spec["signature"] != specs[0]["signature"]:
                raise ValueError(
                    f"expert {j} differs from expert 0 in structure, options or shapes: {experts[j]} vs {experts[0]}"
                )
        blocks, first = specs[0]["blocks"], specs[0]["blocks"][0][0]
        hidden = blocks[:-1]
        options = dict(
            num_layers=len(blocks),
            norm_layer=_norm_spec(hidden[0][1]) if hidden else None,
            act_layer=hidden[0][2] if hidden else None,
            hidden_bias=[lin.bias is not None for lin, _, _ in hidden],
            last_bias=blocks[-1][0].bias is not None,
            last_norm_layer=_norm_spec(blocks[-1][1]),
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        options.update(kwargs)
        width = hidden[0][0].out_features if hidden else first.out_features
        bank = cls(len(experts), first.in_features, width, blocks[-1][0].out_features, **options)
        for k, spec in enumerate(specs):
            for i, (linear, norm, _) in enumerate(spec["blocks"]):
                bank.linears[i].load_expert(k, linear)
                if norm is not None:
                    load_norm(bank.norms[i], k, bank.num_experts, norm)
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


def _uses_batch_stats(norm: nn.Module) -> bool:
    return is_batch_norm(norm) and (norm.training or norm.running_mean is None)


def _hidden_biases(hidden_bias: bool | Sequence[bool], count: int) -> list[bool]:
    if isinstance(hidden_bias, bool):
        return [hidden_bias] * count
    flags = list(hidden_bias) if isinstance(hidden_bias, Sequence) else None
    if flags is None or not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"hidden_bias must be a bool or a sequence of bools, got {hidden_bias!r}")
    if len(flags) != count:
        raise ValueError(f"hidden_bias must have one entry per hidden layer ({count}), got {len(flags)}: {flags}")
    return flags


def _make_act(act_layer) -> nn.Module:
    """Instantiates ``act_layer`` (in place when it supports it) and checks that it is elementwise.

    Inside the bank an activation always follows a norm or a Linear, neither of whose backward needs its
    output, so running it in place is exact and saves one activation-sized tensor per layer.

    Raises:
        TypeError: not an elementwise activation (e.g. ``nn.Softmax``, which would mix experts' features).
    """
    cls = type(act_layer) if isinstance(act_layer, nn.Module) else getattr(act_layer, "func", act_layer)
    if act_layer is not None and cls not in ELEMENTWISE_ACTIVATIONS:
        raise TypeError(
            f"act_layer must be an elementwise activation ({', '.join(c.__name__ for c in ELEMENTWISE_ACTIVATIONS)}), "
            f"got {act_layer!r}: the bank applies it to all experts' features at once"
        )
    if act_layer is None:
        act = nn.Identity()
    elif isinstance(act_layer, nn.Module):
        act = copy.deepcopy(act_layer)
        if hasattr(act, "inplace"):
            act.inplace = True
    else:
        try:
            act = act_layer(inplace=True)
        except TypeError:
            act = act_layer()
    return act


def _export_act(act: nn.Module) -> nn.Module:
    single = copy.deepcopy(act)
    if hasattr(single, "inplace"):
        single.inplace = False  # torch's default; results are the same either way
    return single


def _act_key(act: nn.Module | None) -> tuple | None:
    """What identifies an activation's behaviour: its class and public options (``inplace`` aside)."""
    if act is None:
        return None
    options = {k: v for k, v in vars(act).items() if not k.startswith("_") and k not in ("inplace", "training")}
    return type(act), tuple(sorted(options.items()))


def _norm_spec(norm: nn.Module | None):
    """The class of a standalone norm with its options bound (``functools.partial``), or None."""
    if norm is None:
        return None
    if isinstance(norm, nn.LayerNorm):
        return partial(nn.LayerNorm, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    return partial(type(norm), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                   track_running_stats=norm.track_running_stats)


def _parse_expert(expert: nn.Module, j: int) -> dict:
    """Splits an expert into ``(Linear, norm | None, act | None)`` blocks and a signature to compare experts by.

    Raises:
        TypeError / ValueError: see :meth:`ExpertBank.from_modules`.
    """
    if not isinstance(expert, nn.Sequential):
        raise TypeError(f"expert {j} must be an nn.Sequential of Linear/norm/activation modules, got {type(expert).__name__}")
    mods, blocks, pos = list(expert), [], 0
    supported = "an nn.Linear, then optionally nn.BatchNorm1d/nn.SyncBatchNorm/nn.LayerNorm, then optionally an elementwise activation"
    while pos < len(mods):
        linear = mods[pos]
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"expert {j}, module {pos}: found {linear!r} where each block must be {supported}")
        pos += 1
        norm = act = None
        if pos < len(mods) and norm_options(mods[pos]) is not None:
            norm, pos = mods[pos], pos + 1
        if pos < len(mods) and type(mods[pos]) in ELEMENTWISE_ACTIVATIONS:
            act, pos = mods[pos], pos + 1
        blocks.append((linear, norm, None if type(act) is nn.Identity else act))
    if not blocks:
        raise ValueError(f"expert {j} is empty")
    for i, (linear, norm, act) in enumerate(blocks):
        if i > 0 and linear.in_features != blocks[i - 1][0].out_features:
            raise ValueError(f"expert {j}: Linear {i} takes {linear.in_features} features but the previous one gives {blocks[i - 1][0].out_features}")
        if norm is not None and norm_options(norm)[1] != linear.out_features:
            raise ValueError(f"expert {j}: norm {norm!r} after Linear {i} does not normalise its {linear.out_features} features")
    hidden = blocks[:-1]
    if blocks[-1][2] is not None:
        raise ValueError(f"expert {j}: an activation after the last Linear ({blocks[-1][2]!r}) is not supported")
    for name, key in (("hidden width", lambda blk: blk[0].out_features), ("hidden norm", lambda blk: norm_options(blk[1]) if blk[1] is not None else None),
                      ("hidden activation", lambda blk: _act_key(blk[2]))):
        if len({repr(key(blk)) for blk in hidden}) > 1:
            raise ValueError(f"expert {j}: every hidden block must have the same {name}, got {[key(blk) for blk in hidden]}")
    signature = (
        tuple((lin.in_features, lin.out_features, lin.bias is not None, lin.weight.dtype) for lin, _, _ in blocks),
        tuple((norm_options(nm) if nm is not None else None, type(nm)) for _, nm, _ in blocks),
        tuple(_act_key(a) for _, _, a in blocks),
    )
    return {"blocks": blocks, "signature": signature}
