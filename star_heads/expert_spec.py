"""The expert grammar: what one expert of an :class:`~star_heads.ExpertBank` may contain, read in one place.

An expert is a chain of blocks (STAR, Sec. 3 of arXiv 2510.27222: every expert an MLP of the projector's shape)::

    Linear → [norm] → [activation]      (repeated; nn.Identity anywhere is skipped)

* **norms** (:data:`NORMS`): ``nn.BatchNorm1d`` / ``nn.SyncBatchNorm`` (keyed by ``eps``, ``momentum``,
  ``affine``, ``track_running_stats``) and a 1-D ``nn.LayerNorm`` with both weight and bias or neither (keyed by
  ``eps``, ``elementwise_affine``). Exactly these classes: a subclass or another ``_NormBase`` (``InstanceNorm1d``
  normalises each sample, not the batch) is refused, because the bank fuses the N experts' norms into one;
* **activations** (:data:`ACTIVATIONS`): elementwise and deterministic, so applying one to the fused
  ``[B, N·h]`` features is exactly applying it to each expert; keyed by the constructor options the module
  stores (``inplace`` aside), as :func:`activation_spec` reads them;
* the hidden blocks all alike (width, norm, activation; the hidden Linear biases may differ per layer), and
  no activation after the last Linear.

:func:`parse_expert` reads an expert into an :class:`ExpertSpec` (the bank's constructor options plus the
blocks); ``ExpertBank.from_modules``/``to_modules`` and :func:`~star_heads.integrations.swap_projector` use it,
so they accept exactly the same experts.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from star_heads._checks import check_layer
from star_heads.expert_layers import norm_options

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "Block",
    "ExpertSpec",
    "activation_key",
    "activation_spec",
    "check_norm_layer",
    "export_activation",
    "make_activation",
    "norm_spec",
    "parse_expert",
]

NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.SyncBatchNorm, nn.LayerNorm)
"""The norm classes an expert may contain (exactly these classes)."""

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.Softshrink, nn.Hardshrink,
)
"""The activation classes an expert may contain: elementwise and deterministic (``nn.Identity`` means none)."""

_SUPPORTED = (
    "an nn.Linear, then optionally a norm (" + ", ".join(c.__name__ for c in NORMS) + "), then optionally an "
    "elementwise activation (" + ", ".join(c.__name__ for c in ACTIVATIONS) + ")"
)


@dataclass(frozen=True)
class Block:
    """One ``Linear → [norm] → [activation]`` block of an expert (the modules themselves)."""

    linear: nn.Linear
    norm: nn.Module | None
    act: nn.Module | None


@dataclass(frozen=True)
class ExpertSpec:
    """An expert as :func:`parse_expert` reads it: its blocks and the matching ``ExpertBank`` options.

    ``norm_layer`` / ``act_layer`` / ``last_norm_layer`` are classes with their options bound
    (``functools.partial``) or None; ``hidden_bias`` is one bool when the hidden Linears agree, else one per layer.
    """

    blocks: tuple[Block, ...]
    input_dim: int
    hidden_dim: int
    output_dim: int
    num_layers: int
    norm_layer: Any
    act_layer: Any
    last_norm_layer: Any
    hidden_bias: bool | tuple[bool, ...]
    last_bias: bool

    def options(self) -> dict[str, Any]:
        """The layer keywords of ``ExpertBank`` (and of every head) that rebuild this expert's shape."""
        return {
            "norm_layer": self.norm_layer, "act_layer": self.act_layer, "last_norm_layer": self.last_norm_layer,
            "hidden_bias": self.hidden_bias, "last_bias": self.last_bias,
        }

    def signature(self) -> tuple[Any, ...]:
        """What two experts must share to be fused: shapes, biases, dtypes, norm and activation options."""
        return (
            tuple((b.linear.in_features, b.linear.out_features, b.linear.bias is not None, b.linear.weight.dtype)
                  for b in self.blocks),
            tuple(None if b.norm is None else (type(b.norm), norm_options(b.norm)) for b in self.blocks),
            tuple(activation_key(b.act) for b in self.blocks),
        )


def parse_expert(layers: Sequence[nn.Module], where: str) -> ExpertSpec:
    """Reads a flat list of layers as one expert (see the module docstring for the grammar).

    Args:
        layers: The expert's layers in order (``list(nn.Sequential)``); ``nn.Identity`` is skipped.
        where: How to name the expert in errors (e.g. ``"expert 2"`` or ``"SimCLRProjectionHead"``).

    Raises:
        ValueError: a layer outside the grammar (named with its position), widths that do not chain, a norm of
            the wrong width, an activation after the last Linear, or hidden blocks that differ.
    """
    blocks: list[Block] = []
    linear: nn.Linear | None = None
    norm = act = None
    for pos, m in enumerate(layers):
        if isinstance(m, nn.Identity):
            continue
        if type(m) is nn.Linear:
            if linear is not None:
                blocks.append(Block(linear, norm, act))
            linear, norm, act = m, None, None
        elif linear is not None and norm is None and act is None and norm_options(m) is not None:
            norm = m
        elif linear is not None and act is None and type(m) in ACTIVATIONS:
            act = m
        else:
            what = "a Linear first" if linear is None else _SUPPORTED
            raise ValueError(f"{where}, module {pos}: cannot represent {m!r} in an expert bank; expected {what}")
    if linear is None:
        raise ValueError(f"{where} has no nn.Linear layer: an expert needs at least one")
    blocks.append(Block(linear, norm, act))
    _check_chain(blocks, where)
    hidden, last = blocks[:-1], blocks[-1]
    biases = tuple(b.linear.bias is not None for b in hidden)
    return ExpertSpec(
        blocks=tuple(blocks),
        input_dim=blocks[0].linear.in_features,
        hidden_dim=hidden[0].linear.out_features if hidden else blocks[0].linear.in_features,
        output_dim=last.linear.out_features,
        num_layers=len(blocks),
        norm_layer=norm_spec(hidden[0].norm) if hidden else None,
        act_layer=activation_spec(hidden[0].act) if hidden else None,
        last_norm_layer=norm_spec(last.norm),
        hidden_bias=biases[0] if len(set(biases)) == 1 else biases if biases else False,
        last_bias=last.linear.bias is not None,
    )


def _check_chain(blocks: list[Block], where: str) -> None:
    for i, b in enumerate(blocks):
        if i > 0 and b.linear.in_features != blocks[i - 1].linear.out_features:
            raise ValueError(
                f"{where}: Linear {i} takes {b.linear.in_features} features but Linear {i - 1} gives "
                f"{blocks[i - 1].linear.out_features}: the widths do not chain"
            )
        options = None if b.norm is None else norm_options(b.norm)
        if options is not None and options[1] != b.linear.out_features:
            raise ValueError(
                f"{where}: {b.norm!r} after Linear {i} does not normalise its {b.linear.out_features} features"
            )
    if blocks[-1].act is not None:
        raise ValueError(
            f"{where}: an activation after the last Linear ({blocks[-1].act!r}) is not supported; an expert ends in "
            "a Linear or a norm"
        )
    hidden = blocks[:-1]
    for name, key in (
        ("width", lambda b: b.linear.out_features),
        ("norm", lambda b: None if b.norm is None else (type(b.norm), norm_options(b.norm))),
        ("activation", lambda b: activation_key(b.act)),
    ):
        keys = [key(b) for b in hidden]
        if any(k != keys[0] for k in keys):
            raise ValueError(
                f"{where}: the hidden blocks differ: every hidden block must have the same {name}, got {keys}"
            )


def check_norm_layer(norm_layer: Any, name: str) -> Any:
    """Checks a norm option (a class of :data:`NORMS` or a ``functools.partial`` of one, ``nn.Identity`` or None).

    Raises:
        TypeError: anything else, e.g. ``nn.InstanceNorm1d`` or ``nn.GroupNorm``, which the fused bank cannot compute
            per expert exactly, or an instance instead of a class.
    """
    check_layer(norm_layer, name)
    cls = getattr(norm_layer, "func", norm_layer)
    if cls is None or cls is nn.Identity or cls in NORMS:
        return norm_layer
    raise TypeError(
        f"{name} must be one of {', '.join(c.__name__ for c in NORMS)} (a class or a functools.partial of one), "
        f"nn.Identity or None, got {norm_layer!r}: the bank fuses the experts' norms and computes only these exactly"
    )


def norm_spec(norm: nn.Module | None) -> Any:
    """The class of a norm module with its options bound (``functools.partial``), or None."""
    if norm is None:
        return None
    if norm_options(norm) is None:
        raise ValueError(f"cannot represent {norm!r} in an expert bank; expected one of {[c.__name__ for c in NORMS]}")
    if isinstance(norm, nn.LayerNorm):
        return partial(nn.LayerNorm, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
    return partial(
        type(norm),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )


def activation_spec(act: nn.Module | None) -> Any:
    """The activation's class with every constructor option it stores bound (``inplace`` left to the bank)."""
    if act is None:
        return None
    return partial(type(act), **dict(_activation_options(act)))


def activation_key(act: Any) -> tuple[Any, ...] | None:
    """What identifies an activation's behaviour (a module, class or partial): its class and options."""
    if act is None:
        return None
    if isinstance(act, nn.Module):
        return type(act), _activation_options(act)
    cls = getattr(act, "func", act)
    keywords = getattr(act, "keywords", {})
    return cls, _activation_options(cls(**keywords))


def _activation_options(act: nn.Module) -> tuple[tuple[str, Any], ...]:
    names = [p for p in inspect.signature(type(act).__init__).parameters if p not in ("self", "inplace")]
    names = [p for p in names if p not in ("args", "kwargs")]
    return tuple(sorted((p, getattr(act, p)) for p in names))


def make_activation(act_layer: Any) -> nn.Module:
    """Builds the bank's activation from a class, a ``functools.partial``, a configured instance (copied) or None.

    Inside the bank an activation always follows a norm or a Linear, neither of whose backward needs its
    output, so it runs in place where it supports it (exact, one activation-sized tensor saved per layer).

    Raises:
        TypeError: not one of :data:`ACTIVATIONS` (e.g. ``nn.Softmax``, which would mix experts' features).
    """
    if act_layer is None:
        return nn.Identity()
    cls = type(act_layer) if isinstance(act_layer, nn.Module) else getattr(act_layer, "func", act_layer)
    if cls is nn.Identity:
        return nn.Identity()
    if cls not in ACTIVATIONS:
        raise TypeError(
            f"act_layer must be an elementwise activation ({', '.join(c.__name__ for c in ACTIVATIONS)}) or None, "
            f"got {act_layer!r}: the bank applies it to all experts' features at once"
        )
    if isinstance(act_layer, nn.Module):
        act = copy.deepcopy(act_layer)
    else:
        act = act_layer()
    if hasattr(act, "inplace"):
        setattr(act, "inplace", True)  # noqa: B010  (an attribute of some activation classes only)
    return act


def export_activation(act: nn.Module) -> nn.Module:
    """A standalone copy of the bank's activation (``inplace`` back to torch's default; same results)."""
    single = copy.deepcopy(act)
    if hasattr(single, "inplace"):
        setattr(single, "inplace", False)  # noqa: B010
    return single
