#!/usr/bin/env python
"""The README's first command: a short STAR-head pretraining on the embedded ``shapes`` set, then transfer.

Runs anywhere (CPU, no download, a few minutes on 2 cores): EquiMod-style objective (invariant
NT-Xent + equivariant NT-Xent with STAR's residual predictor on the 11-D augmentation parameters),
STAR head with 8 experts, a small ConvNet; then a linear probe of the frozen backbone on four tasks
(shape, colour, rotation, scikit-learn digits), beside the same probe of the *untrained* backbone
(the seeded initial weights of the same run): the in-domain shape probe must beat it for the
pretraining to have learned anything, and the margin is printed. Prints the transfer table and the
final CCA(inv, eq) with its null baseline; everything lands in the run directory (default runs/demo):
config.json, metrics.jsonl, checkpoint.pt, cca.png, gates.png, losses.png, results.json, and the
untrained baseline in runs/demo/untrained/.

    python examples/demo.py              # ~2-3 min on a 2-core CPU
    python examples/demo.py --quick      # a few seconds: the CI smoke form
    python examples/demo.py --device cuda --epochs 50     # longer, on a GPU

Options after ``--`` go to pretrain.py unchanged (e.g. ``-- --head separate``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrain  # noqa: E402
import transfer  # noqa: E402
from common.backbones import write_untrained_run  # noqa: E402
from common.datasets import DatasetError  # noqa: E402
from common.runs import RunDir, RunError  # noqa: E402

__all__ = ["DEMO", "QUICK", "main"]

TAG = "demo"
UNTRAINED = "untrained"  # sub-directory of the run holding the untrained baseline
# Pretraining settings of the demo (the rest are pretrain.py's defaults: equimod, star, SGD 0.03).
DEMO = {"epochs": 12, "batch_size": 128, "num_train": 2048, "num_heldout": 1024, "width": 16, "num_experts": 8}
QUICK = {"epochs": 1, "batch_size": 32, "num_train": 64, "num_heldout": 256, "width": 4, "num_experts": 4,
         "steps_per_epoch": 2}
TRANSFER = {"grid_points": 12, "num_train": 2000, "num_test": 1000}
TRANSFER_QUICK = {"grid_points": 3, "num_train": 100, "num_test": 100, "max_iter": 50}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few-second smoke run (2 steps, tiny probe)")
    p.add_argument("--out", default="runs/demo", help="run directory (a previous demo run there is replaced)")
    p.add_argument("--epochs", type=int, default=None, help=f"pretraining epochs (default {DEMO['epochs']})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads. 1 by default: ~1.5x slower than 2 on an idle 2-core CPU, but 2 threads "
                   "slow down 10x or more when other jobs share the cores")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Pretrains, probes the pretrained and the untrained backbone, prints.

    Returns:
        ``{"pretrained": ..., "untrained": ..., "shape_margin": float}``: transfer.run_transfer's results
        of both backbones and the shape-probe difference (pretrained − untrained, accuracy in [−1, 1]).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    t0 = time.perf_counter()
    out = RunDir(args.out)
    if out.holds_run():
        tag = json.loads(out.config_path.read_text()).get("tag") if out.config_path.exists() else None
        if tag != TAG:
            raise RunError(f"--out {out.path} holds a run not made by demo.py; choose another --out")
    settings = dict(QUICK if args.quick else DEMO)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    cmd = ["--dataset", "shapes", "--method", "equimod", "--head", "star", "--out", str(out.path), "--overwrite",
           "--tag", TAG, "--device", args.device, "--seed", str(args.seed)]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()] + extra
    cmd += ["--threads", str(args.threads)]
    print("pretrain.py " + " ".join(cmd), flush=True)
    pretrain.main(cmd)
    t1 = time.perf_counter()
    probe = TRANSFER_QUICK if args.quick else TRANSFER
    res = transfer.run_transfer(out.path, device=args.device, **probe)
    base_dir = out.path / UNTRAINED
    write_untrained_run(base_dir, {**res["config"], "tag": f"{TAG}-untrained"})
    base = transfer.run_transfer(base_dir, device=args.device, **probe)
    t2 = time.perf_counter()
    shape, shape0 = res["tasks"]["shape"]["accuracy"], base["tasks"]["shape"]["accuracy"]
    print("\nLinear-probe transfer of the frozen backbone (test accuracy %), untrained vs pretrained:\n")
    print(transfer.comparison_table([base, res]))
    print(f"\nIn-domain shape probe: pretrained {100 * shape:.1f} % vs untrained {100 * shape0:.1f} % "
          f"(same seed, same initial weights): {100 * (shape - shape0):+.1f} points")
    fin = res["final"]
    if fin.get("cca_mean") is not None:
        print(f"\nFinal CCA(inv, eq) on {settings['num_heldout']} held-out images: {fin['cca_mean']:.3f} "
              f"(null baseline, shuffled pairs: {fin['cca_null']:.3f}; lower = less redundant)")
    if fin.get("effective_experts"):
        print("Effective experts per task (inv, eq): " + ", ".join(f"{v:.2f}" for v in fin["effective_experts"]))
    print(f"\nWall time: pretrain {t1 - t0:.0f} s + transfer of both backbones {t2 - t1:.0f} s. Run directory: "
          f"{out.path} (metrics.jsonl, checkpoint.pt, cca.png, gates.png, losses.png, results.json; {UNTRAINED}/)")
    return {"pretrained": res, "untrained": base, "shape_margin": shape - shape0}


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except (pretrain.CLIError, RunError, DatasetError) as exc:
        print(f"demo.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
