"""Quality protocol on ``shapes``: STAR N = 8 and 16 against parameter-matched separate heads, EquiMod's head shape
and the invariant-only baseline, paired by seed, with the untrained backbone as the floor.

    python -m benchmarks.quality [--jobs 2] [--seeds 3] [--quick] [--out-dir DIR] [--runs-dir DIR]

Every arm is trained by ``examples/pretrain.py`` (imported, same code as a user runs) with the EquiMod-style
objective (invariant NT-Xent + equivariant NT-Xent through STAR's residual predictor; the invariant-only arm
trains the invariant term alone) on the same data, budget and seeds; only the projection head differs:

=============  ======================================================================================
``random``     no pretraining: the seeded initial backbone of each seed (the floor)
``single``     invariant-only (SimCLR head, one MLP of STAR's expert shape)
``sep-pm8``    separate inv / eq MLPs, hidden width chosen so the head has STAR-8's parameters (±5 %)
``star-8``     STAR, 8 experts (expert hidden width = backbone width d, as in the paper)
``sep-pm16``   separate MLPs matched to STAR-16
``equimod``    EquiMod's head shape (``SeparateHeads.equimod``: d → 4d → 4d → 128, final BN without
               affine) — the paper's ResNet-18 ratio 2048 / 512, about STAR-16's size as in the paper
``star-16``    STAR, 16 experts
=============  ======================================================================================

CCA protocol (the paper does not publish its own): the invariant and equivariant embeddings ``adapter.embed``
(128-D each, eval mode, no augmentation) of a fixed held-out set of ``num_heldout`` (4096) images that no run
trains on; float64; reported as the mean canonical correlation over all components, the shuffled-pairs null
baseline for the same n and ranks, their difference (excess over null) and SVCCA keeping 99 % of each view's
variance. At step 0 (the seeded initial model, rebuilt exactly as pretrain.py builds it) and at the end; the
mean CCA and its null after every epoch come from the run's own metrics (same held-out set).

Transfer: ``examples/transfer.py``'s linear probe of the frozen backbone on shape, colour, rotation and digits.
A task is *judged* only when every pretrained arm beats the untrained backbone by more than two standard
deviations of the paired (same-seed) gain; head comparisons are paired differences over seeds (mean ± sd).

A full run writes ``docs/benchmarks/quality.json``, the ``quality`` section of ``docs/results.md`` and
``docs/images/quality_cca.png``; ``--quick`` (two arms, one seed, a few steps) writes them under a temporary
folder. Finished runs in ``--runs-dir`` are reused when their settings match, so an interrupted grid continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import machine_info, machine_line, output_dir, table, write_json, write_section

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ARMS", "SETTINGS", "Arm", "arms_for", "cca_stats", "initial_model", "main", "paired", "run_one", "summarize"]


@dataclass(frozen=True)
class Arm:
    """One head of the grid: its name, its table label and its pretrain.py options (None: untrained)."""

    name: str
    label: str
    args: tuple[str, ...] | None


def arms_for(width: int) -> list[Arm]:
    """The arms of the protocol for a ConvNet of first-stage ``width`` (features d = 8 · width)."""
    d = 8 * width
    return [
        Arm("random", "untrained backbone (floor)", None),
        Arm("single", "invariant only (SimCLR head)", ("--head", "single")),
        Arm("sep-pm8", "separate, matched to STAR-8", ("--head", "separate", "--match-params", "--num-experts", "8")),
        Arm("star-8", "STAR N=8", ("--head", "star", "--num-experts", "8")),
        Arm("sep-pm16", "separate, matched to STAR-16",
            ("--head", "separate", "--match-params", "--num-experts", "16")),
        Arm("equimod", f"EquiMod heads (hidden {4 * d})", ("--head", "equimod", "--hidden-dim", str(4 * d))),
        Arm("star-16", "STAR N=16", ("--head", "star", "--num-experts", "16")),
    ]


# 16 epochs × 64 steps of batch 64 = 1024 SGD steps on 4096 images; CCA on 4096 held-out images. ConvNet width 8
# (d = 64): with width 16 the 18 training runs take over two hours on a shared 2-core CPU.
SETTINGS = {"epochs": 16, "batch_size": 64, "num_train": 4096, "num_heldout": 4096, "width": 8}
TRANSFER = {"grid_points": 12, "num_train": 2000, "num_test": 1000, "max_iter": 200}
ARMS = arms_for(SETTINGS["width"])
QUICK = {"epochs": 1, "batch_size": 16, "num_train": 64, "num_heldout": 512, "width": 4, "steps_per_epoch": 2}
QUICK_TRANSFER = {"grid_points": 2, "num_train": 60, "num_test": 40, "max_iter": 20, "tasks": ["shape", "color"]}
QUICK_ARMS = ("random", "sep-pm8", "star-8")
TASKS = ("shape", "color", "rotation", "digits")
COMPARISONS = (("star-8", "sep-pm8"), ("star-16", "sep-pm16"), ("star-16", "equimod"), ("star-8", "single"),
               ("star-16", "single"), ("star-16", "star-8"))
SVCCA_KEEP = 0.99


def _examples() -> tuple[Any, Any]:
    """pretrain.py and transfer.py (the examples are scripts, not a package: their folder goes on sys.path)."""
    path = str(ROOT / "examples")
    if path not in sys.path:
        sys.path.insert(0, path)
    import pretrain
    import transfer

    return pretrain, transfer


def cca_stats(backbone: Any, adapter: Any, images: Any, aug: Any) -> dict[str, float]:
    """Mean CCA, null, excess and SVCCA(0.99) of ``adapter.embed`` on un-augmented ``images``, eval mode, float64."""
    import torch
    from common.training import extract_features

    from star_heads.metrics import CCAMeter, svcca

    h = extract_features(backbone, images, aug, torch.device("cpu"))
    was = adapter.training
    adapter.eval()
    try:
        with torch.no_grad():
            emb = adapter.embed(h)
    finally:
        adapter.train(was)
    x, y = emb["inv"].double(), emb["eq"].double()
    meter = CCAMeter(x.shape[1], y.shape[1])
    meter.update(x, y)
    res = meter.compute()
    return {"cca_mean": float(res.mean), "cca_null": float(res.null_mean), "cca_excess": float(res.excess),
            "svcca": float(svcca(x, y, keep=SVCCA_KEEP)), "n": int(res.n)}


def initial_model(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """The backbone and adapter that ``pretrain.train`` starts from for ``cfg`` (same seeding, same build order)."""
    import random

    import numpy as np
    import torch
    from common.backbones import build_backbone
    from common.training import build_adapter

    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    backbone, dim = build_backbone(cfg["backbone"], width=cfg["width"], cifar_stem=cfg["cifar_stem"])
    return backbone, build_adapter(cfg, dim)


def _final_model(run_dir: Path, cfg: dict[str, Any]) -> tuple[Any, Any]:
    from common.runs import RunDir

    backbone, adapter = initial_model(cfg)
    ckpt = RunDir(run_dir).load_checkpoint()
    backbone.load_state_dict(ckpt["backbone"])
    adapter.load_state_dict(ckpt["adapter"])
    return backbone, adapter


def _head_params(cfg: dict[str, Any]) -> int:
    from common.training import build_head_module

    from star_heads.sizing import count_parameters

    return count_parameters(build_head_module(cfg, 8 * cfg["width"]))


def _trained(run_dir: Path, options: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds a finished pretraining run with these options (its probe may be missing)."""
    from common.runs import RunDir

    run = RunDir(run_dir)
    if not (run.config_path.exists() and run.checkpoint_path.exists()):
        return False
    cfg, rows = run.read_config(), run.read_metrics()
    keys = [k for k in options if k not in ("out", "overwrite", "resume", "progress", "device", "threads", "workers",
                                            "stop_after", "image_size", "backbone", "invariant_only")]
    return bool(rows) and rows[-1]["epoch"] == options["epochs"] and all(cfg.get(k) == options[k] for k in keys)


def run_one(arm: Arm, seed: int, runs_dir: str, settings: dict, transfer_kw: dict,
            threads: int | None = None) -> dict[str, Any]:
    """Trains (unless ``arm.args`` is None), measures and probes one arm × seed; returns its row.

    A run directory that already holds ``quality.json`` made with the same settings is reused.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    pretrain, transfer = _examples()
    from common.backbones import write_untrained_run
    from common.datasets import pretrain_data
    from common.runs import RunDir
    from common.training import build_augment

    run_dir = Path(runs_dir) / f"{arm.name}-s{seed}"
    done = run_dir / "quality.json"
    key = {"settings": settings, "transfer": transfer_kw, "args": list(arm.args or ())}
    if done.exists():
        row = json.loads(done.read_text())
        if row.get("key") == key:
            return {**row, "reused": True}
    t0 = time.perf_counter()
    cmd = ["--dataset", "shapes", "--method", "equimod", "--seed", str(seed), "--out", str(run_dir), "--overwrite",
           "--tag", "quality", "--device", "cpu", "--no-progress", *(arm.args or ("--head", "single"))]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    row: dict[str, Any] = {"arm": arm.name, "seed": seed, "key": key}
    if arm.args is None:
        cfg = {k: v for k, v in vars(pretrain.build_parser().parse_args(cmd)).items()
               if k not in ("out", "resume", "overwrite")}
        cfg.update(backbone="convnet", image_size=32, cifar_stem=False)
        write_untrained_run(run_dir, cfg)
    else:
        if not _trained(run_dir, vars(pretrain.build_parser().parse_args(cmd))):
            pretrain.main(cmd)
        cfg = RunDir(run_dir).read_config()
        metrics = RunDir(run_dir).read_metrics()
        row["head_params"] = _head_params(cfg)
        if not cfg["invariant_only"]:  # CCA(inv, eq) needs both embeddings
            data = pretrain_data("shapes", num_train=cfg["num_train"], num_heldout=cfg["num_heldout"], seed=seed)
            aug = build_augment(cfg, torch.device("cpu"))
            row["step0"] = cca_stats(*initial_model(cfg), data.heldout.images, aug)
            row["final"] = cca_stats(*_final_model(run_dir, cfg), data.heldout.images, aug)
            row["trajectory"] = [{"step": 0, "cca_mean": row["step0"]["cca_mean"], "cca_null": row["step0"]["cca_null"]}]
            row["trajectory"] += [{"step": m["step"], "cca_mean": m["cca_mean"], "cca_null": m["cca_null"]}
                                  for m in metrics if m.get("cca_mean") is not None]
        row["knn_acc"] = metrics[-1].get("knn_acc")
        row["steps"] = metrics[-1]["step"]
        row["effective_experts"] = metrics[-1].get("effective_experts")
    res = transfer.run_transfer(run_dir, **transfer_kw)
    row["acc"] = {t: v["accuracy"] for t, v in res["tasks"].items()}
    row["time_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("arm", "seed", "acc", "time_s")} | {"final": row.get("final")}), flush=True)
    return {**row, "reused": False}


def _ms(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
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


def summarize(rows: list[dict[str, Any]], arms: list[Arm]) -> dict[str, Any]:
    """Per-arm table, gains over the untrained backbone, judged tasks and paired head comparisons."""
    names = [a.name for a in arms if any(r["arm"] == a.name for r in rows)]
    trained = [n for n in names if n != "random"]
    tasks = [t for t in TASKS if all(t in r["acc"] for r in rows)]
    per_arm = []
    for a in arms:
        rs = [r for r in rows if r["arm"] == a.name]
        if not rs:
            continue
        joint = [r for r in rs if r.get("final")]
        per_arm.append({
            "arm": a.name, "label": a.label, "seeds": len(rs), "head_params": rs[0].get("head_params"),
            **{f"{w}_{k}": _ms([r[w][k] for r in joint]) for w in ("step0", "final")
               for k in ("cca_mean", "cca_null", "cca_excess", "svcca")},
            **{t: _ms([r["acc"][t] for r in rs], 100, 1) for t in tasks},
            "knn": _ms([r.get("knn_acc") for r in rs], 100, 1),
        })
    gains, judged = [], []
    for t in tasks:
        per = {n: paired(rows, n, "random", lambda r, t=t: r["acc"][t]) for n in trained}
        ok = bool(per) and all(g["sd"] is not None and g["mean"] > 2 * g["sd"] for g in per.values())
        if ok:
            judged.append(t)
        gains.append({"task": t, "judged": ok, **{n: g for n, g in per.items()}})
    comparisons = []
    for a, b in COMPARISONS:
        if a not in names or b not in names:
            continue
        joint = all(r.get("final") for r in rows if r["arm"] in (a, b))
        metrics = {"cca_excess": lambda r: r["final"]["cca_excess"], "svcca": lambda r: r["final"]["svcca"]} if joint else {}
        metrics |= {t: (lambda r, t=t: r["acc"][t]) for t in judged}
        comparisons.append({"a": a, "b": b, **{m: paired(rows, a, b, f) for m, f in metrics.items()}})
    return {"per_arm": per_arm, "gains": gains, "judged_tasks": judged, "comparisons": comparisons, "tasks": tasks}


def _pm(p: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    if p["mean"] is None:
        return "–"
    sd = "" if p["sd"] is None else f" ± {p['sd'] * scale:.{digits}f}"
    return f"{p['mean'] * scale:+.{digits}f}{sd} ({p['positive']}/{len(p['diffs'])})"


def render(summary: dict[str, Any], payload: dict[str, Any]) -> str:
    """The markdown of the ``quality`` section."""
    s, t = payload["settings"], payload["transfer"]
    steps = s["epochs"] * (s.get("steps_per_epoch") or s["num_train"] // s["batch_size"])
    head = (
        f"{machine_line(payload['machine'])} {payload['jobs']} run(s) at a time, one torch thread each when more "
        f"than one; {payload['num_runs']} runs took {payload['run_time_s'] / 60:.0f} min of wall time in all (sum over "
        f"runs, training + CCA + probes); this invocation {payload['wall_time_s'] / 60:.1f} min "
        f"({payload['reused_runs']} run(s) reused from an earlier invocation). "
        f"`shapes` (plain background), ConvNet width {s['width']} (d = {8 * s['width']}), EquiMod-style objective, "
        f"{s['epochs']} epochs × {steps // s['epochs']} steps of batch {s['batch_size']} = **{steps} SGD steps** on "
        f"{s['num_train']} images, SGD 0.03 cosine; seeds {payload['seeds']}. CCA on {s['num_heldout']} held-out "
        f"images; probe: {t['num_train']} train (20 % val) / {t['num_test']} test images, "
        f"{t['grid_points']}-point L2 grid. Mean ± sd over seeds."
    )
    cols = {"label": "head", "head_params": "head params", "step0_cca_mean": "CCA step 0",
            "final_cca_mean": "CCA ↓", "final_cca_null": "null", "final_cca_excess": "excess ↓",
            "final_svcca": "SVCCA 0.99 ↓", **{k: f"{k} %" for k in summary["tasks"]}, "knn": "kNN %"}
    gain_rows = []
    for g in summary["gains"]:
        gain_rows.append({"task": g["task"] + (" (judged)" if g["judged"] else " (not judged)"),
                          **{n: _pm(g[n], 100, 1) for n in g if isinstance(g[n], dict)}})
    trained = [a["arm"] for a in summary["per_arm"] if a["arm"] != "random"]
    cmp_rows = []
    for c in summary["comparisons"]:
        cca = {k: _pm(c[k]) if k in c else "–" for k in ("cca_excess", "svcca")}
        cmp_rows.append({"pair": f"{c['a']} − {c['b']}", **cca, **{t: _pm(c[t], 100, 1) for t in summary["judged_tasks"]}})
    judged = ", ".join(summary["judged_tasks"]) or "none"
    return "\n\n".join([
        head,
        table(summary["per_arm"], cols),
        "Gain of each pretrained arm over the untrained backbone of the same seed (accuracy points, mean ± sd; "
        "in brackets the seeds where it is positive). A task is judged when every arm's gain exceeds two sd.",
        table(gain_rows, {"task": "task", **{n: n for n in trained}}),
        f"Paired differences (first − second, same seed; judged tasks: {judged}). CCA columns: lower = less "
        "redundant, so a negative value favours the first arm.",
        table(cmp_rows, {"pair": "pair", "cca_excess": "Δ excess", "svcca": "Δ SVCCA",
                         **{t: f"Δ {t} (points)" for t in summary["judged_tasks"]}}),
    ])


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
        ax.plot(steps, mean, marker=".", label=a.label)
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
    p.add_argument("--quick", action="store_true", help="untrained, sep-pm8, STAR-8 × 1 seed × 2 steps (smoke test)")
    p.add_argument("--out-dir", type=Path, default=None, help="where JSON / markdown / plot go (default docs/; "
                   "--quick: a new temporary folder)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="run directories (default runs/quality; --quick: inside the output folder)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each when > 1")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    out = output_dir(args.out_dir, args.quick)
    settings, tkw = (QUICK, QUICK_TRANSFER) if args.quick else (SETTINGS, TRANSFER)
    arms = arms_for(settings["width"])
    if args.quick:
        arms = [a for a in arms if a.name in QUICK_ARMS]
    seeds = list(range(1 if args.quick else args.seeds))
    runs_dir = args.runs_dir or (out / "runs" if args.quick else ROOT / "runs" / "quality")
    machine = machine_info()
    jobs = [(a, s) for s in seeds for a in arms]
    threads = 1 if args.jobs > 1 else None
    t0 = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(run_one, a, s, str(runs_dir), settings, tkw, threads) for a, s in jobs]
            rows, errors = [], []
            for (a, s), fut in zip(jobs, futures):  # one failing run must not cancel the others
                try:
                    rows.append(fut.result())
                except Exception as exc:  # noqa: BLE001 - reported below, after every run has finished
                    errors.append(f"{a.name}-s{s}: {type(exc).__name__}: {exc}")
        if errors:
            raise RuntimeError(f"{len(errors)} run(s) failed (finished runs are saved and reused): {'; '.join(errors)}")
    else:
        rows = [run_one(a, s, str(runs_dir), settings, tkw) for a, s in jobs]
    wall = time.perf_counter() - t0
    summary = summarize(rows, arms)
    payload = {"benchmark": "quality", "quick": args.quick, "machine": machine, "settings": settings,
               "transfer": tkw, "seeds": seeds, "jobs": args.jobs, "wall_time_s": wall,
               "reused_runs": sum(r["reused"] for r in rows), "num_runs": len(rows),
               "run_time_s": sum(r["time_s"] for r in rows), "arms": [vars(a) for a in arms],
               "svcca_keep": SVCCA_KEEP, "runs": rows, "summary": summary}
    write_json(out / "benchmarks" / "quality.json", payload)
    plot(rows, arms, out / "images" / "quality_cca.png")
    body = render(summary, payload)
    write_section(out / "results.md", "quality", body, title="Results")
    print(body)
    return payload


if __name__ == "__main__":
    main()
