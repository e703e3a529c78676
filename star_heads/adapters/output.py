"""What an adapter call returns, and how a loss result becomes a total plus named, detached terms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from star_heads._checks import check_bool
from star_heads.metrics import CCAResult
from star_heads.routing import routing_stats

__all__ = ["AdapterOutput", "split_loss", "weighted_terms"]


@dataclass
class AdapterOutput:
    """What one adapter call returns.

    Attributes:
        loss: The total to back-propagate, ``L_inv + λ·L_eq`` (or ``L_inv`` for an invariant-only call).
        losses: Each term, detached: ``"inv"``, ``"eq"`` and every term the loss output lists itself
            (``terms()``, e.g. ``"inv/invariance"``, ``"eq/variance"`` for VICReg).
        embeddings: ``"inv1"``, ``"inv2"``, ``"inv_local1"`` … ``"inv_localK"`` for local crops and, for a joint
            call, ``"eq0"``, ``"eq1"``, ``"eq2"``, ``"pred1"``, ``"pred2"`` (each ``[B, D]``).
        gates: Router gates ``[B, T, N]`` of view 1 (None when the head has no router or for an
            invariant-only call).
        cca: The CCA(inv, eq) result when the monitor produced one this step, else None. Under
            ``torch.compile`` it is filled in after the compiled forward returns (so forward hooks see None).
        tasks: The head's task names, in the order of the gates' ``T`` axis.
    """

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    gates: Tensor | None = None
    cca: CCAResult | None = None
    tasks: tuple[str, ...] = ()
    cca_pending: bool = field(default=False, repr=False, compare=False)
    """True between a compiled forward and the monitor update that runs after it (internal)."""

    def as_dict(self, prefix: str = "", *, routing: bool = True) -> dict[str, float]:
        """Every readout as a flat ``{name: float}``, ready for Lightning's ``self.log_dict``,
        TensorBoard's ``add_scalars`` or W&B's ``log``.

        Keys (with ``prefix`` in front): ``"loss"``; each entry of :attr:`losses` (``"inv"``, ``"eq"``,
        ``"inv/invariance"``, ...); with ``routing`` and gates, :meth:`RoutingStats.as_dict
        <star_heads.RoutingStats.as_dict>` under ``"routing/"`` (``"routing/<task>/entropy"``,
        ``"routing/<task>/expert_<k>/load"``, ...); on a step with a CCA result, :meth:`CCAResult.as_dict
        <star_heads.CCAResult.as_dict>` under ``"cca/"`` (``"cca/mean"``, ``"cca/null_mean"``,
        ``"cca/excess"``, ``"cca/n"``, ...). Converting to floats syncs with the device (one read of all the
        losses together): call it on logging steps.

        Raises:
            TypeError: ``prefix`` is not a str, or ``routing`` not a bool.
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}")
        check_bool(routing, "routing")
        names = ["loss", *self.losses]
        wide = torch.float32 if self.loss.device.type == "mps" else torch.float64  # MPS has no float64
        values = torch.stack([v.detach().to(wide) for v in (self.loss, *self.losses.values())])
        out = {f"{prefix}{k}": float(v) for k, v in zip(names, values.cpu().tolist())}
        if routing and self.gates is not None:
            out.update(routing_stats(self.gates, tasks=self.tasks or None).as_dict(f"{prefix}routing/"))
        if self.cca is not None:
            out.update(self.cca.as_dict(f"{prefix}cca/"))
        return out


def split_loss(result: Any, prefix: str, name: str, source: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """A loss result as (total, detached terms); clear errors for what cannot be back-propagated.

    ``result`` is a scalar Tensor, or an object with a ``.loss`` scalar and a ``terms()`` method listing
    its named terms (e.g. :class:`~star_heads.VICRegOutput`); the adapter knows no loss by name. Shape and
    Python-level checks only (no host sync).
    """
    if isinstance(result, Tensor):
        total, named = result, {}
    elif isinstance(getattr(result, "loss", None), Tensor) and callable(getattr(result, "terms", None)):
        total, named = result.loss, dict(result.terms())
    else:
        raise TypeError(
            f"{name} must return a scalar Tensor or an object with a Tensor .loss and a terms() method "
            f"(like VICRegOutput), got {type(result).__name__}"
        )
    if not total.is_floating_point():
        raise TypeError(f"{name} must return a floating-point Tensor, got dtype {total.dtype}")
    if total.ndim != 0:
        raise ValueError(f"{name} must return a scalar (0-dim) Tensor, got shape {tuple(total.shape)}")
    if torch.is_grad_enabled() and source.requires_grad and not total.requires_grad:
        raise ValueError(f"{name} returned a Tensor without a gradient (detached from the embeddings it was given)")
    terms = {prefix: total.detach()}
    terms.update({f"{prefix}/{k}": v.detach() for k, v in named.items()})
    return total, terms


def weighted_terms(parts: Sequence[tuple[float, Tensor, dict[str, Tensor]]]) -> tuple[Tensor, dict[str, Tensor]]:
    """``Σ w·loss`` and ``Σ w·term`` per name over ``(w, loss, terms)`` parts (the multi-crop average)."""
    def wsum(values: Sequence[Tensor]) -> Tensor:
        out = values[0]
        for v in values[1:]:
            out = out + v
        return out

    total = wsum([w * loss for w, loss, _ in parts])
    names = parts[0][2].keys()
    return total, {k: wsum([w * terms[k] for w, _, terms in parts]) for k in names}
