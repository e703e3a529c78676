#!/usr/bin/env python
"""Quality benchmark: which head gives less redundant embeddings and better transfer, on ``shapes``.

Runs the examples' own code (``examples/pretrain.py`` and ``examples/transfer.py``, imported) for
head ∈ {single, separate, shared, star} and N ∈ {2, 4, 8, 16} experts for STAR, 3 seeds each, with
the EquiMod-style objective (``--head single`` = the invariant-only SimCLR baseline), then probes
every backbone with the linear-probe protocol; an untrained backbone of each seed ("random init")
is probed too, as the floor that pretraining must beat. Writes docs/benchmarks/quality.json and the
``quality`` section of docs/results.md:

* CCA(inv, eq): mean canonical correlation between the invariant and equivariant embeddings of a
  fixed held-out set (1024 un-augmented images, eval mode, all 128 components, no ridge) and the
  shuffled-pairs null baseline for the same n and ranks (what independent embeddings would give);
* linear-probe test accuracy per transfer task (shape, color, rotation, digits) and kNN accuracy;
* gate specialisation of STAR heads: total-variation distance between the two tasks' mean gate
  distributions (0 = both tasks use the same experts, 1 = disjoint experts) and the number of
  experts that are mainly invariant / mainly equivariant / shared (share of a task > 2/3).

The CPU budget is small (2 shared cores): a few epochs on 2048 images with a width-16 ConvNet (see
SETTINGS). Usage::

    python benchmarks/quality.py --jobs 2        # full grid (21 runs + 3 random inits), ~15 min
    python benchmarks/quality.py --quick         # 3 configs × 1 seed × 2 steps: a smoke test
    python benchmarks/quality.py --jobs 2        # two runs at a time, one thread each
Finished runs are reused (their run directory holds results.json), so an interrupted grid continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT)]

from benchmarks._common import machine_info, write_json, write_section  # noqa: E402
from benchmarks._common import table as markdown_table  # noqa: E402

__all__ = ["CONFIGS", "SETTINGS", "main", "run_one", "summarize"]

CONFIGS: list[tuple[str, int | None]] = [("random", None), ("single", None), ("separate", None), ("shared", None),
                                         ("star", 2), ("star", 4), ("star", 8), ("star", 16)]
SEEDS = (0, 1, 2)
SETTINGS = {"epochs": 4, "batch_size": 128, "num_train": 2048, "num_heldout": 1024, "width": 16}
TRANSFER = {"grid_points": 12, "num_train": 1000, "num_test": 1000, "max_iter": 200}
QUICK_CONFIGS: list[tuple[str, int | None]] = [("random", None), ("separate", None), ("star", 2)]
QUICK = {"epochs": 1, "batch_size": 16, "num_train": 32, "num_heldout": 160, "width": 4, "steps_per_epoch": 2}
QUICK_TRANSFER = {"grid_points": 2, "num_train": 60, "num_test": 40, "max_iter": 20, "tasks": ["shape", "color"]}
TASKS = ("shape", "color", "rotation", "digits")


def _name(head: str, n: int | None, seed: int) -> str:
    return f"{head}{'' if n is None else f'-{n}'}-s{seed}"


def gate_specialisation(gate_mean: list[list[float]] | None) -> dict[str, Any]:
    """TV distance between the tasks' mean gates, and expert roles (inv-mainly / eq-mainly / shared)."""
    if not gate_mean or len(gate_mean) != 2:
        return {"gate_tv": None, "experts_inv": None, "experts_eq": None, "experts_shared": None}
    inv, eq = gate_mean
    roles = []
    for a, b in zip(inv, eq):
        share = a / (a + b) if a + b > 0 else 0.5
        roles.append("inv" if share > 2 / 3 else "eq" if share < 1 / 3 else "shared")
    return {"gate_tv": 0.5 * sum(abs(a - b) for a, b in zip(inv, eq)),
            "experts_inv": roles.count("inv"), "experts_eq": roles.count("eq"), "experts_shared": roles.count("shared")}


def _random_init_run(run_dir: Path, seed: int, settings: dict) -> None:
    """A run directory holding an untrained backbone (seeded like a pretraining run): the no-pretraining baseline."""
    import torch

    import pretrain
    from common.backbones import build_backbone
    from common.runs import RunDir

    cfg = vars(pretrain.build_parser().parse_args(["--out", str(run_dir), "--seed", str(seed)]))
    cfg.update(settings, head="random", backbone="convnet", image_size=32, invariant_only=True, tag="quality")
    torch.manual_seed(seed)
    backbone, dim = build_backbone("convnet", width=settings["width"])
    run = RunDir.create(run_dir, overwrite=True)
    run.write_config({k: v for k, v in cfg.items() if k not in ("out", "resume", "overwrite")})
    run.save_checkpoint({"epoch": 0, "step": 0, "feature_dim": dim, "backbone": backbone.state_dict()})


def run_one(head: str, n: int | None, seed: int, out_root: str, settings: dict, transfer_kw: dict,
            threads: int | None = None) -> dict[str, Any]:
    """Pretrains and probes one configuration (reusing a finished run directory); returns its row."""
    import torch

    import pretrain
    import transfer

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(out_root) / _name(head, n, seed)
    res_path = run_dir / "results.json"
    t0 = time.perf_counter()
    if res_path.exists():  # reuse only a run made with these very settings
        cfg = json.loads(res_path.read_text())["config"]
        if any(cfg.get(k) != v for k, v in settings.items()) or cfg.get("head") != head:
            res_path.unlink()
    reused = res_path.exists()
    if not res_path.exists() and head == "random":
        _random_init_run(run_dir, seed, settings)
        transfer.run_transfer(run_dir, **transfer_kw)
    if not res_path.exists():
        cmd = ["--dataset", "shapes", "--method", "equimod", "--head", head, "--seed", str(seed), "--out", str(run_dir),
               "--overwrite", "--tag", "quality", "--device", "cpu", "--no-progress"]
        cmd += ["--num-experts", str(n or 8)] + [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
        pretrain.main(cmd)
        transfer.run_transfer(run_dir, **transfer_kw)
    res = json.loads(res_path.read_text())
    fin = res["final"]
    row = {"head": head, "num_experts": n, "seed": seed, "cca_mean": fin.get("cca_mean"), "cca_null": fin.get("cca_null"),
           "knn_acc": fin.get("knn_acc"), **{f"acc_{t}": v["accuracy"] for t, v in res["tasks"].items()},
           **gate_specialisation(fin.get("gate_mean")),
           "effective_experts": fin.get("effective_experts"), "time_s": time.perf_counter() - t0, "reused": reused}
    print(json.dumps({k: v for k, v in row.items() if k != "effective_experts"}), flush=True)
    return row


def _ms(values: list[float | None], pct: bool = False) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    k = 100.0 if pct else 1.0
    m = statistics.fmean(vals) * k
    if len(vals) == 1:
        return f"{m:.1f}" if pct else f"{m:.3f}"
    s = statistics.stdev(vals) * k
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: mean ± std over seeds of every metric."""
    out = []
    for head, n in dict.fromkeys((r["head"], r["num_experts"]) for r in rows):
        rs = [r for r in rows if r["head"] == head and r["num_experts"] == n]
        label = {"random": "random init (no pretraining)", "single": "single (SimCLR, inv. only)", "separate": "separate (EquiMod)",
                 "shared": "shared (STAR-SS)"}.get(head, f"STAR N={n}")
        roles = [(r["experts_shared"], r["experts_inv"], r["experts_eq"]) for r in rs if r["experts_inv"] is not None]
        out.append({
            "head": label, "seeds": len(rs),
            "CCA(inv,eq) ↓": _ms([r["cca_mean"] for r in rs]), "null": _ms([r["cca_null"] for r in rs]),
            **{t: _ms([r.get(f"acc_{t}") for r in rs], pct=True) for t in TASKS},
            "kNN": _ms([r["knn_acc"] for r in rs], pct=True),
            "gate TV": _ms([r["gate_tv"] for r in rs]),
            "experts sh/inv/eq": " ".join(f"{a}/{b}/{c}" for a, b, c in roles) or "–",
        })
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="random init, separate, STAR N=2 × 1 seed × 2 steps (smoke test)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "quality"), help="where the run directories go")
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "quality.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with 2 // jobs threads)")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_args(argv)
    configs, settings, tkw = (QUICK_CONFIGS, QUICK, QUICK_TRANSFER) if args.quick else (CONFIGS, SETTINGS, TRANSFER)
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    jobs = [(h, n, s) for s in seeds for h, n in configs]
    t0 = time.perf_counter()
    threads = max(1, 2 // args.jobs) if args.jobs > 1 else None
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            rows = list(ex.map(run_one, *zip(*[(h, n, s, args.out_dir, settings, tkw, threads) for h, n, s in jobs])))
    else:
        rows = [run_one(h, n, s, args.out_dir, settings, tkw) for h, n, s in jobs]
    wall = time.perf_counter() - t0
    table = summarize(rows)
    payload = {"machine": machine_info(), "settings": settings, "transfer": tkw, "seeds": list(seeds),
               "quick": args.quick, "jobs": args.jobs, "wall_time_s": wall,
               "reused_runs": sum(r["reused"] for r in rows), "runs": rows, "summary": table}
    write_json(args.json, payload)
    cols = ["head", "seeds", "CCA(inv,eq) ↓", "null", *TASKS, "kNN", "gate TV", "experts sh/inv/eq"]
    body = (
        f"Measured on {payload['machine']['cpu']} (2 cores shared with other jobs; {args.jobs} run(s) at a time, "
        f"{threads or payload['machine']['torch_threads']} thread(s) each), torch {payload['machine']['torch']}. Settings: EquiMod-style "
        f"objective on `shapes`, ConvNet width {settings['width']}, {settings['epochs']} epochs × "
        f"{settings['num_train'] // settings['batch_size']} steps of batch {settings['batch_size']}, SGD 0.03 cosine; "
        f"probe grid {tkw['grid_points']} points of logspace(-6, 5), {tkw['num_train']} train (20% val) / "
        f"{tkw['num_test']} test images per shapes task. Mean ± std over {len(seeds)} seed(s). Accuracies in %.\n\n"
        + markdown_table(table, cols)
    )
    write_section(args.md, "quality", body, title="Results")
    print(markdown_table(table, cols))
    return rows


if __name__ == "__main__":
    main()
