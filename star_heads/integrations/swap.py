"""Replace an existing MLP projector attribute with a STAR head of the same shape."""

from __future__ import annotations

from typing import Any

from torch import nn

from star_heads.heads import STARSimCLRProjectionHead

__all__ = ["swap_projector", "projector_shape"]


def projector_shape(projector: nn.Module) -> tuple[int, int, int, int]:
    """``(input_dim, hidden_dim, output_dim, num_layers)`` of an MLP projector, read from its Linear layers.

    Raises:
        ValueError: the module has no ``nn.Linear`` layers.
    """
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot read the shape of projector {type(projector).__name__}: it has no nn.Linear layers")
    hidden = linears[0].out_features if len(linears) > 1 else linears[0].in_features
    return linears[0].in_features, hidden, linears[-1].out_features, len(linears)


def swap_projector(
    module: nn.Module,
    attr: str = "projector",
    *,
    num_experts: int = 8,
    batch_norm: bool = True,
    **kwargs: Any,
) -> STARSimCLRProjectionHead:
    """Replaces ``module.<attr>`` (an MLP projector) by a STAR head with the same widths and depth.

    The new head returns the invariant embedding from ``head(x)``, so the method's loss is unchanged;
    ``head(x, task="eq")`` / ``head(x, task=None)`` give the equivariant embedding / both. Do it before the
    optimiser is built (solo-learn builds it in ``configure_optimizers`` from ``learnable_params``, which
    reads ``self.projector`` at that time).

    Args:
        module: The model holding the projector (a solo-learn method, a lightly-style model, ...).
        attr: Attribute name (``"projector"`` in solo-learn, ``"projection_head"`` in lightly's examples).
        num_experts: Experts of the STAR head.
        batch_norm: Hidden BatchNorm in the experts.
        **kwargs: Passed to :class:`~star_heads.STARSimCLRProjectionHead` (``tasks``, ``router_kwargs``, ...).

    Returns:
        The new head (already assigned).

    Raises:
        AttributeError: ``module`` has no such attribute.
    """
    old = getattr(module, attr, None)
    if not isinstance(old, nn.Module):
        raise AttributeError(f"{type(module).__name__} has no projector module at attribute {attr!r}")
    input_dim, hidden_dim, output_dim, num_layers = projector_shape(old)
    ref = next(old.parameters(), None)
    head = STARSimCLRProjectionHead(
        input_dim, hidden_dim, output_dim, num_layers, batch_norm,
        num_experts=num_experts, expert_hidden_dim=hidden_dim, **kwargs,
    )
    if ref is not None:
        head = head.to(device=ref.device, dtype=ref.dtype)
    setattr(module, attr, head)
    return head
