"""Multi-task projection heads: the common interface, MMoE and STAR (STAR, Sec. 3).

Axis legend:
    b: batch    t: tasks    n: experts    o: output features

Every head maps backbone features ``x [B, d]`` to one embedding per task:

* ``head(x, task="inv") -> Tensor [B, o]`` computes only what that task needs (drop-in for any
  ``(z0, z1)`` loss);
* ``head(x) -> HeadOutput`` (a mapping task → Tensor) for multi-task heads; single-task heads return
  the Tensor; ``return_gates`` / ``return_expert_outputs`` opt into extras.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from star_heads._checks import check_float_tensor
from star_heads.experts import ExpertBank
from star_heads.routing import SoftRouter

__all__ = [
    "HeadOutput",
    "TaskHead",
    "MMoEHead",
    "STARHead",
    "STARSimCLRProjectionHead",
    "STARVICRegProjectionHead",
]


@dataclass(frozen=True)
class HeadOutput(Mapping):
    """Per-task embeddings plus opt-in extras; behaves as a read-only ``{task: Tensor}`` mapping.

    Attributes:
        embeddings: ``{task: Tensor [B, o]}``, in the head's task order.
        gates: ``[B, T, N]`` router gates of the returned tasks (``return_gates=True``), else None.
        expert_outputs: ``[B, N, o]`` every expert's output (``return_expert_outputs=True``), else None.
    """

    embeddings: dict[str, torch.Tensor]
    gates: torch.Tensor | None = None
    expert_outputs: torch.Tensor | None = field(default=None, repr=False)

    def __getitem__(self, task: str) -> torch.Tensor:
        try:
            return self.embeddings[task]
        except KeyError:
            raise KeyError(f"unknown task {task!r}; this output holds {tuple(self.embeddings)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.embeddings)

    def __len__(self) -> int:
        return len(self.embeddings)


class TaskHead(nn.Module):
    """Base class: task bookkeeping, input checks and output assembly shared by every head.

    Subclasses implement ``_embed(x, task_indices, need_gates, need_experts) -> (z [T', B, o], gates, experts)``.
    """

    def __init__(self, input_dim: int, output_dim: int, tasks: Sequence[str]) -> None:
        super().__init__()
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"tasks must be a non-empty sequence of distinct non-empty strings, got {tasks!r}")
        self.input_dim, self.output_dim, self.tasks = input_dim, output_dim, tasks

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: str) -> int:
        """Index of ``task`` in :attr:`tasks`; ``ValueError`` naming the known tasks otherwise."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ValueError(f"unknown task {task!r}; this head has tasks {self.tasks}") from None

    def forward(
        self,
        x: torch.Tensor,
        task: str | None = None,
        *,
        return_gates: bool = False,
        return_expert_outputs: bool = False,
    ) -> torch.Tensor | HeadOutput:
        """Embeds backbone features.

        Args:
            x: ``[B, input_dim]`` backbone features.
            task: One task name (only its embedding is computed), or None for all tasks.
            return_gates: Also return the router gates ``[B, T, N]`` (None for heads without a router).
            return_expert_outputs: Also return every expert's output ``[B, N, o]``.

        Returns:
            A Tensor ``[B, output_dim]`` when one task is asked for (or the head has one task) and no
            extras are requested; a :class:`HeadOutput` otherwise.
        """
        check_float_tensor(x, "x", sizes=(None, self.input_dim))
        if task is not None and not isinstance(task, str):
            raise TypeError(f"task must be a task name (str) or None, got {type(task).__name__}")
        indices = list(range(self.num_tasks)) if task is None else [self.task_index(task)]
        z, gates, experts = self._embed(x, indices, return_gates, return_expert_outputs)
        if len(indices) == 1 and not (return_gates or return_expert_outputs):
            return z[0]
        embeddings = {self.tasks[i]: z[j] for j, i in enumerate(indices)}
        return HeadOutput(embeddings, gates if return_gates else None, experts if return_expert_outputs else None)

    def _embed(
        self, x: torch.Tensor, task_indices: list[int], need_gates: bool, need_experts: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


class MMoEHead(TaskHead):
    """Multi-gate mixture of experts: a shared :class:`ExpertBank` read by one :class:`SoftRouter` per task.

    ``z_t(x) = Σ_k s_{t,k}(x) · E_k(x)`` with ``s_t(x) = softmax(W_t x + c_t)`` (STAR, task embedding).
    The experts are computed once for all tasks.

    Args:
        input_dim: Backbone feature size d.
        hidden_dim: Expert hidden width.
        output_dim: Embedding size.
        num_layers: Linear layers per expert.
        num_experts: N.
        tasks: Task names, one router each.
        router_kwargs: Passed to :class:`SoftRouter` (``temperature``, ``learn_temperature``,
            ``conditional``, ``top_k``).
        expert_kwargs: Passed to :class:`ExpertBank` (``norm_layer``, ``act_layer``, ``last_bias``,
            ``last_norm_layer``).
        device: Factory kwarg.
        dtype: Factory kwarg.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int = 3,
        *,
        num_experts: int = 8,
        tasks: Sequence[str] = ("inv", "eq"),
        router_kwargs: dict[str, Any] | None = None,
        expert_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_dim, output_dim, tasks)
        factory = {"device": device, "dtype": dtype}
        self.experts = ExpertBank(
            num_experts, input_dim, hidden_dim, output_dim, num_layers, **(expert_kwargs or {}), **factory
        )
        self.router = SoftRouter(input_dim, num_experts, len(self.tasks), **(router_kwargs or {}), **factory)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def _embed(self, x, task_indices, need_gates, need_experts):
        single = len(task_indices) == 1 and self.num_tasks > 1
        gates = self.router(x, task_indices[0] if single else None)  # [b, t, n]
        if need_experts:
            z, experts = self.experts(x, gates, return_expert_outputs=True)  # [t, b, o], [b, n, o]
            return z, gates, experts
        return self.experts(x, gates), gates, None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Router gates ``[B, T, N]`` alone (cheap: the experts are not evaluated)."""
        return self.router(x)


class STARHead(MMoEHead):
    """MMoE head with the STAR paper's defaults: hidden = input_dim, output 128, 3 layers, tasks inv/eq, N = 8.

    Experts are ``d → d → d → 128`` MLPs (Linear no bias → BN → ReLU, twice, then Linear with bias, no
    output norm); routers are ``Linear(d → N)`` + softmax (STAR_METHOD.md, "Forward pass").
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int = 128,
        *,
        num_experts: int = 8,
        hidden_dim: int | None = None,
        num_layers: int = 3,
        tasks: Sequence[str] = ("inv", "eq"),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            input_dim, hidden_dim or input_dim, output_dim, num_layers, num_experts=num_experts, tasks=tasks, **kwargs
        )


class _DefaultTaskHead(MMoEHead):
    """MMoE head whose ``head(x)`` returns the ``"inv"`` Tensor (lightly-style drop-in)."""

    def forward(self, x, task="inv", **kwargs):  # type: ignore[override]
        """As :meth:`TaskHead.forward`, but ``task`` defaults to ``"inv"``; pass ``task=None`` for all tasks."""
        return super().forward(x, task, **kwargs)


class STARSimCLRProjectionHead(_DefaultTaskHead):
    """Drop-in for lightly's ``SimCLRProjectionHead``: same positional signature and defaults.

    ``head(x)`` returns the invariant embedding Tensor; ``head(x, task="eq")`` the equivariant one;
    ``head(x, task=None)`` both. ``batch_norm`` switches the experts' hidden BatchNorm. Unlike lightly's
    head, the experts follow STAR: the last layer is a Linear with bias and no BatchNorm.
    """

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
        *,
        num_experts: int = 8,
        tasks: Sequence[str] = ("inv", "eq"),
        **kwargs: Any,
    ) -> None:
        expert_kwargs = {"norm_layer": nn.BatchNorm1d if batch_norm else None, **kwargs.pop("expert_kwargs", {})}
        super().__init__(
            input_dim, hidden_dim, output_dim, num_layers,
            num_experts=num_experts, tasks=tasks, expert_kwargs=expert_kwargs, **kwargs,
        )


class STARVICRegProjectionHead(_DefaultTaskHead):
    """Drop-in for lightly's ``VICRegProjectionHead(input_dim=2048, hidden_dim=8192, output_dim=8192,
    num_layers=3)``; ``head(x)`` returns the invariant embedding Tensor. Mind the memory: N experts of
    width 8192 hold N times the parameters of lightly's single projector."""

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 8192,
        output_dim: int = 8192,
        num_layers: int = 3,
        *,
        num_experts: int = 8,
        tasks: Sequence[str] = ("inv", "eq"),
        **kwargs: Any,
    ) -> None:
        super().__init__(input_dim, hidden_dim, output_dim, num_layers, num_experts=num_experts, tasks=tasks, **kwargs)
