"""The package's one dtype / autocast policy (private).

Under autocast, torch decides the compute dtype of matmuls itself; the package only needs to know whether
autocast is on, and at which dtype, to leave that choice alone (gates and outputs keep autocast's dtype) and to
refuse a mismatch between an input's dtype and the parameters' outside autocast.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for ``device_type``, or None when autocast is off.

    ``meta`` has no autocast dispatch key: it stands in for a device without autocast.
    """
    if device_type == "meta":
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
