"""Soft task routers and routing statistics (STAR, Sec. 3: one softmax router per task).

Axis legend:
    b: batch    t: tasks    n: experts    d: input features

Router of task t: ``s_t(x) = softmax(W_t x + c_t)`` over the N experts — no noise, no top-k, no
load-balancing loss in the paper. All T routers are evaluated as one ``Linear(d → T·N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from star_heads._checks import check_float_tensor, check_positive_int

__all__ = ["SoftRouter", "RoutingStats", "routing_stats"]


class SoftRouter(nn.Module):
    """Per-task softmax gates over experts, all tasks from one ``Linear(input_dim → T·N)``.

    Args:
        input_dim: Feature size d of the router input (the backbone features).
        num_experts: Number of experts N.
        num_tasks: Number of tasks T (one router each).
        temperature: Softmax temperature (1.0 in the paper). Must be > 0.
        learn_temperature: Learn the temperature (stored as its log; initialised to ``temperature``).
        conditional: ``False`` gives learned input-independent gates (one logit vector per task).
        top_k: Keep the k largest gates per task and renormalise them. Experimental: with BatchNorm
            inside the experts, each expert then normalises a different, varying sub-batch, which the
            STAR authors found unstable; use it with ``norm_layer=nn.LayerNorm`` or no norm. Gradients
            reach only the kept gates.

    Shapes:
        ``forward(x [B, d]) -> gates [B, T, N]``, each ``gates[b, t]`` sums to 1.
    """

    def __init__(
        self,
        input_dim: int,
        num_experts: int,
        num_tasks: int = 1,
        *,
        temperature: float = 1.0,
        learn_temperature: bool = False,
        conditional: bool = True,
        top_k: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.num_tasks = check_positive_int(num_tasks, "num_tasks")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None:
            check_positive_int(top_k, "top_k")
            if top_k > num_experts:
                raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k = top_k
        self.conditional = conditional
        factory = {"device": device, "dtype": dtype}
        if conditional:
            self.linear = nn.Linear(input_dim, num_tasks * num_experts, **factory)
        else:
            self.logits = nn.Parameter(torch.zeros(num_tasks * num_experts, **factory))
        log_t = torch.tensor(math.log(temperature), **factory)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, x: torch.Tensor, task_index: int | None = None) -> torch.Tensor:
        """Gates of every task ``[B, T, N]``, or of task ``task_index`` only as ``[B, 1, N]`` (only its rows
        of the router are evaluated)."""
        check_float_tensor(x, "x", sizes=(None, self.input_dim))
        n = self.num_experts
        rows = slice(None) if task_index is None else slice(task_index * n, (task_index + 1) * n)
        if self.conditional:
            bias = None if self.linear.bias is None else self.linear.bias[rows]
            logits = F.linear(x, self.linear.weight[rows], bias)
        else:
            logits = self.logits[rows].to(x.dtype).expand(x.shape[0], -1)
        logits = rearrange(logits, "b (t n) -> b t n", n=n)
        gates = torch.softmax(logits.float() / self.temperature.float(), dim=-1)
        if self.top_k is not None and self.top_k < n:
            gates = _keep_top_k(gates, self.top_k)
        return gates

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, num_experts={self.num_experts}, num_tasks={self.num_tasks}, "
            f"conditional={self.conditional}, top_k={self.top_k}"
        )


def _keep_top_k(gates: torch.Tensor, k: int) -> torch.Tensor:
    """Zeroes all but the k largest gates along the last axis and renormalises the rest to sum to 1."""
    _, idx = gates.topk(k, dim=-1)
    mask = torch.zeros_like(gates).scatter_(-1, idx, 1.0)
    kept = gates * mask
    return kept / kept.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class RoutingStats:
    """What users log to see expert specialisation.

    Attributes:
        mean_gate: ``[T, N]`` mean gate of each expert for each task (rows sum to 1).
        entropy: ``[T]`` mean per-sample gate entropy (nats); 0 = hard routing, log N = uniform.
        effective_experts: ``[T]`` ``exp`` of the entropy of ``mean_gate`` (how many experts a task uses
            over the batch, between 1 and N).
        sample_effective_experts: ``[T]`` mean over samples of ``exp(per-sample entropy)``.
        task_overlap: ``[N]`` for each expert, the smallest mean gate over tasks divided by the largest
            (1 = used equally by all tasks, i.e. shared; 0 = used by one task only). ``nan``-free: an
            expert no task uses gets 0.
    """

    mean_gate: torch.Tensor
    entropy: torch.Tensor
    effective_experts: torch.Tensor
    sample_effective_experts: torch.Tensor
    task_overlap: torch.Tensor

    def as_dict(self, tasks: tuple[str, ...] | None = None) -> dict[str, float | list]:
        """Plain Python numbers (for JSON / loggers), keyed by task name when ``tasks`` is given."""
        names = tasks or tuple(str(t) for t in range(self.mean_gate.shape[0]))
        out: dict[str, float | list] = {}
        for t, name in enumerate(names):
            out[f"{name}/entropy"] = float(self.entropy[t])
            out[f"{name}/effective_experts"] = float(self.effective_experts[t])
            out[f"{name}/mean_gate"] = self.mean_gate[t].tolist()
        out["task_overlap"] = self.task_overlap.tolist()
        return out


@torch.no_grad()
def routing_stats(gates: torch.Tensor) -> RoutingStats:
    """Summarises gates ``[B, T, N]`` (or ``[B, N]`` for one task) computed in float64.

    Args:
        gates: Router outputs, each row a distribution over experts.

    Returns:
        :class:`RoutingStats`.
    """
    check_float_tensor(gates, "gates")
    if gates.ndim == 2:
        gates = gates.unsqueeze(1)
    if gates.ndim != 3 or gates.shape[0] == 0:
        raise ValueError(f"gates must have shape [B, T, N] or [B, N] with B >= 1, got {tuple(gates.shape)}")
    g = gates.detach().double()
    plogp = torch.special.xlogy(g, g)  # 0·log 0 = 0
    entropy = -plogp.sum(-1)  # [b, t]
    mean_gate = g.mean(0)  # [t, n]
    mean_entropy = -torch.special.xlogy(mean_gate, mean_gate).sum(-1)
    top = mean_gate.max(0).values
    overlap = torch.where(top > 0, mean_gate.min(0).values / top.clamp_min(1e-300), torch.zeros_like(top))
    return RoutingStats(
        mean_gate=mean_gate,
        entropy=entropy.mean(0),
        effective_experts=mean_entropy.exp(),
        sample_effective_experts=entropy.exp().mean(0),
        task_overlap=overlap,
    )
