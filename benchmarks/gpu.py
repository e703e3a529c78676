"""The one-command GPU check: host syncs, fused bank vs loop vs GEMMs, memory, compile, autocast, a pretraining run.

    python -m benchmarks.gpu [--out PREFIX] [--repeats R] [--skip-pretrain]
    python -m benchmarks.gpu --quick --device cpu      # a dry run of every code path on the CPU, tiny sizes

On a CUDA machine it measures, and writes ``PREFIX.json`` and ``PREFIX.md`` (default ``docs/benchmarks/gpu``):

1. **host syncs per component** — one training step (forward + backward) of ``ExpertBank``, ``STARHead``,
   ``EquivariantPredictor``, ``nt_xent``, a ``SimCLRAdapter`` joint step and ``STARAugment`` (when kornia is
   installed), counted with ``torch.cuda.set_sync_debug_mode("warn")`` (on the CPU dry run: the aten ops that
   would read a value back to the host);
2. **fused vs loop vs GEMM chain** at the four configs of ``benchmarks/expert_bank.py`` (STAR, arXiv
   2510.27222, Sec. 3: a T = 2 routed mixture), forward + backward timed with CUDA events, fp32 and bf16
   autocast, and the peak memory of a step (``torch.cuda.max_memory_allocated``);
3. **compiled vs eager** — ``torch.compile(bank, fullgraph=True)`` against the eager bank, fp32;
4. **autocast parity** — bf16 autocast against fp32: relative error of the mixture and of every parameter
   gradient, fused bank and per-expert loop;
5. **a pretraining run** — ``examples/pretrain.py`` on one GPU for 20 and 10 steps (one epoch each, its CLI as
   it is): step time = the difference of the two epoch times over 10 steps (evaluation cancels), images/s.

Without CUDA (and without ``--device cpu``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._common import (
    DOCS,
    fmt,
    machine_info,
    machine_line,
    peak_bytes,
    table,
    write_json,
)
from benchmarks.expert_bank import CONFIGS, QUICK_CONFIGS, build, make_step

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fused", "loop", "gemm")
MB = 2**20
_SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
            "_unique2", "repeat_interleave", "_assert_async"}


# ------------------------------------------------------------------------------------------ host syncs
class _SyncOps(TorchDispatchMode):
    """The CPU stand-in for CUDA's sync debug mode: counts ops that read values back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in _SYNCING
        return func(*args, **(kwargs or {}))


def count_syncs(step: Callable[[], Any], device: torch.device) -> int:
    """Host synchronisations of ``step()`` (run once before, so that lazy initialisation is not counted)."""
    step()
    if device.type != "cuda":
        with _SyncOps() as ops:
            step()
        return ops.count
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def component_steps(device: torch.device, quick: bool) -> dict[str, Callable[[], Any]]:
    """One training step (forward + backward) of each library component, on ``device``."""
    from star_heads import EquivariantPredictor, ExpertBank, STARHead
    from star_heads.adapters import SimCLRAdapter
    from star_heads.losses import nt_xent

    d, b = (16, 8) if quick else (512, 256)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, d, device=device, generator=g, requires_grad=True)
    params = torch.randn(b, 11, device=device, generator=g)
    bank = ExpertBank(8, d, d, 128, device=device)
    gates = torch.softmax(torch.randn(b, 2, 8, device=device, generator=g), -1)
    head = STARHead(d, device=device)
    predictor = EquivariantPredictor(128, 11).to(device)
    z = torch.randn(b, 128, device=device, generator=g, requires_grad=True)
    adapter = SimCLRAdapter(d, num_experts=8, cca_every=0).to(device)
    steps = {
        "ExpertBank": lambda: bank(x, gates).sum().backward(),
        "STARHead": lambda: sum(head(x, t).sum() for t in ("inv", "eq")).backward(),
        "EquivariantPredictor": lambda: predictor(z, params).sum().backward(),
        "nt_xent": lambda: nt_xent(z, z.flip(0)).backward(),
        "SimCLRAdapter joint step": lambda: adapter(x, x.flip(0), h0=x.roll(1, 0), params1=params,
                                                    params2=params.flip(0)).loss.backward(),
    }
    try:
        from star_heads.augment import STARAugment

        size = 24 if quick else 112
        aug, images = STARAugment(16 if quick else 96), torch.rand(b, 3, size, size, device=device, generator=g)
        steps["STARAugment"] = lambda: aug(images, generator=torch.Generator(device=device).manual_seed(1))
    except ImportError:  # kornia missing: left out of the table
        pass
    return steps


# ------------------------------------------------------------------------------------------ timing
def time_ms(steps: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms per step, rotated order per repeat; CUDA events on a GPU, wall time elsewhere."""
    names = list(steps)
    for n in names:
        steps[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[n]()
                end.record()
                torch.cuda.synchronize(device)
                times[n].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                steps[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def bank_rows(configs: dict[str, tuple[int, ...]], device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Fused / loop / GEMM chain: fp32 and bf16 time, fp32 peak memory, per config."""
    rows = []
    for name, cfg in configs.items():
        models, x, gates = build(cfg, device)
        row: dict[str, Any] = {"name": name, "dims": str(cfg)}
        for precision, amp in (("fp32", False), ("bf16", True)):
            t = time_ms({k: make_step(m, x, gates, amp) for k, m in models.items()}, repeats, device)
            row.update({f"{precision}_{k}_ms": v for k, v in t.items()})
            row[f"{precision}_fused_vs_loop"] = t["fused"] / t["loop"]
            row[f"{precision}_fused_vs_gemm"] = t["fused"] / t["gemm"]
        for k, m in models.items():
            step = make_step(m, x, gates)
            step()
            for p in (*m.parameters(), x, gates):
                p.grad = None
            peak = peak_bytes(step, device)
            row[f"peak_{k}_mb"] = None if peak is None else peak / MB
        if row.get("peak_loop_mb"):
            row["peak_fused_vs_loop"] = row["peak_fused_mb"] / row["peak_loop_mb"]
        rows.append(row)
    return rows


def compile_rows(configs: dict[str, tuple[int, ...]], device: torch.device, repeats: int,
                 backend: str) -> list[dict[str, Any]]:
    """``torch.compile(bank, fullgraph=True)`` against the eager bank (fp32), and that the two agree."""
    rows = []
    for name, cfg in configs.items():
        models, x, gates = build(cfg, device)
        bank = models["fused"]
        twin = copy.deepcopy(bank)
        torch._dynamo.reset()
        row: dict[str, Any] = {"name": name, "backend": backend}
        try:
            compiled = torch.compile(twin, fullgraph=True, backend=backend)
            t0 = time.perf_counter()
            make_step(compiled, x, gates)()
            row["compile_s"] = time.perf_counter() - t0
            with torch.no_grad():
                row["max_abs_diff"] = float((compiled(x, gates) - bank(x, gates)).abs().max())
            t = time_ms({"eager": make_step(bank, x, gates), "compiled": make_step(compiled, x, gates)}, repeats, device)
            row.update(eager_ms=t["eager"], compiled_ms=t["compiled"], speedup=t["eager"] / t["compiled"])
        except Exception as exc:  # noqa: BLE001  (a compiler failure is a result to report)
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def autocast_rows(configs: dict[str, tuple[int, ...]], device: torch.device) -> list[dict[str, Any]]:
    """bf16 autocast against fp32 eager: relative error of the mixture and the worst parameter gradient."""
    rows = []
    for name, cfg in configs.items():
        models, x, gates = build(cfg, device)
        row: dict[str, Any] = {"name": name}
        for k in ("fused", "loop"):
            m, grads, outs = models[k], {}, {}
            for amp in (False, True):
                for p in m.parameters():
                    p.grad = None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    z = m(x, gates)
                z.float().square().mean().backward()
                outs[amp], grads[amp] = z.detach().float(), [p.grad.clone() for p in m.parameters()]
            row[f"{k}_out_err"] = _rel(outs[True], outs[False])
            row[f"{k}_grad_err"] = max(_rel(a, b) for a, b in zip(grads[True], grads[False]))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ pretraining
def pretrain_run(device: torch.device, quick: bool) -> dict[str, Any]:
    """``examples/pretrain.py`` for 20 and 10 steps (``--quick``: 2 and 1, tiny): step time and images/s."""
    steps, batch = ((2, 1), 16) if quick else ((20, 10), 256)
    extra = ["--num-train", "64", "--num-heldout", "130", "--width", "4", "--image-size", "16"] if quick else []
    result: dict[str, Any] = {"batch_size": batch, "steps": list(steps)}
    epoch_s = {}
    for n in steps:
        with tempfile.TemporaryDirectory(prefix="star_heads_gpu_pretrain_") as tmp:
            cmd = [sys.executable, str(ROOT / "examples" / "pretrain.py"), "--out", str(Path(tmp) / "run"),
                   "--epochs", "1", "--steps-per-epoch", str(n), "--batch-size", str(batch),
                   "--device", str(device), "--no-progress", *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                result["error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
                return result
            row = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        epoch_s[n] = row["epoch_time_s"]
        result[f"wall_s_{n}"], result[f"epoch_s_{n}"], result[f"loss_{n}"] = wall, row["epoch_time_s"], row["loss"]
    step_s = (epoch_s[steps[0]] - epoch_s[steps[1]]) / (steps[0] - steps[1])
    result["step_ms"] = 1e3 * step_s
    result["images_per_s"] = batch / step_s if step_s > 0 else None
    return result


# ------------------------------------------------------------------------------------------ report
def render(p: dict[str, Any]) -> str:
    parts = [machine_line(p["machine"]) + f" Device {p['device']}; medians of {p['repeats']} interleaved repeats "
             f"({'CUDA events' if p['device'].startswith('cuda') else 'wall time'})."]
    parts += ["Host synchronisations per training step (forward + backward):",
              table([{"component": k, "syncs": v} for k, v in p["syncs"].items()], ["component", "syncs"])]
    cols = {"name": "config", "dims": "(N, d, h, out, B)"}
    for prec in ("fp32", "bf16"):
        cols.update({f"{prec}_{k}_ms": f"{prec} {k} ms" for k in VARIANTS})
        cols.update({f"{prec}_fused_vs_loop": f"{prec} fused / loop", f"{prec}_fused_vs_gemm": f"{prec} fused / GEMM"})
    parts += ["Fused bank vs per-expert loop vs equal-FLOP GEMM chain, forward + backward:", table(p["bank"], cols),
              "Peak memory of an fp32 step (MB above the parameters and inputs):",
              table(p["bank"], {"name": "config", **{f"peak_{k}_mb": f"{k}" for k in VARIANTS},
                                "peak_fused_vs_loop": "fused / loop"})]
    parts += ["`torch.compile(bank, fullgraph=True)` against the eager bank (fp32):",
              table(p["compile"], {"name": "config", "backend": "backend", "eager_ms": "eager ms",
                                   "compiled_ms": "compiled ms", "speedup": "compiled speed / eager",
                                   "compile_s": "compile s", "max_abs_diff": "max abs. difference",
                                   "error": "error"})]
    parts += ["bf16 autocast against fp32 (relative error of the mixture; worst parameter gradient):",
              table(p["autocast"], {"name": "config", "fused_out_err": "fused output", "loop_out_err": "loop output",
                                    "fused_grad_err": "fused gradient", "loop_grad_err": "loop gradient"})]
    pre = p.get("pretrain")
    if pre is not None:
        if "error" in pre:
            parts.append(f"`examples/pretrain.py` failed: {pre['error']}")
        else:
            long, short = pre["steps"]
            parts.append(f"`examples/pretrain.py` (defaults, batch {pre['batch_size']}, one epoch of {long} and of "
                         f"{short} steps): **{fmt(pre['step_ms'])} ms per step, {fmt(pre['images_per_s'])} "
                         f"images/s** (epochs of {fmt(pre['epoch_s_' + str(long)])} s and "
                         f"{fmt(pre['epoch_s_' + str(short)])} s, evaluation included in both).")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu for a dry run")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, 2 repeats, compile (backend='eager') and autocast at one config")
    ap.add_argument("--out", type=Path, default=None,
                    help="write OUT.json and OUT.md (default docs/benchmarks/gpu on CUDA, a temporary folder otherwise)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per step (default 20; --quick 2)")
    ap.add_argument("--skip-pretrain", action="store_true", help="leave out the examples/pretrain.py run")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False), so nothing was measured. "
              "`python -m benchmarks.gpu --quick --device cpu` dry-runs every code path on the CPU.")
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    repeats = a.repeats or (2 if a.quick else 20)
    configs = QUICK_CONFIGS if a.quick else CONFIGS
    if a.out is not None:
        out = a.out
    elif device.type == "cuda" and not a.quick:
        out = DOCS / "benchmarks" / "gpu"
    else:
        out = Path(tempfile.mkdtemp(prefix="star_heads_bench_")) / "gpu"
    p: dict[str, Any] = {"benchmark": "gpu", "quick": a.quick, "device": str(device), "machine": machine_info(),
                         "repeats": repeats}
    p["syncs"] = {k: count_syncs(step, device) for k, step in component_steps(device, a.quick).items()}
    p["bank"] = bank_rows(configs, device, repeats)
    first = dict(list(configs.items())[:1]) if a.quick else configs  # --quick: the code path once
    p["compile"] = compile_rows(first, device, repeats, "eager" if a.quick else "inductor")
    p["autocast"] = autocast_rows(first, device)
    p["pretrain"] = None if a.skip_pretrain else pretrain_run(device, a.quick)
    write_json(out.with_suffix(".json"), p)
    text = render(p)
    out.with_suffix(".md").write_text("# GPU check\n\n" + text + "\n")
    print(text)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
