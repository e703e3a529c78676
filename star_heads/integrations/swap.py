"""Replace an existing MLP projector attribute with a STAR head that keeps its architecture.

The replaced projector is read layer by layer — lightly ``ProjectionHead`` (its ``layers``), solo-learn
projectors and any plain ``nn.Sequential`` of ``Linear → [norm] → [activation]`` blocks — and every expert of
the new head gets the same depth, widths, hidden norm (none, BatchNorm with its ``eps`` / ``momentum`` /
``affine``, LayerNorm), activation (with its options) and last-layer norm and bias (STAR, Sec. 3 of
arXiv 2510.27222: N experts of the projector's shape, one soft router per task). What an expert bank
cannot represent is refused with an error naming the layer.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from star_heads._checks import check_bool
from star_heads.heads import STARSimCLRProjectionHead

__all__ = ["swap_projector", "projector_shape", "projector_spec", "ProjectorSpec"]

_NORMS = (nn.BatchNorm1d, nn.SyncBatchNorm, nn.LayerNorm)
_ACTS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus,
)


@dataclass(frozen=True)
class ProjectorSpec:
    """The architecture of an MLP projector, as :func:`projector_spec` reads it.

    ``norm_layer`` / ``act_layer`` / ``last_norm_layer`` are classes with their options bound
    (``functools.partial``), ready for any head's constructor; ``options()`` returns them as keywords.
    """

    input_dim: int
    hidden_dim: int
    output_dim: int
    num_layers: int
    norm_layer: Any = None
    act_layer: Any = None
    last_norm_layer: Any = None
    last_bias: bool = True
    hidden_bias: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    def options(self) -> dict[str, Any]:
        opts = {
            "norm_layer": self.norm_layer, "last_norm_layer": self.last_norm_layer, "last_bias": self.last_bias,
            "hidden_bias": self.hidden_bias,
        }
        if self.act_layer is not None:
            opts["act_layer"] = self.act_layer
        return opts


def projector_shape(projector: nn.Module) -> tuple[int, int, int, int]:
    """``(input_dim, hidden_dim, output_dim, num_layers)`` of an MLP projector (see :func:`projector_spec`)."""
    spec = projector_spec(projector)
    return spec.input_dim, spec.hidden_dim, spec.output_dim, spec.num_layers


def projector_spec(projector: nn.Module, *, drop_hidden_bias: bool = False) -> ProjectorSpec:
    """Reads the architecture of an MLP projector.

    Args:
        projector: An ``nn.Sequential`` (nested ones are flattened) or a lightly ``ProjectionHead``, made of
            blocks ``Linear → [BatchNorm1d | SyncBatchNorm | LayerNorm] → [elementwise activation]``; every
            block but the last has an activation, all hidden blocks are alike, ``nn.Identity`` is skipped.
        drop_hidden_bias: Build experts without the hidden Linear biases the projector has (the paper's
            experts have none; a BatchNorm after them cancels them anyway). By default they are kept, so
            the experts reproduce the projector's layers exactly (solo-learn's SimCLR projector has them).

    Raises:
        TypeError: not a Sequential / lightly ProjectionHead.
        ValueError: a layer or a layout that the expert bank cannot represent (the message names it).
    """
    check_bool(drop_hidden_bias, "drop_hidden_bias")
    where = type(projector).__name__
    blocks = _blocks(_layers(projector), where)
    hidden, last = blocks[:-1], blocks[-1]
    if last["act"] is not None:
        raise ValueError(f"{where}: the last Linear is followed by an activation ({last['act']!r}); expert outputs end in a Linear or a norm")
    notes: list[str] = []
    spec: dict[str, Any] = {}
    if hidden:
        kinds = {(b["linear"].out_features, _key(b["norm"]), _key(b["act"]), b["linear"].bias is not None) for b in hidden}
        if len(kinds) > 1:
            raise ValueError(f"{where}: the hidden blocks differ (width, norm, activation or bias: {sorted(map(str, kinds))}); experts repeat one block")
        first = hidden[0]
        if first["act"] is None:
            raise ValueError(f"{where}: hidden Linear {first['linear']} has no activation after it; experts need one between Linears")
        bias = first["linear"].bias is not None
        if bias and drop_hidden_bias:
            bias = False
            notes.append("hidden Linear biases dropped (drop_hidden_bias=True)")
        spec.update(norm_layer=_norm_spec(first["norm"]), act_layer=_act_spec(first["act"]), hidden_bias=bias)
    linears = [b["linear"] for b in blocks]
    for prev, nxt in zip(linears, linears[1:]):
        if prev.out_features != nxt.in_features:
            raise ValueError(f"{where}: {prev} feeds {nxt}: widths do not chain")
    return ProjectorSpec(
        input_dim=linears[0].in_features,
        hidden_dim=linears[0].out_features if hidden else linears[0].in_features,
        output_dim=linears[-1].out_features,
        num_layers=len(linears),
        last_norm_layer=_norm_spec(last["norm"]),
        last_bias=last["linear"].bias is not None,
        notes=tuple(notes),
        **spec,
    )


def swap_projector(
    module: nn.Module,
    attr: str = "projector",
    *,
    momentum_attr: str | None = None,
    num_experts: int = 8,
    drop_hidden_bias: bool = False,
    **options: Any,
) -> STARSimCLRProjectionHead:
    """Replaces ``module.<attr>`` (an MLP projector) by a STAR head whose experts keep its architecture.

    The new head returns the invariant embedding from ``head(x)``, so the method's loss is unchanged;
    ``head(x, task="eq")`` / ``head(x, task=None)`` give the equivariant embedding / both. It is created on
    the old projector's device and dtype. Do it before the optimiser is built (solo-learn builds it in
    ``configure_optimizers`` from ``learnable_params``, which reads ``self.projector`` at that time).

    Args:
        module: The model holding the projector (a solo-learn method, a lightly-style model, ...).
        attr: Attribute name (``"projector"`` in solo-learn, ``"projection_head"`` in lightly's examples).
        momentum_attr: Also replace this momentum (EMA) copy of the projector (``"momentum_projector"`` in
            solo-learn's BYOL/MoCo/...): it must have the same architecture, and becomes a copy of the new
            head with the old momentum parameters' ``requires_grad``, so the method's momentum pairs and its
            updater (which zips the two heads' parameters) stay consistent.
        num_experts: Experts of the STAR head.
        drop_hidden_bias: See :func:`projector_spec`.
        **options: Head options (``tasks``, router options, ...); layer options given here override what
            was read from the projector.

    Returns:
        The new (online) head, already assigned.

    Raises:
        AttributeError: ``module`` has no such projector attribute.
        TypeError, ValueError: a projector that cannot be represented (see :func:`projector_spec`), or a
            momentum projector whose architecture differs from the online one.
    """
    old = _get(module, attr)
    spec = projector_spec(old, drop_hidden_bias=drop_hidden_bias)
    if spec.num_layers < 2:
        raise ValueError(f"{type(old).__name__}: a single Linear projector has no hidden layer to share; nothing to swap")
    momentum = None
    if momentum_attr is not None:
        momentum = _get(module, momentum_attr)
        other = projector_spec(momentum, drop_hidden_bias=drop_hidden_bias)
        if _comparable(other) != _comparable(spec):
            raise ValueError(f"{momentum_attr!r} has another architecture than {attr!r}: {other} vs {spec}")
    ref = next(old.parameters(), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    head = STARSimCLRProjectionHead(
        spec.input_dim, spec.hidden_dim, spec.output_dim, spec.num_layers,
        num_experts=num_experts, expert_hidden_dim=spec.hidden_dim, **{**spec.options(), **factory, **options},
    )
    head.train(old.training)
    if momentum is not None:
        target = copy.deepcopy(head)
        frozen = all(not p.requires_grad for p in momentum.parameters())
        ref = next(momentum.parameters(), None)
        if ref is not None:
            target = target.to(device=ref.device, dtype=ref.dtype)
        target.requires_grad_(not frozen)
        target.train(momentum.training)
        setattr(module, momentum_attr, target)
    setattr(module, attr, head)
    return head


def _get(module: nn.Module, attr: str) -> nn.Module:
    if not isinstance(attr, str):
        raise TypeError(f"attr must be an attribute name (str), got {type(attr).__name__}")
    old = getattr(module, attr, None)
    if not isinstance(old, nn.Module):
        raise AttributeError(f"{type(module).__name__} has no projector module at attribute {attr!r}")
    return old


def _comparable(spec: ProjectorSpec) -> tuple:
    return (spec.input_dim, spec.hidden_dim, spec.output_dim, spec.num_layers, _key(spec.norm_layer),
            _key(spec.act_layer), _key(spec.last_norm_layer), spec.last_bias, spec.hidden_bias)


def _layers(projector: nn.Module) -> list[nn.Module]:
    """The flat layer list of a Sequential or a lightly ProjectionHead (whose forward is ``self.layers(x)``)."""
    if not isinstance(projector, nn.Module):
        raise TypeError(f"projector must be an nn.Module, got {type(projector).__name__}")
    lightly = any(c.__name__ == "ProjectionHead" and c.__module__.startswith("lightly") for c in type(projector).__mro__)
    if lightly and isinstance(getattr(projector, "layers", None), nn.Sequential):
        projector = projector.layers
    if not isinstance(projector, nn.Sequential):
        if not any(isinstance(m, nn.Linear) for m in projector.modules()):
            raise ValueError(f"cannot read the shape of projector {type(projector).__name__}: it has no nn.Linear layers")
        raise TypeError(
            f"cannot read the architecture of {type(projector).__name__}: its forward is its own; expected an "
            "nn.Sequential or a lightly ProjectionHead"
        )
    flat: list[nn.Module] = []
    for m in projector:
        flat.extend(_layers(m) if isinstance(m, nn.Sequential) else [m])
    return [m for m in flat if not isinstance(m, nn.Identity)]


def _blocks(layers: list[nn.Module], where: str) -> list[dict[str, Any]]:
    if not layers or not isinstance(layers[0], nn.Linear):
        first = layers[0] if layers else "nothing"
        if not any(isinstance(m, nn.Linear) for m in layers):
            raise ValueError(f"cannot read the shape of projector {where}: it has no nn.Linear layers")
        raise ValueError(f"{where}: expected a Linear first, got {first}")
    blocks: list[dict[str, Any]] = []
    for m in layers:
        if isinstance(m, nn.Linear):
            blocks.append({"linear": m, "norm": None, "act": None})
            continue
        block = blocks[-1]
        if isinstance(m, _NORMS) and block["norm"] is None and block["act"] is None:
            block["norm"] = m
        elif isinstance(m, _ACTS) and block["act"] is None:
            block["act"] = m
        else:
            raise ValueError(
                f"{where}: cannot represent {m!r} after {block['linear']} in an expert bank (supported: Linear, then "
                "BatchNorm1d / SyncBatchNorm / LayerNorm, then one elementwise activation such as ReLU or GELU)"
            )
    return blocks


def _norm_spec(norm: nn.Module | None):
    if norm is None:
        return None
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1 or (norm.elementwise_affine and norm.bias is None):
            raise ValueError(f"cannot represent {norm!r}: experts take a 1-D LayerNorm with weight and bias, or neither")
        return partial(nn.LayerNorm, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    return partial(type(norm), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                   track_running_stats=norm.track_running_stats)


def _act_spec(act: nn.Module):
    """The activation's class with every constructor option it stores bound (``inplace`` left to the bank)."""
    names = [p for p in inspect.signature(type(act).__init__).parameters if p not in ("self", "inplace")]
    missing = [p for p in names if not hasattr(act, p)]
    if missing:
        raise ValueError(f"cannot read the options {missing} of {act!r}")
    return partial(type(act), **{p: getattr(act, p) for p in names})


def _key(layer) -> Any:
    """A comparable description of a layer class/partial/module (class and options)."""
    if layer is None:
        return None
    if isinstance(layer, partial):
        return (layer.func.__name__, tuple(sorted(layer.keywords.items())))
    if isinstance(layer, (nn.LayerNorm, nn.modules.batchnorm._NormBase)):
        return _key(_norm_spec(layer))
    if isinstance(layer, _ACTS):
        return _key(_act_spec(layer))
    return type(layer).__name__
