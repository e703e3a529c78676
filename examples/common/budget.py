"""Will a run fit? The memory a config asks for, measured on the ``meta`` device before anything is allocated.

The backbone and the adapter are built on ``meta`` (shapes only, no storage) and one image goes through
the backbone there, so an impossible setting (``--image-size 100000``, ``--num-experts 1000000``) is
refused in one line instead of filling the machine. The estimate is a floor, not a forecast:

* model: parameters, gradients and SGD momentum (3 × 4 bytes per parameter);
* step: every backbone activation of one image (summed op outputs, kept for the backward) × images
  per process × 3 views, and the float views themselves;
* host: the in-memory data set (float32 for the generated sets).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["MemoryEstimate", "estimate_memory", "total_memory"]


class _OutputBytes(TorchDispatchMode):
    """Sums the bytes of every op output (the activations a training forward keeps, roughly)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


class MemoryEstimate(dict):
    """``{"model", "step", "host"}`` in bytes, and ``device = model + step``."""

    @property
    def device(self) -> int:
        return self["model"] + self["step"]


def estimate_memory(cfg: dict[str, Any], world: int = 1, *, num_images: int | None = None) -> MemoryEstimate:
    """A floor of the memory ``cfg`` needs per process (see the module docstring); nothing is allocated.

    Raises whatever building the backbone / adapter raises (ValueError, TypeError, RuntimeError for a
    view size too small for the backbone).
    """
    from common.backbones import build_backbone
    from common.training import build_adapter

    with torch.device("meta"):
        backbone, feat_dim = build_backbone(cfg["backbone"], width=cfg["width"], cifar_stem=cfg["cifar_stem"])
        adapter = build_adapter(cfg, feat_dim)
    params = sum(p.numel() for m in (backbone, adapter) for p in m.parameters())
    size = cfg["image_size"]
    counter = _OutputBytes()
    with torch.no_grad(), counter:
        backbone.eval()(torch.zeros(1, 3, size, size, device="meta"))
    per_process = max(1, cfg["batch_size"] // world)
    views = 3 * per_process * 3 * size * size * 4
    n = num_images if num_images is not None else cfg["num_train"] + cfg["num_heldout"]
    return MemoryEstimate(model=3 * 4 * params, step=3 * per_process * counter.bytes + views, host=n * 3 * size * size * 4)


def total_memory(device: torch.device) -> int | None:
    """Physical memory of ``device`` in bytes (CUDA: the GPU's; CPU: the machine's RAM), None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None
