"""star-heads: STAR projection heads for joint invariant/equivariant self-supervised learning.

STAR (Soft Task-Aware Routing of experts, NeurIPS 2025) replaces the separate invariant and equivariant
projection heads of a joint SSL trainer with a bank of shared MLP experts and one soft router per task.

``import star_heads`` loads only this file: every public name below is imported on first use (module-level
``__getattr__``), so the import costs little more than torch's. ``from star_heads import X`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import star_heads.distributed as _distributed  # noqa: F401  (must run before any process group exists; see that module)
from star_heads._value_checks import set_value_checks, value_checks
from star_heads._version import __version__

# public name -> the module that defines it, imported on first access
_LAZY: dict[str, tuple[str, ...]] = {
    "star_heads.adapters": (
        "AdapterOutput", "EquiModAdapter", "JointAdapter", "SimCLRAdapter", "VICRegAdapter", "build_head",
    ),
    "star_heads.augment": (
        "PARAM_DIM", "PARAM_NAMES", "AugmentConfig", "MultiCropViews", "STARAugment", "params_to_pixels",
        "pixels_to_params",
    ),
    "star_heads.baselines": ("SeparateHeads", "SharedSpecificHead"),
    "star_heads.equivariance": (
        "STL10_PARAM_MEAN", "STL10_PARAM_STD", "AugParamNormalizer", "EquivariantPredictor",
    ),
    "star_heads.experts": ("ExpertBank",),
    "star_heads.heads": (
        "HeadOutput", "MMoEHead", "STARHead", "STARSimCLRProjectionHead", "STARVICRegProjectionHead",
        "TaskHead",
    ),
    "star_heads.losses": (
        "EquivariantNTXentLoss", "NTXentLoss", "VICRegLoss", "VICRegOutput", "equivariant_nt_xent", "nt_xent",
        "vicreg",
    ),
    "star_heads.metrics": (
        "CCAMeter", "CCAMonitor", "CCAResult", "canonical_correlations", "mean_canonical_correlation",
        "CollapseStats", "collapse_stats", "effective_rank", "embedding_std", "AugmentationR2", "augmentation_r2",
    ),
    "star_heads.optim": ("param_groups",),
    "star_heads.routing": ("ROUTER_INITS", "RoutingStats", "SoftRouter", "routing_stats"),
    "star_heads.sizing": ("count_parameters", "linear_macs"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    else:
        try:  # a submodule not imported yet, e.g. ``star_heads.heads``
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from star_heads.adapters import (
        AdapterOutput,
        EquiModAdapter,
        JointAdapter,
        SimCLRAdapter,
        VICRegAdapter,
        build_head,
    )
    from star_heads.augment import (
        PARAM_DIM,
        PARAM_NAMES,
        AugmentConfig,
        MultiCropViews,
        STARAugment,
        params_to_pixels,
        pixels_to_params,
    )
    from star_heads.baselines import SeparateHeads, SharedSpecificHead
    from star_heads.equivariance import STL10_PARAM_MEAN, STL10_PARAM_STD, AugParamNormalizer, EquivariantPredictor
    from star_heads.experts import ExpertBank
    from star_heads.heads import (
        HeadOutput,
        MMoEHead,
        STARHead,
        STARSimCLRProjectionHead,
        STARVICRegProjectionHead,
        TaskHead,
    )
    from star_heads.losses import (  # type: ignore[no-redef]  # (the submodule star_heads.losses.vicreg)
        EquivariantNTXentLoss,
        NTXentLoss,
        VICRegLoss,
        VICRegOutput,
        equivariant_nt_xent,
        nt_xent,
        vicreg,
    )
    from star_heads.metrics import (
        AugmentationR2,
        CCAMeter,
        CCAMonitor,
        CCAResult,
        CollapseStats,
        augmentation_r2,
        canonical_correlations,
        collapse_stats,
        effective_rank,
        embedding_std,
        mean_canonical_correlation,
    )
    from star_heads.optim import param_groups
    from star_heads.routing import ROUTER_INITS, RoutingStats, SoftRouter, routing_stats
    from star_heads.sizing import count_parameters, linear_macs

__all__ = [
    "set_value_checks",
    "value_checks",
    "__version__",
    # heads and their parts
    "ExpertBank",
    "SoftRouter",
    "ROUTER_INITS",
    "MMoEHead",
    "STARHead",
    "STARSimCLRProjectionHead",
    "STARVICRegProjectionHead",
    "SeparateHeads",
    "SharedSpecificHead",
    "TaskHead",
    "HeadOutput",
    "routing_stats",
    "RoutingStats",
    "param_groups",
    "count_parameters",
    "linear_macs",
    # losses
    "nt_xent",
    "equivariant_nt_xent",
    "vicreg",
    "NTXentLoss",
    "EquivariantNTXentLoss",
    "VICRegLoss",
    "VICRegOutput",
    # adapters
    "SimCLRAdapter",
    "VICRegAdapter",
    "EquiModAdapter",
    "JointAdapter",
    "AdapterOutput",
    "build_head",
    # redundancy metric
    "canonical_correlations",
    "mean_canonical_correlation",
    "CCAMeter",
    "CCAResult",
    "CCAMonitor",
    # equivariance readout
    "augmentation_r2",
    "AugmentationR2",
    # collapse readouts
    "CollapseStats",
    "collapse_stats",
    "effective_rank",
    "embedding_std",
    # augmentation
    "STARAugment",
    "AugmentConfig",
    "MultiCropViews",
    "PARAM_NAMES",
    "PARAM_DIM",
    "params_to_pixels",
    "pixels_to_params",
    # equivariance
    "AugParamNormalizer",
    "EquivariantPredictor",
    "STL10_PARAM_MEAN",
    "STL10_PARAM_STD",
]
