"""How much of the augmentation an embedding encodes: held-out R² of a ridge readout of the relative parameters.

Axis legend:
    p: pairs of views    d: embedding features    k: augmentation parameters    l: ridge penalties

STAR (arXiv 2510.27222, Sec. 4) asks the equivariant embedding to encode the transformation between two views
and the invariant one to discard it, and compares heads by how equivariant each embedding is (its R-equiv and
P-equiv columns); their exact definitions are not published. :func:`augmentation_r2` measures that intent
directly: for pairs of views ``(a, b)`` of the same image, a linear (ridge) readout predicts the relative
parameters ``params_b − params_a`` from the embedding difference ``z_b − z_a``, and its R² on images the readout
never saw is reported per parameter group (crop, colour, blur, flip, grayscale, solarize when present).

Why the difference ``z_b − z_a`` rather than ``[z_a, z_b]``: an embedding that is equivariant in the plain
linear sense, ``z = f(image) + W·params``, gives ``z_b − z_a = W·(params_b − params_a)``, a function of the
relative parameters alone — the image term cancels, so a linear readout is exact; an invariant embedding gives
``z_b − z_a ≈ 0`` and scores ≈ 0. The concatenation would also let the readout decode each view's absolute
parameters, which an image-dependent embedding can encode without encoding the change between views, and it
doubles the readout's width. ``pair="concat"`` is available for comparison.

The readout is fitted and scored on disjoint sets of *images* (all pairs of an image fall on one side), in
float64, in closed form: inputs standardised with the fit split's mean and standard deviation, targets centred,
``W = V diag(s / (s² + λ)) Uᵀ Y`` from the SVD of the fit inputs, with λ chosen per parameter by generalised
cross-validation (GCV) on the fit split over a log grid relative to the largest squared singular value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from star_heads._checks import (
    check_choice,
    check_float_tensor,
    check_int,
    check_names,
    check_probability,
)
from star_heads.augment._params import PARAM_NAMES

__all__ = ["AugmentationR2", "PairFeatures", "augmentation_r2", "parameter_groups"]

PairFeatures = Literal["difference", "concat"]
_COLOR = ("brightness", "contrast", "saturation", "hue")
_PENALTY_GRID = (-8.0, 3.0, 45)  # λ / s_max² on a log grid, 10^-8 .. 10^3 (made per call, on the data's device)


def parameter_groups(names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Groups parameter indices by augmentation: ``crop_*`` → crop; brightness, contrast, saturation, hue → color;
    ``flip`` → flip; ``grayscale`` → grayscale; ``blur*`` → blur; ``solariz*`` → solarize; any other name is
    its own group. Groups keep the order in which they first appear.

    Raises:
        TypeError, ValueError: ``names`` is not a non-empty sequence of distinct strings.
    """
    names = check_names(names, "param_names")
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n.startswith("crop"):
            g = "crop"
        elif n in _COLOR:
            g = "color"
        elif n.startswith("blur"):
            g = "blur"
        elif n.startswith("solariz"):
            g = "solarize"
        else:
            g = n
        groups.setdefault(g, []).append(i)
    return {g: tuple(idx) for g, idx in groups.items()}


@dataclass(frozen=True)
class AugmentationR2:
    """Held-out R² of the ridge readout of the relative augmentation parameters (see :func:`augmentation_r2`).

    Attributes:
        groups: ``{group: R²}``, the mean of the group's parameter R² (groups whose every parameter is
            constant on the scoring images are left out and listed in ``skipped``).
        params: ``{parameter: R²}`` on the scoring images: ``1 − Σ(y − ŷ)² / Σ(y − ȳ)²``. 1 = the readout
            recovers the parameter; 0 = no better than its mean; negative = worse.
        penalties: ``{parameter: λ}`` chosen by GCV on the fit split (in the units of the standardised inputs).
        skipped: Parameters constant on the scoring images (no R² exists), e.g. an augmentation that is off.
        n_fit: Pairs the readout was fitted on.
        n_score: Pairs it was scored on.
        pair: ``"difference"`` or ``"concat"``.
    """

    groups: dict[str, float]
    params: dict[str, float]
    penalties: dict[str, float]
    skipped: tuple[str, ...] = ()
    n_fit: int = 0
    n_score: int = 0
    pair: str = "difference"

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + "r2/" + group: R²}`` for loggers (flat, plain floats)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}")
        return {f"{prefix}r2/{g}": float(v) for g, v in self.groups.items()}


def _split(ids: torch.Tensor, fit_fraction: float, seed: int, fit_images: torch.Tensor | None) -> torch.Tensor:
    """Boolean ``[p]`` mask of the fit pairs: a seeded random ``fit_fraction`` of the images, or ``fit_images``."""
    unique = torch.unique(ids)
    if unique.numel() < 4:
        raise ValueError(f"augmentation_r2 needs pairs from at least 4 distinct images (2 to fit, 2 to score), "
                         f"got {unique.numel()}")
    if fit_images is None:
        gen = torch.Generator().manual_seed(seed)
        order = unique[torch.randperm(unique.numel(), generator=gen)]
        n_fit = min(max(round(fit_fraction * unique.numel()), 2), unique.numel() - 2)
        fit_images = order[:n_fit]
    else:
        if not isinstance(fit_images, torch.Tensor) or fit_images.dtype.is_floating_point or fit_images.ndim != 1:
            raise TypeError(f"fit_images must be a 1-D integer tensor of image ids, got "
                            f"{type(fit_images).__name__} {getattr(fit_images, 'dtype', '')} "
                            f"{tuple(getattr(fit_images, 'shape', ()))}")
        fit_images = fit_images.cpu()
    return torch.isin(ids, fit_images)


def _ridge_gcv(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``[d, k]`` and the GCV-chosen penalty ``[k]`` of ridge on centred ``x [p, d]``, ``y [p, k]``."""
    n = x.shape[0]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    grid = torch.logspace(*_PENALTY_GRID, dtype=torch.float64, device=s.device)
    lam = grid * s[0].square().clamp_min(torch.finfo(torch.float64).tiny)  # [l]
    s2 = s.square()
    filt = s2 / (s2 + lam[:, None])  # [l, r]: shrinkage of each direction
    uty = u.T @ y  # [r, k]
    # residual of each λ: ‖y‖² − 2 Σ f (uᵀy)² + Σ f² (uᵀy)²  (y's part outside span(U) is kept)
    rss = y.square().sum(0) - (2 * filt - filt.square()) @ uty.square()  # [l, k]
    dof = n - filt.sum(1)  # [l]
    gcv = n * rss.clamp_min(0) / dof.square()[:, None]
    gcv = torch.where(dof[:, None] > 1e-9 * n, gcv, torch.full_like(gcv, float("inf")))
    best = gcv.argmin(0)  # [k]
    chosen = lam[best]
    coef = vh.T @ ((s[:, None] / (s2[:, None] + chosen[None, :])) * uty)  # [d, k]
    return coef, chosen


def augmentation_r2(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    params_a: torch.Tensor,
    params_b: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    *,
    param_names: Sequence[str] | None = None,
    pair: PairFeatures = "difference",
    fit_fraction: float = 0.5,
    seed: int = 0,
    fit_images: torch.Tensor | None = None,
) -> AugmentationR2:
    """Held-out R² of a ridge readout from a pair of embeddings to the relative augmentation parameters.

    A readout of how equivariant an embedding is, in the spirit of STAR's equivariance comparison (arXiv
    2510.27222, Sec. 4, R-equiv / P-equiv; their exact definition is not published, this is not it): an
    invariant embedding should score ≈ 0 on every group, an equivariant one high. See the module docstring
    for the features (``z_b − z_a``), the split and the closed-form ridge with GCV.

    Args:
        z_a, z_b: Embeddings ``[P, D]`` of the two views of each pair (float; computed in float64).
        params_a, params_b: The views' augmentation parameters ``[P, K]`` (e.g. ``STARAugment``'s 11-D vectors).
            The target is ``params_b − params_a``.
        image_ids: ``[P]`` integer id of the image each pair comes from (pairs of one image are never split
            between fitting and scoring). Default: every pair its own image.
        param_names: Names of the K parameters (default :data:`~star_heads.augment.PARAM_NAMES` when K = 11);
            grouped by :func:`parameter_groups`.
        pair: ``"difference"`` (``z_b − z_a``, default) or ``"concat"`` (``[z_a, z_b]``).
        fit_fraction: Fraction of the images the readout is fitted on (the rest score it); at least 2 each.
        seed: Seed of the image split (a ``torch.Generator``; the global RNG is not touched).
        fit_images: Explicit ids of the fit images (overrides ``fit_fraction`` and ``seed``).

    Returns:
        :class:`AugmentationR2`.

    Raises:
        TypeError: a non-float embedding or parameter tensor, non-integer ``image_ids``.
        ValueError: mismatched shapes, NaN/Inf, fewer than 4 images, fewer than 3 fit or 2 scoring pairs,
            ``param_names`` missing for K ≠ 11 or of the wrong length, a bad ``pair`` or ``fit_fraction``.
    """
    check_float_tensor(z_a, "z_a", ndim=2, finite=True)
    check_float_tensor(z_b, "z_b", sizes=tuple(z_a.shape), finite=True)
    check_float_tensor(params_a, "params_a", sizes=(z_a.shape[0], None), finite=True)
    check_float_tensor(params_b, "params_b", sizes=tuple(params_a.shape), finite=True)
    check_choice(pair, "pair", PairFeatures)
    fit_fraction = check_probability(fit_fraction, "fit_fraction", allow_zero=False, allow_one=False)
    check_int(seed, "seed")
    n_pairs, k = params_a.shape
    if param_names is None:
        if k != len(PARAM_NAMES):
            raise ValueError(f"param_names is required for {k}-D parameters (the default names are the "
                             f"{len(PARAM_NAMES)}-D STAR layout)")
        param_names = PARAM_NAMES
    names = check_names(param_names, "param_names")
    if len(names) != k:
        raise ValueError(f"param_names has {len(names)} names, but the parameters are {k}-D")
    if image_ids is None:
        ids = torch.arange(n_pairs)
    else:
        if not isinstance(image_ids, torch.Tensor) or image_ids.is_floating_point() or image_ids.dtype == torch.bool:
            raise TypeError(f"image_ids must be an integer tensor [P], got {type(image_ids).__name__} "
                            f"{getattr(image_ids, 'dtype', '')}")
        if tuple(image_ids.shape) != (n_pairs,):
            raise ValueError(f"image_ids must have shape [{n_pairs}] (one id per pair), got {tuple(image_ids.shape)}")
        ids = image_ids.cpu()
    za, zb = z_a.detach().cpu().double(), z_b.detach().cpu().double()
    y = params_b.detach().cpu().double() - params_a.detach().cpu().double()
    x = zb - za if pair == "difference" else torch.cat([za, zb], dim=1)
    fit = _split(ids, fit_fraction, seed, fit_images)
    n_fit, n_score = int(fit.sum()), int((~fit).sum())
    if n_fit < 3 or n_score < 2:
        raise ValueError(f"augmentation_r2 needs at least 3 fit pairs and 2 scoring pairs, got {n_fit} and {n_score}")
    x_mean, x_std = x[fit].mean(0), x[fit].std(0)
    x_std = torch.where(x_std > 0, x_std, torch.ones_like(x_std))
    y_mean = y[fit].mean(0)
    coef, lam = _ridge_gcv((x[fit] - x_mean) / x_std, y[fit] - y_mean)
    pred = ((x[~fit] - x_mean) / x_std) @ coef + y_mean
    ys = y[~fit]
    sst = (ys - ys.mean(0)).square().sum(0)
    sse = (ys - pred).square().sum(0)
    params, skipped = {}, []
    for j, n in enumerate(names):
        if sst[j] > 0:
            params[n] = float(1 - sse[j] / sst[j])
        else:
            skipped.append(n)
    groups = {}
    for g, idx in parameter_groups(names).items():
        vals = [params[names[i]] for i in idx if names[i] in params]
        if vals:
            groups[g] = sum(vals) / len(vals)
    return AugmentationR2(groups=groups, params=params, penalties={n: float(v) for n, v in zip(names, lam)},
                          skipped=tuple(skipped), n_fit=n_fit, n_score=n_score, pair=pair)
