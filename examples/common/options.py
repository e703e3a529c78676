"""Command-line options of pretrain.py: the parser, its validation and the device choice.

Kept apart from the training loop so that ``pretrain.py`` reads top to bottom as "parse → run".
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

from common.backbones import BACKBONES
from common.datasets import DATASETS
from common.fabric import PRECISIONS  # Lightning's names (Fabric implements them; 16-mixed adds a gradient scaler)

__all__ = [
    "HEADS", "LR_RULES", "METHODS", "PRECISIONS", "ROUTER_INITS", "RUNTIME_KEYS", "WD_POLICIES", "CLIError",
    "OneLineParser", "build_parser",
    "check_resume_flags", "given_options", "new_run_config", "resolve_device", "validate",
]

METHODS = ("simclr", "vicreg", "equimod")
HEADS = ("star", "separate", "shared", "single", "equimod")
LR_RULES = ("fixed", "paper")
WD_POLICIES = ("no-bias-norm", "all")
ROUTER_INITS = ("default", "task-distinct", "noisy")
# Options a resumed run may change (everything else comes from the run's config.json).
RUNTIME_KEYS = ("device", "workers", "progress", "stop_after", "threads", "check_finite", "log_every", "compile", "channels_last",
                "tf32", "cudnn_benchmark", "compile_backend")
# Seeds feed numpy (< 2**32) and the per-rank augmentation generator (seed * 1000 + rank).
MAX_SEED = 2**32 // 1000 - 1
# Options that are about this invocation, not the run.
_CONTROL_KEYS = ("resume", "out", "overwrite")


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
    g.add_argument("--embed-dim", type=int, default=128,
                   help="width D of each task's embedding (the head's output; the paper uses 128)")
    g.add_argument("--router-init", default="default", choices=ROUTER_INITS,
                   help="start of the routers of a routed head (star, shared): default = the library's near-uniform "
                   "start; task-distinct / noisy = the library's task-distinct starts (passed as router_init=)")
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
    g.add_argument("--lr", type=float, default=0.03,
                   help="SGD learning rate (cosine decay per epoch, no warm-up); see --lr-rule")
    g.add_argument("--lr-rule", default="fixed", choices=LR_RULES,
                   help="fixed = --lr as given (ours); paper = --lr × batch / 256, the STAR paper's linear scaling "
                   "(0.03 × batch / 256 with the default --lr)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay; see --wd-policy")
    g.add_argument("--wd-policy", default="no-bias-norm", choices=WD_POLICIES,
                   help="no-bias-norm = no decay on biases and norm layers (star_heads.param_groups, ours); "
                   "all = decay on every parameter (the STAR paper's reference runs)")
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
    g.add_argument("--precision", default="32-true", choices=PRECISIONS,
                   help="Lightning Fabric's precision: 32-true; bf16-mixed (bf16 autocast, for GPUs); 16-mixed (fp16 "
                   "autocast with a gradient scaler; on a CPU Fabric runs it as bf16-mixed)")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone + head step (one graph)")
    g.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: "eager"
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: channels_last memory format for the backbone and its inputs (no effect on a CPU)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: TF32 matmuls and convolutions (float32 tensors on tensor cores)")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: let cuDNN pick the fastest convolution per shape (not bit-reproducible)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy or small CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    g.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=False,
                   help="per-step NaN/Inf checks of the views, the backbone features, the loss and inside the "
                   "library (star_heads.set_value_checks); each is a host-device sync, so off by default (a "
                   "non-finite epoch loss still stops the run at the end of the epoch)")
    g.add_argument("--log-every", type=int, default=0, metavar="K",
                   help="show the loss on the progress bar every K steps (a host sync on those steps; 0 = never)")
    return p


def given_options(argv: list[str] | None) -> set[str]:
    """The destinations of the options that ``argv`` sets explicitly (defaults excluded)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def new_run_config(args: dict[str, Any]) -> dict[str, Any]:
    """The resolved config of a new run from parsed options (validated first: nothing is resolved from a bad value)."""
    validate(args)
    from common.backbones import resolve_backbone

    cfg = {k: v for k, v in args.items() if k not in _CONTROL_KEYS}
    cfg["image_size"] = cfg["image_size"] or (96 if cfg["dataset"] == "stl10" else 32)
    try:
        cfg["backbone"] = resolve_backbone(cfg["backbone"], cfg["dataset"])
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    cfg["invariant_only"] = cfg["invariant_only"] or cfg["head"] == "single"
    cfg["lr_effective"] = cfg["lr"] * cfg["batch_size"] / 256 if cfg["lr_rule"] == "paper" else cfg["lr"]
    return cfg


def check_resume_flags(given: set[str], args: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Refuses options given with ``--resume`` that contradict the run's config.

    Runtime options (:data:`RUNTIME_KEYS`) may change; any other option must equal the run's value
    (after the same resolution a new run gets, e.g. ``--backbone auto``).
    """
    for key in ("out", "overwrite"):
        if key in given:
            raise CLIError(f"--{key} cannot be combined with --resume (the run directory is RUN_DIR)")
    fixed = sorted(given - set(RUNTIME_KEYS) - set(_CONTROL_KEYS))
    if not fixed:
        return
    resolved = new_run_config({**args, "out": None, "resume": None, "overwrite": False})
    parser_defaults = vars(build_parser().parse_args([]))
    for key in fixed:
        want = resolved.get(key)
        have = cfg.get(key, parser_defaults.get(key))
        if want != have:
            flag = "--" + key.replace("_", "-")
            allowed = ", ".join("--" + k.replace("_", "-") for k in RUNTIME_KEYS)
            raise CLIError(
                f"{flag} {args[key]} contradicts the run being resumed ({key}={have!r}); a resumed run keeps its "
                f"config and only {allowed} may change (start a new run for other settings)"
            )


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def validate(cfg: dict[str, Any]) -> None:
    """Raises :class:`CLIError` (one line naming the option) for any out-of-range value.

    Integers: ``--epochs``, ``--num-experts``, ``--num-train``, ``--width``, ``--embed-dim``,
    ``--steps-per-epoch``, ``--stop-after`` >= 1; ``--batch-size`` >= 2; ``--num-heldout`` >= max(130, D + 2);
    ``--threads`` in [1, CPUs]; ``--seed`` in [0, MAX_SEED]; ``--image-size`` >= 8; ``--workers``,
    ``--log-every`` >= 0. Floats, all finite: ``--lr`` and ``--temperature`` > 0, ``--lam`` and
    ``--weight-decay`` >= 0, ``--momentum`` in [0, 1).
    """
    for key in ("epochs", "batch_size", "num_experts", "num_train", "num_heldout", "width", "embed_dim"):
        if cfg.get(key, 1) < 1:
            raise CLIError(f"{_flag(key)} must be >= 1, got {cfg[key]}")
    if cfg["batch_size"] < 2:
        raise CLIError(f"--batch-size must be >= 2 (the contrastive losses need a negative, BatchNorm two samples), "
                       f"got {cfg['batch_size']}")
    if not 0 <= cfg["seed"] <= MAX_SEED:
        raise CLIError(f"--seed must be in [0, {MAX_SEED}], got {cfg['seed']}")
    cpus = os.cpu_count() or 1
    if cfg.get("threads") is not None and cfg["threads"] > cpus:
        raise CLIError(f"--threads must be <= {cpus} (the CPUs of this machine), got {cfg['threads']}")
    if cfg.get("log_every", 0) < 0:
        raise CLIError(f"--log-every must be >= 0, got {cfg['log_every']}")
    if cfg.get("router_init", "default") != "default" and cfg["head"] not in ("star", "shared"):
        raise CLIError(f"--router-init {cfg['router_init']} applies to routed heads (star, shared), "
                       f"not --head {cfg['head']}")
    if cfg.get("match_params") and cfg["head"] in ("star", "equimod"):
        raise CLIError(f"--match-params sizes a baseline head to STAR; it does not apply to --head {cfg['head']}")
    for key in ("steps_per_epoch", "stop_after", "threads", "hidden_dim"):
        if cfg.get(key) is not None and cfg[key] < 1:
            raise CLIError(f"{_flag(key)} must be >= 1, got {cfg[key]}")
    if cfg.get("image_size") is not None and cfg["image_size"] < 8:
        raise CLIError(f"--image-size must be >= 8 pixels, got {cfg['image_size']}")
    dim = cfg.get("embed_dim", 128)
    if cfg["num_heldout"] < max(130, dim + 2):
        raise CLIError(f"--num-heldout must be >= {max(130, dim + 2)} (CCA of two {dim}-D embeddings needs "
                       f"n - 1 > {dim}), got {cfg['num_heldout']}")
    for key, low, inclusive in (("lr", 0.0, False), ("temperature", 0.0, False), ("lam", 0.0, True),
                                ("weight_decay", 0.0, True), ("momentum", 0.0, True)):
        v = cfg[key]
        if not math.isfinite(v) or v < low or (v == low and not inclusive):
            raise CLIError(f"{_flag(key)} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {v}")
    if cfg["momentum"] >= 1:
        raise CLIError(f"--momentum must be < 1, got {cfg['momentum']}")
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
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: training and probing run on cpu or cuda (cuda:K), not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda given but CUDA is not available here (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
