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
        --num-experts 16 --batch-size 256 --epochs 200 --lr 0.03 --precision bf16-mixed --out runs/stl10-star
    # several GPUs (global batch split across processes, SyncBatchNorm, gathered negatives):
    torchrun --nproc_per_node 4 examples/pretrain.py --dataset stl10 --data-dir data ... --out runs/ddp

Devices, precision and DDP go through Lightning Fabric (``common/fabric.py``); the loop below stays plain
torch. With nothing logged a step makes no host-device synchronisation (``--check-finite`` and
``--log-every`` add them on purpose); the losses are read back once per epoch.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common.backbones import build_backbone  # noqa: E402
from common.budget import estimate_memory, total_memory  # noqa: E402
from common.datasets import DatasetError, pretrain_data, to_float  # noqa: E402
from common.fabric import configure_cuda, make_fabric, torchrun_world  # noqa: E402
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
    build_adapter,
    build_augment,
    build_optimizer,
    evaluate,
    make_loader,
    progress,
    train_step,
)
from torch import nn  # noqa: E402

import star_heads  # noqa: E402
import star_heads.distributed  # noqa: E402,F401  (before init_process_group: see its "Process-group teardown")

__all__ = ["HEADS", "METHODS", "CLIError", "build_model", "build_parser", "cli", "main", "train"]

# Keys a run's config.json must hold, and their values for runs written before the option existed.
CONFIG_KEYS = ("method", "head", "num_experts", "lam", "temperature", "epochs", "batch_size", "lr", "momentum",
               "weight_decay", "seed", "dataset", "image_size", "num_train", "num_heldout", "backbone", "width",
               "cifar_stem", "invariant_only")
CONFIG_DEFAULTS = {"predictor": "star", "lr_rule": "fixed", "wd_policy": "no-bias-norm", "match_params": False, "hidden_dim": None,
                   "check_finite": False, "world_size": 1, "steps_per_epoch": None, "precision": "32-true",
                   "compile": False, "data_dir": None, "download": False, "embed_dim": 128, "router_init": "default",
                   "run_id": None}
CHECKPOINT_KEYS = ("epoch", "step", "backbone", "adapter", "optimizer", "scheduler", "rng")
# Keys that describe an invocation, not the run (compared neither between config.json and checkpoint.pt).
_NOT_IDENTITY = (*RUNTIME_KEYS, "torch")


def _normalise(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the defaults of options added since it was written (``amp`` → ``precision``)."""
    out = {**CONFIG_DEFAULTS, **cfg}
    amp = out.pop("amp", None)
    if "precision" not in cfg:
        out["precision"] = "bf16-mixed" if amp else "32-true"
    out.setdefault("lr_effective", out["lr"])
    return out


def _check_buildable(cfg: dict[str, Any], world: int, device: torch.device) -> None:
    """Builds the backbone and adapter of ``cfg`` on the meta device, runs the backbone there on one image of
    the view size, and refuses a setting whose memory floor exceeds the machine: a setting that cannot work
    fails before anything is allocated or written."""
    if cfg["batch_size"] % world:
        raise CLIError(f"--batch-size {cfg['batch_size']} must be divisible by the {world} processes")
    if cfg["batch_size"] // world < 2:
        raise CLIError(f"--batch-size {cfg['batch_size']} gives {cfg['batch_size'] // world} image(s) per process; "
                       f"each of the {world} processes needs at least 2")
    try:
        est = estimate_memory(cfg, world, num_images=None if cfg["dataset"].startswith("shapes") else 0)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--head {cfg['head']}: {exc}") from None
    except RuntimeError as exc:
        raise CLIError(f"--image-size {cfg['image_size']} is too small for --backbone {cfg['backbone']}: "
                       f"{str(exc).splitlines()[0]}") from None
    try:
        build_augment(cfg, torch.device("cpu"))
    except ValueError as exc:
        raise CLIError(f"--image-size {cfg['image_size']}: {exc}") from None
    gib = 2.0**30
    host = total_memory(torch.device("cpu"))
    needs = [(est.device + (est["host"] if device.type == "cpu" else 0), total_memory(device), str(device))]
    if device.type != "cpu":
        needs.append((est["host"], host, "the host (data set)"))
    for need, have, where in needs:
        if have is not None and need > have:
            raise CLIError(
                f"--image-size {cfg['image_size']}, --batch-size {cfg['batch_size']}, --num-experts {cfg['num_experts']} "
                f"need at least {need / gib:.1f} GiB on {where} (model {est['model'] / gib:.1f}, one step "
                f"{est['step'] / gib:.1f}, data {est['host'] / gib:.1f}), more than its {have / gib:.1f} GiB")


def main(argv: list[str] | None = None) -> Path:
    """Parses ``argv``, prepares (or reopens) the run directory and trains. Returns the run directory.

    Every value is validated, and a resumed run's config and checkpoint are read and verified, before
    anything is written; one process per node prepares the data while the others wait.

    Raises:
        CLIError, RunError, DatasetError: bad input (nothing written).
        NonFiniteError: a NaN/Inf batch, feature or loss stopped training (the checkpoint holds the last
            finished epoch).
    """
    args = vars(build_parser().parse_args(argv))
    world, _ = torchrun_world()
    if args["resume"] is not None:
        run = RunDir.open(args["resume"])
        cfg = _normalise(run.read_config(required=CONFIG_KEYS))
        check_resume_flags(given_options(argv), args, cfg)
        cfg.update({k: args[k] for k in RUNTIME_KEYS})
        validate(cfg)
        check_writable_dir(run.path, "--resume")
        if cfg["world_size"] != world:
            raise CLIError(f"{run.path} was trained with {cfg['world_size']} process(es); resume it with the same "
                           f"number (got {world}): each process restores its own augmentation generator")
    else:
        if args["out"] is None:
            raise CLIError("--out RUN_DIR is required (or --resume RUN_DIR)")
        cfg = new_run_config(args)
        if RunDir(args["out"]).holds_run() and not args["overwrite"]:
            RunDir.create(args["out"])  # raises the one-line refusal; nothing is touched
        check_writable_dir(args["out"])
        cfg.update(world_size=world, run_id=uuid.uuid4().hex)
        run = None
    device = resolve_device(args["device"], int(os.environ.get("LOCAL_RANK", "0")))
    _check_buildable(cfg, world, device)
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    if device.type == "cuda":
        configure_cuda(tf32=cfg["tf32"], cudnn_benchmark=cfg["cudnn_benchmark"])
    try:
        fabric = make_fabric(device, cfg["precision"], find_unused_parameters=cfg["invariant_only"])
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    try:
        with star_heads.value_checks(cfg["check_finite"]):  # the library's finite / range checks: one switch
            if run is not None:
                return train(cfg, run, fabric, resume=True)
            data = _load_data(cfg, fabric)
            per_rank = len(data.train) // world // (cfg["batch_size"] // world)
            if per_rank == 0:
                raise CLIError(f"--batch-size {cfg['batch_size']} is larger than the {len(data.train)} training images "
                               "(--num-train): no full batch")
            if fabric.global_rank == 0:
                run = RunDir.create(args["out"], overwrite=args["overwrite"])
                try:
                    run.write_config({**cfg, "torch": torch.__version__})
                except OSError as exc:
                    run.discard()
                    raise RunError(f"cannot write {run.config_path}: {exc.strerror or exc}") from None
            else:
                run = RunDir(args["out"])
            fabric.barrier()
            return train(cfg, run, fabric, data=data, resume=False)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _load_data(cfg: dict[str, Any], fabric: Any) -> Any:
    """The run's data; the first process of each node downloads / prepares it while the others wait."""
    with fabric.rank_zero_first(local=True):
        return pretrain_data(cfg["dataset"], image_size=cfg["image_size"], num_train=cfg["num_train"],
                             num_heldout=cfg["num_heldout"], seed=cfg["seed"], data_dir=cfg["data_dir"],
                             download=cfg["download"])


def _check_belongs(run: RunDir, cfg: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """Refuses a checkpoint that another run wrote, or that config.json no longer describes."""
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        raise RunError(f"{run.checkpoint_path} holds no run config, so it cannot be shown to belong to {run.path}")
    stored = _normalise(stored)
    if cfg.get("run_id") != stored.get("run_id"):
        raise RunError(f"{run.checkpoint_path} belongs to another run (run id {stored.get('run_id')}; config.json: "
                       f"{cfg.get('run_id')}); refusing to continue from it")
    diff = sorted(k for k in (set(cfg) | set(stored)) - set(_NOT_IDENTITY) if cfg.get(k) != stored.get(k))
    if diff:
        k = diff[0]
        hint = ("; the learning-rate schedule is sized for the epochs a run starts with, so restore config.json "
                "or train longer in a new run" if k == "epochs" else "; restore config.json or start a new run")
        raise RunError(f"config.json and {run.checkpoint_path.name} of {run.path} disagree on {', '.join(diff)} "
                       f"({k}: {cfg.get(k)!r} in config.json, {stored.get(k)!r} in the checkpoint){hint}")


def _load_resume_state(run: RunDir, cfg: dict[str, Any], model: SSLModel, opt: torch.optim.Optimizer, sched: Any,
                       world: int) -> dict[str, Any]:
    """Loads the verified checkpoint of this run into the model, optimiser and scheduler (RunError when it does
    not belong to the run, does not fit, or the metric history it continues is missing)."""
    ckpt = run.load_checkpoint(map_location="cpu", required=CHECKPOINT_KEYS)  # RNG states must stay CPU tensors
    _check_belongs(run, cfg, ckpt)
    if not isinstance(ckpt["rng"], list) or len(ckpt["rng"]) != world:
        got = len(ckpt["rng"]) if isinstance(ckpt["rng"], list) else type(ckpt["rng"]).__name__
        raise RunError(f"{run.checkpoint_path} holds the RNG states of {got} process(es), this run has {world}")
    epochs = {r.get("epoch") for r in run.read_metrics()}
    missing = [e for e in range(1, int(ckpt["epoch"]) + 1) if e not in epochs]
    if missing:
        what = "does not exist" if not run.metrics_path.exists() else f"lacks epoch(s) {missing[:5]}"
        raise RunError(f"{run.metrics_path} {what} but the checkpoint is at epoch {ckpt['epoch']}: resuming would "
                       "leave a partial history; restore the file or start again with --overwrite")
    try:
        model.backbone.load_state_dict(ckpt["backbone"])
        model.adapter.load_state_dict(ckpt["adapter"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"{run.checkpoint_path} does not fit the run's config: {str(exc).splitlines()[0]}") from None
    return ckpt


def build_model(cfg: dict[str, Any], device: torch.device, world: int = 1) -> tuple[SSLModel, int]:
    """The run's :class:`SSLModel` on the CPU (seed first: the build order fixes the initial weights) and the
    backbone's feature width; SyncBatchNorm for several GPUs, channels_last on CUDA, compiled with ``--compile``."""
    backbone, feat_dim = build_backbone(cfg["backbone"], width=cfg["width"], cifar_stem=cfg["cifar_stem"])
    adapter = build_adapter(cfg, feat_dim, distributed=world > 1)
    channels_last = device.type == "cuda" and cfg.get("channels_last", True)
    model = SSLModel(backbone, adapter, joint=not cfg["invariant_only"], check_finite=cfg["check_finite"],
                     channels_last=channels_last)
    if world > 1 and device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only (CPU/gloo: per-process BN)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if cfg["compile"]:  # in place (DDP and Fabric wrap the compiled modules, the state_dict keys stay); backbone
        # and adapter apart: the adapter's __call__ is an eager frame (its CCA bookkeeping stays out of the graph),
        # so compiling the whole model would break the graph there
        backend = cfg.get("compile_backend", "inductor")
        model.backbone.compile(backend=backend)
        model.adapter.compile(backend=backend)
    return model, feat_dim


def train(cfg: dict[str, Any], run: RunDir, fabric: Any, *, data: Any = None, resume: bool = False) -> Path:
    """Trains the run described by ``cfg`` into ``run`` (continuing its checkpoint when ``resume``)."""
    rank, world, device = fabric.global_rank, fabric.world_size, fabric.device
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    if data is None:
        data = _load_data(cfg, fabric)
    model, feat_dim = build_model(cfg, device, world)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    fmodel, fopt = fabric.setup(model, opt)  # to the device, DDP under torchrun, the autocast of --precision
    aug = build_augment(cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"] * 1000 + rank)  # views drawn on the device
    start_epoch, step = 0, 0
    if resume:
        if rank == 0:
            run.remove_stale_temporaries()
        ckpt = _load_resume_state(run, cfg, model, opt, sched, world)
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        try:
            restore_rng(ckpt["rng"][rank], gen)
        except RuntimeError as exc:  # e.g. a CPU generator's state given to a CUDA generator
            raise RunError(f"{run.checkpoint_path} holds random states this device cannot continue "
                           f"({str(exc).splitlines()[0]}); resume on the device type the run was trained on") from None
        del ckpt
        if rank == 0:
            run.truncate_metrics(start_epoch)
    loader, sampler = make_loader(data.train.images, cfg, rank, world, device)
    steps = len(loader) if cfg["steps_per_epoch"] is None else min(len(loader), cfg["steps_per_epoch"])
    end_epoch = cfg["epochs"] if cfg["stop_after"] is None else min(cfg["epochs"], start_epoch + cfg["stop_after"])
    cache: dict[str, Any] = {}  # evaluate() keeps its CCAMeter (and cached null baseline) here
    dim = cfg["embed_dim"]
    if rank == 0 and len(data.heldout) < 4 * dim and start_epoch < end_epoch:
        print(f"note: CCA on {len(data.heldout)} held-out images is biased upward for {dim}-D embeddings; "
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
            try:
                out = train_step(fmodel, aug, fopt, x, generator=gen, backward=fabric.backward,
                                 check_finite=cfg["check_finite"])
            except NonFiniteError as exc:
                raise NonFiniteError(f"{exc} at epoch {epoch + 1}, step {step + 1}; {run.checkpoint_path} still "
                                     f"holds epoch {epoch} (try a lower --lr)") from None
            step += 1
            for k, v in {"loss": out.loss, **{f"loss_{n}": t for n, t in out.losses.items()}}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()  # on the device: no sync
            if cfg["log_every"] and step % cfg["log_every"] == 0 and rank == 0:
                bar.set_postfix(step=step, loss=float(out.loss.detach()))  # a logging step: one host read
            bar.update(1)
        bar.close()
        # One host read per epoch: the mean losses (over ranks) and whether every parameter is finite.
        params_ok = torch.stack([torch.isfinite(p.detach()).all() for p in model.parameters()]).all()
        vec = torch.stack([*(v / steps for v in sums.values()), params_ok.float()])
        if world > 1:
            vec = fabric.all_reduce(vec, reduce_op="mean")
        *means, ok = vec.tolist()
        losses = dict(zip(sums, means))
        if ok != 1.0 or not all(math.isfinite(v) for v in means):
            raise NonFiniteError(f"non-finite loss or weights in epoch {epoch + 1}; {run.checkpoint_path} still holds "
                                 f"epoch {epoch} (try a lower --lr; --check-finite finds the step)")
        row = {"epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"], **losses}
        sched.step()
        with warnings.catch_warnings():  # the sample-size warning of CCAMeter is reported once per run below
            warnings.simplefilter("ignore")
            try:
                row.update(evaluate(model.backbone, model.adapter, data, aug, device, cache=cache,
                                    autocast=fabric.autocast))
            except NonFiniteError as exc:
                raise NonFiniteError(f"{exc} after epoch {epoch + 1}; {run.checkpoint_path} still holds epoch "
                                     f"{epoch} (try a lower --lr)") from None
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
                "epoch": epoch + 1, "step": step, "run_id": cfg["run_id"], "config": cfg, "feature_dim": feat_dim,
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
