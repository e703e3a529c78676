"""One-line integrations with the SSL libraries our users come from (imported lazily)."""

from star_heads.integrations.swap import swap_projector

__all__ = ["swap_projector"]
