"""Speed and accuracy of the CCA metric against numpy's float64 QR + SVD (and sklearn once), and the null table.

    python -m benchmarks.cca [--quick] [--out-dir DIR] [--repeats R] [--no-sklearn]

One BLAS and one torch thread; ``ours`` (``mean_canonical_correlation`` on float32 input), ``meter``
(``CCAMeter.update`` in batches of 256, then ``compute``, no null) and ``numpy`` (QR of each centred float64
view, then the singular values of Qx^T Qy: the textbook route, Björck & Golub 1973) run interleaved; ``numpy``
is also the reference for the errors. Views carry p/4 planted canonical correlations (0.9 … 0.1) under a random
rotation, each view's condition number about ``cond`` (10; 10⁴ in one row, where the metric's covariance route
hands over to its QR fallback). sklearn's ``CCA(n_components=p)`` (iterative NIPALS) runs once at one size.
The null table is the expected mean CCA of independent views (``null_mean_canonical_correlation``), which
docs/cca.md quotes.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import (
    interleaved,
    machine_info,
    machine_line,
    output_dir,
    single_thread,
    table,
    write_json,
    write_section,
)
from star_heads.metrics import CCAMeter, mean_canonical_correlation, null_mean_canonical_correlation

FULL = {"configs": [(4096, 64, 10), (4096, 128, 10), (16384, 64, 10), (16384, 128, 10), (4096, 512, 10),
                    (4096, 128, 1e4)], "sklearn": (4096, 64), "repeats": 7, "null_p": 128,
        "null_n": [512, 1024, 2048, 4096, 8192, 16384, 65536]}
QUICK = {"configs": [(256, 16, 10), (512, 32, 1e4)], "sklearn": (256, 16), "repeats": 2, "null_p": 16,
         "null_n": [64, 256, 1024]}


def make_views(n: int, p: int, cond: float = 10.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 views ``[n, p]`` with p/4 planted canonical correlations from 0.9 down to 0.1; each view's
    columns are scaled from 1 down to 1/cond, then rotated: its condition number is about ``cond``."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, p // 4)
    rho = torch.linspace(0.9, 0.1, k, dtype=torch.float64)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.randn(n, p, generator=g, dtype=torch.float64)
    y[:, :k] = rho * x[:, :k] + (1 - rho**2).sqrt() * y[:, :k]
    scale = torch.logspace(0, -np.log10(cond), p, dtype=torch.float64)
    rotations = [torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0] for _ in range(2)]
    return ((x * scale) @ rotations[0] + 1.0).float(), ((y * scale) @ rotations[1] - 2.0).float()


def numpy_qr_svd(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    qx = np.linalg.qr(x - x.mean(0))[0]
    qy = np.linalg.qr(y - y.mean(0))[0]
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0, 1)


def meter_cca(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    meter = CCAMeter(x.shape[1], y.shape[1], null_baseline=False)
    for xb, yb in zip(x.split(256), y.split(256)):
        meter.update(xb, yb)
    return meter.compute().correlations.numpy()


def sklearn_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from sklearn.cross_decomposition import CCA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning for the later components
        xs, ys = CCA(n_components=x.shape[1], scale=False).fit(x, y).transform(x, y)
    xs, ys = xs - xs.mean(0), ys - ys.mean(0)
    return np.abs((xs * ys).sum(0) / np.sqrt((xs * xs).sum(0) * (ys * ys).sum(0)))


def bench(n: int, p: int, cond: float, repeats: int, sklearn: bool) -> dict[str, Any]:
    x, y = make_views(n, p, cond)
    xn, yn = x.double().numpy(), y.double().numpy()
    outs: dict[str, Any] = {}
    fns = {"ours": lambda: outs.__setitem__("ours", float(mean_canonical_correlation(x, y))),
           "meter": lambda: outs.__setitem__("meter", meter_cca(x, y)),
           "numpy": lambda: outs.__setitem__("numpy", numpy_qr_svd(xn, yn))}
    t = interleaved(fns, repeats)
    ref = outs["numpy"]
    row = {"n": n, "p": p, "cond": cond, **{f"{k}_ms": v["cpu_ms"] for k, v in t.items()},
           "ours_vs_numpy": t["ours"]["cpu_ms"] / t["numpy"]["cpu_ms"],
           "meter_vs_numpy": t["meter"]["cpu_ms"] / t["numpy"]["cpu_ms"], "mean": float(ref.mean()),
           "ours_err": abs(outs["ours"] - float(ref.mean())), "meter_err": float(np.abs(outs["meter"] - ref).max())}
    if sklearn:
        t_sk = interleaved({"sklearn": lambda: outs.__setitem__("sklearn", sklearn_cca(xn, yn))}, 1, warmup=0)
        row.update(sklearn_ms=t_sk["sklearn"]["cpu_ms"], sklearn_err=float(np.abs(np.sort(outs["sklearn"])[::-1] - ref).max()))
    return row


def render(p: dict[str, Any]) -> str:
    cols = {"n": "n", "p": "p = q", "cond": "cond", "ours_ms": "ours ms", "meter_ms": "meter ms", "numpy_ms": "numpy ms",
            "ours_vs_numpy": "ours / numpy", "meter_vs_numpy": "meter / numpy", "ours_err": "ours error (mean)",
            "meter_err": "meter error (max)"}
    sk = next(r for r in p["rows"] if "sklearn_ms" in r) if any("sklearn_ms" in r for r in p["rows"]) else None
    rows = [{**r, "cond": f"{r['cond']:g}"} for r in p["rows"]]
    parts = [machine_line(p["machine"]) + f" One BLAS thread; median process CPU time of {p['repeats']} interleaved "
             "repeats; errors are absolute, against numpy's float64 QR + SVD.", table(rows, cols)]
    if sk:
        parts.append(f"sklearn `CCA(n_components={sk['p']})` at n = {sk['n']}, p = q = {sk['p']} (one run): "
                     f"{sk['sklearn_ms'] / 1e3:.3g} s, {sk['sklearn_ms'] / sk['ours_ms']:.0f}× the time of `ours`, "
                     f"max error {sk['sklearn_err']:.1e}.")
    nulls = {str(r["n"]): r["null_mean"] for r in p["null_table"]}
    parts += [f"Expected mean CCA of independent views (null baseline), p = q = {p['null_table'][0]['p']}:",
              table([nulls], {k: f"n = {k}" for k in nulls})]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats; writes to a temporary folder")
    ap.add_argument("--out-dir", type=Path, help="write under this folder instead of docs/ (or the temporary one)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--no-sklearn", action="store_true")
    a = ap.parse_args(argv)
    single_thread()  # torch and numpy's BLAS / LAPACK
    cfg, out = QUICK if a.quick else FULL, output_dir(a.out_dir, a.quick)
    repeats = a.repeats or cfg["repeats"]
    try:
        import sklearn  # noqa: F401
        with_sklearn = not a.no_sklearn
    except ImportError:
        with_sklearn = False
    p: dict[str, Any] = {"benchmark": "cca", "quick": a.quick, "machine": machine_info(), "repeats": repeats,
                         "timer": "process CPU time"}
    p["rows"] = [bench(n, q, cond, repeats, with_sklearn and (n, q) == cfg["sklearn"] and cond == 10)
                 for n, q, cond in cfg["configs"]]
    ones = torch.ones(cfg["null_p"])
    p["null_table"] = [{"n": n, "p": cfg["null_p"], "null_mean": null_mean_canonical_correlation(n, ones, ones)}
                       for n in cfg["null_n"]]
    write_json(out / "benchmarks" / "cca.json", p)
    write_section(out / "benchmarks.md", "cca", render(p))
    print(f"wrote {out}/benchmarks/cca.json, {out}/benchmarks.md (section cca)")
    return p


if __name__ == "__main__":
    main()
