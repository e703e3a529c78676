#!/usr/bin/env python
"""Self-supervised pretraining with a STAR head (or a baseline head): SimCLR, VICReg or EquiMod style.

One step (STAR, arXiv 2510.27222): the batch is augmented twice on the device
(``star_heads.augment.STARAugment``, which also returns each view's 11-D parameter vector); the
original x0 and the views x1, x2 go through the backbone in three separate calls (BatchNorm
statistics per view group, as in the reference code); the adapter (``star_heads.adapters``) owns
the projection head, the equivariant predictor, the parameter normaliser and the losses:
``L = L_inv + λ·L_eq``. ``--head single`` (or ``--invariant-only``) trains the invariant objective
alone: ``adapter(h1, h2)``.

Every epoch: each loss term, CCA(inv, eq) with its null baseline on a fixed held-out set
(``CCAMeter``), gate usage per task and expert, kNN accuracy of backbone features; one line of
metrics.jsonl and a checkpoint (backbone + adapter + optimiser + scheduler + RNG states).
At the end: cca.png, gates.png, losses.png in the run directory.

Examples::

    python examples/pretrain.py --out runs/star                     # shapes, ConvNet, STAR N=8
    python examples/pretrain.py --head separate --out runs/sep      # EquiMod-style separate heads
    python examples/pretrain.py --resume runs/star                  # continue an interrupted run
    # the paper's STL10 recipe on one GPU:
    python examples/pretrain.py --dataset stl10 --data-dir data --download --backbone resnet18 \\
        --num-experts 16 --batch-size 256 --epochs 200 --lr 0.03 --amp --out runs/stl10-star
    # several GPUs (global batch split across processes, SyncBatchNorm, gathered negatives):
    torchrun --nproc_per_node 4 examples/pretrain.py --dataset stl10 --data-dir data ... --out runs/ddp
"""

from __future__ import annotations

import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from common.backbones import build_backbone  # noqa: E402
from common.datasets import DatasetError, pretrain_data, to_float  # noqa: E402
from common.options import (  # noqa: E402
    HEADS,
    METHODS,
    RUNTIME_KEYS,
    CLIError,
    build_parser,
    check_resume_flags,
    given_options,
    new_run_config,
    resolve_device,
    validate,
)
from common.runs import PLOT_FILES, RunDir, RunError, capture_rng, check_writable_dir, restore_rng  # noqa: E402
from common.training import (  # noqa: E402
    NonFiniteError,
    SSLModel,
    all_finite,
    build_adapter,
    build_augment,
    build_optimizer,
    evaluate,
    make_loader,
    original_view,
    progress,
)

import star_heads.distributed  # noqa: E402,F401  (before init_process_group: see its "Process-group teardown")

__all__ = ["HEADS", "METHODS", "CLIError", "build_parser", "cli", "main", "train"]

# Keys a run's config.json must hold, and their values for runs written before the option existed.
CONFIG_KEYS = ("method", "head", "num_experts", "lam", "temperature", "epochs", "batch_size", "lr", "momentum",
               "weight_decay", "seed", "dataset", "image_size", "num_train", "num_heldout", "backbone", "width",
               "cifar_stem", "invariant_only")
CONFIG_DEFAULTS = {"predictor": "star", "lr_rule": "fixed", "wd_policy": "no-bias-norm", "match_params": False, "hidden_dim": None,
                   "check_finite": True, "world_size": 1, "steps_per_epoch": None, "amp": False, "compile": False,
                   "data_dir": None, "download": False}
CHECKPOINT_KEYS = ("epoch", "step", "backbone", "adapter", "optimizer", "scheduler", "rng")


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _check_buildable(cfg: dict[str, Any]) -> None:
    """Builds the backbone, adapter and augmentation of ``cfg`` once (and runs the backbone on two blank
    images of the view size), so that a setting that cannot work fails before anything is written."""
    backbone, feat_dim = build_backbone(cfg["backbone"], width=cfg["width"], cifar_stem=cfg["cifar_stem"])
    try:
        build_adapter(cfg, feat_dim)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--head {cfg['head']}: {exc}") from None
    try:
        build_augment(cfg, torch.device("cpu"))
    except ValueError as exc:
        raise CLIError(f"--image-size {cfg['image_size']}: {exc}") from None
    with torch.no_grad():
        try:
            backbone.eval()(torch.zeros(2, 3, cfg["image_size"], cfg["image_size"]))
        except RuntimeError as exc:
            raise CLIError(f"--image-size {cfg['image_size']} is too small for --backbone {cfg['backbone']}: "
                           f"{str(exc).splitlines()[0]}") from None


def main(argv: list[str] | None = None) -> Path:
    """Parses ``argv``, prepares (or reopens) the run directory and trains. Returns the run directory.

    Every value is validated, and a resumed run's config and checkpoint are read and verified, before
    anything is written.

    Raises:
        CLIError, RunError, DatasetError: bad input (nothing written).
        NonFiniteError: a NaN/Inf batch, feature or loss stopped training (the checkpoint holds the last
            finished epoch).
    """
    args = vars(build_parser().parse_args(argv))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args["resume"] is not None:
        run = RunDir.open(args["resume"])
        cfg = {**CONFIG_DEFAULTS, **run.read_config(required=CONFIG_KEYS)}
        cfg.setdefault("lr_effective", cfg["lr"])
        check_resume_flags(given_options(argv), args, cfg)
        cfg.update({k: args[k] for k in RUNTIME_KEYS})
        validate(cfg)
    else:
        if args["out"] is None:
            raise CLIError("--out RUN_DIR is required (or --resume RUN_DIR)")
        cfg = new_run_config(args)
        if RunDir(args["out"]).holds_run() and not args["overwrite"]:
            RunDir.create(args["out"])  # raises the one-line refusal; nothing is touched
        check_writable_dir(args["out"])
        run = None
    device = resolve_device(args["device"], local_rank)
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    rank, world = _setup_distributed(device)
    try:
        if cfg["batch_size"] % world:
            raise CLIError(f"--batch-size {cfg['batch_size']} must be divisible by the {world} processes")
        if run is not None:
            if cfg["world_size"] != world:
                raise CLIError(f"{run.path} was trained with {cfg['world_size']} process(es); resume it with the same "
                               f"number (got {world}): each process restores its own augmentation generator")
            return train(cfg, run, device, resume=True)
        # Everything that can fail on user input is checked before the directory is touched.
        data = pretrain_data(cfg["dataset"], image_size=cfg["image_size"], num_train=cfg["num_train"],
                             num_heldout=cfg["num_heldout"], seed=cfg["seed"], data_dir=cfg["data_dir"],
                             download=cfg["download"])
        _check_buildable(cfg)
        if rank == 0:
            run = RunDir.create(args["out"], overwrite=args["overwrite"])
            try:
                run.write_config({**cfg, "world_size": world, "torch": torch.__version__})
            except OSError as exc:
                run.discard()
                raise RunError(f"cannot write {run.config_path}: {exc.strerror or exc}") from None
        else:
            run = RunDir(args["out"])
        if world > 1:
            dist.barrier()
        return train({**cfg, "world_size": world}, run, device, data=data, resume=False)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _load_resume_state(run: RunDir, model: SSLModel, opt: torch.optim.Optimizer, sched: Any, rank: int,
                       world: int) -> dict[str, Any]:
    """Loads the verified checkpoint into the model, optimiser and scheduler (RunError when it does not fit)."""
    ckpt = run.load_checkpoint(map_location="cpu", required=CHECKPOINT_KEYS)  # RNG states must stay CPU tensors
    if not isinstance(ckpt["rng"], list) or len(ckpt["rng"]) != world:
        got = len(ckpt["rng"]) if isinstance(ckpt["rng"], list) else type(ckpt["rng"]).__name__
        raise RunError(f"{run.checkpoint_path} holds the RNG states of {got} process(es), this run has {world}")
    try:
        model.backbone.load_state_dict(ckpt["backbone"])
        model.adapter.load_state_dict(ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"{run.checkpoint_path} does not fit the run's config: {str(exc).splitlines()[0]}") from None
    return ckpt


def train(cfg: dict[str, Any], run: RunDir, device: torch.device, *, data: Any = None, resume: bool = False) -> Path:
    """Trains the run described by ``cfg`` into ``run`` (continuing its checkpoint when ``resume``)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    if data is None:
        data = pretrain_data(cfg["dataset"], image_size=cfg["image_size"], num_train=cfg["num_train"],
                             num_heldout=cfg["num_heldout"], seed=cfg["seed"], data_dir=cfg["data_dir"],
                             download=cfg["download"])
    backbone, feat_dim = build_backbone(cfg["backbone"], width=cfg["width"], cifar_stem=cfg["cifar_stem"])
    adapter = build_adapter(cfg, feat_dim, distributed=world > 1)
    model = SSLModel(backbone, adapter, joint=not cfg["invariant_only"], check_finite=cfg["check_finite"])
    if world > 1 and device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only (CPU/gloo: per-process BN)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    aug = build_augment(cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] * 1000 + rank)
    start_epoch, step = 0, 0
    if resume:
        ckpt = _load_resume_state(run, model, opt, sched, rank, world)
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        restore_rng(ckpt["rng"][rank], gen)
        del ckpt
        if rank == 0:
            run.truncate_metrics(start_epoch)
    fwd: nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg["invariant_only"])
    if cfg["compile"]:
        fwd = torch.compile(fwd)
    loader, sampler = make_loader(data.train.images, cfg, rank, world, device)
    steps = len(loader) if cfg["steps_per_epoch"] is None else min(len(loader), cfg["steps_per_epoch"])
    if steps == 0:
        raise CLIError(f"{len(data.train)} training images give no full batch of {cfg['batch_size']} ({world} processes)")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"])
    end_epoch = cfg["epochs"] if cfg["stop_after"] is None else min(cfg["epochs"], start_epoch + cfg["stop_after"])
    cache: dict[str, Any] = {}  # evaluate() keeps its CCAMeter (and cached null baseline) here
    if rank == 0 and len(data.heldout) < 4 * 128 and start_epoch < end_epoch:
        print(f"note: CCA on {len(data.heldout)} held-out images is biased upward for 128-D embeddings; "
              "compare it with the printed null baseline", flush=True)
    row: dict[str, Any] = {}
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        bar = progress(steps, f"epoch {epoch + 1}/{cfg['epochs']}", enabled=cfg["progress"] and rank == 0)
        for i, batch in enumerate(loader):
            if i == steps:
                break
            x = to_float(batch.to(device, non_blocking=True))
            x1, p1 = aug(x, generator=gen)
            x2, p2 = aug(x, generator=gen)
            x0 = original_view(aug, x)
            where = f"epoch {epoch + 1}, step {step + 1}"
            with amp:
                out = fwd(x0, x1, x2, p1, p2, where=where)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg["check_finite"] and not all_finite(out.loss):
                raise NonFiniteError(f"non-finite loss at {where}; stopped before the optimiser step, so "
                                     f"{run.checkpoint_path} still holds epoch {epoch} (try a lower --lr)")
            opt.step()
            step += 1
            for k, v in {"loss": out.loss, **{f"loss_{n}": t for n, t in out.losses.items()}}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            bar.update(1)
        bar.close()
        losses = {k: float(v) / steps for k, v in sums.items()}
        if world > 1:
            vec = torch.tensor(list(losses.values()), device=device)
            dist.all_reduce(vec)
            losses = dict(zip(losses, (vec / world).tolist()))
        row = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"], **losses}
        sched.step()
        with warnings.catch_warnings():  # the sample-size warning of CCAMeter is reported once per run below
            warnings.simplefilter("ignore")
            row.update(evaluate(model.backbone, model.adapter, data, aug, device, amp_enabled=cfg["amp"], cache=cache))
        if world > 1:
            row["ddp_param_spread"] = _param_spread(model)
        row["epoch_time_s"] = time.perf_counter() - t0
        rngs = [capture_rng(gen)]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, capture_rng(gen))
        if rank == 0:
            run.append_metrics(row)
            run.save_checkpoint({
                "epoch": epoch + 1, "step": step, "config": cfg, "feature_dim": feat_dim,
                "backbone": model.backbone.state_dict(), "adapter": model.adapter.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs,
            })
            print(_summary(row, cfg["epochs"]), flush=True)
    if rank == 0 and end_epoch == cfg["epochs"]:
        missing = [f for f in PLOT_FILES if not (run.path / f).exists()]
        if start_epoch < end_epoch or missing:
            from common.plots import plot_run

            plot_run(run.path, run.read_metrics(), list(getattr(model.adapter.head, "tasks", ("inv", "eq"))))
        if start_epoch >= end_epoch:
            redone = [f for f in missing if (run.path / f).exists()]
            print(f"{run.path}: already trained for {cfg['epochs']} epochs; "
                  + (f"re-created {', '.join(redone)}" if redone else "nothing to do"), flush=True)
    return run.path


def _param_spread(model: nn.Module) -> float:
    """Largest difference of any parameter across ranks (0 when DDP keeps replicas in sync)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def _summary(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}"]
    parts += [f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("loss_")]
    if row.get("cca_mean") is not None:
        parts.append(f"CCA(inv,eq) {row['cca_mean']:.3f} (null {row['cca_null']:.3f})")
    if row.get("knn_acc") is not None:
        parts.append(f"kNN {100 * row['knn_acc']:.1f}%")
    if row.get("effective_experts") is not None:
        parts.append("eff. experts " + "/".join(f"{v:.2f}" for v in row["effective_experts"]))
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return " | ".join(parts)


def cli(argv: list[str] | None = None) -> int:
    """Entry point: runs :func:`main`; bad input → one line on stderr and exit code 2."""
    try:
        main(argv)
    except (CLIError, RunError, DatasetError) as exc:
        print(f"pretrain.py: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"pretrain.py: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "torchvision" not in str(exc):
            raise
        print(f"pretrain.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
