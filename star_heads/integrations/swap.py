"""Replace an existing MLP projector attribute with a STAR head that keeps its architecture.

The replaced projector is read layer by layer — lightly ``ProjectionHead`` (its ``layers``), solo-learn
projectors and any plain ``nn.Sequential`` of ``Linear → [norm] → [activation]`` blocks — and every expert of
the new head gets the same depth, widths, hidden norm (none, BatchNorm with its ``eps`` / ``momentum`` /
``affine``, LayerNorm), activation (with its options) and last-layer norm and bias (STAR, Sec. 3 of
arXiv 2510.27222: N experts of the projector's shape, one soft router per task). What an expert bank
cannot represent is refused with an error naming the layer: the grammar is :mod:`star_heads.expert_spec`, the
one ``ExpertBank.from_modules`` reads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from star_heads._checks import check_bool
from star_heads.expert_spec import parse_expert
from star_heads.heads import MMoEHead, STARSimCLRProjectionHead
from star_heads.sizing import count_parameters, drop_in_size, on_meta

__all__ = ["swap_projector", "projector_shape", "projector_spec", "ProjectorSpec"]

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
    hidden_bias: bool | tuple[bool, ...] = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    def options(self) -> dict[str, Any]:
        return {
            "norm_layer": self.norm_layer, "act_layer": self.act_layer, "last_norm_layer": self.last_norm_layer,
            "last_bias": self.last_bias, "hidden_bias": self.hidden_bias,
        }


def projector_shape(projector: nn.Module) -> tuple[int, int, int, int]:
    """``(input_dim, hidden_dim, output_dim, num_layers)`` of an MLP projector (see :func:`projector_spec`)."""
    spec = projector_spec(projector)
    return spec.input_dim, spec.hidden_dim, spec.output_dim, spec.num_layers


def projector_spec(projector: nn.Module, *, drop_hidden_bias: bool = False) -> ProjectorSpec:
    """Reads the architecture of an MLP projector.

    Args:
        projector: An ``nn.Sequential`` (nested ones are flattened) or a lightly ``ProjectionHead``, in the expert
            grammar of :mod:`star_heads.expert_spec` (``Linear → [norm] → [activation]`` blocks, hidden blocks
            alike, ``nn.Identity`` skipped): exactly what ``ExpertBank.from_modules`` accepts.
        drop_hidden_bias: Build experts without the hidden Linear biases the projector has (the paper's
            experts have none; a BatchNorm after them cancels them anyway). By default they are kept, so
            the experts reproduce the projector's layers exactly (solo-learn's SimCLR projector has them).

    Raises:
        TypeError: not a Sequential / lightly ProjectionHead.
        ValueError: a layer or a layout that the expert bank cannot represent (the message names it).
    """
    check_bool(drop_hidden_bias, "drop_hidden_bias")
    spec = parse_expert(_layers(projector), type(projector).__name__)
    notes: list[str] = []
    hidden_bias = spec.hidden_bias
    if drop_hidden_bias and hidden_bias:
        hidden_bias = False
        notes.append("hidden Linear biases dropped (drop_hidden_bias=True)")
    return ProjectorSpec(
        input_dim=spec.input_dim,
        hidden_dim=spec.hidden_dim,
        output_dim=spec.output_dim,
        num_layers=spec.num_layers,
        norm_layer=spec.norm_layer,
        act_layer=spec.act_layer,
        last_norm_layer=spec.last_norm_layer,
        last_bias=spec.last_bias,
        hidden_bias=hidden_bias,
        notes=tuple(notes),
    )


def swap_projector(
    module: nn.Module,
    attr: str = "projector",
    *,
    momentum_attr: str | None = None,
    num_experts: int | None = None,
    expert_hidden_dim: int | None = None,
    drop_hidden_bias: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
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
        num_experts: Experts of the STAR head (default 8; 4 or 2 only where 8 do not fit the default budget).
        expert_hidden_dim: Hidden width of every expert. Default: the package's sizing rule
            (:func:`~star_heads.sizing.drop_in_size`): the largest width, a multiple of 8 where the budget allows,
            at which the STAR head has at most twice the parameters of the projector it replaces.
            ``expert_hidden_dim=<the projector's hidden width>`` gives the paper's per-expert shape (every expert
            a copy of the projector's shape, about N times its parameters).
        drop_hidden_bias: See :func:`projector_spec`.
        optimizer: An optimiser already built over ``module``'s parameters: the old projector's parameters
            (and their optimiser state) leave it, and the new head's join the param group that held them. Without
            it, a projector whose parameters already have gradients (training has started, so an optimiser holds
            them) is refused: the new head would silently never be trained.
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
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if optimizer is None and any(p.grad is not None for p in old.parameters()):
        raise ValueError(
            f"{attr!r} already has gradients, so an optimiser was built over it: the new head would never be "
            "trained. Pass optimizer=<that optimiser> (its param group takes the new head), or swap before "
            "building the optimiser"
        )
    spec = projector_spec(old, drop_hidden_bias=drop_hidden_bias)
    if spec.num_layers < 2:
        raise ValueError(
            f"{type(old).__name__}: a single Linear projector has no hidden layer to share; nothing to swap"
        )
    momentum = None
    if momentum_attr is not None:
        momentum = _get(module, momentum_attr)
        other = projector_spec(momentum, drop_hidden_bias=drop_hidden_bias)
        if _comparable(other) != _comparable(spec):
            raise ValueError(f"{momentum_attr!r} has another architecture than {attr!r}: {other} vs {spec}")
    ref = next(old.parameters(), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    config = {**spec.options(), **factory, **options}
    if expert_hidden_dim is None:
        expert_hidden_dim, num_experts = drop_in_size(
            lambda h, n: MMoEHead(
                spec.input_dim, h, spec.output_dim, spec.num_layers, num_experts=n, **on_meta(config)
            ),
            count_parameters(old),
            num_experts,
        )
    head = STARSimCLRProjectionHead(
        spec.input_dim,
        spec.hidden_dim,
        spec.output_dim,
        spec.num_layers,
        num_experts=num_experts,
        expert_hidden_dim=expert_hidden_dim,
        **config,
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
        setattr(module, str(momentum_attr), target)
    setattr(module, attr, head)
    if optimizer is not None:
        _move_params(optimizer, list(old.parameters()), [p for p in head.parameters() if p.requires_grad])
    return head


def _move_params(optimizer: torch.optim.Optimizer, old: list[nn.Parameter], new: list[nn.Parameter]) -> None:
    """Drops ``old`` (and their state) from ``optimizer`` and adds ``new`` to the group that held the first of them."""
    gone = {id(p) for p in old}
    target = None
    for group in optimizer.param_groups:
        if target is None and any(id(p) in gone for p in group["params"]):
            target = group
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in old:
        optimizer.state.pop(p, None)
    if target is None:
        raise ValueError("optimizer holds none of the projector's parameters: pass the optimiser built over this model")
    target["params"].extend(new)


def _get(module: nn.Module, attr: str) -> nn.Module:
    if not isinstance(attr, str):
        raise TypeError(f"attr must be an attribute name (str), got {type(attr).__name__}")
    old = getattr(module, attr, None)
    if not isinstance(old, nn.Module):
        raise AttributeError(f"{type(module).__name__} has no projector module at attribute {attr!r}")
    return old


def _comparable(spec: ProjectorSpec) -> tuple:
    return (
        spec.input_dim,
        spec.hidden_dim,
        spec.output_dim,
        spec.num_layers,
        _key(spec.norm_layer),
        _key(spec.act_layer),
        _key(spec.last_norm_layer),
        spec.last_bias,
        spec.hidden_bias,
    )


def _layers(projector: nn.Module) -> list[nn.Module]:
    """The flat layer list of a Sequential or a lightly ProjectionHead (whose forward is ``self.layers(x)``)."""
    if not isinstance(projector, nn.Module):
        raise TypeError(f"projector must be an nn.Module, got {type(projector).__name__}")
    lightly = any(
        c.__name__ == "ProjectionHead" and c.__module__.startswith("lightly") for c in type(projector).__mro__
    )
    layers = getattr(projector, "layers", None)
    if lightly and isinstance(layers, nn.Sequential):
        projector = layers
    if not isinstance(projector, nn.Sequential):
        if not any(isinstance(m, nn.Linear) for m in projector.modules()):
            raise ValueError(
                f"cannot read the shape of projector {type(projector).__name__}: it has no nn.Linear layers"
            )
        raise TypeError(
            f"cannot read the architecture of {type(projector).__name__}: its forward is its own; expected an "
            "nn.Sequential or a lightly ProjectionHead"
        )
    flat: list[nn.Module] = []
    for m in projector:
        flat.extend(_layers(m) if isinstance(m, nn.Sequential) else [m])
    return [m for m in flat if not isinstance(m, nn.Identity)]


def _key(layer: Any) -> Any:
    """A comparable description of a layer option (class with options bound, or None)."""
    if layer is None:
        return None
    return (layer.func.__name__, tuple(sorted(layer.keywords.items()))) if isinstance(layer, partial) else layer
