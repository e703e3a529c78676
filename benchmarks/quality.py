"""Quality protocol on ``shapes``: is STAR less redundant than parameter-matched separate heads, and at what cost?

    python -m benchmarks.quality --grid NAME [--jobs 2] [--seeds 3] [--train-only] [--quick] [--out-dir DIR]

Grids (``GRIDS``; each a set of arms × seeds at one budget):

=================  ===============================================================================================
``narrow``         embeddings a quarter of the backbone width (ConvNet width 8, d = 64 → 16-D, the paper's
                   512 → 128 ratio): STAR N = 8 and 16 beside separate heads matched to each, untrained floor
``router-init``    the same setting, STAR-16 with each router start (``SoftRouter(init=...)``: default,
                   task-distinct, noisy) beside its matched separate heads: same backbone, experts, predictor
                   and data per seed
``router-init-8``  the same for STAR-8
``long``           STAR-16 (default and task-distinct start) and its matched separate heads in the narrow
                   setting, trained 4× longer (64 epochs, the cosine schedule stretched to 4096 steps)
``long-8``         the same for STAR-8
``long-dropin``    the long grid with ``build_head``'s default (drop-in) sizing instead of the paper's expert shape:
                   experts d → 8 → 8 → 16, at most 2× the single head (``settings["hidden"] = "auto"``)
``standard``       the 128-D setting of the earlier grid (width 8, 1024 steps); not re-run by default
=================  ===============================================================================================

Every arm is trained by the loop below from the examples' building blocks (``common.training``: ``SSLModel``,
``build_augment``, ``build_optimizer``, ``make_loader``, ``evaluate``; ``common.backbones.build_backbone``;
``common.datasets``; ``common.probe.linear_probe``): EquiMod-style objective (invariant NT-Xent + equivariant
NT-Xent through STAR's residual predictor), SGD 0.03 cosine, the same data, augmentation draws and seeds for
every arm. Per seed, the backbone and the head are built right after ``torch.manual_seed(seed)``, then the
predictor after ``torch.manual_seed(seed + PREDICTOR_SEED_OFFSET)``: arms that differ only in the router start
share the backbone, experts, router weights and predictor exactly.

Measured on ``num_heldout`` fixed held-out images no run trains on (eval mode, float64), at step 0 and at the
end: the mean canonical correlation of ``z_inv`` and ``z_eq``, its null (the expected mean for independent
embeddings of the same n and ranks), the excess (mean − null), SVCCA keeping 99 % of each view's variance and
the top canonical correlations; the mean CCA and its null after every epoch (the trajectory); the
equivariance readout ``star_heads.metrics.augmentation_r2`` of both embeddings on pairs of views of held-out
images; the linear probe of the frozen backbone (shape, colour, rotation, digits). Paired statistics are
per-seed differences (mean ± sd, and the number of seeds with a positive difference).

Runs are cached in ``--runs-dir`` (default ``runs/quality``): training in ``train.json`` + ``*.pt`` (keyed by
the training settings), measurements in ``quality.json`` (keyed by the measurement settings), so a grid can be
extended (more seeds, new arms) or re-measured without retraining. A full run writes
``docs/benchmarks/quality_<grid>.json``, the ``quality-<grid>`` section of ``docs/results.md`` and
``docs/images/quality_<grid>_cca.png``; ``--quick`` writes them under a temporary folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks._common import (
    machine_info,
    machine_line,
    output_dir,
    table,
    write_json,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:  # the examples' building blocks are imported as ``common.*``
    sys.path.insert(0, str(ROOT / "examples"))

__all__ = [
    "GRIDS",
    "QUICK",
    "Arm",
    "Grid",
    "build_model",
    "cca_stats",
    "main",
    "measure_run",
    "paired",
    "render",
    "summarize",
    "train_run",
]

PREDICTOR_SEED_OFFSET = 10_000
EQUIV_SEED = 20_251_027  # fixed draw of the views for the equivariance readout (same for every arm and seed)
SVCCA_KEEP = 0.99
TOP_K = 3
TASKS = ("shape", "color", "rotation", "digits")
GROUPS = ("crop", "color", "blur", "flip", "grayscale")


@dataclass(frozen=True)
class Arm:
    """One head of a grid. ``head`` is a ``build_head`` kind, ``"equimod"`` or None (the untrained floor)."""

    name: str
    label: str
    head: str | None
    num_experts: int | None = None
    match_params: bool = False
    router_init: str = "default"
    router_init_scale: float | None = None


@dataclass(frozen=True)
class Grid:
    """Arms, training budget and paired comparisons of one experiment."""

    name: str
    title: str
    arms: tuple[Arm, ...]
    settings: dict[str, Any]
    comparisons: tuple[tuple[str, str], ...]


RANDOM = Arm("random", "untrained backbone (floor)", None)
SEP8 = Arm("sep-pm8", "separate, matched to STAR-8", "separate", 8, True)
STAR8 = Arm("star-8", "STAR N=8", "star", 8)
SEP16 = Arm("sep-pm16", "separate, matched to STAR-16", "separate", 16, True)
STAR16 = Arm("star-16", "STAR N=16", "star", 16)
STAR8_DISTINCT = Arm("star-8-distinct", "STAR N=8, task-distinct start (±3)", "star", 8,
                     router_init="task-distinct", router_init_scale=3.0)
STAR8_NOISY = Arm("star-8-noisy", "STAR N=8, noisy start (N(0, 2²))", "star", 8, router_init="noisy",
                  router_init_scale=2.0)
STAR16_DISTINCT = Arm("star-16-distinct", "STAR N=16, task-distinct start (±3)", "star", 16,
                      router_init="task-distinct", router_init_scale=3.0)
STAR16_NOISY = Arm("star-16-noisy", "STAR N=16, noisy start (N(0, 2²))", "star", 16,
                   router_init="noisy", router_init_scale=2.0)



def _router_comparisons(n: int) -> tuple[tuple[str, str], ...]:
    """The default start of STAR-n, then each other start, against its matched separate heads; each other start
    against the default start."""
    return ((f"star-{n}", f"sep-pm{n}"),
            *((f"star-{n}{v}", ref) for v in ("-distinct", "-noisy") for ref in (f"sep-pm{n}", f"star-{n}")))




def _long_comparisons(n: int) -> tuple[tuple[str, str], ...]:
    """STAR-n (default and task-distinct start) against its matched separate heads, and the two starts."""
    return (f"star-{n}", f"sep-pm{n}"), (f"star-{n}-distinct", f"sep-pm{n}"), (f"star-{n}-distinct", f"star-{n}")


HIDDEN = ("d", "auto")  # expert / MLP hidden width: the paper's shape (= backbone width d), or build_head's sizing
BASE = {"width": 8, "hidden": "d", "output_dim": 16, "epochs": 16, "batch_size": 64, "num_train": 4096, "num_heldout": 4096,
        "steps_per_epoch": None, "lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4, "lam": 1.0, "temperature": 0.2}
GRIDS: dict[str, Grid] = {
    "narrow": Grid("narrow", "16-D embeddings of 64-D features", (RANDOM, SEP8, STAR8, SEP16, STAR16), BASE,
                   (("star-8", "sep-pm8"), ("star-16", "sep-pm16"), ("star-16", "star-8"))),
    "router-init": Grid("router-init", "router start, STAR-16, 16-D embeddings",
                        (RANDOM, SEP16, STAR16, STAR16_DISTINCT, STAR16_NOISY), BASE,
                        _router_comparisons(16)),
    "router-init-8": Grid("router-init-8", "router start, STAR-8, 16-D embeddings",
                          (RANDOM, SEP8, STAR8, STAR8_DISTINCT, STAR8_NOISY), BASE, _router_comparisons(8)),
    "long": Grid("long", "4× longer, 16-D embeddings", (RANDOM, SEP16, STAR16, STAR16_DISTINCT), {**BASE, "epochs": 64},
                 _long_comparisons(16)),
    "long-8": Grid("long-8", "4× longer, STAR-8, 16-D embeddings", (RANDOM, SEP8, STAR8, STAR8_DISTINCT),
                   {**BASE, "epochs": 64}, _long_comparisons(8)),
    "long-dropin": Grid("long-dropin", "4× longer, drop-in head size", (RANDOM, SEP16, STAR16, STAR16_DISTINCT),
                        {**BASE, "epochs": 64, "hidden": "auto"}, _long_comparisons(16)),
    "standard": Grid("standard", "128-D embeddings of 64-D features", (RANDOM, SEP8, STAR8, SEP16, STAR16),
                     {**BASE, "output_dim": 128}, (("star-8", "sep-pm8"), ("star-16", "sep-pm16"))),
}
MEASURE = {"transfer": {"grid_points": 12, "num_train": 2000, "num_test": 1000, "max_iter": 100, "tasks": ["shape", "color"]},
           "equiv_images": 512, "equiv_pairs_per_image": 2, "svcca_keep": SVCCA_KEEP, "top_k": TOP_K}
QUICK = {**BASE, "width": 4, "epochs": 2, "batch_size": 16, "num_train": 64, "num_heldout": 512, "steps_per_epoch": 2}
QUICK_MEASURE = {"transfer": {"grid_points": 2, "num_train": 60, "num_test": 40, "max_iter": 20, "tasks": ["shape", "color"]},
                 "equiv_images": 256, "equiv_pairs_per_image": 2, "svcca_keep": SVCCA_KEEP, "top_k": TOP_K}
QUICK_GRID = Grid("quick", "smoke test", (RANDOM, SEP8, STAR8, replace(STAR8, name="star-8-noisy", router_init="noisy")),
                  QUICK, (("star-8", "sep-pm8"), ("star-8-noisy", "star-8")))


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_model(arm: Arm, seed: int, settings: dict[str, Any]) -> tuple[Any, Any]:
    """The seeded initial backbone and adapter of ``arm`` (adapter None for the untrained floor).

    Backbone then head after ``torch.manual_seed(seed)``; the predictor after a second fixed seed, so that the
    router start (drawn last in the head) changes nothing else.
    """
    import torch
    from common.backbones import build_backbone

    from star_heads import SeparateHeads, build_head
    from star_heads.adapters import EquiModAdapter
    from star_heads.augment import PARAM_DIM

    if settings["hidden"] not in HIDDEN:
        raise ValueError(f"settings['hidden'] must be one of {HIDDEN}, got {settings['hidden']!r}")
    _seed_all(seed)
    backbone, dim = build_backbone("convnet", width=settings["width"])
    if arm.head is None:
        return backbone, None
    out = settings["output_dim"]
    # "d": every expert (and the STAR reference of a matched baseline) is d -> d -> d -> out, the paper's shape
    hidden = {"hidden_dim": dim} if settings["hidden"] == "d" else {}
    if arm.head == "equimod":
        head = SeparateHeads.equimod(dim, hidden_dim=4 * dim, output_dim=out)
    else:
        router = ({"router_init": arm.router_init, "router_init_scale": arm.router_init_scale}
                  if arm.router_init != "default" else {})
        head = build_head(arm.head, dim, output_dim=out, num_experts=arm.num_experts,
                          match_params=arm.match_params, **hidden, **router)
    torch.manual_seed(seed + PREDICTOR_SEED_OFFSET)
    adapter = EquiModAdapter(dim, head=head, param_dim=PARAM_DIM, lam=settings["lam"], predictor="star", cca_every=0,
                             temperature=settings["temperature"], eq_temperature=settings["temperature"])
    return backbone, adapter


def _run_dir(runs_dir: str | Path, arm: Arm, seed: int, settings: dict[str, Any]) -> Path:
    s = settings
    tag = f"w{s['width']}-o{s['output_dim']}-e{s['epochs']}" + (f"-spe{s['steps_per_epoch']}" if s["steps_per_epoch"] else "")
    tag += "" if s["hidden"] == "d" else f"-h{s['hidden']}"
    return Path(runs_dir) / f"{arm.name}-{tag}-s{seed}"


def _train_key(arm: Arm, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """What a cached run must match: the arm, seed and settings, and the parameter count of each module the
    current code builds from them (a change to how a head is built invalidates the cache instead of being
    reused silently)."""
    return {"arm": asdict(arm) | {"label": None}, "seed": seed, "settings": settings,
            "params": _model_params(arm, json.dumps(settings, sort_keys=True))}


@functools.cache
def _model_params(arm: Arm, settings_json: str) -> dict[str, int]:
    import torch

    from star_heads.sizing import count_parameters

    with torch.random.fork_rng():  # build_model seeds the global generators
        backbone, adapter = build_model(arm, 0, json.loads(settings_json))
    counts = {"backbone": count_parameters(backbone)}
    if adapter is not None:
        counts |= {"head": count_parameters(adapter.head), "predictor": count_parameters(adapter.predictor)}
    return counts


def train_run(arm: Arm, seed: int, settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Trains one arm × seed into ``run_dir`` (``initial.pt``, ``final.pt``, ``train.json``); reused when done."""
    import torch
    from common.datasets import pretrain_data, to_float
    from common.training import (
        SSLModel,
        build_augment,
        build_optimizer,
        evaluate,
        make_loader,
        original_view,
    )

    marker, key = run_dir / "train.json", _train_key(arm, seed, settings)
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            return done
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backbone, adapter = build_model(arm, seed, settings)
    torch.save({"backbone": backbone.state_dict(), "adapter": adapter and adapter.state_dict()}, run_dir / "initial.pt")
    info: dict[str, Any] = {"key": key, "metrics": []}
    if adapter is None:
        marker.write_text(json.dumps(info | {"time_s": 0.0}) + "\n")
        return info
    cfg = {"seed": seed, "batch_size": settings["batch_size"], "workers": 0, "lr": settings["lr"],
           "momentum": settings["momentum"], "weight_decay": settings["weight_decay"], "image_size": 32}
    data = pretrain_data("shapes", num_train=settings["num_train"], num_heldout=settings["num_heldout"], seed=seed)
    device = torch.device("cpu")
    model = SSLModel(backbone, adapter, joint=True)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings["epochs"])
    aug = build_augment(cfg, device)
    gen = torch.Generator().manual_seed(seed * 1000)
    loader, sampler = make_loader(data.train.images, cfg, 0, 1, device)
    steps = len(loader) if settings["steps_per_epoch"] is None else min(len(loader), settings["steps_per_epoch"])
    cache: dict[str, Any] = {}
    step = 0
    for epoch in range(settings["epochs"]):
        model.train()
        sampler.set_epoch(epoch)
        total = torch.zeros(())
        for i, batch in enumerate(loader):
            if i == steps:
                break
            x = to_float(batch)
            x1, p1 = aug(x, generator=gen)
            x2, p2 = aug(x, generator=gen)
            out = model(original_view(aug, x), x1, x2, p1, p2)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            total += out.loss.detach()
            step += 1
        sched.step()
        row = evaluate(model.backbone, model.adapter, data, aug, device, cache=cache)
        loss = float(total) / steps
        if not math.isfinite(loss):
            raise RuntimeError(f"{run_dir.name}: non-finite loss in epoch {epoch + 1}")
        info["metrics"].append({"epoch": epoch + 1, "step": step, "loss": loss,
                                **{k: row[k] for k in ("cca_mean", "cca_null", "knn_acc", "effective_experts",
                                                       "gate_mean")}})
    torch.save({"backbone": backbone.state_dict(), "adapter": adapter.state_dict()}, run_dir / "final.pt")
    info["time_s"] = time.perf_counter() - t0
    marker.write_text(json.dumps(info) + "\n")
    return info


def _load(arm: Arm, seed: int, settings: dict[str, Any], path: Path) -> tuple[Any, Any]:
    import torch

    backbone, adapter = build_model(arm, seed, settings)
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone.load_state_dict(state["backbone"])
    if adapter is not None:
        adapter.load_state_dict(state["adapter"])
    return backbone.eval(), adapter if adapter is None else adapter.eval()


def cca_stats(emb: dict[str, Any], keep: float = SVCCA_KEEP, top_k: int = TOP_K) -> dict[str, Any]:
    """Mean CCA, null, excess, SVCCA(keep) and the ``top_k`` largest canonical correlations of z_inv, z_eq."""
    from star_heads.metrics import CCAMeter, canonical_correlations, svcca

    x, y = emb["inv"].double(), emb["eq"].double()
    meter = CCAMeter(x.shape[1], y.shape[1])
    meter.update(x, y)
    res = meter.compute()
    rho = canonical_correlations(x, y)
    return {"cca_mean": float(res.mean), "cca_null": float(res.null_mean), "cca_excess": float(res.excess),
            "svcca": float(svcca(x, y, keep=keep)), "top": [float(v) for v in rho[:top_k]], "n": int(res.n)}


def _embed(backbone: Any, adapter: Any, images: Any, aug: Any) -> dict[str, Any]:
    import torch
    from common.training import extract_features

    h = extract_features(backbone, images, aug, torch.device("cpu"))
    with torch.no_grad():
        return adapter.embed(h)


def equivariance_stats(backbone: Any, adapter: Any, images: Any, pairs_per_image: int) -> dict[str, Any]:
    """``augmentation_r2`` of z_inv and z_eq on ``pairs_per_image`` pairs of views of each image (same draws for
    every model: a generator seeded with ``EQUIV_SEED``)."""
    import torch
    from common.datasets import to_float
    from common.training import build_augment

    from star_heads.metrics import augmentation_r2

    aug = build_augment({"image_size": 32}, torch.device("cpu"))
    gen = torch.Generator().manual_seed(EQUIV_SEED)
    x = to_float(images)
    za, zb, pa, pb, ids = [], [], [], [], []
    for _ in range(pairs_per_image):
        xa, p_a = aug(x, generator=gen)
        xb, p_b = aug(x, generator=gen)
        za.append(_embed(backbone, adapter, xa, None))
        zb.append(_embed(backbone, adapter, xb, None))
        pa.append(p_a)
        pb.append(p_b)
        ids.append(torch.arange(x.shape[0]))
    pa_, pb_, ids_ = torch.cat(pa), torch.cat(pb), torch.cat(ids)
    out = {}
    for task in ("inv", "eq"):
        res = augmentation_r2(torch.cat([z[task] for z in za]), torch.cat([z[task] for z in zb]), pa_, pb_, ids_)
        out[task] = {"groups": res.groups, "params": res.params, "n_fit": res.n_fit, "n_score": res.n_score}
    return out


def _transfer(backbone: Any, seed: int, kw: dict[str, Any]) -> dict[str, float]:
    import numpy as np
    import torch
    from common.datasets import transfer_tasks
    from common.probe import linear_probe
    from common.training import build_augment, extract_features

    aug = build_augment({"image_size": 32}, torch.device("cpu"))
    grid = [float(v) for v in np.logspace(-6, 5, kw["grid_points"])]
    acc = {}
    for name, task in transfer_tasks("shapes", tasks=kw["tasks"], num_train=kw["num_train"], num_test=kw["num_test"],
                                     seed=seed).items():
        tr = extract_features(backbone, task.train.images, aug, torch.device("cpu"))
        te = extract_features(backbone, task.test.images, aug, torch.device("cpu"))
        acc[name] = linear_probe(tr, task.train.labels, te, task.test.labels, grid=grid, num_classes=task.num_classes,
                                 seed=seed, max_iter=kw["max_iter"]).accuracy
    return acc


def measure_run(arm: Arm, seed: int, settings: dict[str, Any], measure: dict[str, Any], run_dir: Path,
                train_info: dict[str, Any]) -> dict[str, Any]:
    """CCA at step 0 and at the end, trajectory, equivariance readout and transfer of a trained run (cached)."""
    from common.datasets import pretrain_data

    done, key = run_dir / "quality.json", {"train": _train_key(arm, seed, settings), "measure": measure}
    if done.exists():
        row = json.loads(done.read_text())
        if row.get("key") == key:
            return {**row, "reused": True}
    t0 = time.perf_counter()
    row: dict[str, Any] = {"arm": arm.name, "seed": seed, "key": key, "train_time_s": train_info.get("time_s", 0.0)}
    final = run_dir / ("final.pt" if arm.head is not None else "initial.pt")
    backbone, adapter = _load(arm, seed, settings, final)
    if adapter is not None:
        from star_heads.sizing import count_parameters

        row["head_params"] = count_parameters(adapter.head)
        data = pretrain_data("shapes", num_train=settings["num_train"], num_heldout=settings["num_heldout"], seed=seed)
        held = data.heldout.images
        eq_images = held[: measure["equiv_images"]]
        for point, path in (("step0", run_dir / "initial.pt"), ("final", final)):
            b, a = (backbone, adapter) if point == "final" else _load(arm, seed, settings, path)
            row[point] = cca_stats(_embed(b, a, held, None), measure["svcca_keep"], measure["top_k"])
            row[point]["equivariance"] = equivariance_stats(b, a, eq_images, measure["equiv_pairs_per_image"])
        metrics = train_info["metrics"]
        row["trajectory"] = [{"step": 0, "cca_mean": row["step0"]["cca_mean"], "cca_null": row["step0"]["cca_null"]}]
        row["trajectory"] += [{k: m[k] for k in ("step", "cca_mean", "cca_null")} for m in metrics]
        row["knn_acc"] = metrics[-1]["knn_acc"]
        row["steps"] = metrics[-1]["step"]
        row["effective_experts"] = metrics[-1]["effective_experts"]
    row["acc"] = _transfer(backbone, seed, measure["transfer"])
    row["measure_time_s"] = time.perf_counter() - t0
    row["time_s"] = row["train_time_s"] + row["measure_time_s"]
    done.write_text(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("arm", "seed", "acc", "time_s")}
                     | {"final": {k: v for k, v in row.get("final", {}).items() if k != "equivariance"}}), flush=True)
    return {**row, "reused": False}


def run_one(arm: Arm, seed: int, runs_dir: str, settings: dict[str, Any], measure: dict[str, Any] | None,
            threads: int | None = None, train: bool = True) -> dict[str, Any] | None:
    """Trains (or reuses) one arm × seed and, unless ``measure`` is None, measures it; returns its row.

    With ``train=False`` a run that is not trained yet is skipped (None).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    run_dir = _run_dir(runs_dir, arm, seed, settings)
    marker = run_dir / "train.json"
    if not train and not (marker.exists() and json.loads(marker.read_text()).get("key") == _train_key(arm, seed, settings)):
        return None
    info = train_run(arm, seed, settings, run_dir)
    if measure is None:
        return None
    return {**measure_run(arm, seed, settings, measure, run_dir, info), **_routing_at_end(info)}


def _routing_at_end(info: dict[str, Any]) -> dict[str, Any]:
    """The last epoch's mean gate ``[T][N]`` of a routed head, and the share of each task's gate on the other
    task's half of the experts (the half the task-distinct start biases against; 0.5 for uniform gates)."""
    gates = info["metrics"][-1].get("gate_mean") if info.get("metrics") else None
    if gates is None or len(gates) != 2:
        return {}
    half = len(gates[0]) // 2
    return {"gate_mean": gates, "other_half_gate": [sum(gates[0][half:]), sum(gates[1][:half])]}


def _ms(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def paired(rows: list[dict[str, Any]], a: str, b: str, get: Any) -> dict[str, Any]:
    """Differences ``get(a-row) − get(b-row)`` over the seeds both arms have: values, mean, sd, sign count."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({s for (arm, s) in by if arm == a} & {s for (arm, s) in by if arm == b})
    diffs = [get(by[(a, s)]) - get(by[(b, s)]) for s in seeds]
    mean = statistics.fmean(diffs) if diffs else None
    sd = statistics.stdev(diffs) if len(diffs) > 1 else None
    return {"a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd,
            "positive": sum(d > 0 for d in diffs)}


def _r2(row: dict[str, Any], task: str, group: str | None = None, point: str = "final") -> float:
    """Held-out R² of ``task``'s embedding for ``group`` (None: the mean over the groups)."""
    groups = row[point]["equivariance"][task]["groups"]
    return groups[group] if group is not None else statistics.fmean(groups.values())


CCA_METRICS = {
    "cca_mean": lambda r: r["final"]["cca_mean"],
    "cca_excess": lambda r: r["final"]["cca_excess"],
    "svcca": lambda r: r["final"]["svcca"],
    "rho1": lambda r: r["final"]["top"][0],
    "r2_inv": lambda r: _r2(r, "inv"),
    "r2_eq": lambda r: _r2(r, "eq"),
}


def summarize(rows: list[dict[str, Any]], arms: list[Arm], comparisons: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Per-arm table, equivariance table, gains over the untrained backbone, judged tasks and paired comparisons."""
    names = [a.name for a in arms if any(r["arm"] == a.name for r in rows)]
    trained = [n for n in names if n != "random"]
    tasks = [t for t in TASKS if all(t in r["acc"] for r in rows)]
    per_arm, equiv, routing = [], [], []
    for a in arms:
        rs = [r for r in rows if r["arm"] == a.name]
        if not rs:
            continue
        joint = [r for r in rs if r.get("final")]
        entry = {"arm": a.name, "label": a.label, "seeds": len(rs), "head_params": rs[0].get("head_params"),
                 **{t: _ms([r["acc"][t] for r in rs], 100, 1) for t in tasks},
                 "knn": _ms([r.get("knn_acc") for r in rs], 100, 1), "seed_list": ", ".join(str(r["seed"]) for r in rs)}
        for w in ("step0", "final"):
            entry |= {f"{w}_{k}": _ms([r[w][k] for r in joint]) for k in ("cca_mean", "cca_null", "cca_excess", "svcca")}
            entry[f"{w}_top"] = " / ".join(_ms([r[w]["top"][i] for r in joint], digits=2).split(" ± ")[0]
                                           for i in range(TOP_K)) if joint else "–"
        per_arm.append(entry)
        if joint:
            groups = list(joint[0]["final"]["equivariance"]["inv"]["groups"])
            equiv.append({"arm": a.name, "label": a.label, **{
                f"{w}_{t}_{g}": _ms([_r2(r, t, g, w) for r in joint], digits=2)
                for w in ("step0", "final") for t in ("inv", "eq") for g in groups}})
        routed = [r for r in rs if r.get("other_half_gate")]
        if routed:
            routing.append({"arm": a.name, "label": a.label,
                             **{t: _ms([r["other_half_gate"][i] for r in routed]) + f" (max {max(r['other_half_gate'][i] for r in routed):.3f})"
                                for i, t in enumerate(("inv", "eq"))}})
    gains, judged = [], []
    for t in tasks:
        per = {n: paired(rows, n, "random", lambda r, t=t: r["acc"][t]) for n in trained} if "random" in names else {}
        ok = bool(per) and all(g["sd"] is not None and g["mean"] > 2 * g["sd"] for g in per.values())
        if ok:
            judged.append(t)
        gains.append({"task": t, "judged": ok, **per})
    cmps = []
    for a, b in comparisons:
        if a not in names or b not in names:
            continue
        metrics = {**CCA_METRICS, **{t: (lambda r, t=t: r["acc"][t]) for t in tasks}}
        cmps.append({"a": a, "b": b, **{m: paired(rows, a, b, f) for m, f in metrics.items()}})
    return {"per_arm": per_arm, "equivariance": equiv, "routing": routing, "gains": gains, "judged_tasks": judged, "comparisons": cmps,
            "tasks": tasks}


def _pm(p: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    if p["mean"] is None:
        return "–"
    sd = "" if p["sd"] is None else f" ± {p['sd'] * scale:.{digits}f}"
    return f"{p['mean'] * scale:+.{digits}f}{sd} ({p['positive']}/{len(p['diffs'])})"


def render(summary: dict[str, Any], payload: dict[str, Any]) -> str:
    """The markdown of one grid's section."""
    s, m = payload["settings"], payload["measure"]
    steps = s["epochs"] * (s["steps_per_epoch"] or s["num_train"] // s["batch_size"])
    head = (
        f"{machine_line(payload['machine'])} {payload['jobs']} run(s) at a time, one torch thread each when more "
        f"than one; {payload['num_runs']} runs took {payload['run_time_s'] / 60:.0f} min in all (sum over runs of "
        f"training + measurement, as first run); this invocation {payload['wall_time_s'] / 60:.1f} min of wall time "
        f"({payload['reused_runs']} run(s) reused). `shapes` (plain background), ConvNet width {s['width']} "
        f"(d = {8 * s['width']}) → **{s['output_dim']}-D embeddings**, "
        + ("experts d → d → d → out (the paper's shape; separate heads matched to them)"
           if s.get("hidden", "d") == "d" else "`build_head`'s default drop-in sizing (separate heads matched to it)")
        + f", EquiMod-style objective, {s['epochs']} epochs × "
        f"{steps // s['epochs']} steps of batch {s['batch_size']} = **{steps} SGD steps** on {s['num_train']} images, "
        f"SGD {s['lr']} cosine; seeds {payload['seeds']}. CCA on {s['num_heldout']} held-out images; equivariance "
        f"readout on {m['equiv_pairs_per_image']} pairs of views of each of {m['equiv_images']} held-out images "
        f"(fit on half of the images, scored on the other half); probe: {m['transfer']['num_train']} train "
        f"(20 % val) / {m['transfer']['num_test']} test images, {m['transfer']['grid_points']}-point L2 grid. "
        f"Mean ± sd over seeds."
    )
    tasks = summary["tasks"]
    cols = {"label": "head", "seed_list": "seeds", "head_params": "head params", "step0_cca_mean": "CCA step 0",
            "final_cca_mean": "CCA ↓", "final_cca_null": "null", "final_cca_excess": "excess ↓",
            "final_svcca": "SVCCA ↓", "step0_top": f"top-{TOP_K} ρ step 0", "final_top": f"top-{TOP_K} ρ",
            **{k: f"{k} %" for k in tasks}, "knn": "kNN %"}
    groups = [k.split("_", 3)[-1] for k in (summary["equivariance"][0] if summary["equivariance"] else {})
              if k.startswith("final_inv_")]
    eq_cols = {"label": "head", **{f"final_inv_{g}": f"inv {g}" for g in groups},
               **{f"final_eq_{g}": f"eq {g}" for g in groups}}
    eq0_cols = {"label": "head", **{f"step0_inv_{g}": f"inv {g}" for g in groups},
                **{f"step0_eq_{g}": f"eq {g}" for g in groups}}
    trained = [a["arm"] for a in summary["per_arm"] if a["arm"] != "random"]
    gain_rows = [{"task": g["task"] + (" (judged)" if g["judged"] else " (not judged)"),
                  **{n: _pm(g[n], 100, 1) for n in trained if n in g}} for g in summary["gains"]]
    cmp_rows = [{"pair": f"{c['a']} − {c['b']}", **{k: _pm(c[k]) for k in CCA_METRICS},
                 **{t: _pm(c[t], 100, 1) for t in tasks}} for c in summary["comparisons"]]
    judged = ", ".join(summary["judged_tasks"]) or "none"
    eq_text = ("Equivariance readout at the end (`augmentation_r2`: held-out R² of a ridge readout of the relative "
               "augmentation parameters from z_b − z_a, per group; 1 = encoded linearly, 0 = not at all):")
    parts = [head, table(summary["per_arm"], cols), eq_text, table(summary["equivariance"], eq_cols),
             "The same at step 0:", table(summary["equivariance"], eq0_cols)]
    if summary.get("routing"):
        parts += ["Routing at the end: share of each task's mean gate on the other task's half of the experts (the "
                  "half the task-distinct start biases against; 0.5 = no preference), mean ± sd and max over seeds:",
                  table(summary["routing"], {"label": "head", "inv": "inv on the eq half", "eq": "eq on the inv half"})]
    if "random" in [a["arm"] for a in summary["per_arm"]]:
        gain_text = ("Gain of each pretrained arm over the untrained backbone of the same seed (accuracy points, "
                     "mean ± sd; in brackets the seeds where it is positive). A task is judged when every arm's gain "
                     "exceeds two sd.")
        parts += [gain_text, table(gain_rows, {"task": "task", **{n: n for n in trained}})]
    cmp_text = (f"Paired differences (first − second, same seed; judged tasks: {judged}). CCA columns: lower = less "
                "redundant, so a negative value favours the first arm; R² columns: mean over the groups.")
    parts += [cmp_text,
              table(cmp_rows, {"pair": "pair", "cca_mean": "Δ CCA", "cca_excess": "Δ excess", "svcca": "Δ SVCCA",
                               "rho1": "Δ ρ₁", "r2_inv": "Δ R² inv", "r2_eq": "Δ R² eq",
                               **{t: f"Δ {t} (points)" for t in tasks}})]
    return "\n\n".join(parts)


def plot(rows: list[dict[str, Any]], arms: list[Arm], path: Path) -> Path | None:
    """CCA(inv, eq) − null over training steps, mean over seeds with a ± sd band, one line per joint arm."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for a in arms:
        rs = [r for r in rows if r["arm"] == a.name and r.get("trajectory")]
        if not rs:
            continue
        steps = [p["step"] for p in rs[0]["trajectory"]]
        vals = [[p["cca_mean"] - p["cca_null"] for p in r["trajectory"]] for r in rs]
        mean = [statistics.fmean(v) for v in zip(*vals)]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*vals)]
        ax.plot(steps, mean, marker=".", markersize=3, label=f"{a.label} ({len(rs)} seeds)")
        ax.fill_between(steps, [m - e for m, e in zip(mean, sd)], [m + e for m, e in zip(mean, sd)], alpha=0.15)
    ax.set_xlabel("SGD step")
    ax.set_ylabel("mean CCA(inv, eq) − null")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="narrow", help="which experiment (see the module doc)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 4 arms × 1 seed × 4 steps, width 4")
    p.add_argument("--out-dir", type=Path, default=None, help="where JSON / markdown / plot go (default docs/; "
                   "--quick: a new temporary folder)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="run directories (default runs/quality; --quick: inside the output folder)")
    p.add_argument("--seeds", type=int, default=3, help="seeds FIRST_SEED .. FIRST_SEED + SEEDS - 1")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=None, help="only these arms of the grid")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    p.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, measure and write nothing")
    p.add_argument("--no-train", action="store_true",
                   help="measure and report only the runs already trained (the others are left out of the tables)")
    return p


def _execute(jobs: list[tuple[Arm, int]], runs_dir: Path, settings: dict, measure: dict | None, n_jobs: int,
             train: bool = True) -> list:
    if n_jobs <= 1:  # one torch thread per run in every case (the protocol's budget)
        return [run_one(a, s, str(runs_dir), settings, measure, 1, train) for a, s in jobs]
    import multiprocessing as mp

    rows, errors = [], []
    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(run_one, a, s, str(runs_dir), settings, measure, 1, train) for a, s in jobs]
        for (a, s), fut in zip(jobs, futures):  # one failing run must not cancel the others
            try:
                rows.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - reported below, after every run has finished
                errors.append(f"{a.name}-s{s}: {type(exc).__name__}: {exc}")
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed (finished runs are saved and reused): {'; '.join(errors)}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = _parser().parse_args(argv)
    grid = QUICK_GRID if args.quick else GRIDS[args.grid]
    measure = QUICK_MEASURE if args.quick else MEASURE
    arms = [a for a in grid.arms if args.arms is None or a.name in args.arms]
    out = output_dir(args.out_dir, args.quick)
    seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
    runs_dir = args.runs_dir or (out / "runs" if args.quick else ROOT / "runs" / "quality")
    machine = machine_info()
    # longest runs first, so that two workers finish together
    jobs = sorted(((a, s) for s in seeds for a in arms), key=lambda j: j[0].head is None)
    t0 = time.perf_counter()
    rows = _execute(jobs, runs_dir, grid.settings, None if args.train_only else measure, args.jobs, not args.no_train)
    wall = time.perf_counter() - t0
    if args.train_only:
        print(f"trained {len(jobs)} run(s) in {wall / 60:.1f} min", flush=True)
        return None
    rows = sorted((r for r in rows if r is not None), key=lambda r: (r["seed"], [a.name for a in arms].index(r["arm"])))
    seeds = sorted({r["seed"] for r in rows})
    summary = summarize(rows, arms, grid.comparisons)
    payload = {"benchmark": "quality", "grid": grid.name, "title": grid.title, "quick": args.quick,
               "machine": machine, "settings": grid.settings, "measure": measure, "seeds": seeds, "jobs": args.jobs,
               "wall_time_s": wall, "reused_runs": sum(r["reused"] for r in rows), "num_runs": len(rows),
               "run_time_s": sum(r["time_s"] for r in rows), "arms": [asdict(a) for a in arms], "runs": rows,
               "summary": summary}
    write_json(out / "benchmarks" / f"quality_{grid.name}.json", payload)
    plot(rows, arms, out / "images" / f"quality_{grid.name}_cca.png")
    body = render(summary, payload)
    write_section(out / "results.md", f"quality-{grid.name}", body, title="Results")
    print(body)
    return payload


if __name__ == "__main__":
    main()
