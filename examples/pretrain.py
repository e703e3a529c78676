#!/usr/bin/env python
"""Self-supervised pretraining with a STAR head (or a baseline head): SimCLR, VICReg or EquiMod style.

One step (STAR_METHOD.md, "Forward pass"): the batch is augmented twice on the device
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

from common.backbones import build_backbone, resolve_backbone  # noqa: E402
from common.datasets import DatasetError, pretrain_data, to_float  # noqa: E402
from common.options import (  # noqa: E402
    HEADS,
    METHODS,
    RUNTIME_KEYS,
    CLIError,
    build_parser,
    resolve_device,
    validate,
)
from common.runs import RunDir, RunError, capture_rng, restore_rng  # noqa: E402
from common.training import (  # noqa: E402
    SSLModel,
    build_adapter,
    build_augment,
    evaluate,
    make_loader,
    original_view,
    progress,
)

__all__ = ["HEADS", "METHODS", "CLIError", "build_parser", "cli", "main", "train"]

def _setup_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def main(argv: list[str] | None = None) -> Path:
    """Parses ``argv``, prepares (or reopens) the run directory and trains. Returns the run directory.

    Raises:
        CLIError, RunError, DatasetError: bad input (nothing written).
    """
    args = vars(build_parser().parse_args(argv))
    if args["threads"] is not None:
        if args["threads"] < 1:
            raise CLIError(f"--threads must be >= 1, got {args['threads']}")
        torch.set_num_threads(args["threads"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args["device"], local_rank)
    if args["resume"] is not None:
        run = RunDir.open(args["resume"])
        cfg = run.read_config()
        cfg.update({k: args[k] for k in RUNTIME_KEYS})
    else:
        if args["out"] is None:
            raise CLIError("--out RUN_DIR is required (or --resume RUN_DIR)")
        cfg = {k: v for k, v in args.items() if k not in ("resume", "overwrite", "out")}
        cfg["image_size"] = cfg["image_size"] or (96 if cfg["dataset"] == "stl10" else 32)
        cfg["backbone"] = resolve_backbone(cfg["backbone"], cfg["dataset"])
        cfg["invariant_only"] = cfg["invariant_only"] or cfg["head"] == "single"
        validate(cfg)
        if RunDir(args["out"]).holds_run() and not args["overwrite"]:
            RunDir.create(args["out"])  # raises the one-line refusal; nothing is touched
        run = None
    rank, world = _setup_distributed(device)
    try:
        if cfg["batch_size"] % world:
            raise CLIError(f"--batch-size {cfg['batch_size']} must be divisible by the {world} processes")
        if run is None:
            # Everything that can fail on user input is checked before the directory is touched.
            data = pretrain_data(cfg["dataset"], image_size=cfg["image_size"], num_train=cfg["num_train"],
                                 num_heldout=cfg["num_heldout"], seed=cfg["seed"], data_dir=cfg["data_dir"],
                                 download=cfg["download"])
            build_backbone(cfg["backbone"], width=cfg["width"], cifar_stem=cfg["cifar_stem"])
            if rank == 0:
                run = RunDir.create(args["out"], overwrite=args["overwrite"])
                run.write_config({**cfg, "world_size": world, "torch": torch.__version__})
            else:
                run = RunDir(args["out"])
            if world > 1:
                dist.barrier()
            return train(cfg, run, device, data=data, resume=False)
        return train(cfg, run, device, resume=True)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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
    model = SSLModel(backbone, adapter, joint=not cfg["invariant_only"])
    if world > 1 and device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only (CPU/gloo: per-process BN)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    from star_heads import param_groups

    opt = torch.optim.SGD(param_groups(model, cfg["weight_decay"]), lr=cfg["lr"], momentum=cfg["momentum"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    aug = build_augment(cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] * 1000 + rank)
    start_epoch, step = 0, 0
    if resume:
        ckpt = run.load_checkpoint(map_location="cpu")  # RNG states must stay CPU tensors
        model.backbone.load_state_dict(ckpt["backbone"])
        model.adapter.load_state_dict(ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        restore_rng(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0], gen)
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
    if rank == 0 and start_epoch >= cfg["epochs"]:
        print(f"{run.path}: already trained for {cfg['epochs']} epochs; nothing to do")
    cache: dict[str, Any] = {}  # evaluate() keeps its CCAMeter (and cached null baseline) here
    if rank == 0 and len(data.heldout) < 4 * 128:
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
            with amp:
                out = fwd(x0, x1, x2, p1, p2)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
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
    if rank == 0 and end_epoch == cfg["epochs"] and start_epoch < end_epoch:
        from common.plots import plot_run

        plot_run(run.path, run.read_metrics(), list(getattr(model.adapter.head, "tasks", ("inv", "eq"))))
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
    except RuntimeError as exc:
        if "torchvision" not in str(exc):
            raise
        print(f"pretrain.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
