"""Fused ExpertBank vs the per-expert loop vs an equal-FLOP GEMM chain: time, operators, saved and peak bytes.

    python -m benchmarks.expert_bank [--quick] [--out-dir DIR] [--repeats R] [--device cpu|cuda]

Per config ``(N, d, h, out, B)``, one forward + backward of a T = 2 routed mixture ``z_t = Σ_k g[b, t, k] E_k(x)``
(STAR, arXiv 2510.27222, Sec. 3) in three variants, run interleaved in one process:

* ``fused`` — ``ExpertBank(N, d, h, out)`` (3 layers, BatchNorm + ReLU) called as ``bank(x, gates)``;
* ``loop`` — the same experts as standard modules (``bank.to_modules()``), one after the other, outputs
  stacked, the same mixture (one ``bmm``): what a user writes without the bank;
* ``gemm`` — three plain GEMMs with the bank's FLOPs and nothing else (``[B, d] @ [d, N·h] → @ [N·h, h] →
  @ [h, N·out]``): the hardware's limit for that matmul work.

Also per config: aten operators per step, bytes saved for backward, peak bytes of a step (definitions in
``benchmarks/_common.py``), bf16 autocast, and ``torch.compile(bank, fullgraph=True)`` against the eager bank;
and an N sweep with its plot. A full run writes ``docs/benchmarks/expert_bank.json``, the ``expert_bank``
section of ``docs/benchmarks.md`` and ``docs/images/expert_bank_n_sweep.png``; ``--quick`` (tiny sizes, no
compile) writes them under a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import (
    count_ops,
    interleaved,
    machine_info,
    machine_line,
    output_dir,
    peak_bytes,
    saved_bytes,
    single_thread,
    table,
    write_json,
    write_section,
)
from star_heads.experts import ExpertBank

CONFIGS = {"STL10": (16, 512, 512, 128, 768), "ImageNet100": (8, 2048, 2048, 128, 256),
           "mid": (8, 512, 512, 128, 256), "small experts": (64, 128, 128, 64, 256)}
SWEEP_N, SWEEP_DIMS = (2, 4, 8, 16, 32, 64), (512, 512, 128, 256)
QUICK_CONFIGS = {"tiny": (4, 32, 32, 16, 64), "tiny small experts": (16, 16, 16, 8, 64)}
QUICK_SWEEP_N, QUICK_SWEEP_DIMS = (2, 4, 8), (32, 32, 16, 64)
VARIANTS = ("fused", "loop", "gemm")
MB = 2**20


class Loop(nn.Module):
    """The experts as standard modules, one at a time: ``x [B, d], gates [B, T, N] -> [T, B, o]``."""

    def __init__(self, experts: nn.ModuleList) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([e(x) for e in self.experts], dim=1)  # [B, N, o]
        return torch.bmm(gates.to(outs.dtype), outs).transpose(0, 1)


class GemmChain(nn.Module):
    """Three GEMMs with the bank's FLOPs per layer (``B·d·N·h``, ``B·N·h·h``, ``B·N·h·o``) and nothing else."""

    def __init__(self, n: int, d: int, h: int, o: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n * h, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(h, n * h) / (n * h) ** 0.5)
        self.w3 = nn.Parameter(torch.randn(n * o, h) / h**0.5)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(x, self.w1), self.w2), self.w3)


def build(cfg: tuple[int, ...], device: torch.device) -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    n, d, h, o, b = cfg
    torch.manual_seed(0)
    bank = ExpertBank(n, d, h, o).to(device)
    models = {"fused": bank, "loop": Loop(bank.to_modules()), "gemm": GemmChain(n, d, h, o).to(device)}
    x = torch.randn(b, d, device=device, requires_grad=True)
    gates = torch.softmax(torch.randn(b, 2, n, device=device), -1).requires_grad_()
    return models, x, gates


def make_step(model: nn.Module, x: torch.Tensor, gates: torch.Tensor, amp: bool = False):
    """Forward + backward against a fixed upstream gradient; gradients are cleared first."""
    tensors = [*model.parameters(), x, gates]

    def step() -> None:
        for t in tensors:
            t.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            z = model(x, gates)
        if not hasattr(step, "up"):
            step.up = torch.randn(z.shape, device=z.device, generator=torch.Generator(z.device).manual_seed(1))
        (z.float() * step.up).sum().backward()

    return step


def measure(cfg: tuple[int, ...], device: torch.device, repeats: int, extras: bool, compile_: bool) -> dict[str, Any]:
    models, x, gates = build(cfg, device)
    steps = {k: make_step(m, x, gates) for k, m in models.items()}
    row: dict[str, Any] = dict(zip(("N", "d", "h", "out", "B"), cfg))
    row["fp32"] = interleaved(steps, repeats, device=device)
    row["ops"], row["saved_mb"], row["peak_mb"] = {}, {}, {}
    for k, m in models.items():
        row["ops"][k] = count_ops(steps[k])
        row["saved_mb"][k] = saved_bytes(steps[k], [*m.parameters(), x, gates]) / MB
        for t in (*m.parameters(), x, gates):
            t.grad = None  # the peak counts the gradients, allocated during the step
        peak = peak_bytes(steps[k], device)
        row["peak_mb"][k] = None if peak is None else peak / MB
    t = {k: v["cpu_ms"] for k, v in row["fp32"].items()}
    row["fused_vs_loop"], row["fused_vs_gemm"] = t["fused"] / t["loop"], t["fused"] / t["gemm"]
    if row["peak_mb"]["loop"]:
        row["peak_fused_vs_loop"] = row["peak_mb"]["fused"] / row["peak_mb"]["loop"]
    if extras:
        bf16 = {k: make_step(models[k], x, gates, amp=True) for k in ("fused", "loop")}
        row["bf16"] = interleaved(bf16, repeats, device=device)
        row["bf16_fused_vs_loop"] = row["bf16"]["fused"]["cpu_ms"] / row["bf16"]["loop"]["cpu_ms"]
    if compile_:
        row["compile"] = compiled_vs_eager(models["fused"], x, gates, repeats, device)
    return row


def compiled_vs_eager(bank: ExpertBank, x, gates, repeats: int, device: torch.device) -> dict[str, Any]:
    """``torch.compile(bank, fullgraph=True)`` (default mode) against the eager bank, interleaved."""
    try:
        compiled = torch.compile(bank, fullgraph=True)
        step = make_step(compiled, x, gates)
        t0 = time.perf_counter()
        step()  # compiles forward and backward (empty inductor cache: see main)
        compile_s = time.perf_counter() - t0
        t = interleaved({"eager": make_step(bank, x, gates), "compiled": step}, repeats, device=device)
    except Exception as exc:  # noqa: BLE001  (a compiler failure is a result to report, not a crash)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"eager_ms": t["eager"]["cpu_ms"], "compiled_ms": t["compiled"]["cpu_ms"], "compile_s": compile_s,
            "speedup": t["eager"]["cpu_ms"] / t["compiled"]["cpu_ms"]}


def render(p: dict[str, Any]) -> str:
    rows = []
    for r in p["configs"] + p["sweep"]:
        rows.append({**r, "dims": f"({r['N']}, {r['d']}, {r['h']}, {r['out']}, {r['B']})",
                     **{f"{k}_ms": r["fp32"][k]["cpu_ms"] for k in VARIANTS},
                     **{f"{q}_{k}": r[q][k] for q in ("ops", "saved_mb", "peak_mb") for k in ("fused", "loop")}})
    main, sweep = rows[: len(p["configs"])], rows[len(p["configs"]):]
    cols = {"fused_ms": "fused ms", "loop_ms": "loop ms", "gemm_ms": "GEMM chain ms", "fused_vs_loop": "fused / loop",
            "fused_vs_gemm": "fused / GEMM", "ops_fused": "aten ops fused", "ops_loop": "aten ops loop",
            "saved_mb_fused": "saved MB fused", "saved_mb_loop": "saved MB loop", "peak_mb_fused": "peak MB fused",
            "peak_mb_loop": "peak MB loop", "peak_fused_vs_loop": "peak fused / loop"}
    parts = [machine_line(p["machine"]) + f" Median process CPU time of {p['repeats']} interleaved repeats per step.",
             "fp32 eager:", table(main, {"name": "config", "dims": "(N, d, h, out, B)", **cols})]
    if any("bf16" in r for r in main):
        bf = [{"name": r["name"], "fused": r["bf16"]["fused"]["cpu_ms"], "loop": r["bf16"]["loop"]["cpu_ms"],
               "ratio": r["bf16_fused_vs_loop"], "speedup": r["fused_ms"] / r["bf16"]["fused"]["cpu_ms"]} for r in main]
        parts += ["bf16 autocast, eager:", table(bf, {"name": "config", "fused": "fused ms", "loop": "loop ms",
                                                      "ratio": "fused / loop", "speedup": "fused fp32 / bf16 time"})]
    comp = [{"name": r["name"], **r["compile"]} for r in main if "compile" in r]
    if comp:
        parts += ["`torch.compile(bank, fullgraph=True)` (default mode, fp32) against the eager bank; compile s = the "
                  "first call (forward + backward) with an empty inductor cache:",
                  table(comp, {"name": "config", "eager_ms": "eager ms", "compiled_ms": "compiled ms",
                               "speedup": "compiled speed / eager", "compile_s": "compile s", "error": "error"})]
    d = p["sweep"][0]
    parts += [f"N sweep at (d, h, out, B) = ({d['d']}, {d['h']}, {d['out']}, {d['B']}), fp32 eager:",
              table(sweep, {"N": "N", **cols})]
    if p["plot"]:
        parts.append(f"![time and operators vs N]({p['plot']})")
    return "\n\n".join(parts)


def plot(p: dict[str, Any], path: Path) -> bool:
    """Time and operator count vs N (skipped, returning False, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    ns = [r["N"] for r in p["sweep"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    for k, style in (("fused", "o-"), ("loop", "s-"), ("gemm", "^--")):
        axes[0].plot(ns, [r["fp32"][k]["cpu_ms"] for r in p["sweep"]], style, label=k)
        if k != "gemm":
            axes[1].plot(ns, [r["ops"][k] for r in p["sweep"]], style, label=k)
    axes[0].set_ylabel("ms per forward + backward (CPU time, 1 thread)")
    axes[1].set_ylabel("aten operators per forward + backward")
    for ax in axes:
        ax.set(xscale="log", yscale="log", xlabel="experts N")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    d = p["sweep"][0]
    fig.suptitle(f"ExpertBank, d = h = {d['d']}, out = {d['out']}, B = {d['B']}, T = 2 ({p['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, no compile; writes to a temporary folder")
    ap.add_argument("--out-dir", type=Path, help="write under this folder instead of docs/ (or the temporary one)")
    ap.add_argument("--repeats", type=int, help="timed repeats per step (default 7; --quick 2)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    single_thread()  # see docs/benchmarks.md: one thread's CPU time is what a shared machine can measure
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="star_heads_inductor_")  # cold compiles
    device, out = torch.device(a.device), output_dir(a.out_dir, a.quick)
    repeats = a.repeats or (2 if a.quick else 7)
    configs, sweep_n, dims = (QUICK_CONFIGS, QUICK_SWEEP_N, QUICK_SWEEP_DIMS) if a.quick else (CONFIGS, SWEEP_N, SWEEP_DIMS)
    p: dict[str, Any] = {"benchmark": "expert_bank", "quick": a.quick, "machine": machine_info(), "repeats": repeats,
                         "device": str(device), "timer": "process CPU time" if device.type == "cpu" else "CUDA sync wall"}
    p["configs"] = [{"name": name, **measure(cfg, device, repeats, True, not a.quick)} for name, cfg in configs.items()]
    p["sweep"] = [{"name": f"N={n}", **measure((n, *dims), device, repeats, False, False)} for n in sweep_n]
    p["load_avg_end"] = list(os.getloadavg())
    png = out / "images" / "expert_bank_n_sweep.png"
    p["plot"] = "images/expert_bank_n_sweep.png" if plot(p, png) else None
    write_json(out / "benchmarks" / "expert_bank.json", p)
    write_section(out / "benchmarks.md", "expert_bank", render(p))
    print(f"wrote {out}/benchmarks/expert_bank.json, {out}/benchmarks.md (section expert_bank), {png}")
    return p


if __name__ == "__main__":
    main()
