"""The one switch for checks that read tensor values (finite, range): off by default, because each is a host sync.

Shape, dtype and Python-value checks cost nothing on a GPU and always run. Checks that must read a tensor's
values (``isfinite(x).all()``, ``x.min() >= 0``) make the host wait for the device, so every module runs them
only when asked: per module (``check_finite=True``, ``check_range=True``) or everywhere at once::

    star_heads.set_value_checks(True)        # a debugging run
    with star_heads.value_checks():          # or only inside a block
        loss = adapter(h1, h2, ...).loss

Modules read :func:`value_checks_enabled` at call time, so the switch also reaches modules already built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["set_value_checks", "value_checks", "value_checks_enabled"]

_enabled = False


def set_value_checks(enabled: bool) -> None:
    """Turns the value checks of every star-heads module on or off (default off: no host syncs)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    _enabled = enabled


def value_checks_enabled(local: bool | None = None) -> bool:
    """Whether a module should check values: its own ``local`` setting when True, else the global switch."""
    return bool(local) or _enabled


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Context manager: value checks on (or off) inside the block, restored afterwards."""
    global _enabled
    before = _enabled
    set_value_checks(enabled)
    try:
        yield
    finally:
        _enabled = before
