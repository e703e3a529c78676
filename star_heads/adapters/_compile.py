"""An eager frame around a compiled forward, without importing torch._dynamo for users who never compile.

``torch.compile(adapter)`` traces ``adapter.__call__``. The adapter's host-side bookkeeping (the CCA monitor's
step counter and its compute step) must run outside the graph, or the counter becomes a guard and every step
recompiles. :class:`eager_call` marks ``__call__`` as a frame dynamo skips (``torch.compiler.disable(...,
recursive=False)``: the frame runs eagerly, the forward it calls is still compiled), and gives each method
named in ``host_side`` a twin ``<name>_eager`` that dynamo never enters (``recursive=True``). Both are made
when ``__call__`` is first looked up with torch._dynamo loaded (``torch.compile`` loads it): that lookup runs
eagerly, so no Python frame is left for dynamo to trace between the compiled forward and the host code, and
``import star_heads`` stays free of the compiler's import cost.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["eager_call"]


class eager_call:  # noqa: N801 - used as a decorator
    """Decorator for ``__call__``: its frame and the ``host_side`` methods run eagerly under torch.compile.

    Args:
        host_side: Names of methods of the class that ``__call__`` calls as ``type(self).<name>_eager`` (when
            present) for host-side work.
    """

    def __init__(self, *, host_side: tuple[str, ...] = ()) -> None:
        self.host_side = host_side
        self.fn: Callable | None = None
        self.skipped: Callable | None = None

    def __call__(self, fn: Callable) -> eager_call:
        self.fn = fn
        self.__doc__ = fn.__doc__
        return self

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        fn = self.fn
        if "torch._dynamo" in sys.modules:  # something may compile: skip this frame and the host-side methods
            if self.skipped is None:
                self.skipped = torch.compiler.disable(self.fn, recursive=False)
            owner = type(obj) if owner is None else owner
            for name in self.host_side:
                if f"{name}_eager" not in owner.__dict__:
                    setattr(owner, f"{name}_eager", torch.compiler.disable(getattr(owner, name), recursive=True))
            fn = self.skipped
        assert fn is not None, "eager_call decorates a function"
        return fn if obj is None else types.MethodType(fn, obj)
