"""Optimiser parameter groups that treat stacked expert weights correctly.

Rules (lightly's and solo-learn's combined): no weight decay for biases (names ending in ``bias``),
for every parameter of a norm layer, and for any parameter with ``ndim <= 1``; weight decay for
everything else, *including* the 3-D stacked expert weights ``[N, out, in]`` of an
:class:`~star_heads.ExpertBank`.

LARS caveat: LARS-style optimisers compute one trust ratio per parameter tensor. A stacked expert
weight is one tensor, so all N experts of a layer would share one ratio (and EquiMod-style code that only
adapts ``nn.Linear``/``nn.Conv2d`` weights would skip it entirely). For LARS, compute the trust ratio per
expert slice (``weight[k]``) or use SGD/AdamW as the STAR paper does.
"""

from __future__ import annotations

from torch import nn

from star_heads._checks import check_float
from star_heads.expert_layers import ExpertLayerNorm

__all__ = ["param_groups"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, ExpertLayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits ``model``'s trainable parameters into a decayed and a non-decayed group.

    Args:
        model: Any module (backbone + head, an adapter, ...).
        weight_decay: Weight decay of the decayed group.

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay, "names": [...]},
        {"params": no_decay, "weight_decay": 0.0, "names": [...]}]`` — pass it to any ``torch.optim``
        optimiser (``names`` is ignored by them and useful for logging).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    weight_decay = check_float(weight_decay, "weight_decay", minimum=0.0)
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("bias") or id(p) in norm_params:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]
