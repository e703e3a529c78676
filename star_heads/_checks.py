"""Input validation shared by the package: one check per kind of value, one exception type per mistake.

Every public entry point validates its arguments *before* touching any state, and raises an error that
names the argument, what was expected and what was given. The exception type says what kind of mistake
it is, the same way everywhere:

* ``TypeError`` — the value has the wrong type: a float or a string where an int is expected, a ``bool``
  where a number is expected (``True`` is an ``int`` to Python, never to us), a string where a sequence of
  names is expected, a non-tensor, an integer tensor where a float one is expected;
* ``ValueError`` — the type is right but the value is not: out of range, not finite, not one of the
  choices, a tensor of the wrong rank or size.

Choices are declared once as a ``typing.Literal`` and checked with :func:`check_choice`, which reads the
allowed values from the Literal itself (``typing.get_args``).
"""

from __future__ import annotations

import math
import numbers
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from star_heads._precision import autocast_dtype

__all__ = [
    "check_float_tensor",
    "check_positive_int",
    "check_int",
    "check_positive_float",
    "check_float",
    "check_probability",
    "check_bool",
    "check_choice",
    "check_names",
    "check_layer",
    "check_input_dtype",
    "check_batch_for_batch_norm",
    "uses_batch_statistics",
    "choices",
]


def check_int(value: object, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Checks that ``value`` is an int in ``[minimum, maximum]`` and returns it as a Python int.

    Raises:
        TypeError: not an int (``bool``, float and str are rejected; numpy integers are accepted).
        ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Checks that ``value`` is an int ``>= minimum`` (1 unless told) and returns it."""
    return check_int(value, name, minimum=minimum)


def check_float(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_inf: bool = False,
) -> float:
    """Checks that ``value`` is a real number (int or float, not bool/str) in the given range; returns a float.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite (unless ``allow_inf``) or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value < minimum or (value == minimum and not min_inclusive)):
        raise ValueError(f"{name} must be {'>=' if min_inclusive else '>'} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (value == maximum and not max_inclusive)):
        raise ValueError(f"{name} must be {'<=' if max_inclusive else '<'} {maximum}, got {value}")
    return value


def check_positive_float(value: object, name: str, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """Checks that ``value`` is a real number ``> 0`` (``>= 0`` with ``allow_zero``), finite unless ``allow_inf``."""
    return check_float(value, name, minimum=0.0, min_inclusive=allow_zero, allow_inf=allow_inf)


def check_probability(value: object, name: str, *, allow_zero: bool = True, allow_one: bool = True) -> float:
    """Checks that ``value`` is a real number in ``[0, 1]`` (ends excluded on request)."""
    return check_float(value, name, minimum=0.0, maximum=1.0, min_inclusive=allow_zero, max_inclusive=allow_one)


def check_bool(value: object, name: str) -> bool:
    """Checks that ``value`` is a ``bool`` (``0``/``1``/``"yes"`` are rejected, numpy bools accepted)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def choices(literal: Any) -> tuple[Any, ...]:
    """The allowed values of a ``typing.Literal`` (or a sequence of values), as a tuple."""
    args = typing.get_args(literal)
    return tuple(args) if args else tuple(literal)


def check_choice(value: object, name: str, allowed: Any) -> Any:
    """Checks that ``value`` is one of ``allowed`` (a ``typing.Literal`` or a sequence) and returns it.

    Raises:
        TypeError: ``value`` is not of the type of the choices (e.g. an int where names are expected).
        ValueError: not one of them.
    """
    options = choices(allowed)
    types = {type(o) for o in options}
    if not any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in types):
        raise TypeError(f"{name} must be one of {options}, got {type(value).__name__} {value!r}")
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_names(value: object, name: str) -> tuple[str, ...]:
    """Checks a non-empty sequence of distinct non-empty strings (e.g. task names) and returns it as a tuple.

    A bare string is rejected (``tasks="inv"`` would otherwise read as ``('i', 'n', 'v')``).

    Raises:
        TypeError: a string, a non-sequence, or an element that is not a string.
        ValueError: empty, an empty name or a repeated name.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        hint = f" (did you mean ({value!r},)?)" if isinstance(value, str) else ""
        raise TypeError(f"{name} must be a sequence of strings, got {type(value).__name__} {value!r}{hint}")
    names = tuple(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must contain only strings, got {type(bad[0]).__name__} {bad[0]!r} in {names!r}")
    if not names or not all(names) or len(set(names)) != len(names):
        raise ValueError(f"{name} must be a non-empty sequence of distinct non-empty strings, got {names!r}")
    return names


def check_layer(value: object, name: str, *, optional: bool = True) -> Any:
    """Checks a layer option given timm-style: a ``nn.Module`` class or a ``functools.partial`` of one
    (``None`` allowed when ``optional``). An *instance* such as ``nn.ReLU()`` is rejected: the layer is
    built once per use.

    Raises:
        TypeError: anything else.
    """
    if value is None and optional:
        return value
    func = getattr(value, "func", value)  # functools.partial
    if isinstance(func, type) and issubclass(func, torch.nn.Module):
        return value
    what = "an nn.Module class or a functools.partial of one" + (" or None" if optional else "")
    given = f"the instance {value!r} (pass its class)" if isinstance(value, torch.nn.Module) else repr(value)
    raise TypeError(f"{name} must be {what}, got {given}")


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
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains NaN or Inf values ({bad} of {x.numel()}, shape {tuple(x.shape)})")
    return x


def check_input_dtype(x: torch.Tensor, dtype: torch.dtype, name: str, owner: str) -> torch.Tensor:
    """The package's one dtype policy: an input has its module's parameter dtype, except under autocast
    (:mod:`star_heads._precision`), where torch picks the compute dtype itself.

    Raises:
        TypeError: ``x.dtype != dtype`` outside autocast (the message names the three ways out).
    """
    if x.dtype != dtype and autocast_dtype(x.device.type) is None:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the {owner}'s parameters are {dtype}: cast the input "
            f"({name}.to({dtype})), the {owner} (.to({x.dtype})), or run under torch.autocast"
        )
    return x


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that normalises with the batch's statistics in its current mode."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


def check_batch_for_batch_norm(x: torch.Tensor, module: nn.Module, name: str = "x") -> torch.Tensor:
    """Refuses a batch of one sample when a BatchNorm inside ``module`` uses batch statistics (its variance
    would be 0 and torch's error would not say which layer or what to do).

    Raises:
        ValueError: ``x.shape[0] == 1`` and a BatchNorm of ``module`` uses batch statistics.
    """
    if x.shape[0] == 1 and any(uses_batch_statistics(m) for m in module.modules()):
        raise ValueError(
            f"{name} has a batch of 1 (shape {tuple(x.shape)}): BatchNorm in training mode needs at least 2 samples; "
            "use a larger batch, call .eval(), or build the module with norm_layer=nn.LayerNorm or None"
        )
    return x


def _fmt(sizes: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in sizes) + "]"
