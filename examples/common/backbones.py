"""Backbones for the examples: a small built-in ConvNet, or torchvision ResNet-18/50.

Only the backbone is transferred after pretraining (the projection head is discarded), so every
builder returns the module *and* its feature width ``d`` (512 for ResNet-18, 2048 for ResNet-50).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["BACKBONES", "ConvNet", "build_backbone", "resolve_backbone", "torchvision_error", "write_untrained_run"]

BACKBONES = ("auto", "convnet", "resnet18", "resnet50")


class ConvNet(nn.Module):
    """A small VGG-style ConvNet for 32×32 images (the backbone of the embedded CPU default).

    Four stages of ``Conv3x3 (no bias) → norm → act`` with widths ``w, 2w, 4w, 8w``; a 2×2 max-pool
    between stages; global average pooling at the end. Output: ``[B, 8w]``.

    Args:
        width: Channels of the first stage ``w``.
        norm_layer: Normalisation class called as ``norm_layer(channels)``.
        act_layer: Activation class called with no argument.
    """

    def __init__(
        self,
        width: int = 32,
        *,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), norm_layer(chans[i + 1]), act_layer()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images ``[B, 3, H, W]`` to features ``[B, 8w]``."""
        return self.net(x)


def torchvision_error() -> str | None:
    """Why torchvision cannot be used here (one line), or None when it imports."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or a RuntimeError from an ABI mismatch with torch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"torchvision is not importable ({type(exc).__name__}: {first}); install the torchvision build matching torch {torch.__version__}"
    return None


def resolve_backbone(name: str, dataset: str) -> str:
    """``auto`` picks ResNet-18 for cifar10/stl10 (when torchvision imports) and the ConvNet otherwise."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if name != "auto":
        return name
    if dataset in ("cifar10", "stl10") and torchvision_error() is None:
        return "resnet18"
    return "convnet"


def build_backbone(name: str, *, width: int = 32, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """Builds a backbone and returns ``(module, feature_dim)``.

    Args:
        name: ``convnet``, ``resnet18`` or ``resnet50`` (resolve ``auto`` first with :func:`resolve_backbone`).
        width: First-stage width of the ConvNet (ignored for ResNets).
        cifar_stem: For ResNets, replace the 7×7/2 conv and max-pool by a 3×3/1 conv (the usual
            CIFAR / small-image stem).

    Raises:
        ValueError: Unknown name.
        RuntimeError: A ResNet was asked for but torchvision does not import.
    """
    if name == "convnet":
        net = ConvNet(width)
        return net, net.out_dim
    if name not in ("resnet18", "resnet50"):
        raise ValueError(f"unknown backbone {name!r}; expected convnet, resnet18 or resnet50")
    err = torchvision_error()
    if err is not None:
        raise RuntimeError(f"--backbone {name} needs torchvision: {err}")
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, dim


def write_untrained_run(run_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Writes a run directory holding the *untrained* backbone of ``config`` — the floor pretraining must beat.

    The backbone is built right after ``torch.manual_seed(config["seed"])``, exactly as ``pretrain.py``
    builds it, so it is the initial state of the pretraining run with the same seed (the transfer of
    the two is a paired comparison). ``config`` is a pretrain.py config (``backbone``, ``width``,
    ``cifar_stem``, ``seed``, ``dataset``, ``image_size``, ...); the directory gets ``head="random"``
    and a checkpoint with ``epoch=0`` that ``transfer.py`` can probe.
    """
    from common.runs import RunDir

    torch.manual_seed(config["seed"])
    backbone, dim = build_backbone(config["backbone"], width=config["width"], cifar_stem=config.get("cifar_stem", False))
    run = RunDir.create(run_dir, overwrite=True)
    run.write_config({**config, "head": "random", "invariant_only": True})
    run.save_checkpoint({"epoch": 0, "step": 0, "feature_dim": dim, "backbone": backbone.state_dict()})
