"""Multi-task projection heads: the common interface, MMoE and STAR (STAR, Sec. 3).

Axis legend:
    b: batch    t: tasks    n: experts    o: output features

Every head maps backbone features ``x [B, d]`` to one embedding per task:

* ``head(x, task="inv") -> Tensor [B, o]`` computes only what that task needs (drop-in for any
  ``(z0, z1)`` loss);
* ``head(x) -> HeadOutput`` (a mapping task → Tensor) for multi-task heads; single-task heads return
  the Tensor; ``return_gates`` / ``return_expert_outputs`` opt into extras.

Options follow one convention for every head (timm-style, flat keywords): sizes, then ``norm_layer``,
``act_layer``, ``last_norm_layer`` (classes or ``functools.partial`` of them, ``None`` / ``nn.Identity``
for none), ``last_bias``, the router options of :class:`~star_heads.SoftRouter` (``temperature``,
``learn_temperature``, ``conditional``, ``top_k``) for routed heads, ``check_finite``, ``device``, ``dtype``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from star_heads._checks import (
    check_batch_for_batch_norm,
    check_bool,
    check_float_tensor,
    check_input_dtype,
    check_layer,
    check_names,
    check_positive_int,
)
from star_heads._value_checks import value_checks_enabled
from star_heads.expert_spec import check_norm_layer
from star_heads.experts import ExpertBank
from star_heads.routing import RouterInit, SoftRouter
from star_heads.sizing import DEFAULT_NUM_EXPERTS, count_parameters, drop_in_size, on_meta

__all__ = [
    "HeadOutput",
    "TaskHead",
    "MMoEHead",
    "STARHead",
    "STARSimCLRProjectionHead",
    "STARVICRegProjectionHead",
    "ROUTER_OPTIONS",
]

ROUTER_OPTIONS: tuple[str, ...] = ("temperature", "learn_temperature", "conditional", "top_k", "router_init",
                                   "router_init_scale")
"""The keyword options of a routed head that configure its :class:`~star_heads.SoftRouter`."""


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

    The task names are saved in the state_dict (buffer ``task_names``): loading weights trained with tasks
    ``("eq", "inv")`` into a head with ``("inv", "eq")`` raises instead of silently swapping the tasks.

    Subclasses implement ``_embed(x, task_indices, need_gates, need_experts) -> (z [T', B, o], gates, experts)``.

    Args:
        input_dim: Backbone feature size d.
        output_dim: Embedding size.
        tasks: Task names (a sequence of distinct strings; a bare string is an error).
        check_finite: Check every input for NaN/Inf before it reaches a layer (and so the BatchNorm
            running statistics, which a single NaN row poisons for good). Costs one host sync per call.
    """

    def __init__(self, input_dim: int, output_dim: int, tasks: Sequence[str], *, check_finite: bool = False) -> None:
        super().__init__()
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.output_dim = check_positive_int(output_dim, "output_dim")
        self.tasks = check_names(tasks, "tasks")
        self.check_finite = check_bool(check_finite, "check_finite")
        self._register_task_names()

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: str) -> int:
        """Index of ``task`` in :attr:`tasks`; ``ValueError`` naming the known tasks otherwise."""
        if not isinstance(task, str):
            raise TypeError(f"task must be a task name (str) or None, got {type(task).__name__} {task!r}")
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
            x: ``[B, input_dim]`` backbone features, in the head's dtype (or any float dtype under autocast).
            task: One task name (only its embedding is computed), or None for all tasks.
            return_gates: Also return the router gates ``[B, T, N]`` (None for heads without a router).
            return_expert_outputs: Also return every expert's output ``[B, N, o]``.

        Returns:
            A Tensor ``[B, output_dim]`` when one task is asked for (or the head has one task) and no
            extras are requested; a :class:`HeadOutput` otherwise.

        Raises:
            TypeError: ``x`` is not a float tensor, or its dtype differs from the head's outside autocast;
                ``task`` is not a string; a flag is not a bool.
            ValueError: wrong shape, empty batch, a batch of one in training mode with BatchNorm, an unknown
                task, or (``check_finite``) NaN/Inf in ``x``.
        """
        self.check_input(x)
        return_gates = check_bool(return_gates, "return_gates")
        return_expert_outputs = check_bool(return_expert_outputs, "return_expert_outputs")
        indices = list(range(self.num_tasks)) if task is None else [self.task_index(task)]
        z, gates, experts = self._embed(x, indices, return_gates, return_expert_outputs)
        if len(indices) == 1 and not (return_gates or return_expert_outputs):
            return z[0]
        embeddings = {self.tasks[i]: z[j] for j, i in enumerate(indices)}
        if torch.jit.is_tracing():  # the tracer records tensors, not a mapping keyed by task names
            raise TypeError(
                f"torch.jit.trace of a {type(self).__name__} with several tasks: trace one task, e.g. "
                f"torch.jit.trace(head.single_task({self.tasks[0]!r}), x), or use torch.compile / torch.export"
            )
        return HeadOutput(embeddings, gates if return_gates else None, experts if return_expert_outputs else None)

    def check_input(self, x: object) -> torch.Tensor:
        """The one check of ``head(x)``: backbone features ``x`` in the user's terms (shape, dtype, batch size,
        finiteness). Layers below it (router, expert bank) run unchecked."""
        t = check_float_tensor(x, "x", sizes=(None, self.input_dim))
        if t.shape[0] == 0:
            raise ValueError(f"x must hold at least one sample, got an empty batch of shape {tuple(t.shape)}")
        ref = next(self.parameters(), None)
        if ref is not None:
            check_input_dtype(t, ref.dtype, "x", "head")
        if self.training:
            check_batch_for_batch_norm(t, self)
        if value_checks_enabled(self.check_finite):
            check_float_tensor(t, "x", finite=True)
        return t

    def _embed(
        self, x: torch.Tensor, task_indices: list[int], need_gates: bool, need_experts: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    # The task names travel with the weights: a head's per-task parameters (routers, separate MLPs) are
    # stored by task position, so a checkpoint loaded under another task order would swap the tasks. They
    # are kept as a persistent uint8 buffer (UTF-8 JSON) so that every state_dict value stays a Tensor.
    def _register_task_names(self) -> None:
        names = torch.tensor(list(json.dumps(list(self.tasks)).encode()), dtype=torch.uint8)
        self.register_buffer("task_names", names)
        self._register_load_state_dict_pre_hook(self._check_loaded_tasks)

    def _check_loaded_tasks(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        key = prefix + "task_names"
        if key not in state_dict:
            raise ValueError(
                f"{type(self).__name__}: the state_dict has no {key!r}, so the task order of its per-task weights "
                f"cannot be checked against this head's tasks {self.tasks}; load a state_dict saved from a "
                f"{type(self).__name__} (it stores the task names), or add state_dict[{key!r}] = head.task_names "
                "yourself if you know the orders agree"
            )
        try:
            saved = tuple(json.loads(bytes(state_dict[key].tolist()).decode()))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{type(self).__name__}: {key!r} in the checkpoint is not a list of task names") from None
        if saved != self.tasks:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was saved by a head with tasks {saved}, this head has tasks "
                f"{self.tasks}; per-task weights are stored by position, so loading would mix the tasks up. "
                f"Build the head with tasks={saved!r}."
            )

    def single_task(self, task: str) -> nn.Module:
        """A module whose ``forward(x)`` is ``head(x, task=task)``, sharing this head's parameters (for
        ``torch.jit.trace``, or code that expects ``projector(x) -> Tensor``)."""
        self.task_index(task)
        return _SingleTask(self, task)

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its forward takes task names and returns "
            "a mapping or a Tensor); use torch.compile, or torch.jit.trace(head.single_task('inv'), x)"
        )

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


class _SingleTask(nn.Module):
    """``forward(x) = head(x, task=task)`` (see :meth:`TaskHead.single_task`)."""

    def __init__(self, head: TaskHead, task: str) -> None:
        super().__init__()
        self.head, self.task = head, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.head(x, task=self.task)
        return z

    def extra_repr(self) -> str:
        return f"task={self.task!r}"


class MMoEHead(TaskHead):
    """Multi-gate mixture of experts: a shared :class:`ExpertBank` read by one :class:`SoftRouter` per task.

    ``z_t(x) = Σ_k s_{t,k}(x) · E_k(x)`` with ``s_t(x) = softmax(W_t x + c_t)`` (STAR, Sec. 3, task embedding;
    arXiv 2510.27222). The experts are computed once for all tasks.

    Args:
        input_dim: Backbone feature size d.
        hidden_dim: Expert hidden width.
        output_dim: Embedding size.
        num_layers: Linear layers per expert.
        num_experts: N.
        tasks: Task names, one router each.
        norm_layer: Norm after each hidden Linear of an expert (class or partial; ``None`` for none).
        act_layer: Activation after each hidden norm.
        last_norm_layer: Optional norm after the last Linear.
        last_bias: Whether the last Linear has a bias.
        hidden_bias: Whether the hidden Linears have a bias (the paper's experts have none: BatchNorm follows).
        temperature: Router softmax temperature (1 in the paper).
        learn_temperature: Learn the router temperature.
        conditional: Input-dependent gates (``False``: one learned logit vector per task).
        top_k: Keep the k largest gates per task (experimental, see :class:`SoftRouter`).
        router_init: How the routers start: ``"default"``, ``"task-distinct"`` or ``"noisy"`` (``init`` of
            :class:`SoftRouter`).
        router_init_scale: Its bias scale (``init_scale`` of :class:`SoftRouter`).
        check_finite: See :class:`TaskHead` (one host sync per call).
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
        norm_layer: type[nn.Module] | None = nn.BatchNorm1d,
        act_layer: type[nn.Module] = nn.ReLU,
        last_norm_layer: type[nn.Module] | None = None,
        last_bias: bool = True,
        hidden_bias: bool = False,
        temperature: float = 1.0,
        learn_temperature: bool = False,
        conditional: bool = True,
        top_k: int | None = None,
        router_init: RouterInit = "default",
        router_init_scale: float | None = None,
        check_finite: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_dim, output_dim, tasks, check_finite=check_finite)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.experts = ExpertBank(
            num_experts, input_dim, hidden_dim, output_dim, num_layers,
            **_layer_options(norm_layer, act_layer, last_norm_layer, last_bias, hidden_bias), **factory,
        )
        self.router = SoftRouter(
            input_dim, num_experts, len(self.tasks), temperature=temperature, learn_temperature=learn_temperature,
            conditional=conditional, top_k=top_k, init=router_init, init_scale=router_init_scale, **factory,
        )

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def hidden_dim(self) -> int:
        return self.experts.hidden_dim

    def _embed(self, x, task_indices, need_gates, need_experts):
        # x was checked once by TaskHead.check_input: the router and the bank run unchecked
        single = len(task_indices) == 1 and self.num_tasks > 1
        gates = self.router(x, task_indices[0] if single else None, _checked=True)  # [b, t, n]
        if need_experts:
            z, experts = bank_forward(self.experts, x, gates, return_expert_outputs=True)  # [t, b, o], [b, n, o]
            return z, gates, experts
        return bank_forward(self.experts, x, gates), gates, None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Router gates ``[B, T, N]`` alone (cheap: the experts are not evaluated)."""
        self.check_input(x)
        return self.router(x, _checked=True)


def bank_forward(bank: ExpertBank, x: torch.Tensor, gates: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """The bank's unchecked forward, for a head whose input was checked by :meth:`TaskHead.check_input`."""
    return bank(x, gates, _checked=True, **kwargs)


def _layer_options(norm_layer, act_layer, last_norm_layer, last_bias, hidden_bias=False) -> dict[str, Any]:
    """The bank's layer options, type-checked under the names the user gave them."""
    return {
        "norm_layer": check_norm_layer(norm_layer, "norm_layer"),
        "act_layer": check_layer(act_layer, "act_layer"),
        "last_norm_layer": check_norm_layer(last_norm_layer, "last_norm_layer"),
        "last_bias": check_bool(last_bias, "last_bias"),
        "hidden_bias": hidden_bias,  # a bool, or one per hidden layer: checked by the bank
    }


class STARHead(MMoEHead):
    """MMoE head with the STAR paper's defaults (its experimental setup, arXiv 2510.27222): hidden = input_dim,
    output 128, 3 layers, tasks inv/eq, N = 8.

    Experts are ``d → d → d → 128`` MLPs (Linear no bias → BN → ReLU, twice, then Linear with bias, no
    output norm); routers are ``Linear(d → N)`` + softmax (STAR, Sec. 3). Other options as :class:`MMoEHead`.
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
        **options: Any,
    ) -> None:
        hidden = input_dim if hidden_dim is None else hidden_dim
        super().__init__(input_dim, hidden, output_dim, num_layers, num_experts=num_experts, tasks=tasks, **options)


class _DefaultTaskHead(MMoEHead):
    """MMoE head whose ``head(x)`` returns the ``"inv"`` Tensor (lightly-style drop-in)."""

    def forward(self, x, task="inv", **kwargs):
        """As :meth:`TaskHead.forward`, but ``task`` defaults to ``"inv"``; pass ``task=None`` for all tasks."""
        return super().forward(x, task, **kwargs)


def lightly_projection_mlp(
    input_dim: int,
    hidden_dim: int,
    output_dim: int,
    num_layers: int,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    **factory: Any,
) -> nn.Sequential:
    """The MLP that lightly 1.6 builds for ``SimCLRProjectionHead`` / ``VICRegProjectionHead`` (its
    ``ProjectionHead`` blocks, where a Linear has a bias exactly when no BatchNorm follows it):
    ``num_layers - 1`` times ``Linear → BatchNorm1d → ReLU`` (no BatchNorm without ``batch_norm``), then
    ``Linear`` (→ ``BatchNorm1d`` with ``last_batch_norm``: SimCLR's head with ``batch_norm=True``). Used
    to size the drop-ins without importing lightly; a client-tier test compares it with lightly."""
    sizes = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        norm = last_batch_norm if last else batch_norm
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=not norm, **factory))
        if norm:
            layers.append(nn.BatchNorm1d(sizes[i + 1], **factory))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _LightlyDropIn(_DefaultTaskHead):
    """A STAR head sized from a lightly projection head's arguments.

    ``hidden_dim`` is the replaced lightly head's hidden width. The experts' hidden width
    ``expert_hidden_dim`` defaults to the package's one sizing rule (:func:`~star_heads.sizing.drop_in_size`,
    table in docs/heads.md): the largest width, a multiple of 8 where the budget allows, at which the whole STAR
    head (N experts + routers) has at most twice the parameters of that lightly head — the budget of the two
    heads (invariant and equivariant) that STAR replaces. ``num_experts`` defaults to 8 (4 or 2 only where 8
    experts of width 1 exceed that budget). Pass ``expert_hidden_dim=hidden_dim`` for the paper's per-expert
    shape (every expert as wide as the lightly head, as in the STAR paper's setup), at about N times the
    parameters.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        batch_norm: bool,
        last_batch_norm: bool,
        *,
        num_experts: int | None,
        expert_hidden_dim: int | None,
        tasks: Sequence[str],
        **options: Any,
    ) -> None:
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            check_positive_int(value, name)
        check_positive_int(num_layers, "num_layers", minimum=2)  # lightly silently builds 2 layers for 1
        batch_norm = check_bool(batch_norm, "batch_norm")
        norm = options.pop("norm_layer", nn.BatchNorm1d if batch_norm else None)
        if not batch_norm and norm not in (None, nn.Identity):
            raise ValueError(f"batch_norm=False contradicts norm_layer={norm!r}; pass one of them")
        config = dict(tasks=tasks, norm_layer=norm, **options)
        if expert_hidden_dim is None:
            lightly = lightly_projection_mlp(
                input_dim, hidden_dim, output_dim, num_layers, batch_norm, last_batch_norm, device="meta"
            )
            expert_hidden_dim, num_experts = drop_in_size(
                lambda h, n: MMoEHead(input_dim, h, output_dim, num_layers, num_experts=n, **on_meta(config)),
                count_parameters(lightly), num_experts,
            )
        config["num_experts"] = DEFAULT_NUM_EXPERTS if num_experts is None else num_experts
        super().__init__(input_dim, expert_hidden_dim, output_dim, num_layers, **config)
        self.lightly_hidden_dim = hidden_dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lightly_hidden_dim={self.lightly_hidden_dim}"


class STARSimCLRProjectionHead(_LightlyDropIn):
    """Drop-in for lightly's ``SimCLRProjectionHead``: same positional signature and defaults.

    SimCLR's projection head (arXiv 2002.05709) made a STAR head (arXiv 2510.27222, Sec. 3): ``head(x)``
    returns the invariant embedding Tensor, ``head(x, task="eq")`` the equivariant one, ``head(x, task=None)``
    both. ``batch_norm`` switches the experts' hidden BatchNorm. Unlike lightly's head (whose last Linear is
    followed by a BatchNorm when ``batch_norm=True``), the experts follow STAR: the last layer is a Linear
    with bias and no BatchNorm. Sizes: see ``expert_hidden_dim`` below.

    Args:
        input_dim, hidden_dim, output_dim, num_layers, batch_norm: As lightly's head (``hidden_dim`` sizes
            the parameter budget; ``num_layers >= 2``).
        num_experts: N (default 8; 4 or 2 where 8 experts do not fit the default budget).
        expert_hidden_dim: Hidden width of every expert. Default: the largest width (a multiple of 8 where the
            budget allows) at which the STAR head has at most twice the parameters of lightly's head with the same
            arguments (the two heads STAR replaces); ``expert_hidden_dim=hidden_dim`` gives the paper's
            per-expert shape.
        tasks: Task names.
        **options: As :class:`MMoEHead` (``norm_layer``, ``act_layer``, router options, ...).
    """

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
        *,
        num_experts: int | None = None,
        expert_hidden_dim: int | None = None,
        tasks: Sequence[str] = ("inv", "eq"),
        **options: Any,
    ) -> None:
        super().__init__(
            input_dim, hidden_dim, output_dim, num_layers, batch_norm, batch_norm,
            num_experts=num_experts, expert_hidden_dim=expert_hidden_dim, tasks=tasks, **options,
        )


class STARVICRegProjectionHead(_LightlyDropIn):
    """Drop-in for lightly's ``VICRegProjectionHead(input_dim=2048, hidden_dim=8192, output_dim=8192,
    num_layers=3)`` (VICReg, arXiv 2105.04906) made a STAR head (arXiv 2510.27222, Sec. 3); ``head(x)``
    returns the invariant embedding Tensor. Sizes and options as :class:`STARSimCLRProjectionHead`
    (hidden BatchNorm always, as in lightly).
    """

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 8192,
        output_dim: int = 8192,
        num_layers: int = 3,
        *,
        num_experts: int | None = None,
        expert_hidden_dim: int | None = None,
        tasks: Sequence[str] = ("inv", "eq"),
        **options: Any,
    ) -> None:
        super().__init__(
            input_dim, hidden_dim, output_dim, num_layers, True, False,
            num_experts=num_experts, expert_hidden_dim=expert_hidden_dim, tasks=tasks, **options,
        )
