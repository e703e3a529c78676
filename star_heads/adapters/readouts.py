"""Readouts as flat ``{name: float}`` dicts: what Lightning's ``log_dict``, TensorBoard's ``add_scalars`` and
W&B's ``log`` take unchanged (no lists, no tensors, no nesting)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from star_heads.routing import routing_stats

__all__ = ["flatten_floats", "routing_dict", "cca_dict"]


def flatten_floats(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{prefix + key: float}``; a list / tensor value ``v`` becomes ``key/0``, ``key/1``, ...; None is dropped."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().tolist()
        if isinstance(value, Sequence) and not isinstance(value, str):
            out.update(flatten_floats({str(i): v for i, v in enumerate(value)}, f"{name}/"))
        else:
            out[name] = float(value)
    return out


def routing_dict(gates: torch.Tensor, tasks: Sequence[str] = (), prefix: str = "") -> dict[str, float]:
    """Routing statistics of gates ``[B, T, N]`` (:func:`~star_heads.routing_stats`) as flat floats:
    ``<task>/entropy``, ``<task>/effective_experts``, ``<task>/mean_gate/<k>``, ``task_overlap/<k>``."""
    stats = routing_stats(gates)
    names = tuple(tasks) if len(tasks) == stats.mean_gate.shape[0] else tuple(str(t) for t in range(stats.mean_gate.shape[0]))
    values: dict[str, Any] = {}
    for t, name in enumerate(names):
        values[f"{name}/entropy"] = stats.entropy[t]
        values[f"{name}/effective_experts"] = stats.effective_experts[t]
        values[f"{name}/mean_gate"] = stats.mean_gate[t]
    values["task_overlap"] = stats.task_overlap
    return flatten_floats(values, prefix)


def cca_dict(result: Any, prefix: str = "") -> dict[str, float]:
    """A :class:`~star_heads.CCAResult` as flat floats: ``mean``, ``null_mean``, ``excess`` (when the null
    baseline was computed), ``n``, ``rank_x``, ``rank_y``."""
    values = {
        "mean": result.mean,
        "null_mean": result.null_mean,
        "excess": result.excess,
        "n": result.n,
        "rank_x": result.rank_x,
        "rank_y": result.rank_y,
    }
    return flatten_floats(values, prefix)
