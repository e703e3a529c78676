"""Integrations with the SSL libraries our users come from (see docs/integrations.md).

* :func:`swap_projector` (here): replace any MLP projector attribute by a STAR head of the same architecture.
* ``star_heads.integrations.lightly``: ``replace_projection_head`` for lightly models.
* ``star_heads.integrations.solo_learn``: ``replace_projector`` (momentum methods included),
  ``STAREquivariantMixin`` and ``star_method`` for solo-learn methods, the yaml entry point
  ``python -m star_heads.integrations.solo_learn.pretrain``; solo-learn is imported only when called.
* ``star_heads.integrations.lightning``: ``STARLoggingCallback`` (routing, collapse and CCA readouts, each logged
  once at its step); importable only where Lightning is installed.

None of these libraries is imported by ``import star_heads``.
"""

from star_heads.integrations.swap import swap_projector

__all__ = ["swap_projector"]
