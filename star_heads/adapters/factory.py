"""Builds the projection heads the adapters and examples choose between by name."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from star_heads.baselines import SeparateHeads, SharedSpecificHead
from star_heads.heads import STARHead, TaskHead

__all__ = ["HEAD_KINDS", "build_head"]

HeadKind = Literal["star", "separate", "shared", "single"]
HEAD_KINDS: tuple[str, ...] = ("star", "separate", "shared", "single")


def build_head(
    kind: HeadKind | nn.Module,
    input_dim: int,
    *,
    num_experts: int = 8,
    output_dim: int = 128,
    hidden_dim: int | None = None,
    num_layers: int = 3,
    **kwargs: Any,
) -> TaskHead | nn.Module:
    """Returns a head with tasks ``("inv", "eq")`` (``"single"``: ``("inv",)``), or ``kind`` itself if it is a module.

    Every kind uses the same expert shape ``input_dim → hidden → hidden → output_dim`` (hidden defaults to
    ``input_dim``, as in STAR), so ablations differ only in how the tasks share parameters:

    * ``"star"``: :class:`~star_heads.STARHead`, ``num_experts`` experts with one soft router per task;
    * ``"separate"``: :class:`~star_heads.SeparateHeads`, one MLP per task (EquiMod-style; for EquiMod's
      exact 2048-wide heads use ``SeparateHeads.equimod``);
    * ``"shared"``: :class:`~star_heads.SharedSpecificHead` (STAR-SS);
    * ``"single"``: one MLP for the invariant task only (the SimCLR / VICReg baseline).

    Raises:
        ValueError: unknown ``kind``.
    """
    if isinstance(kind, nn.Module):
        return kind
    hidden = hidden_dim or input_dim
    if kind == "star":
        return STARHead(input_dim, output_dim, num_experts=num_experts, hidden_dim=hidden, num_layers=num_layers, **kwargs)
    if kind == "separate":
        return SeparateHeads(input_dim, hidden, output_dim, num_layers, **kwargs)
    if kind == "shared":
        return SharedSpecificHead(input_dim, hidden, output_dim, num_layers, **kwargs)
    if kind == "single":
        return SeparateHeads(input_dim, hidden, output_dim, num_layers, tasks=("inv",), **kwargs)
    raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS} or an nn.Module")
