"""solo-learn: swap a method's projector for a STAR head.

Usage::

    from solo.methods import BYOL
    from star_heads.integrations.solo_learn import replace_projector

    model = BYOL(cfg)
    replace_projector(model)   # before trainer.fit: solo builds the optimiser from learnable_params then

For methods with a momentum (teacher) projector (BYOL, MoCo v2+/v3, NNBYOL, ReSSL, All4One) the
``momentum_projector`` is replaced too, by an identical copy of the new head with gradients off, so solo's
``momentum_pairs`` and its momentum updater walk two identical architectures in lockstep.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from star_heads.integrations.swap import swap_projector

__all__ = ["replace_projector", "SOLO_INSTALL_HINT"]

SOLO_INSTALL_HINT = (
    "solo-learn is not importable. Its PyPI release (1.0.2) pins torch 1.9, so install it from source instead: "
    "clone the solo-learn repository and run `pip install -e .` in it (or put the checkout on PYTHONPATH)"
)


def _base_method() -> type:
    try:
        from solo.methods.base import BaseMethod
    except ImportError as err:
        raise ImportError(SOLO_INSTALL_HINT) from err
    return BaseMethod


def replace_projector(
    method: nn.Module, *, num_experts: int = 8, **kwargs: Any
) -> nn.Module:
    """Replaces ``method.projector`` of a solo-learn method by a STAR head of the same shape (and its
    ``momentum_projector``, if any, by a frozen copy of that head).

    Call it before ``trainer.fit``: solo-learn reads ``learnable_params`` when it builds the optimiser. The
    new head returns the invariant embedding from ``head(x)``, so the method's loss code is unchanged.

    Args:
        method: A solo-learn method (``solo.methods.base.BaseMethod``) with a ``projector``.
        num_experts: Experts of the STAR head.
        **kwargs: Passed to :func:`~star_heads.integrations.swap_projector` (head and layer options, e.g.
            ``drop_hidden_bias=True`` for the paper's bias-free hidden Linears where solo's projector has biases).

    Returns:
        The new online head.

    Raises:
        ImportError: solo-learn is not importable (the message says how to install it).
        TypeError: ``method`` is not a solo-learn method.
        AttributeError: the method has no ``projector`` (DINO's ``head``, MAE and the linear probe have none).
    """
    base = _base_method()
    if not isinstance(method, base):
        raise TypeError(f"method must be a solo-learn BaseMethod, got {type(method).__name__}")
    if not isinstance(getattr(method, "projector", None), nn.Module):
        raise AttributeError(f"{type(method).__name__} has no projector to replace")
    momentum = "momentum_projector" if isinstance(getattr(method, "momentum_projector", None), nn.Module) else None
    return swap_projector(
        method, "projector", momentum_attr=momentum, num_experts=num_experts, **kwargs
    )
