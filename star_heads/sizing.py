"""Parameter and FLOP counts of heads, and hidden widths chosen to meet a parameter budget.

Counts used throughout the package (and in the tables of ``docs/heads.md``):

* **parameters** — every parameter of the module: weights, biases, norm affine weights, router weights
  and biases, a learned temperature (buffers such as BatchNorm running statistics are not counted);
* **FLOPs** — multiply-adds per sample of the Linear layers: ``in · out`` for each ``nn.Linear``,
  ``N · in · out`` for each fused :class:`~star_heads.expert_layers.ExpertLinear`, routers included (a
  conditional STAR router is ``Linear(d → T·N)``, so ``d · T · N``). Norms, activations and the gate
  mixture ``Σ_k s_{t,k} E_k(x)`` (``T · N · o`` multiply-adds) are not counted: they are
  ``O(width)`` next to the ``O(width²)`` Linears.

Hidden widths are found by building candidate heads on the ``meta`` device (no memory, no
initialisation cost) and bisecting on the exact parameter count, so every option (norms, biases,
router settings) is accounted for without a hand-written formula.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from torch import nn

from star_heads._checks import check_choice, check_positive_int
from star_heads.expert_layers import ExpertLinear

__all__ = [
    "count_parameters",
    "linear_macs",
    "fit_width",
    "drop_in_hidden_dim",
    "drop_in_size",
    "on_meta",
    "DROP_IN_FACTOR",
    "DEFAULT_NUM_EXPERTS",
    "PARAM_RTOL",
    "FLOP_RTOL",
]

FitMode = Literal["nearest", "at_most"]
"""How :func:`fit_width` picks a width: the nearest parameter count, or the largest at most the budget."""
PARAM_RTOL = 0.05
"""Relative tolerance of a parameter-matched baseline's parameter count."""
FLOP_RTOL = 0.10
"""Relative tolerance of a parameter-matched baseline's FLOP count (:func:`linear_macs`)."""
DROP_IN_FACTOR = 2
"""The one sizing rule: by default a STAR head has at most this many times the parameters of the head it replaces
(the invariant and the equivariant head that STAR shares one bank between)."""
DEFAULT_NUM_EXPERTS = 8
"""Experts of a drop-in head unless told; fewer (4, then 2) only where 8 experts of width 1 exceed the budget."""


def count_parameters(module: nn.Module) -> int:
    """Number of scalars in all parameters of ``module`` (trainable or not; shared ones counted once)."""
    return sum(p.numel() for p in module.parameters())


def linear_macs(module: nn.Module) -> int:
    """Multiply-adds per sample of every Linear layer in ``module`` (fused expert layers and routers included).

    Counts ``in · out`` per ``nn.Linear`` and ``N · in · out`` per
    :class:`~star_heads.expert_layers.ExpertLinear`; this is the per-sample cost of ``head(x)`` with all
    tasks, up to the O(width) terms listed in the module docstring.
    """
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, ExpertLinear):
            total += m.num_experts * m.in_features * m.out_features
    return total


def fit_width(
    build: Callable[[int], nn.Module],
    budget: int,
    *,
    mode: FitMode = "nearest",
    multiple_of: int = 1,
    name: str = "hidden_dim",
) -> int:
    """The hidden width whose head has the parameter count nearest to (or at most) ``budget``.

    Args:
        build: ``width -> module``; build it on ``device="meta"`` so candidates cost nothing.
        budget: Target parameter count.
        mode: ``"nearest"`` (closest count, ties to the smaller width) or ``"at_most"`` (largest width
            whose count does not exceed ``budget``).
        multiple_of: Only consider widths that are multiples of this (e.g. 8 for tensor cores).
        name: Name of the width in error messages.

    Tensor cores want widths that are multiples of 8: :func:`drop_in_hidden_dim` rounds down to one wherever
    the budget allows a width of 8 or more.

    Returns:
        The width (a positive multiple of ``multiple_of``).

    Raises:
        ValueError: the parameter count does not depend on the width, or (``"at_most"``) even the
            smallest width exceeds ``budget``.
    """
    budget = check_positive_int(budget, "budget")
    multiple_of = check_positive_int(multiple_of, "multiple_of")
    check_choice(mode, "mode", FitMode)

    def count(k: int) -> int:
        return count_parameters(build(k * multiple_of))

    lo_count, next_count = count(1), count(2)
    if next_count <= lo_count:
        raise ValueError(f"the parameter count does not grow with {name} (e.g. num_layers=1), so it cannot be sized")
    if mode == "at_most" and lo_count > budget:
        raise ValueError(
            f"no {name} fits a budget of {budget:,} parameters: the smallest ({multiple_of}) already has {lo_count:,}"
        )
    lo, hi = 1, 2  # invariant after the loop: count(lo) < budget <= count(hi), or lo == 1 with count(1) >= budget
    if lo_count >= budget:
        return multiple_of
    while count(hi) < budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) < budget:
            lo = mid
        else:
            hi = mid
    if mode == "at_most":
        k = hi if count(hi) == budget else lo
    else:
        k = hi if count(hi) - budget < budget - count(lo) else lo
    return k * multiple_of


def on_meta(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the module built on the ``meta`` device (a reference to count, never run)."""
    return {**{k: v for k, v in options.items() if k not in ("device", "dtype")}, "device": "meta"}


def drop_in_hidden_dim(
    build: Callable[[int], nn.Module], replaced_params: int, *, name: str = "expert_hidden_dim"
) -> int:
    """The default hidden width of a STAR head that replaces a head of ``replaced_params`` parameters.

    The largest width at which ``build(width)`` has at most :data:`DROP_IN_FACTOR` (2) times ``replaced_params``
    parameters, rounded down to a multiple of 8 when that is 8 or more (tensor cores). Every drop-in entry point
    uses it: the lightly drop-in heads, :func:`~star_heads.integrations.swap_projector` (and so
    ``replace_projection_head`` / solo-learn's ``replace_projector``) and :func:`~star_heads.build_head`.

    Args:
        build: ``width -> head``, built on ``device="meta"`` (:func:`on_meta`).
        replaced_params: Parameters of the replaced head (:func:`count_parameters`).
        name: The width's name in errors.

    Raises:
        ValueError: even width 1 exceeds the budget (the message says to pass the width explicitly).
    """
    budget = DROP_IN_FACTOR * check_positive_int(replaced_params, "replaced_params")
    try:
        width = fit_width(build, budget, mode="at_most", name=name)
    except ValueError as err:
        raise ValueError(
            f"the default {name} gives the STAR head at most {DROP_IN_FACTOR}x the {replaced_params:,} parameters of "
            f"the head it replaces, and none fits ({err}); pass {name}= explicitly"
        ) from None
    return width // 8 * 8 if width >= 8 else width


def _with_experts(build: Callable[[int, int], nn.Module], num_experts: int, width: int) -> nn.Module:
    return build(width, num_experts)


def drop_in_size(
    build: Callable[[int, int], nn.Module],
    replaced_params: int,
    num_experts: int | None,
    *,
    name: str = "expert_hidden_dim",
) -> tuple[int, int]:
    """``(hidden width, num_experts)`` of a drop-in STAR head: :func:`drop_in_hidden_dim` at ``num_experts``, or
    at :data:`DEFAULT_NUM_EXPERTS` (8) when None — then 4 or 2 where the routers and 8 experts of width 1 alone
    exceed the budget (small heads such as hidden width 8). ``build(width, num_experts)`` builds on meta."""
    if num_experts is not None:
        n = check_positive_int(num_experts, "num_experts")
        return drop_in_hidden_dim(lambda w: build(w, n), replaced_params, name=name), n
    for n in (DEFAULT_NUM_EXPERTS, 4, 2):
        try:
            return drop_in_hidden_dim(partial(_with_experts, build, n), replaced_params, name=name), n
        except ValueError:
            if n == 2:
                raise
    raise AssertionError("unreachable")
