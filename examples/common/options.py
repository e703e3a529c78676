"""Command-line options of pretrain.py: the parser, its validation and the device choice.

Kept apart from the training loop so that ``pretrain.py`` reads top to bottom as "parse → run".
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from common.backbones import BACKBONES
from common.datasets import DATASETS

__all__ = ["HEADS", "METHODS", "RUNTIME_KEYS", "CLIError", "OneLineParser", "build_parser", "resolve_device", "validate"]

METHODS = ("simclr", "vicreg", "equimod")
HEADS = ("star", "separate", "shared", "single", "equimod")
# Options a resumed run may change (everything else comes from the run's config.json).
RUNTIME_KEYS = ("device", "workers", "progress", "stop_after", "threads")


class CLIError(Exception):
    """Bad command-line input, reported as one line with a non-zero exit code."""


class OneLineParser(argparse.ArgumentParser):
    """argparse parser whose errors are one line (no usage block) with exit code 2."""

    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of pretrain.py (``--help`` documents every option)."""
    p = OneLineParser(
        prog="pretrain.py",
        description="Self-supervised pretraining with a STAR head (or a baseline head). "
        "Writes config.json, metrics.jsonl, checkpoint.pt and plots into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("objective and head")
    g.add_argument("--method", default="equimod", choices=METHODS,
                   help="trainer style: SimCLR (NT-Xent), VICReg, or EquiMod (NT-Xent invariant + equivariant)")
    g.add_argument("--head", default="star", choices=HEADS,
                   help="star = STAR soft-routed experts; separate = EquiMod's two heads; shared = STAR-SS "
                   "(shared + specific experts); single = one invariant head (invariant-only baseline); "
                   "equimod = EquiMod's own head shape (SeparateHeads.equimod: d → H → H → 128, final BN "
                   "without affine; H = --hidden-dim, default 2048)")
    g.add_argument("--num-experts", type=int, default=8,
                   help="experts N of the STAR head (with --match-params: of the STAR head to match)")
    g.add_argument("--hidden-dim", type=int, default=None,
                   help="hidden width of the head's MLPs (default: the backbone's feature width; equimod: 2048)")
    g.add_argument("--match-params", action="store_true",
                   help="separate / shared / single: choose the hidden width so that the head has the parameter "
                   "count (within 5%%) and FLOPs (within 10%%) of the STAR head with --num-experts experts")
    g.add_argument("--invariant-only", action="store_true",
                   help="train only the invariant objective adapter(h1, h2) (implied by --head single)")
    g.add_argument("--predictor", default="star", choices=("star", "equimod"),
                   help="equivariant predictor: STAR's residual MLP or EquiMod's single linear layer")
    g.add_argument("--lam", type=float, default=1.0, help="weight λ of the equivariant loss")
    g.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature (simclr / equimod)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=256, help="global batch (split across torchrun processes)")
    g.add_argument("--lr", type=float, default=0.03, help="SGD learning rate (cosine decay per epoch, no warm-up)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4, help="via star_heads.param_groups (no decay on biases / norms)")
    g.add_argument("--steps-per-epoch", type=int, default=None, help="cap on optimiser steps per epoch (smoke tests)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data and backbone")
    g.add_argument("--dataset", default="shapes", choices=DATASETS,
                   help="shapes = embedded procedural images (no download); digits = scikit-learn's digits; "
                   "cifar10 / stl10 need torchvision")
    g.add_argument("--data-dir", default=None, help="root of the torchvision data sets")
    g.add_argument("--download", action="store_true", help="let torchvision download cifar10 / stl10 into --data-dir")
    g.add_argument("--image-size", type=int, default=None, help="crop size of the views (default 32; 96 for stl10)")
    g.add_argument("--num-train", type=int, default=4096, help="shapes: pretraining images to generate")
    g.add_argument("--num-heldout", type=int, default=1024, help="held-out images for CCA and kNN queries")
    g.add_argument("--backbone", default="auto", choices=BACKBONES,
                   help="auto = ResNet-18 for cifar10/stl10 when torchvision imports, else the built-in ConvNet")
    g.add_argument("--width", type=int, default=32, help="ConvNet first-stage width (features = 8 × width)")
    g.add_argument("--cifar-stem", action="store_true", help="ResNet: 3×3 stride-1 stem without max-pool (small images)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (required unless --resume)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run files already in --out")
    g.add_argument("--tag", default=None, help="free-form label stored in config.json (demo.py and the benchmark use it)")
    g.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="stop after K epochs in this invocation (e.g. a time-limited job); continue with --resume")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (for GPUs; allowed but slow on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy or small CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    return p


def validate(cfg: dict[str, Any]) -> None:
    """Raises :class:`CLIError` (one line) for out-of-range options of a new run."""
    for key in ("epochs", "batch_size", "num_experts", "num_train", "num_heldout", "width"):
        if cfg[key] < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg.get("match_params") and cfg["head"] in ("star", "equimod"):
        raise CLIError(f"--match-params sizes a baseline head to STAR; it does not apply to --head {cfg['head']}")
    for key in ("steps_per_epoch", "stop_after", "image_size", "threads", "hidden_dim"):
        if cfg.get(key) is not None and cfg[key] < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["num_heldout"] < 130:
        raise CLIError(f"--num-heldout must be >= 130 (CCA of two 128-D embeddings needs n - 1 > 128), got {cfg['num_heldout']}")
    if cfg["lr"] <= 0 or cfg["temperature"] <= 0:
        raise CLIError(f"--lr and --temperature must be > 0, got {cfg['lr']} and {cfg['temperature']}")
    if cfg["workers"] < 0:
        raise CLIError(f"--workers must be >= 0, got {cfg['workers']}")


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``auto`` → CUDA (this process's local rank) when available, else CPU; checks the name."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device (expected auto, cpu, cuda or cuda:K)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda given but CUDA is not available here (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev
