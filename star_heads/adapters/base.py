"""The joint invariant + equivariant objective behind every adapter (STAR, arXiv 2510.27222, Sec. 3).

Per image: the original x0 and two augmented views x1, x2 with augmentation parameters a1, a2;
backbone features h_v = f(x_v). Then

* ``L_inv = inv_loss(z_inv(x1), z_inv(x2))``;
* ``ẑ_eq(x_v) = predictor(z_eq(x0), normalise(a_v))`` for v = 1, 2;
* ``L_eq = eq_loss([z_eq(x1); z_eq(x2)], [ẑ_eq(x1); ẑ_eq(x2)])``;
* ``L = L_inv + λ·L_eq`` (λ = 1 in the paper).

An invariant-only call (no x0, no parameters) computes ``L_inv`` alone: the trainer's old objective
through the new head.
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from star_heads._checks import check_float_tensor
from star_heads.adapters.factory import HeadKind, build_head
from star_heads.equivariance import AugParamNormalizer, EquivariantPredictor
from star_heads.heads import HeadOutput
from star_heads.metrics import CCAMonitor, CCAResult
from star_heads.routing import routing_stats

__all__ = ["AdapterOutput", "JointAdapter"]

LossFn = Callable[[Tensor, Tensor], Any]


@dataclass
class AdapterOutput:
    """What one adapter call returns.

    Attributes:
        loss: The total to back-propagate, ``L_inv + λ·L_eq`` (or ``L_inv`` for an invariant-only call).
        losses: Each term, detached: ``"inv"``, ``"eq"`` and every term the loss output lists itself
            (``terms()``, e.g. ``"inv/invariance"``, ``"eq/variance"`` for VICReg).
        embeddings: ``"inv1"``, ``"inv2"`` and, for a joint call, ``"eq0"``, ``"eq1"``, ``"eq2"``,
            ``"pred1"``, ``"pred2"`` (each ``[B, D]``).
        gates: Router gates ``[B, T, N]`` of view 1 (None when the head has no router or for an
            invariant-only call).
        cca: The CCA(inv, eq) result when the monitor produced one this step, else None.
        tasks: The head's task names, in the order of the gates' ``T`` axis.
    """

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    gates: Tensor | None = None
    cca: CCAResult | None = None
    tasks: tuple[str, ...] = ()

    def as_dict(self, prefix: str = "", *, routing: bool = True) -> dict[str, float]:
        """Every readout as a flat ``{name: float}``, ready for Lightning's ``self.log_dict``,
        TensorBoard's ``add_scalars`` or W&B's ``log``.

        Keys (with ``prefix`` in front): ``"loss"``; each entry of :attr:`losses` (``"inv"``, ``"eq"``,
        ``"inv/invariance"``, ...); with ``routing`` and gates, :meth:`RoutingStats.as_dict
        <star_heads.RoutingStats.as_dict>` under ``"routing/"`` (``"routing/<task>/entropy"``,
        ``"routing/<task>/expert_<k>/load"``, ...); on a step with a CCA result, :meth:`CCAResult.as_dict
        <star_heads.CCAResult.as_dict>` under ``"cca/"`` (``"cca/mean"``, ``"cca/null_mean"``,
        ``"cca/excess"``, ``"cca/n"``, ...). Converting to floats syncs with the device: call it on
        logging steps.
        """
        out = {f"{prefix}loss": float(self.loss.detach())}
        out.update({f"{prefix}{k}": float(v) for k, v in self.losses.items()})
        if routing and self.gates is not None:
            out.update(routing_stats(self.gates, tasks=self.tasks or None).as_dict(f"{prefix}routing/"))
        if self.cca is not None:
            out.update(self.cca.as_dict(f"{prefix}cca/"))
        return out


class JointAdapter(nn.Module):
    """Owns the projection head, the equivariant predictor, the parameter normaliser, the losses and the
    CCA monitor; takes the backbone features a trainer already has.

    Subclasses only choose the losses and defaults (:class:`SimCLRAdapter`, :class:`VICRegAdapter`,
    :class:`EquiModAdapter`).

    Args:
        input_dim: Backbone feature width d.
        head: ``"star"`` (default), ``"separate"``, ``"shared"``, ``"single"`` or any head module with
            the :class:`~star_heads.TaskHead` interface (tasks ``"inv"`` and, for joint calls, ``"eq"``).
        num_experts: Experts of the STAR head (default 8); an error for the other head kinds.
        output_dim: Embedding width D.
        hidden_dim: Expert hidden width (default ``input_dim``).
        param_dim: Width of the augmentation parameter vector (11 for STAR; 4 for a quaternion latent).
        lam: Weight λ of the equivariant loss.
        predictor: ``"star"``, ``"equimod"``, ``"hyper"`` or a module ``(z0, params) -> prediction``.
        normalizer: ``"running"`` (default: tracked statistics, saved in the state_dict), ``"stl10"``
            (the published constants), ``None`` (parameters used as given) or a module.
        loss: Invariant loss ``(z0, z1) -> Tensor`` (e.g. lightly's ``NTXentLoss``); default per subclass.
        eq_loss: Equivariant loss ``(targets, predictions) -> Tensor``; default per subclass.
        cca_every: Compute CCA(inv, eq) over the last ``cca_every`` joint steps, every ``cca_every``
            steps (0 disables it).
        view_batching: ``"separate"`` runs the head once per view, so BatchNorm statistics are per view
            group as in the reference code; ``"concat"`` runs one call on all views (faster, lightly-style).
    """

    def __init__(
        self,
        input_dim: int,
        *,
        head: HeadKind | nn.Module = "star",
        num_experts: int | None = None,
        output_dim: int = 128,
        hidden_dim: int | None = None,
        param_dim: int = 11,
        lam: float = 1.0,
        predictor: Literal["star", "equimod", "hyper"] | nn.Module = "star",
        normalizer: Literal["running", "stl10"] | nn.Module | None = "running",
        loss: LossFn,
        eq_loss: LossFn,
        cca_every: int = 100,
        view_batching: Literal["separate", "concat"] = "separate",
    ) -> None:
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise TypeError(f"lam must be a float, got {type(lam).__name__} {lam!r}")
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be a finite float >= 0, got {lam}")
        if not callable(loss):
            raise TypeError(f"loss must be a callable (z0, z1) -> Tensor, got {type(loss).__name__}")
        if not callable(eq_loss):
            raise TypeError(f"eq_loss must be a callable (targets, predictions) -> Tensor, got {type(eq_loss).__name__}")
        if view_batching not in ("separate", "concat"):
            raise ValueError(f"view_batching must be 'separate' or 'concat', got {view_batching!r}")
        self.input_dim, self.param_dim, self.lam, self.view_batching = input_dim, param_dim, lam, view_batching
        self.head = build_head(head, input_dim, num_experts=num_experts, output_dim=output_dim, hidden_dim=hidden_dim)
        self.tasks = tasks = tuple(getattr(self.head, "tasks", ()))
        if "inv" not in tasks:
            raise ValueError(f"the head must have an 'inv' task, got tasks {tasks}")
        self.joint = "eq" in tasks
        embed_dim = getattr(self.head, "output_dim", output_dim)
        if isinstance(predictor, nn.Module) or not self.joint:
            self.predictor = predictor if isinstance(predictor, nn.Module) else None
        else:
            self.predictor = EquivariantPredictor(embed_dim, param_dim, kind=predictor)
        if normalizer == "running":
            normalizer = AugParamNormalizer(param_dim)
        elif normalizer == "stl10":
            normalizer = AugParamNormalizer.stl10()
        elif normalizer is not None and not isinstance(normalizer, nn.Module):
            raise ValueError(f"normalizer must be 'running', 'stl10', None or a module, got {normalizer!r}")
        self.normalizer = normalizer
        self.inv_loss, self.eq_loss = loss, eq_loss
        self.monitor = CCAMonitor(every=cca_every) if cca_every and self.joint else None

    # ------------------------------------------------------------------ calls
    def forward(
        self,
        h1: Tensor,
        h2: Tensor,
        *,
        h0: Tensor | None = None,
        params1: Tensor | None = None,
        params2: Tensor | None = None,
    ) -> AdapterOutput:
        """Invariant-only call ``adapter(h1, h2)`` or joint call with ``h0``, ``params1``, ``params2``.

        Args:
            h1: Backbone features of view 1, ``[B, d]``.
            h2: Backbone features of view 2, ``[B, d]``.
            h0: Backbone features of the original image, ``[B, d]`` (joint call).
            params1: Augmentation parameters of view 1, ``[B, param_dim]`` (joint call).
            params2: Augmentation parameters of view 2, ``[B, param_dim]`` (joint call).
        """
        joint = self._validate(h1, h2, h0, params1, params2)  # before any state (normaliser, monitor) changes
        if not joint:
            z1, z2 = self._embed_views([h1, h2], task="inv")
            loss, terms = self._inv(z1, z2)
            return AdapterOutput(loss, terms, {"inv1": z1, "inv2": z2}, tasks=self.tasks)
        out1, out2, z0 = self._embed_joint(h0, h1, h2)
        z_inv1, z_inv2, z_eq1, z_eq2 = out1["inv"], out2["inv"], out1["eq"], out2["eq"]
        loss_inv, terms = self._inv(z_inv1, z_inv2)
        a1, a2 = self._normalise(params1, params2)
        pred1, pred2 = self.predictor(z0, a1), self.predictor(z0, a2)
        targets, predictions = torch.cat([z_eq1, z_eq2]), torch.cat([pred1, pred2])
        loss_eq, eq_terms = _split(self.eq_loss(targets, predictions), "eq", "eq_loss", predictions)
        terms.update(eq_terms)
        cca = None
        if self.monitor is not None:
            cca = self.monitor.update(torch.cat([z_inv1, z_inv2]).detach(), torch.cat([z_eq1, z_eq2]).detach())
        embeddings = {"inv1": z_inv1, "inv2": z_inv2, "eq0": z0, "eq1": z_eq1, "eq2": z_eq2, "pred1": pred1, "pred2": pred2}
        return AdapterOutput(loss_inv + self.lam * loss_eq, terms, embeddings, out1.gates, cca, self.tasks)

    @torch.no_grad()
    def embed(self, h: Tensor) -> dict[str, Tensor]:
        """Evaluation-time embeddings of features ``h [B, d]``: ``{"inv": ..., "eq": ...}`` (no gradients)."""
        out = self.head(h, task=None) if self.joint else {"inv": self.head(h, task="inv")}
        return dict(out.items())

    # ---------------------------------------------------------------- helpers
    def _validate(self, h1, h2, h0, params1, params2) -> bool:
        check_float_tensor(h1, "h1", sizes=(None, self.input_dim))
        if h1.shape[0] == 0:
            raise ValueError(f"h1 must hold at least one row, got shape {tuple(h1.shape)}")
        check_float_tensor(h2, "h2", sizes=(None, self.input_dim))
        _same_batch(h1, h2=h2)
        given = {"h0": h0 is not None, "params1": params1 is not None, "params2": params2 is not None}
        if not any(given.values()):
            return False
        if not all(given.values()):
            missing = [k for k, v in given.items() if not v]
            raise ValueError(f"a joint call needs h0, params1 and params2 together; missing {missing}")
        if not self.joint:
            raise ValueError(f"this adapter's head has tasks {self.head.tasks}: a joint call needs an 'eq' task")
        check_float_tensor(h0, "h0", sizes=(None, self.input_dim))
        check_float_tensor(params1, "params1", sizes=(None, self.param_dim))
        check_float_tensor(params2, "params2", sizes=(None, self.param_dim))
        _same_batch(h1, h0=h0, params1=params1, params2=params2)
        return True

    def _embed_views(self, hs: list[Tensor], task: str | None) -> list:
        if self.view_batching == "separate":
            return [self.head(h, task=task, return_gates=task is None) for h in hs]
        out = self.head(torch.cat(hs), task=task, return_gates=task is None)
        return _chunk(out, len(hs))

    def _embed_joint(self, h0: Tensor, h1: Tensor, h2: Tensor):
        if self.view_batching == "separate":
            out1, out2 = self._embed_views([h1, h2], task=None)
            return out1, out2, self.head(h0, task="eq")
        out0, out1, out2 = _chunk(self.head(torch.cat([h0, h1, h2]), task=None, return_gates=True), 3)
        return out1, out2, out0["eq"]

    def _inv(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return _split(self.inv_loss(z1, z2), "inv", "loss", z1)

    def _normalise(self, params1: Tensor, params2: Tensor) -> tuple[Tensor, Tensor]:
        if self.normalizer is None:
            return params1, params2
        a = self.normalizer(torch.cat([params1, params2]))
        return a.to(params1.dtype).chunk(2)


def _same_batch(h1: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.shape[0] != h1.shape[0]:
            raise ValueError(
                f"{name} must have the batch size of h1 ({h1.shape[0]} rows), got shape {tuple(t.shape)}"
            )


def _split(result: Any, prefix: str, name: str, source: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """A loss result as (total, detached terms); clear errors for what cannot be back-propagated.

    ``result`` is a scalar Tensor, or an object with a ``.loss`` scalar and a ``terms()`` method listing
    its named terms (e.g. :class:`~star_heads.VICRegOutput`); the adapter knows no loss by name.
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


def _chunk(out, k: int) -> list:
    """Splits a head output over ``k`` concatenated views into one output per view."""
    if isinstance(out, Tensor):
        return list(out.chunk(k))
    parts = {t: z.chunk(k) for t, z in out.items()}
    gates = out.gates.chunk(k) if out.gates is not None else [None] * k
    return [HeadOutput({t: parts[t][i] for t in parts}, gates[i]) for i in range(k)]
