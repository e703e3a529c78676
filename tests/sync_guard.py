"""A CPU stand-in for CUDA's sync debugging: run a step on the ``meta`` device and see every host read.

On a GPU, an op that reads a tensor value back to Python (``.item()``, ``bool(t)``, ``torch.equal``), an op
whose output shape depends on values (``nonzero``, ``masked_select``, boolean-mask indexing) and a copy
between the host and the device all make the CPU wait for the GPU queue. The ``meta`` device has no values,
so such a step either fails outright on ``meta`` or shows up here as the aten op that would sync.

Usage::

    with HostSyncGuard("meta") as guard:   # raises HostSyncError at the first offending op
        loss = step(batch_on_meta)
        loss.backward()

    with HostSyncGuard("meta", strict=False) as guard:   # records instead of raising
        ...
    assert guard.events == []

What it cannot see (keep these off the hot path): the copy inside ``torch.tensor(data, device=...)`` and
indexing a device tensor with a Python list (both happen below the dispatcher).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostSyncError", "HostSyncGuard"]

# ops that read a value to the host, or whose output shape depends on the values
_SYNCING = {
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "equal",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "repeat_interleave",  # with tensor repeats (the output size is read from the values)
    "_assert_async",
    "_assert_scalar",
}
_COPIES = {"_to_copy", "copy_", "copy", "to", "_copy_from", "_copy_from_and_resize"}


class HostSyncError(AssertionError):
    """An op that would synchronise the host with the device ran inside :class:`HostSyncGuard`."""


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat, _ = tree_flatten((args, kwargs or {}))
    return [a for a in flat if isinstance(a, torch.Tensor)]


class HostSyncGuard(TorchDispatchMode):
    """Fails (or records) each host sync, host↔device copy and mixed-device op on ``device``.

    Args:
        device: The step's device (``"meta"`` as the stand-in for ``"cuda"``).
        strict: Raise :class:`HostSyncError` at the first event (default) or only record it in ``events``.
        allow: aten op names to let through (a documented, by-design sync).

    Scalars (0-d CPU tensors, e.g. a Python float wrapped by torch) may meet device tensors: CUDA accepts
    them without a copy. Anything larger crossing devices is an event.
    """

    def __init__(self, device: str | torch.device = "meta", *, strict: bool = True, allow: set[str] | None = None):
        super().__init__()
        self.device = torch.device(device)
        self.strict = strict
        self.allow = set(allow or ())
        self.events: list[str] = []

    def _event(self, text: str) -> None:
        self.events.append(text)
        if self.strict:
            raise HostSyncError(f"host sync on the {self.device.type} step: {text}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = _tensors(args, kwargs)
        on_device = [t for t in tensors if t.device.type == self.device.type]
        on_host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if name not in self.allow:
            if name in _SYNCING and (on_device or self.device.type == "cpu"):
                self._event(f"aten.{name} (reads values back to the host)")
            elif name == "index" and any(t.dtype == torch.bool for t in tensors[1:]) and on_device:
                self._event("aten.index with a boolean mask (output shape depends on values)")
            elif name in _COPIES:
                target = (kwargs or {}).get("device")
                src = tensors[0] if tensors else None
                if name == "copy_" and len(tensors) >= 2:
                    dst, src = tensors[0], tensors[1]
                    if dst.device != src.device and src.dim() > 0:
                        self._event(f"aten.copy_ {src.device.type}→{dst.device.type} of shape {tuple(src.shape)}")
                elif src is not None and target is not None and torch.device(target).type != src.device.type:
                    if src.dim() > 0 or torch.device(target).type == "cpu":
                        self._event(f"aten.{name} {src.device.type}→{torch.device(target).type} "
                                    f"of shape {tuple(src.shape)}")
            elif on_device and on_host and self.device.type != "cpu":
                shapes = [tuple(t.shape) for t in on_host]
                self._event(f"aten.{name} mixes {self.device.type} tensors with CPU tensors of shapes {shapes}")
        return func(*args, **(kwargs or {}))
