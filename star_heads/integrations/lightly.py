"""lightly: the one-line head swap.

In lightly's SimCLR example, replace::

    self.projection_head = SimCLRProjectionHead(512, 512, 128)

by::

    self.projection_head = star_heads.STARSimCLRProjectionHead(512, 512, 128)

(same positional signature and defaults; ``head(x)`` still returns the Tensor that ``NTXentLoss`` takes),
or swap an existing model's head with :func:`replace_projection_head` (BYOL / MoCo models: pass
``momentum_attr="projection_head_momentum"`` so lightly's ``update_momentum`` walks two identical heads). To train
both tasks in lightly's examples, see ``examples/lightly_simclr.py`` and docs/integrations.md.
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
    """Replaces ``model.projection_head`` (a lightly ``ProjectionHead``) by a STAR head whose experts keep its
    architecture (depth, widths, norm, activation; see :func:`~star_heads.integrations.swap_projector`).

    Args:
        model: The lightly-style model.
        attr: Attribute of the head.
        num_experts: Experts of the STAR head.
        **kwargs: :func:`~star_heads.integrations.swap_projector` options, e.g.
            ``momentum_attr="projection_head_momentum"`` for BYOL / MoCo models.

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
