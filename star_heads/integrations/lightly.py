"""lightly: the one-line head swap.

In lightly's SimCLR example, replace::

    self.projection_head = SimCLRProjectionHead(512, 512, 128)

by::

    self.projection_head = star_heads.STARSimCLRProjectionHead(512, 512, 128)

(same positional signature and defaults; ``head(x)`` still returns the Tensor that ``NTXentLoss`` takes),
or swap an existing model's head with :func:`replace_projection_head`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from star_heads.heads import STARSimCLRProjectionHead
from star_heads.integrations.swap import swap_projector

__all__ = ["replace_projection_head"]


def replace_projection_head(
    model: nn.Module, attr: str = "projection_head", *, num_experts: int = 8, **kwargs: Any
) -> STARSimCLRProjectionHead:
    """Replaces ``model.projection_head`` (a lightly ``ProjectionHead``) by a same-shape STAR head.

    Raises:
        ImportError: lightly is not installed.
        TypeError: the attribute is not a lightly ``ProjectionHead``.
    """
    try:
        from lightly.models.modules.heads import ProjectionHead
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("replace_projection_head needs lightly: pip install lightly") from err
    old = getattr(model, attr, None)
    if not isinstance(old, ProjectionHead):
        raise TypeError(f"expected a lightly ProjectionHead at {attr!r}, got {type(old).__name__}")
    return swap_projector(model, attr, num_experts=num_experts, **kwargs)
