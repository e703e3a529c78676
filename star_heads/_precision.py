"""The package's one dtype / autocast policy (private).

Under autocast, torch decides the compute dtype of matmuls itself; the package only needs to know whether
autocast is on, and at which dtype, to leave that choice alone (gates and outputs keep autocast's dtype) and to
refuse a mismatch between an input's dtype and the parameters' outside autocast.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_dtype", "autocast_off"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for ``device_type``, or None when autocast is off.

    ``meta`` has no autocast dispatch key: it stands in for a device without autocast.
    """
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast switched off on ``device_type`` for a block that must run in its inputs' precision (statistics,
    losses, augmentations); a no-op where autocast is off or does not exist (``meta``)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
