"""A Lightning callback that logs STAR's readouts: routing statistics and CCA(inv, eq) with its null baseline.

Imported only when Lightning is installed (either namespace: ``lightning`` or ``pytorch_lightning``; with both
installed the callback is accepted by both ``Trainer`` classes). Usage::

    from star_heads.integrations.lightning import STARLoggingCallback

    trainer = pl.Trainer(callbacks=[STARLoggingCallback(every=50)])

It finds the STAR adapter (:class:`~star_heads.JointAdapter`) or head (any module with a router and task
names) in the LightningModule, watches its calls with a forward hook (no extra forward pass) and logs flat floats
under ``prefix``: ``routing/<task>/entropy``, ``.../effective_experts``, ``.../expert_<k>/load``,
``routing/expert_<k>/task_overlap`` and ``collapse/<task>/std``, ``collapse/<task>/rank`` every ``every``
optimiser steps, and ``cca/mean``, ``cca/null_mean``, ``cca/excess``, ``cca/n`` for every CCA result (the
adapter's own monitor; for a bare head, the callback's monitor fed by calls that return both tasks,
``head(x, task=None)``). With ``equivariance_every=k`` it also logs, every ``k`` optimiser steps, the held-out
R² of the relative augmentation parameters read out of each embedding (``equivariance/<task>/r2/<group>``,
:func:`~star_heads.metrics.augmentation_r2` on that step's pairs of views). Values are written to the
trainer's loggers at the step of the batch they come from, once each, independently of ``log_every_n_steps``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from star_heads._checks import check_bool, check_int, check_names, check_positive_int
from star_heads.adapters.base import AdapterOutput, JointAdapter
from star_heads.augment._params import PARAM_NAMES
from star_heads.heads import HeadOutput
from star_heads.metrics import CCAMonitor, augmentation_r2, collapse_stats
from star_heads.routing import routing_stats


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(name, fromlist=["Callback"])
        except ImportError:
            continue
        bases.append(module.Callback)
    if not bases:
        raise ImportError(
            "star_heads.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)"
        )
    return tuple(bases)


__all__ = ["STARLoggingCallback", "find_star_module"]


def find_star_module(module: nn.Module) -> nn.Module:
    """The first :class:`~star_heads.JointAdapter` in ``module``, else the first head with a router and tasks.

    Raises:
        ValueError: ``module`` holds neither.
    """
    for m in module.modules():
        if isinstance(m, JointAdapter):
            return m
    for m in module.modules():
        if hasattr(m, "router") and hasattr(m, "tasks") and callable(getattr(m, "gates", None)):
            return m
    raise ValueError(f"{type(module).__name__} holds no STAR adapter (JointAdapter) or routed head")


class _STARLogging:
    def __init__(
        self,
        every: int = 50,
        *,
        prefix: str = "star/",
        cca_every: int = 100,
        target: nn.Module | None = None,
        collapse: bool = True,
        equivariance_every: int = 0,
        param_names: Sequence[str] | None = None,
    ):
        self.every = check_positive_int(every, "every")
        self.equivariance_every = check_int(equivariance_every, "equivariance_every", minimum=0)
        self.param_names = None if param_names is None else check_names(param_names, "param_names")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix, self.cca_every, self.target = prefix, check_positive_int(cca_every, "cca_every"), target
        self.collapse = check_bool(collapse, "collapse")
        self._handle: Any = None
        self._trainer: Any = None
        self._default_task: str | None = None
        self._last_gates: torch.Tensor | None = None
        self._last_embeddings: dict[str, torch.Tensor] = {}
        self._last_pairs: dict[str, torch.Tensor] = {}  # inv1, inv2, eq1, eq2, params1, params2 of a joint call
        self._capture_step = 0  # trainer.global_step while the captured batch ran
        self._seen_step = 0  # trainer.global_step at the last batch end: a larger one means the optimiser stepped
        self._pending_cca: list[tuple[int, Any]] = []  # (step it was computed at, result), each logged once
        self._monitor: CCAMonitor | None = None
        self._tasks: tuple[str, ...] = ()

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        target = self.target if self.target is not None else find_star_module(pl_module)
        if self.equivariance_every:
            if not isinstance(target, JointAdapter):
                raise ValueError(f"equivariance_every={self.equivariance_every} needs a STAR adapter (JointAdapter), "
                                 f"whose joint call carries params1/params2; the target is a "
                                 f"{type(target).__name__}")
            k, names = target.param_dim, self.param_names
            if names is None and k != len(PARAM_NAMES):
                raise ValueError(f"equivariance_every needs param_names= for the adapter's {k} augmentation "
                                 f"parameters (the default names cover {len(PARAM_NAMES)})")
            if names is not None and len(names) != k:
                raise ValueError(f"param_names has {len(names)} names, the adapter takes {k} parameters")
        self._trainer = trainer
        self._tasks = tuple(getattr(target, "tasks", ()))
        task = inspect.signature(target.forward).parameters.get("task")
        self._default_task = task.default if task is not None and isinstance(task.default, str) else None
        if not isinstance(target, JointAdapter):
            self._monitor = CCAMonitor(every=self.cca_every)
        self._seen_step = trainer.global_step
        self._pending_cca = []
        self._handle = target.register_forward_hook(self._capture, with_kwargs=True)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._trainer = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = trainer.global_step > self._seen_step  # False on the first micro-batches under accumulation
        self._seen_step = trainer.global_step
        for step, result in self._pending_cca:
            self._emit(trainer, pl_module, result.as_dict(f"{self.prefix}cca/"), step)
        self._pending_cca = []
        routine = self._capture_step % self.every == 0
        equivariance = bool(self.equivariance_every) and self._capture_step % self.equivariance_every == 0
        if not stepped or not (routine or equivariance):
            return
        values: dict[str, float] = {}
        if routine and self._last_gates is not None:
            values.update(routing_stats(self._last_gates, tasks=self._tasks or None).as_dict(f"{self.prefix}routing/"))
        if routine and self.collapse and self._last_embeddings:
            values.update(collapse_stats(self._last_embeddings).as_dict(f"{self.prefix}collapse/"))
        if equivariance and self._last_pairs:
            values.update(self._equivariance(self._last_pairs))
        self._last_gates, self._last_embeddings, self._last_pairs = None, {}, {}
        if values:
            self._emit(trainer, pl_module, values, self._capture_step)

    def _equivariance(self, pairs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out R² of the relative augmentation parameters from each task's pair of views (host reads)."""
        values: dict[str, float] = {}
        for task in ("inv", "eq"):
            result = augmentation_r2(pairs[f"{task}1"].float(), pairs[f"{task}2"].float(), pairs["params1"].float(),
                                     pairs["params2"].float(), param_names=self.param_names)
            values.update(result.as_dict(f"{self.prefix}equivariance/{task}/"))
        return values

    def _emit(self, trainer: Any, pl_module: Any, values: dict[str, float], step: int) -> None:
        """Writes ``values`` to every logger at ``step`` directly (``log_every_n_steps`` would drop or delay
        them) and into ``trainer.callback_metrics`` (progress bar, checkpoint monitors) without logging twice."""
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    # ---------------------------------------------------------------- capture
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training:
            return
        if self._trainer is not None:
            self._capture_step = self._trainer.global_step
        if isinstance(output, AdapterOutput):
            if output.gates is not None:
                self._last_gates = output.gates.detach()
            emb = {t: output.embeddings[f"{t}1"].detach() for t in ("inv", "eq") if f"{t}1" in output.embeddings}
            self._last_embeddings.update(emb)
            if output.cca is not None:
                self._pending_cca.append((self._capture_step, output.cca))
            names = ("inv1", "inv2", "eq1", "eq2")
            if self.equivariance_every and kwargs.get("params1") is not None and set(names) <= set(output.embeddings):
                self._last_pairs = {n: output.embeddings[n].detach() for n in names}
                self._last_pairs.update(params1=kwargs["params1"].detach(), params2=kwargs["params2"].detach())
            return
        if isinstance(output, HeadOutput):
            self._last_embeddings.update({t: z.detach() for t, z in output.embeddings.items()})
        elif isinstance(output, torch.Tensor):
            task = kwargs.get("task", args[1] if len(args) > 1 else self._default_task)
            if isinstance(task, str):
                self._last_embeddings[task] = output.detach()
        if isinstance(output, HeadOutput) and output.gates is not None:
            self._last_gates = output.gates.detach()
        elif args and isinstance(args[0], torch.Tensor):
            with torch.no_grad():  # the router alone: a Linear, no state
                self._last_gates = module.gates(args[0].detach())
        if isinstance(output, HeadOutput) and {"inv", "eq"} <= set(output.keys()) and self._monitor is not None:
            result = self._monitor.update(output["inv"].detach(), output["eq"].detach())
            if result is not None:
                self._pending_cca.append((self._capture_step, result))


STARLoggingCallback = type(
    "STARLoggingCallback",
    (_STARLogging, *_callback_bases()),
    {
        "__doc__": """Logs routing statistics and CCA(inv, eq) of the STAR adapter or head inside a LightningModule.

    Every value reaches each of ``trainer.loggers`` exactly once, at the step its batch ran
    (``trainer.global_step`` during that ``training_step``), whatever ``log_every_n_steps`` is: a CCA result
    at the step it was computed, routing and collapse readouts once per optimiser step (on the last
    micro-batch under gradient accumulation) every ``every`` steps. The same values go to
    ``trainer.callback_metrics`` (``pl_module.log_dict(..., logger=False)``).

    Args:
        every: Log routing statistics and collapse readouts every ``every`` optimiser steps (one host sync
            each; the effective rank runs one SVD per task on the last batch).
        prefix: Prepended to every logged name.
        cca_every: Window of the callback's own CCA monitor, used only for a bare head (an adapter logs its
            own monitor's results, set by its ``cca_every``).
        target: The adapter or head to watch (default: found with :func:`find_star_module`).
        collapse: Also log :func:`~star_heads.metrics.collapse_stats` of each task's last embeddings under
            ``collapse/<task>/std`` and ``collapse/<task>/rank``.
        equivariance_every: Every this many optimiser steps (0 = never, the default), log how much of the
            augmentation each embedding encodes: :func:`~star_heads.metrics.augmentation_r2` of the step's
            pairs of views (``z_task`` of view 1 and view 2 of each image, the adapter's ``params1`` /
            ``params2``; fitted on half the batch's images, scored on the other half) under
            ``equivariance/<task>/r2/<group>``. Needs a joint adapter call with at least 4 images; one host
            read per logged step. One batch gives a noisy estimate: use a large batch or the held-out
            evaluation in ``benchmarks/quality.py`` for a verdict.
        param_names: Names of the adapter's augmentation parameters when there are not 11 (``STARAugment``'s
            default vector), e.g. ``augment.param_names`` of a ``STARAugment(solarize=...)``.
    """,
        "__module__": __name__,
    },
)
