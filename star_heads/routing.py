"""Soft task routers and routing statistics (STAR, Sec. 3: one softmax router per task).

Axis legend:
    b: batch    t: tasks    n: experts    d: input features

Router of task t: ``s_t(x) = softmax(W_t x + c_t)`` over the N experts — no noise, no top-k, no
load-balancing loss in the paper. All T routers are evaluated as one ``Linear(d → T·N)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from star_heads._checks import (
    check_bool,
    check_choice,
    check_float_tensor,
    check_int,
    check_names,
    check_positive_float,
    check_positive_int,
)
from star_heads._precision import autocast_dtype

__all__ = ["ROUTER_INITS", "RouterInit", "RoutingStats", "SoftRouter", "routing_stats"]

RouterInit = Literal["default", "task-distinct", "noisy"]
ROUTER_INITS: tuple[str, ...] = ("default", "task-distinct", "noisy")
"""The router initialisations of :class:`SoftRouter` (``init=``)."""
_DEFAULT_INIT_SCALE = {"task-distinct": 3.0, "noisy": 2.0}


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
        init: The router's starting bias. ``"default"``: ``nn.Linear``'s, so every task starts near the uniform
            gate and reads the same mixture (z_inv ≈ z_eq at step 0). ``"task-distinct"``: the experts split into
            contiguous blocks, one per task, bias ``+init_scale`` on the task's own block and ``-init_scale``
            elsewhere. ``"noisy"``: independent ``N(0, init_scale²)`` biases per task and expert. Neither
            alternative is in the paper. Evidence (docs/results.md, quality benchmark): task-distinct is less
            redundant than separate heads after 1024 steps but not after 4096, and costs shape transfer there;
            noisy costs transfer.
        init_scale: Bias scale of ``"task-distinct"`` (default 3) or ``"noisy"`` (default 2); refused with
            ``"default"``.

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
        init: RouterInit = "default",
        init_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.num_tasks = check_positive_int(num_tasks, "num_tasks")
        temperature = check_positive_float(temperature, "temperature")
        learn_temperature = check_bool(learn_temperature, "learn_temperature")
        self.conditional = check_bool(conditional, "conditional")
        if top_k is not None:
            check_positive_int(top_k, "top_k")
            if top_k > num_experts:
                raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k = top_k
        self.init = check_choice(init, "init", RouterInit)
        self.init_scale = _init_scale(init, init_scale, self.num_tasks, self.num_experts)
        factory = {"device": device, "dtype": dtype}
        if conditional:
            self.linear = nn.Linear(input_dim, num_tasks * num_experts, **factory)
        else:
            self.logits = nn.Parameter(torch.zeros(num_tasks * num_experts, **factory))
        if self.init_scale is not None:  # every init but "default" has a scale
            _init_bias_(self.linear.bias if conditional else self.logits, init, self.init_scale, num_tasks, num_experts)
        log_t = torch.tensor(math.log(temperature), **factory)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, x: torch.Tensor, task_index: int | None = None, *, _checked: bool = False) -> torch.Tensor:
        """Gates of every task ``[B, T, N]``, or of task ``task_index`` only as ``[B, 1, N]`` (only its rows
        of the router are evaluated). ``_checked`` (internal): the caller, a head, validated the inputs already.

        Raises:
            TypeError: ``x`` is not a float tensor; ``task_index`` is not an int (a bool is not).
            ValueError: ``x`` is not ``[B, input_dim]``; ``task_index`` is outside ``[0, num_tasks - 1]``.
        """
        if not _checked:
            check_float_tensor(x, "x", sizes=(None, self.input_dim))
            if task_index is not None:
                check_int(task_index, "task_index", minimum=0, maximum=self.num_tasks - 1)
        return self._gates(x, task_index)

    def _gates(self, x: torch.Tensor, task_index: int | None = None) -> torch.Tensor:
        """:meth:`forward` without the checks, for a caller that validated ``x`` and ``task_index`` already."""
        n = self.num_experts
        rows = slice(None) if task_index is None else slice(task_index * n, (task_index + 1) * n)
        if self.conditional:
            bias = None if self.linear.bias is None else self.linear.bias[rows]
            logits = F.linear(x, self.linear.weight[rows], bias)
        else:
            logits = self.logits[rows].to(x.dtype).expand(x.shape[0], -1)
        logits = rearrange(logits, "b (t n) -> b t n", n=n)
        compute = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 logits: softmax in fp32
        gates = torch.softmax(logits.to(compute) / self.temperature.to(compute), dim=-1)
        if self.top_k is not None and self.top_k < n:
            gates = _keep_top_k(gates, self.top_k)
        # under autocast the bank casts the gates itself; otherwise they take the input's dtype
        return gates if autocast_dtype(x.device.type) is not None else gates.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, num_experts={self.num_experts}, num_tasks={self.num_tasks}, "
            f"conditional={self.conditional}, top_k={self.top_k}"
        )


def _init_scale(init: str, scale: object, num_tasks: int, num_experts: int) -> float | None:
    """Checks ``init_scale`` against ``init`` (and the task / expert counts it needs); returns the scale used."""
    if init == "default":
        if scale is not None:
            raise ValueError(
                f"init_scale applies to init 'task-distinct' or 'noisy', not 'default'; got init_scale={scale!r}"
            )
        return None
    if init == "task-distinct" and not 2 <= num_tasks <= num_experts:
        raise ValueError(
            "init 'task-distinct' splits the experts between the tasks, so it needs num_tasks >= 2 and "
            f"num_experts >= num_tasks; got num_tasks={num_tasks!r}, num_experts={num_experts!r}"
        )
    return _DEFAULT_INIT_SCALE[init] if scale is None else check_positive_float(scale, "init_scale")


@torch.no_grad()
def _init_bias_(bias: torch.Tensor, init: str, scale: float, num_tasks: int, num_experts: int) -> None:
    """Writes the ``[T·N]`` router bias of ``init`` in place (see :class:`SoftRouter`'s ``init``)."""
    if init == "noisy":
        bias.normal_(0.0, scale)
        return
    owner = torch.arange(num_experts, device=bias.device) * num_tasks // num_experts  # [n]: task owning expert k
    own = owner == torch.arange(num_tasks, device=bias.device)[:, None]  # [t, n]
    signs = own.to(bias.dtype) * 2 - 1
    bias.copy_(rearrange(signs * scale, "t n -> (t n)"))


def _keep_top_k(gates: torch.Tensor, k: int) -> torch.Tensor:
    """Zeroes all but the k largest gates along the last axis and renormalises the rest to sum to 1."""
    _, idx = gates.topk(k, dim=-1)
    mask = torch.zeros_like(gates).scatter_(-1, idx, 1.0)
    kept = gates * mask
    return kept / kept.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class RoutingStats:
    """What users log to see expert specialisation (the STAR paper, arXiv 2510.27222, analyses experts as shared vs
    task-specific).

    Attributes:
        mean_gate: ``[T, N]`` mean gate of each expert for each task (rows sum to 1): the expert's load.
        entropy: ``[T]`` mean per-sample gate entropy (nats); 0 = hard routing, log N = uniform.
        effective_experts: ``[T]`` ``exp`` of the entropy of ``mean_gate`` (how many experts a task uses
            over the batch, between 1 and N).
        sample_effective_experts: ``[T]`` mean over samples of ``exp(per-sample entropy)``.
        task_overlap: ``[N]`` for each expert, the smallest mean gate over tasks divided by the largest
            (1 = used equally by all tasks, i.e. shared; 0 = used by one task only). ``nan``-free: an
            expert no task uses gets 0.
        tasks: Task names of the T rows (``("0", "1", ...)`` when :func:`routing_stats` was not given them).
    """

    mean_gate: torch.Tensor
    entropy: torch.Tensor
    effective_experts: torch.Tensor
    sample_effective_experts: torch.Tensor
    task_overlap: torch.Tensor
    tasks: tuple[str, ...] = ()

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """A flat ``{name: float}`` dict that Lightning's ``self.log_dict``, TensorBoard's ``add_scalars`` and
        W&B's ``log`` take unchanged (no lists, no tensors).

        Keys (``{p}`` is ``prefix``, ``{t}`` a task name, ``{k}`` an expert index)::

            {p}{t}/entropy   {p}{t}/effective_experts   {p}{t}/sample_effective_experts
            {p}{t}/expert_{k}/load        (the mean gate of expert k for task t)
            {p}expert_{k}/task_overlap

        Args:
            prefix: Prepended to every key as given (e.g. ``"train/routing/"``).
        """
        if not isinstance(prefix, str):
            raise TypeError(
                f"prefix must be a str, got {type(prefix).__name__} {prefix!r} "
                "(task names are given to routing_stats(gates, tasks=...))"
            )
        names = self.tasks or tuple(str(t) for t in range(self.mean_gate.shape[0]))
        out: dict[str, float] = {}
        for t, name in enumerate(names):
            out[f"{prefix}{name}/entropy"] = float(self.entropy[t])
            out[f"{prefix}{name}/effective_experts"] = float(self.effective_experts[t])
            out[f"{prefix}{name}/sample_effective_experts"] = float(self.sample_effective_experts[t])
            for k, load in enumerate(self.mean_gate[t].tolist()):
                out[f"{prefix}{name}/expert_{k}/load"] = float(load)
        for k, overlap in enumerate(self.task_overlap.tolist()):
            out[f"{prefix}expert_{k}/task_overlap"] = float(overlap)
        return out


@torch.no_grad()
def routing_stats(gates: torch.Tensor, tasks: Sequence[str] | None = None) -> RoutingStats:
    """Summarises gates ``[B, T, N]`` (or ``[B, N]`` for one task) computed in float64.

    Args:
        gates: Router outputs, each row a distribution over experts (e.g. ``head(x, return_gates=True).gates``).
        tasks: Names of the T tasks, used as keys by :meth:`RoutingStats.as_dict` (e.g. ``head.tasks``).

    Returns:
        :class:`RoutingStats`.

    Raises:
        TypeError: ``gates`` is not a float tensor, ``tasks`` not a sequence of strings.
        ValueError: wrong shape, an empty batch, or as many task names as tasks.
    """
    check_float_tensor(gates, "gates")
    if gates.ndim == 2:
        gates = gates.unsqueeze(1)
    if gates.ndim != 3 or gates.shape[0] == 0:
        raise ValueError(f"gates must have shape [B, T, N] or [B, N] with B >= 1, got {tuple(gates.shape)}")
    names = () if tasks is None else check_names(tasks, "tasks")
    if names and len(names) != gates.shape[1]:
        raise ValueError(
            f"tasks has {len(names)} names {names}, but gates have {gates.shape[1]} tasks (shape {tuple(gates.shape)})"
        )
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
        tasks=names,
    )
