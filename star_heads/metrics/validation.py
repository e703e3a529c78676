"""Input checks shared by every CCA entry point (one-shot functions, :class:`CCAMeter`, :class:`CCAMonitor`).

Each check raises before any state changes, with a message that names the argument, what was
expected and what was given: ``TypeError`` for a wrong type, ``ValueError`` for a wrong value or shape.
"""

from __future__ import annotations

import warnings

import torch

from star_heads._checks import check_float_tensor, check_positive_float, check_probability

__all__ = [
    "DEFAULT_RANK_TOL",
    "CCASampleSizeWarning",
    "check_cca_options",
    "check_keep",
    "check_sample_size",
    "check_views",
    "min_samples",
]

DEFAULT_RANK_TOL = 1e-5
"""Relative rank cut-off: directions with singular value <= tol · s_max are dropped (variance 1e-10 of the top)."""


class CCASampleSizeWarning(UserWarning):
    """Fewer than 2(p + q) samples: canonical correlations are biased upward."""


def min_samples(p: int, q: int) -> int:
    """Smallest n for which CCA of widths p, q is not trivially 1: n − 1 > max(p, q)."""
    return max(p, q) + 2


def check_sample_size(n: int, p: int, q: int, *, stacklevel: int = 3) -> None:
    """Raises if every correlation would be trivially 1 (n − 1 <= max(p, q)); warns if n < 2(p + q)."""
    if n < min_samples(p, q):
        raise ValueError(
            f"CCA needs n - 1 > max(p, q) samples: got n={n} for p={p}, q={q}, so every canonical "
            f"correlation would be trivially 1; need n >= {min_samples(p, q)} (and n >= {2 * (p + q)} "
            "for a low-bias estimate)"
        )
    if n < 2 * (p + q):
        warnings.warn(
            f"CCA with n={n} samples for p={p}, q={q} is biased upward; use n >= 2(p + q) = "
            f"{2 * (p + q)} (see docs/cca.md) and compare with the null baseline",
            CCASampleSizeWarning,
            stacklevel=stacklevel,
        )


def check_views(x: object, y: object, *, finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks a pair of views x [n, p], y [n, q]: float tensors, 2-D, same n, non-empty, same device.

    Args:
        x: First view.
        y: Second view (same samples, same order).
        finite: Also reject NaN/Inf (a host sync; the streaming meter can defer it to ``compute``).

    Returns:
        ``(x, y)`` unchanged.
    """
    x = check_float_tensor(x, "x", ndim=2)
    y = check_float_tensor(y, "y", ndim=2)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of samples (rows): got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.shape[1] == 0 or y.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"x and y must be non-empty: got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device: got {x.device} and {y.device}")
    if finite:
        check_float_tensor(x, "x", finite=True)
        check_float_tensor(y, "y", finite=True)
    return x, y


def check_cca_options(ridge: object, rank_tol: object) -> tuple[float, float]:
    """Validates ``ridge`` (finite, >= 0) and ``rank_tol`` (in [0, 1), None = default); returns both as floats."""
    ridge = check_positive_float(ridge, "ridge", allow_zero=True)
    tol = DEFAULT_RANK_TOL if rank_tol is None else check_probability(rank_tol, "rank_tol", allow_one=False)
    return ridge, tol


def check_keep(keep: object, name: str = "keep") -> float:
    """Validates the SVCCA variance fraction ``keep`` in (0, 1] (``name``: the argument, for the message)."""
    return check_probability(keep, name, allow_zero=False)
