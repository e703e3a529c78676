"""A Lightning callback that logs STAR's readouts: routing statistics and CCA(inv, eq) with its null baseline.

Imported only when Lightning is installed (either namespace: ``lightning`` or ``pytorch_lightning``; with both
installed the callback is accepted by both ``Trainer`` classes). Usage::

    from star_heads.integrations.lightning import STARLoggingCallback

    trainer = pl.Trainer(callbacks=[STARLoggingCallback(every=50)])

It finds the STAR adapter (:class:`~star_heads.JointAdapter`) or head (any module with a router and task
names) in the LightningModule, watches its calls with a forward hook (no extra forward pass) and logs, through
``pl_module.log_dict``, flat floats under ``prefix``: ``routing/<task>/entropy``, ``.../effective_experts``,
``.../expert_<k>/load``, ``routing/expert_<k>/task_overlap`` every ``every`` steps, and ``cca/mean``, ``cca/null_mean``,
``cca/excess``, ``cca/n`` whenever a CCA result is ready (the adapter's own monitor; for a bare head, the
callback's monitor fed by calls that return both tasks, ``head(x, task=None)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from star_heads._checks import check_positive_int
from star_heads.adapters.base import AdapterOutput, JointAdapter
from star_heads.heads import HeadOutput
from star_heads.metrics import CCAMonitor
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
    def __init__(self, every: int = 50, *, prefix: str = "star/", cca_every: int = 100, target: nn.Module | None = None):
        self.every = check_positive_int(every, "every")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix, self.cca_every, self.target = prefix, check_positive_int(cca_every, "cca_every"), target
        self._handle = None
        self._last_gates: torch.Tensor | None = None
        self._last_cca: Any = None
        self._monitor: CCAMonitor | None = None
        self._tasks: tuple[str, ...] = ()

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        target = self.target if self.target is not None else find_star_module(pl_module)
        self._tasks = tuple(getattr(target, "tasks", ()))
        if not isinstance(target, JointAdapter):
            self._monitor = CCAMonitor(every=self.cca_every)
        self._handle = target.register_forward_hook(self._capture, with_kwargs=True)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        values: dict[str, float] = {}
        if self._last_gates is not None and trainer.global_step % self.every == 0:
            values.update(routing_stats(self._last_gates, tasks=self._tasks or None).as_dict(f"{self.prefix}routing/"))
        if self._last_cca is not None:
            values.update(self._last_cca.as_dict(f"{self.prefix}cca/"))
        self._last_gates, self._last_cca = None, None
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False)

    # ---------------------------------------------------------------- capture
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training:
            return
        if isinstance(output, AdapterOutput):
            if output.gates is not None:
                self._last_gates = output.gates.detach()
            if output.cca is not None:
                self._last_cca = output.cca
            return
        if isinstance(output, HeadOutput) and output.gates is not None:
            self._last_gates = output.gates.detach()
        elif args and isinstance(args[0], torch.Tensor):
            with torch.no_grad():  # the router alone: a Linear, no state
                self._last_gates = module.gates(args[0].detach())
        if isinstance(output, HeadOutput) and {"inv", "eq"} <= set(output.keys()) and self._monitor is not None:
            result = self._monitor.update(output["inv"].detach(), output["eq"].detach())
            if result is not None:
                self._last_cca = result


STARLoggingCallback = type(
    "STARLoggingCallback",
    (_STARLogging, *_callback_bases()),
    {
        "__doc__": """Logs routing statistics and CCA(inv, eq) of the STAR adapter or head inside a LightningModule.

    Args:
        every: Log routing statistics every ``every`` optimiser steps (they need one host sync).
        prefix: Prepended to every logged name.
        cca_every: Window of the callback's own CCA monitor, used only for a bare head (an adapter logs its
            own monitor's results, set by its ``cca_every``).
        target: The adapter or head to watch (default: found with :func:`find_star_module`).
    """,
        "__module__": __name__,
    },
)
