"""Baseline heads behind the same interface as :class:`~star_heads.MMoEHead`, for ablations.

Axis legend:
    b: batch    t: tasks    n: experts    o: output features

* :class:`SeparateHeads` — one independent MLP per task (EquiMod's invariant and equivariant heads).
* :class:`SharedSpecificHead` — STAR-SS: ``z_t = E_t(x) + E_shared(x)``, no router.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import nn

from star_heads.experts import ExpertBank
from star_heads.heads import TaskHead

__all__ = ["SeparateHeads", "SharedSpecificHead"]


class SeparateHeads(TaskHead):
    """One independent MLP per task (the separate-heads baseline of EquiMod).

    Each task owns a single-expert :class:`ExpertBank`, so ``head(x, task=...)`` computes only that task's MLP.

    Args:
        input_dim: Backbone feature size d.
        hidden_dim: Hidden width of each MLP.
        output_dim: Embedding size.
        num_layers: Linear layers per MLP.
        tasks: Task names, one MLP each.
        **expert_kwargs: Passed to each :class:`ExpertBank` (``norm_layer``, ``act_layer``, ``last_bias``,
            ``last_norm_layer``, ``device``, ``dtype``).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int = 3,
        *,
        tasks: Sequence[str] = ("inv", "eq"),
        **expert_kwargs: Any,
    ) -> None:
        super().__init__(input_dim, output_dim, tasks)
        self.heads = nn.ModuleDict(
            {t: ExpertBank(1, input_dim, hidden_dim, output_dim, num_layers, **expert_kwargs) for t in self.tasks}
        )

    @classmethod
    def equimod(cls, input_dim: int, hidden_dim: int = 2048, output_dim: int = 128, **kwargs: Any) -> SeparateHeads:
        """EquiMod's heads: ``d → 2048 → 2048 → 128`` with BN+ReLU between, ending in ``BN(affine=False)``."""
        kwargs.setdefault("last_norm_layer", partial(nn.BatchNorm1d, affine=False))
        kwargs.setdefault("last_bias", False)
        return cls(input_dim, hidden_dim, output_dim, 3, **kwargs)

    def _embed(self, x, task_indices, need_gates, need_experts):
        outs = [self.heads[self.tasks[i]](x) for i in task_indices]  # each [b, 1, o]
        z = rearrange(torch.cat(outs, dim=1), "b t o -> t b o")
        return z, None, (rearrange(z, "t b o -> b t o") if need_experts else None)


class SharedSpecificHead(TaskHead):
    """STAR-SS ("shared + specific"): ``z_t(x) = E_t(x) + E_shared(x)`` with no router.

    The T task experts and the shared expert live in one fused :class:`ExpertBank` of ``T + 1`` experts
    (the shared one last); the sums are a fixed 0/1 mixing matrix, so ``gates`` are returned as that matrix.

    Args:
        input_dim: Backbone feature size d.
        hidden_dim: Expert hidden width.
        output_dim: Embedding size.
        num_layers: Linear layers per expert.
        tasks: Task names.
        **expert_kwargs: Passed to the :class:`ExpertBank`.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int = 3,
        *,
        tasks: Sequence[str] = ("inv", "eq"),
        **expert_kwargs: Any,
    ) -> None:
        super().__init__(input_dim, output_dim, tasks)
        t = self.num_tasks
        self.experts = ExpertBank(t + 1, input_dim, hidden_dim, output_dim, num_layers, **expert_kwargs)
        mixing = torch.cat([torch.eye(t), torch.ones(t, 1)], dim=1)  # [t, t+1]
        self.register_buffer("mixing", mixing, persistent=False)

    def _embed(self, x, task_indices, need_gates, need_experts):
        gates = self.mixing[task_indices].to(x.dtype).expand(x.shape[0], -1, -1)  # [b, t, n]
        if need_experts:
            z, experts = self.experts(x, gates, return_expert_outputs=True)
            return z, gates, experts
        return self.experts(x, gates), gates, None
