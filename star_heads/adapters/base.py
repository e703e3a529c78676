"""The joint invariant + equivariant objective behind every adapter (STAR, arXiv 2510.27222, Sec. 3).

Per image: the original x0 and two augmented (global) views x1, x2 with augmentation parameters a1, a2,
optionally K local crops l1 … lK; backbone features h_v = f(x_v). Then

* ``L_inv = inv_loss(z_inv(x1), z_inv(x2))`` — with local crops, the mean over every (global view, other
  view) pair (see :meth:`JointAdapter.forward`);
* ``ẑ_eq(x_v) = predictor(z_eq(x0), normalise(a_v))`` for v = 1, 2;
* ``L_eq = eq_loss([z_eq(x1); z_eq(x2)], [ẑ_eq(x1); ẑ_eq(x2)])`` (global views only);
* ``L = L_inv + λ·L_eq`` (λ = 1 in the paper).

An invariant-only call (no x0, no parameters) computes ``L_inv`` alone: the trainer's old objective
through the new head.

Host syncs: none in a training step unless value checks are switched on (``check_finite`` or
:func:`star_heads.set_value_checks`); the CCA monitor's compute step (every ``cca_every`` joint steps) and
:meth:`AdapterOutput.as_dict` read values by design. Under ``torch.compile`` the monitor runs after the
compiled forward, so its step counter never becomes a guard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from star_heads._checks import check_bool, check_choice, check_float, check_float_tensor, check_int, choices
from star_heads._value_checks import value_checks_enabled
from star_heads.adapters._compile import eager_call
from star_heads.adapters.factory import HeadKind, build_head
from star_heads.adapters.output import AdapterOutput, split_loss, weighted_terms
from star_heads.equivariance import AugParamNormalizer, EquivariantPredictor
from star_heads.heads import HeadOutput
from star_heads.metrics import CCAMonitor, CCAResult

__all__ = ["AdapterOutput", "JointAdapter"]

LossFn = Callable[[Tensor, Tensor], Any]
ViewBatching = Literal["separate", "concat"]
NormalizerKind = Literal["running", "stl10"]


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
        param_dim: Width of the augmentation parameter vector: ``STARAugment.param_dim`` (11, or 12 with
            solarization), 4 for a quaternion latent, 15/17 for EquiMod's vectors. Sizes the predictor and the
            normaliser.
        lam: Weight λ of the equivariant loss.
        predictor: ``"star"``, ``"equimod"``, ``"hyper"`` or a module ``(z0, params) -> prediction``.
        normalizer: ``"running"`` (default: tracked statistics, saved in the state_dict), ``"stl10"``
            (the paper's published 11-D constants, crop box in pixels of 96-px images; for the normalised boxes of
            ``STARAugment`` pass ``AugParamNormalizer.stl10(crop_units="normalized")``), ``None`` (parameters used
            as given) or a module.
        loss: Invariant loss ``(z0, z1) -> Tensor`` (e.g. lightly's ``NTXentLoss``); default per subclass.
        eq_loss: Equivariant loss ``(targets, predictions) -> Tensor``; default per subclass.
        cca_every: Compute CCA(inv, eq) over the last ``cca_every`` joint steps, every ``cca_every``
            steps (0 disables it).
        view_batching: ``"separate"`` runs the head once per view, so BatchNorm statistics are per view
            group as in the reference code; ``"concat"`` runs one call on all views (faster, lightly-style).
        check_finite: Refuse non-finite features or parameters before any state changes (ValueError). One host
            sync per call, so off by default; :func:`star_heads.set_value_checks` switches it on everywhere.
        device: Device of every parameter and buffer (e.g. ``"cuda"``, or ``"meta"`` to count or trace).
        dtype: Floating dtype of the head and predictor parameters (the normaliser keeps float64 statistics).
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
        normalizer: NormalizerKind | nn.Module | None = "running",
        loss: LossFn,
        eq_loss: LossFn,
        cca_every: int = 100,
        view_batching: ViewBatching = "separate",
        check_finite: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.lam = check_float(lam, "lam", minimum=0.0)
        if not callable(loss):
            raise TypeError(f"loss must be a callable (z0, z1) -> Tensor, got {type(loss).__name__}")
        if not callable(eq_loss):
            raise TypeError(
                f"eq_loss must be a callable (targets, predictions) -> Tensor, got {type(eq_loss).__name__}"
            )
        self.view_batching: ViewBatching = check_choice(view_batching, "view_batching", ViewBatching)
        self.param_dim = check_int(param_dim, "param_dim", minimum=1)
        self.check_finite = check_bool(check_finite, "check_finite")
        cca_every = check_int(cca_every, "cca_every", minimum=0)
        self.input_dim = input_dim
        options = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.head = build_head(head, input_dim, num_experts=num_experts, output_dim=output_dim,
                                   hidden_dim=hidden_dim, **({} if isinstance(head, nn.Module) else options))
            self.tasks = tasks = tuple(getattr(self.head, "tasks", ()))
            if "inv" not in tasks:
                raise ValueError(f"the head must have an 'inv' task, got tasks {tasks}")
            self.joint = "eq" in tasks
            embed_dim = getattr(self.head, "output_dim", output_dim)
            if isinstance(predictor, nn.Module) or not self.joint:
                self.predictor = predictor if isinstance(predictor, nn.Module) else None
            else:
                self.predictor = EquivariantPredictor(embed_dim, self.param_dim, kind=predictor)
                if dtype is not None:
                    self.predictor.to(dtype=dtype)
        self.normalizer = _build_normalizer(normalizer, self.param_dim)  # checks its constants on the host
        if device is not None and self.normalizer is not None:
            self.normalizer.to(device)
        self.inv_loss, self.eq_loss = loss, eq_loss
        self.monitor = CCAMonitor(every=cca_every) if cca_every and self.joint else None

    # ------------------------------------------------------------------ calls
    @eager_call(host_side=("_observe",))  # eager under torch.compile; the forward it calls is compiled
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)
        if isinstance(out, AdapterOutput) and out.cca_pending:  # a compiled forward: the monitor runs here
            observe = getattr(type(self), "_observe_eager", type(self)._observe)
            out.cca = observe(self, out.embeddings)
            out.cca_pending = False
        return out

    def forward(
        self,
        h1: Tensor,
        h2: Tensor,
        *,
        h0: Tensor | None = None,
        params1: Tensor | None = None,
        params2: Tensor | None = None,
        h_local: Sequence[Tensor] | None = None,
    ) -> AdapterOutput:
        """Invariant-only call ``adapter(h1, h2)`` or joint call with ``h0``, ``params1``, ``params2``.

        With local crops (``h_local``, K tensors), the invariant loss averages every (global view, other
        view) pair, each global view in turn being the target, as lightly's multi-crop losses
        (``SwaVLoss``, ``DINOLoss``) do::

            L_inv = [ inv(z1, z2) + Σ_k ½ (inv(z1, l_k) + inv(z2, l_k)) ] / (1 + K)

        (equal to ``inv(z1, z2)`` for K = 0; each local crop is pulled towards both global views). The
        equivariant loss, the predictor and the CCA monitor use the global views only: local crops have no
        parameters of their own.

        Args:
            h1: Backbone features of view 1, ``[B, d]``.
            h2: Backbone features of view 2, ``[B, d]``.
            h0: Backbone features of the original image, ``[B, d]`` (joint call).
            params1: Augmentation parameters of view 1, ``[B, param_dim]`` (joint call).
            params2: Augmentation parameters of view 2, ``[B, param_dim]`` (joint call).
            h_local: Backbone features of the local crops, each ``[B, d]`` (row i: a crop of image i).
        """
        joint, local = self._validate(h1, h2, h0, params1, params2, h_local)  # before any state changes
        z_local = self._embed(local, task="inv") if local else []
        if not joint:
            z1, z2 = self._embed([h1, h2], task="inv")
            loss, terms = self._inv(z1, z2, z_local)
            return AdapterOutput(loss, terms, _named(inv1=z1, inv2=z2, local=z_local), tasks=self.tasks)
        out1, out2, z0 = self._embed_joint(h0, h1, h2)
        z_inv1, z_inv2, z_eq1, z_eq2 = out1["inv"], out2["inv"], out1["eq"], out2["eq"]
        loss_inv, terms = self._inv(z_inv1, z_inv2, z_local)
        a1, a2 = self._normalise(params1, params2)
        pred1, pred2 = self.predictor(z0, a1), self.predictor(z0, a2)
        targets, predictions = torch.cat([z_eq1, z_eq2]), torch.cat([pred1, pred2])
        loss_eq, eq_terms = split_loss(self.eq_loss(targets, predictions), "eq", "eq_loss", predictions)
        terms.update(eq_terms)
        embeddings = _named(inv1=z_inv1, inv2=z_inv2, local=z_local, eq0=z0, eq1=z_eq1, eq2=z_eq2,
                            pred1=pred1, pred2=pred2)
        out = AdapterOutput(loss_inv + self.lam * loss_eq, terms, embeddings, out1.gates, None, self.tasks)
        if self.monitor is not None:
            if torch.compiler.is_compiling():
                out.cca_pending = True  # JointAdapter.__call__ updates the monitor outside the graph
            else:
                out.cca = self._observe(embeddings)
        return out

    @torch.no_grad()
    def embed(self, h: Tensor) -> dict[str, Tensor]:
        """Evaluation-time embeddings of features ``h [B, d]``: ``{"inv": ..., "eq": ...}`` (no gradients)."""
        out = self.head(h, task=None) if self.joint else {"inv": self.head(h, task="inv")}
        return dict(out.items())

    # ---------------------------------------------------------------- helpers
    def _validate(self, h1, h2, h0, params1, params2, h_local) -> tuple[bool, list[Tensor]]:
        check_float_tensor(h1, "h1", sizes=(None, self.input_dim))
        if h1.shape[0] == 0:
            raise ValueError(f"h1 must hold at least one row, got shape {tuple(h1.shape)}")
        check_float_tensor(h2, "h2", sizes=(None, self.input_dim))
        _same_batch(h1, h2=h2)
        local = _check_local(h_local, h1, self.input_dim)
        given = {"h0": h0 is not None, "params1": params1 is not None, "params2": params2 is not None}
        joint = any(given.values())
        if joint and not all(given.values()):
            missing = [k for k, v in given.items() if not v]
            raise ValueError(f"a joint call needs h0, params1 and params2 together; missing {missing}")
        if joint and not self.joint:
            raise ValueError(f"this adapter's head has tasks {self.head.tasks}: a joint call needs an 'eq' task")
        if joint:
            check_float_tensor(h0, "h0", sizes=(None, self.input_dim))
            check_float_tensor(params1, "params1", sizes=(None, self.param_dim))
            check_float_tensor(params2, "params2", sizes=(None, self.param_dim))
            _same_batch(h1, h0=h0, params1=params1, params2=params2)
        if value_checks_enabled(self.check_finite):  # opt-in: one host read for every input together
            named = {"h1": h1, "h2": h2, **{f"h_local[{k}]": t for k, t in enumerate(local)}}
            if joint:
                named.update(h0=h0, params1=params1, params2=params2)
            finite = torch.stack([torch.isfinite(t).all() for t in named.values()]).tolist()
            bad = [name for name, ok in zip(named, finite) if not ok]
            if bad:
                verb = "contains" if len(bad) == 1 else "contain"
                raise ValueError(f"{', '.join(bad)} {verb} NaN or Inf values (check_finite)")
        return joint, local

    def _embed(self, hs: list[Tensor], task: str | None) -> list:
        if self.view_batching == "separate":
            return [self.head(h, task=task, return_gates=task is None) for h in hs]
        out = self.head(torch.cat(hs), task=task, return_gates=task is None)
        return _chunk(out, len(hs))

    def _embed_joint(self, h0: Tensor, h1: Tensor, h2: Tensor):
        if self.view_batching == "separate":
            out1, out2 = self._embed([h1, h2], task=None)
            return out1, out2, self.head(h0, task="eq")
        out0, out1, out2 = _chunk(self.head(torch.cat([h0, h1, h2]), task=None, return_gates=True), 3)
        return out1, out2, out0["eq"]

    def _inv(self, z1: Tensor, z2: Tensor, z_local: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        first = split_loss(self.inv_loss(z1, z2), "inv", "loss", z1)
        if not z_local:
            return first
        w = 1.0 / (1 + len(z_local))  # the multi-crop average of forward()'s docstring
        parts = [(w, *first)]
        for zl in z_local:
            parts += [(w / 2, *split_loss(self.inv_loss(zg, zl), "inv", "loss", zg)) for zg in (z1, z2)]
        return weighted_terms(parts)

    def _normalise(self, params1: Tensor, params2: Tensor) -> tuple[Tensor, Tensor]:
        if self.normalizer is None:
            return params1, params2
        a = self.normalizer(torch.cat([params1, params2]))
        return a.to(params1.dtype).chunk(2)

    def _observe(self, embeddings: dict[str, Tensor]) -> CCAResult | None:
        """Adds the step's global-view embeddings to the CCA monitor; a result every ``cca_every`` steps."""
        z_inv = torch.cat([embeddings["inv1"], embeddings["inv2"]]).detach()
        z_eq = torch.cat([embeddings["eq1"], embeddings["eq2"]]).detach()
        return self.monitor.update(z_inv, z_eq)


def _build_normalizer(normalizer: object, param_dim: int) -> nn.Module | None:
    if normalizer is None or isinstance(normalizer, nn.Module):
        return normalizer
    if not isinstance(normalizer, str):
        raise TypeError(
            f"normalizer must be one of {choices(NormalizerKind)}, None or a module, got {type(normalizer).__name__}"
        )
    check_choice(normalizer, "normalizer", NormalizerKind)
    if normalizer == "running":  # finite checks: the adapter's own (check_finite / set_value_checks)
        return AugParamNormalizer(param_dim, check_finite=False)
    if param_dim != 11:
        raise ValueError(
            f"normalizer='stl10' holds the published 11-D constants, but param_dim is {param_dim}; "
            "use normalizer='running' (tracked statistics of any width)"
        )
    return AugParamNormalizer.stl10()


def _check_local(h_local: object, h1: Tensor, input_dim: int) -> list[Tensor]:
    if h_local is None:
        return []
    if isinstance(h_local, Tensor) or not isinstance(h_local, Sequence):
        raise TypeError(
            f"h_local must be a list of [B, d] tensors (one per local crop), got {type(h_local).__name__}"
        )
    for k, t in enumerate(h_local):
        check_float_tensor(t, f"h_local[{k}]", sizes=(None, input_dim))
        _same_batch(h1, **{f"h_local[{k}]": t})
    return list(h_local)


def _same_batch(h1: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        if t.shape[0] != h1.shape[0]:
            raise ValueError(
                f"{name} must have the batch size of h1 ({h1.shape[0]} rows), got shape {tuple(t.shape)}"
            )


def _named(*, local: list[Tensor], **embeddings: Tensor) -> dict[str, Tensor]:
    """The embeddings dict, local crops as ``inv_local1`` … ``inv_localK`` after the global views."""
    out = dict(embeddings)
    out.update({f"inv_local{k + 1}": z for k, z in enumerate(local)})
    return out


def _chunk(out, k: int) -> list:
    """Splits a head output over ``k`` concatenated views into one output per view."""
    if isinstance(out, Tensor):
        return list(out.chunk(k))
    parts = {t: z.chunk(k) for t, z in out.items()}
    gates = out.gates.chunk(k) if out.gates is not None else [None] * k
    return [HeadOutput({t: parts[t][i] for t in parts}, gates[i]) for i in range(k)]
