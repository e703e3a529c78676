#!/usr/bin/env python
"""Linear transfer of a pretrained backbone (the STAR / AugSelf protocol).

The backbone of a run directory is frozen; features of un-augmented images feed a multinomial
logistic regression trained with full-batch L-BFGS; its L2 weight is chosen from
``logspace(-6, 5, 45)`` on a validation split (20% of train), then the classifier is retrained on
train + val and scored once on test (``common/probe.py``). The projection head is not used.

Tasks of a ``shapes`` run: ``shape`` (in-domain, semantic), ``color`` and ``rotation``
(augmentation-sensitive: the colour jitter and crops the invariant objective learns to ignore),
``digits`` (scikit-learn's real 8×8 digits, out-of-domain). ``cifar10`` / ``stl10`` runs are
probed on their own labelled splits (torchvision needed).

Examples::

    python examples/transfer.py runs/star                       # writes runs/star/results.json
    python examples/transfer.py --compare runs/single runs/separate runs/star
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common.backbones import build_backbone  # noqa: E402
from common.datasets import DatasetError, transfer_tasks  # noqa: E402
from common.options import CLIError, OneLineParser, resolve_device  # noqa: E402
from common.probe import linear_probe  # noqa: E402
from common.runs import RunDir, RunError, atomic_write_text  # noqa: E402

__all__ = ["build_parser", "cli", "comparison_table", "main", "run_transfer"]

RESULTS = "results.json"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="transfer.py",
        description="Linear-probe transfer of a pretrained backbone (frozen features, full-batch L-BFGS, "
        "L2 weight chosen on a validation split, retrained on train+val, scored on test).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by pretrain.py")
    p.add_argument("--compare", action="store_true",
                   help="print the runs side by side (probing those without results.json first)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks to probe (default for shapes runs: shape color rotation digits)")
    p.add_argument("--grid-points", type=int, default=45, help="points of the L2 grid logspace(-6, 5, K)")
    p.add_argument("--num-train", type=int, default=2000, help="shapes tasks: labelled train images (20%% become val)")
    p.add_argument("--num-test", type=int, default=1000, help="shapes tasks: test images")
    p.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations per fit")
    p.add_argument("--data-dir", default=None, help="root of the torchvision data sets (cifar10 / stl10 tasks)")
    p.add_argument("--download", action="store_true")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--recompute", action="store_true", help="with --compare: probe again even when results.json exists")
    return p


def run_transfer(
    run_dir: str | Path,
    *,
    tasks: list[str] | None = None,
    grid_points: int = 45,
    num_train: int = 2000,
    num_test: int = 1000,
    max_iter: int = 500,
    data_dir: str | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    write: bool = True,
) -> dict[str, Any]:
    """Probes the backbone of ``run_dir`` on every task; writes ``results.json`` there when ``write``.

    Returns:
        ``{"run", "config", "final", "grid", "tasks": {name: {"accuracy", "best_wd", "num_classes",
        "kind", "n_train", "n_test"}}, "time_s"}`` where ``final`` holds the run's last-epoch
        CCA / kNN / gate metrics.
    """
    _validate(grid_points=grid_points, num_train=num_train, num_test=num_test, max_iter=max_iter)
    run = RunDir.open(run_dir)
    cfg = run.read_config(required=("dataset", "image_size", "seed", "backbone", "width", "cifar_stem"))
    if write and not os.access(run.path, os.W_OK | os.X_OK):
        raise RunError(f"{run.path} is not writable, so {RESULTS} could not be saved (pass write=False to only print)")
    device = resolve_device(str(device), 0)
    task_data = transfer_tasks(cfg["dataset"], tasks=tasks, image_size=cfg["image_size"], num_train=num_train,
                               num_test=num_test, seed=cfg["seed"], data_dir=data_dir or cfg.get("data_dir"),
                               download=download)
    t0 = time.perf_counter()
    ckpt = run.load_checkpoint(map_location="cpu", required=("backbone",))
    backbone, _ = build_backbone(cfg["backbone"], width=cfg["width"], cifar_stem=cfg["cifar_stem"])
    try:
        backbone.load_state_dict(ckpt["backbone"])
    except RuntimeError as exc:
        raise RunError(f"{run.checkpoint_path} does not fit the run's backbone: {str(exc).splitlines()[0]}") from None
    backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    from common.training import build_augment, extract_features

    aug = build_augment(cfg, device)
    grid = [float(v) for v in np.logspace(-6, 5, grid_points)]
    results: dict[str, Any] = {}
    for name, task in task_data.items():
        tr = extract_features(backbone, task.train.images, aug, device).cpu()
        te = extract_features(backbone, task.test.images, aug, device).cpu()
        res = linear_probe(tr, task.train.labels, te, task.test.labels, grid=grid, num_classes=task.num_classes,
                           seed=cfg["seed"], max_iter=max_iter)
        results[name] = {"accuracy": res.accuracy, "best_wd": res.best_wd, "num_classes": task.num_classes,
                         "kind": task.kind, "n_train": len(task.train), "n_test": len(task.test)}
    metrics = run.read_metrics()
    last = metrics[-1] if metrics else {}
    final = {k: last.get(k) for k in ("epoch", "cca_mean", "cca_null", "knn_acc", "gate_mean", "effective_experts")}
    out = {"run": str(run.path), "config": cfg, "final": final, "grid": grid, "tasks": results,
           "time_s": time.perf_counter() - t0}
    if write:
        save_results(run.path, out)
    return out


def save_results(run_dir: str | Path, results: dict[str, Any]) -> None:
    """Writes ``results.json`` atomically (RunError, one line, when that fails)."""
    path = Path(run_dir) / RESULTS
    try:
        atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    except OSError as exc:
        raise RunError(f"cannot write {path}: {exc.strerror or exc} (the table above holds the results)") from None


_RESULT_KEYS = ("run", "config", "final", "tasks")


def _read_results(path: Path) -> dict[str, Any]:
    """A results.json written by this script (RunError, one line, for anything else; JSONDecodeError passes)."""
    res = json.loads(path.read_text())
    if not isinstance(res, dict):
        raise RunError(f"{path} must hold a JSON object, got {type(res).__name__}; delete it or pass --recompute")
    missing = [k for k in _RESULT_KEYS if k not in res]
    bad = [k for k in ("config", "final", "tasks") if k in res and not isinstance(res[k], dict)]
    if not missing and not bad:
        missing = [f"config.{k}" for k in ("method", "head") if k not in res["config"]]
        missing += [f"tasks.{t}" for t, v in res["tasks"].items() if not (isinstance(v, dict) and {"accuracy", "kind"} <= set(v))]
    if missing or bad:
        what = f"lacks the keys {missing}" if missing else f"has non-object {bad}"
        raise RunError(f"{path} {what}; it was not written by transfer.py (delete it or pass --recompute)")
    return res


def _validate(*, grid_points: int, num_train: int, num_test: int, max_iter: int) -> None:
    """One-line RunError for out-of-range probe options (before any run is opened)."""
    for flag, value, low in (("--grid-points", grid_points, 1), ("--num-train", num_train, 10),
                             ("--num-test", num_test, 1), ("--max-iter", max_iter, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RunError(f"{flag} must be an int >= {low}, got {value!r}")


def _label(res: dict[str, Any]) -> str:
    cfg = res["config"]
    head = cfg["head"] + (f"-{cfg['num_experts']}" if cfg["head"] == "star" else "")
    return f"{Path(res['run']).name} ({cfg['method']}/{head})"


def comparison_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: one row per task (test accuracy %), then the runs' final CCA and kNN accuracy."""
    cols = [_label(r) for r in results]
    tasks: list[str] = []
    for r in results:
        tasks += [t for t in r["tasks"] if t not in tasks]
    lines = ["| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t in tasks:
        kind = next(r["tasks"][t]["kind"] for r in results if t in r["tasks"])
        cells = [f"{100 * r['tasks'][t]['accuracy']:.1f}" if t in r["tasks"] else "–" for r in results]
        lines.append(f"| {t} ({kind}) | " + " | ".join(cells) + " |")

    def fmt(v: Any, pct: bool = False) -> str:
        return "–" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")

    lines.append("| CCA(inv, eq) ↓ [null] | " + " | ".join(
        f"{fmt(r['final'].get('cca_mean'))} [{fmt(r['final'].get('cca_null'))}]" for r in results) + " |")
    lines.append("| kNN (held-out) | " + " | ".join(fmt(r["final"].get("knn_acc"), True) for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Probes (or, with --compare, loads) each run and prints the markdown table."""
    args = build_parser().parse_args(argv)
    if len(args.runs) > 1 and not args.compare:
        raise RunError(f"got {len(args.runs)} run directories; pass --compare to print several runs side by side")
    _validate(grid_points=args.grid_points, num_train=args.num_train, num_test=args.num_test, max_iter=args.max_iter)
    resolve_device(args.device, 0)
    for r in args.runs:  # check every run before probing any
        run = RunDir.open(r)
        run.read_config()
        reuse = args.compare and (run.path / RESULTS).exists() and not args.recompute
        if not reuse and not os.access(run.path, os.W_OK | os.X_OK):
            raise RunError(f"{run.path} is not writable, so {RESULTS} could not be saved")
    kw = dict(tasks=args.tasks, grid_points=args.grid_points, num_train=args.num_train, num_test=args.num_test,
              max_iter=args.max_iter, data_dir=args.data_dir, download=args.download, device=args.device)
    results, fresh = [], []
    for r in args.runs:
        path = Path(r) / RESULTS
        if args.compare and path.exists() and not args.recompute:
            try:
                results.append(_read_results(path))
                continue
            except json.JSONDecodeError:
                print(f"note: {path} is damaged; probing {r} again", file=sys.stderr)
        results.append(run_transfer(r, **kw, write=False))
        fresh.append((r, results[-1]))
    print(comparison_table(results), flush=True)  # printed first: a failed write below loses nothing
    for r, res in fresh:
        save_results(r, res)
    return results


def cli(argv: list[str] | None = None) -> int:
    """Entry point: bad input → one line on stderr and exit code 2."""
    try:
        main(argv)
    except (CLIError, RunError, DatasetError) as exc:
        print(f"transfer.py: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "torchvision" not in str(exc):
            raise
        print(f"transfer.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
