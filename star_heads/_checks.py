"""Input validation shared by the package.

Every public entry point validates its tensors *before* touching any state, and raises an
error that names what was expected and what was given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_float_tensor", "check_positive_int"]


def check_float_tensor(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    sizes: Sequence[int | None] | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """Checks that ``x`` is a floating-point tensor of the expected rank and sizes.

    Args:
        x: The object to check.
        name: Name used in the error message (e.g. ``"x"`` or ``"gates"``).
        ndim: Expected number of dimensions, or None for any.
        sizes: Expected size per dimension (None entries are free); implies ``ndim``.
        finite: Also require every value to be finite (this syncs with the device; use it
            for statistics, not on hot paths).

    Returns:
        ``x`` itself, for chaining.

    Raises:
        TypeError: ``x`` is not a tensor or not floating point.
        ValueError: Wrong rank, wrong size, or (with ``finite``) NaN/Inf values.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if sizes is not None:
        ndim = len(sizes)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions"
            + (f" {_fmt(sizes)}" if sizes is not None else "")
            + f", got {x.ndim} with shape {tuple(x.shape)}"
        )
    if sizes is not None:
        for axis, (want, got) in enumerate(zip(sizes, x.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name} must have shape {_fmt(sizes)}, got {tuple(x.shape)} "
                    f"(dimension {axis}: expected {want}, got {got})"
                )
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Checks that ``value`` is an int ``>= minimum`` (bools rejected) and returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _fmt(sizes: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in sizes) + "]"
