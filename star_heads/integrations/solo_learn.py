"""solo-learn: swap a method's ``self.projector`` for a STAR head after construction.

Usage::

    from solo.methods import SimCLR
    from star_heads.integrations.solo_learn import replace_projector

    model = SimCLR(cfg)
    replace_projector(model, num_experts=8)   # before trainer.fit (optimiser params are read then)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from star_heads.heads import STARSimCLRProjectionHead
from star_heads.integrations.swap import swap_projector

__all__ = ["replace_projector"]


def replace_projector(method: nn.Module, *, num_experts: int = 8, **kwargs: Any) -> STARSimCLRProjectionHead:
    """Replaces ``method.projector`` of a solo-learn ``BaseMethod`` by a same-shape STAR head.

    Raises:
        ImportError: solo-learn is not installed.
        TypeError: ``method`` is not a solo-learn method.
    """
    try:
        from solo.methods.base import BaseMethod
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("replace_projector needs solo-learn: pip install solo-learn") from err
    if not isinstance(method, BaseMethod):
        raise TypeError(f"expected a solo-learn BaseMethod, got {type(method).__name__}")
    return swap_projector(method, "projector", num_experts=num_experts, **kwargs)
