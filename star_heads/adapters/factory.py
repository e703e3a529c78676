"""Builds the projection heads the adapters and examples choose between by name."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from star_heads._checks import check_bool, choices
from star_heads.baselines import SeparateHeads, SharedSpecificHead
from star_heads.heads import ROUTER_OPTIONS, STARHead, TaskHead
from star_heads.sizing import DEFAULT_NUM_EXPERTS, count_parameters, drop_in_size, on_meta

__all__ = ["HEAD_KINDS", "HeadKind", "build_head"]

HeadKind = Literal["star", "separate", "shared", "single"]
HEAD_KINDS: tuple[str, ...] = choices(HeadKind)


def build_head(
    kind: HeadKind | nn.Module,
    input_dim: int,
    *,
    num_experts: int | None = None,
    output_dim: int = 128,
    hidden_dim: int | None = None,
    num_layers: int = 3,
    match_params: bool = False,
    **options: Any,
) -> TaskHead | nn.Module:
    """Returns a head with tasks ``("inv", "eq")`` (``"single"``: ``("inv",)``), or ``kind`` itself if it is a module.

    Every kind has the depth ``num_layers`` and output width ``output_dim``; the baselines' hidden width defaults
    to ``input_dim`` (the STAR paper's expert shape, arXiv 2510.27222). A ``"star"`` head follows the package's one
    sizing rule (:func:`~star_heads.sizing.drop_in_size`, table in docs/heads.md): by default it has at most twice
    the parameters of the ``"single"`` head of the same arguments (the head a user of the method would otherwise
    use), at the largest expert width (a multiple of 8 where the budget allows) that fits; ``hidden_dim=input_dim``
    gives the paper's per-expert shape (about N times those parameters).

    * ``"star"``: :class:`~star_heads.STARHead`, ``num_experts`` (default 8; 4 or 2 where 8 do not fit the
      default budget) experts with one soft router per task;
    * ``"separate"``: :class:`~star_heads.SeparateHeads`, one MLP per task (EquiMod-style; for EquiMod's
      exact 2048-wide heads use ``SeparateHeads.equimod``);
    * ``"shared"``: :class:`~star_heads.SharedSpecificHead` (STAR-SS);
    * ``"single"``: one MLP for the invariant task only (the SimCLR / VICReg baseline).

    With ``match_params=True`` a baseline kind is instead sized like the STAR head that the same arguments
    would build (``build_head("star", input_dim, num_experts=..., hidden_dim=..., ...)``): its hidden width is
    chosen so that its parameter count is within 5 % and its FLOPs within 10 % of that head's
    (:meth:`SeparateHeads.param_matched`). ``num_experts``, ``hidden_dim`` and the router options then
    describe the STAR reference.

    Args:
        kind: One of :data:`HEAD_KINDS`, or a module returned as is (then no other option may be given).
        input_dim: Backbone feature size d.
        num_experts: Experts of a STAR head (default 8); only for ``"star"`` or with ``match_params``.
        output_dim: Embedding size.
        hidden_dim: Hidden width (baselines: default ``input_dim``; ``"star"``: default the sizing rule above).
        num_layers: Linear layers per expert / MLP.
        match_params: Size a baseline kind to the STAR head of the same arguments.
        **options: Flat layer options valid for every kind (``norm_layer``, ``act_layer``,
            ``last_norm_layer``, ``last_bias``, ``hidden_bias``, ``check_finite``, ``device``, ``dtype``) and router
            options (``temperature``, ``learn_temperature``, ``conditional``, ``top_k``, ``router_init``,
            ``router_init_scale``) valid for ``"star"`` or
            with ``match_params``.

    Raises:
        TypeError: wrong type of ``kind`` or of an option, or an unknown option.
        ValueError: unknown ``kind``, or an option that the kind does not have (the message names the kind).
    """
    if isinstance(kind, nn.Module):
        given = {"num_experts": num_experts, "hidden_dim": hidden_dim, **options}
        extra = [k for k, v in given.items() if v is not None] + (["match_params"] if match_params else [])
        if extra:
            raise ValueError(f"build_head got a ready-made module, so it takes no options; got {extra}")
        return kind
    if not isinstance(kind, str):
        raise TypeError(f"kind must be one of {HEAD_KINDS} or an nn.Module, got {type(kind).__name__} {kind!r}")
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS} or an nn.Module")
    check_bool(match_params, "match_params")
    if "tasks" in options:
        raise TypeError(
            "build_head fixes the tasks (('inv', 'eq'), or ('inv',) for 'single'); for other tasks build the head "
            f"class directly, got tasks={options['tasks']!r}"
        )
    router = {k: options.pop(k) for k in ROUTER_OPTIONS if k in options}
    hidden = input_dim if hidden_dim is None else hidden_dim
    if kind == "star" or match_params:
        if kind == "star" and match_params:
            raise ValueError("match_params sizes a baseline against STAR; it does not apply to kind 'star'")
        n = num_experts
        if hidden_dim is None:  # the one sizing rule: at most 2x the single-task head of the same arguments
            single = SeparateHeads(input_dim, input_dim, output_dim, num_layers, tasks=("inv",), **on_meta(options))
            hidden, n = drop_in_size(
                lambda h, k: STARHead(
                    input_dim,
                    output_dim,
                    num_experts=k,
                    hidden_dim=h,
                    num_layers=num_layers,
                    **router,
                    **on_meta(options),
                ),
                count_parameters(single),
                num_experts,
                name="hidden_dim",
            )
        star = STARHead(
            input_dim,
            output_dim,
            num_experts=DEFAULT_NUM_EXPERTS if n is None else n,
            hidden_dim=hidden,
            num_layers=num_layers,
            **router,
            **(options if kind == "star" else on_meta(options)),
        )
        if kind == "star":
            return star
    else:
        unused = (["num_experts"] if num_experts is not None else []) + sorted(router)
        if unused:
            raise ValueError(
                f"{unused} apply to kind 'star' (or to a baseline sized with match_params=True), not to kind {kind!r}"
            )
    tasks = ("inv",) if kind == "single" else ("inv", "eq")
    cls = SharedSpecificHead if kind == "shared" else SeparateHeads
    if match_params:
        return cls.param_matched(star, input_dim, output_dim, num_layers, tasks=tasks, **options)
    return cls(input_dim, hidden, output_dim, num_layers, tasks=tasks, **options)
