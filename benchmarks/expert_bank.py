"""Forward+backward speed of the fused ExpertBank against the per-expert loop and an equal-FLOP GEMM chain (issue 6).

For every config ``(N, d, h, out, B)`` three variants run interleaved in one process (medians of repeats):

* ``fused`` — :class:`star_heads.experts.ExpertBank` ``(N, d, h, out)`` (3 layers, BatchNorm+ReLU) and a
  T=2 routed mixture ``z_t = Σ_k g[b, t, k] E_k(x)``;
* ``loop`` — the same experts unfused with ``bank.to_modules()`` (an ``nn.ModuleList`` of ``nn.Sequential``),
  run one after the other, outputs stacked, same mixture: what users write today;
* ``dense`` — three plain GEMMs with the bank's FLOPs and nothing else (no norm, activation or mixture):
  ``x[B, d] @ [d, N·h] → @ [N·h, h] → @ [h, N·out]``, the practical limit of the hardware for that matmul work.

Also measured: aten operators dispatched per forward+backward (a TorchDispatchMode counter: the hardware-independent
"one kernel per layer" check), activation bytes saved for backward (saved-tensor hooks, deterministic), the heap growth
of one step (CPU: glibc ``mallinfo2`` sampled after every dispatched op; CUDA: ``torch.cuda.max_memory_allocated``),
bf16 autocast, ``torch.compile`` and a torch.profiler breakdown (GEMM / BatchNorm / other ops / autograd overhead).
The fp32 eager timings are repeated under other CPU allocators, each in its own subprocess (glibc tuned by
environment, jemalloc / tcmalloc by ``LD_PRELOAD`` when the library is installed).

Usage::

    python benchmarks/expert_bank.py [--quick] [--out-json P] [--out-md P] [--out-plot P]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._speed import (  # noqa: E402
    count_ops,
    interleaved_times,
    make_step,
    median_ms,
    peak_step_bytes,
    profile_breakdown,
    saved_activation_bytes,
)
from benchmarks._expert_bank_md import VARIANTS, goals, markdown, plot_sweep  # noqa: E402
from benchmarks._report import DOCS, machine_info, write_json, write_section  # noqa: E402
from star_heads.experts import ExpertBank  # noqa: E402

MAIN = {"STL10": (16, 512, 512, 128, 768), "ImageNet100": (8, 2048, 2048, 128, 256),
        "mid": (8, 512, 512, 128, 256), "small-experts": (64, 128, 128, 64, 256)}
QUICK_MAIN = {"tiny": (4, 32, 32, 16, 64), "tiny-small-experts": (16, 16, 16, 8, 64)}
SWEEP_N, SWEEP_DIMS = (2, 4, 8, 16, 32, 64), (512, 512, 128, 256)
QUICK_SWEEP_N, QUICK_SWEEP_DIMS = (2, 4, 8), (32, 32, 16, 64)
COMPILE_CONFIGS, QUICK_COMPILE_CONFIGS = ("STL10",), ()  # --quick skips compile (~20 s per module)
FEWER_REPEATS = ("ImageNet100",)  # ~1 s per step here: fewer repeats
GLIBC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184",
               "MALLOC_TOP_PAD_": "1073741824"}
GLIBC_MMAP_32M = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                  "MALLOC_TOP_PAD_": "1073741824"}
PRELOADS = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"), "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


# --------------------------------------------------------------------------- the three variants
class Fused(nn.Module):
    """The fused bank and its routed mixture: ``[B, d], gates [B, T, N] -> [T, B, o]``."""

    def __init__(self, bank: ExpertBank) -> None:
        super().__init__()
        self.bank = bank

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return self.bank(x, gates)


class Loop(nn.Module):
    """The same experts as standard modules, one at a time, stacked, same mixture (one bmm)."""

    def __init__(self, experts: nn.ModuleList) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([e(x) for e in self.experts], dim=1)  # [B, N, o]
        return torch.bmm(gates.to(outs.dtype), outs).transpose(0, 1)  # [T, B, o]


class GemmChain(nn.Module):
    """Three GEMMs with the bank's FLOPs per layer (``B·d·N·h``, ``B·N·h·h``, ``B·N·h·o``) and nothing else."""

    def __init__(self, n: int, d: int, h: int, o: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n * h, d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(h, n * h) / (n * h) ** 0.5)
        self.w3 = nn.Parameter(torch.randn(n * o, h) / h**0.5)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(x, self.w1), self.w2), self.w3)


def build(cfg: tuple[int, ...], device: torch.device, seed: int = 0) -> tuple[dict[str, nn.Module], torch.Tensor, torch.Tensor]:
    n, d, h, o, b = cfg
    torch.manual_seed(seed)
    bank = ExpertBank(n, d, h, o).to(device)
    models = {"fused": Fused(bank), "loop": Loop(bank.to_modules()), "dense": GemmChain(n, d, h, o).to(device)}
    x = torch.randn(b, d, device=device, requires_grad=True)
    gates = torch.softmax(torch.randn(b, 2, n, device=device), -1).requires_grad_()
    return models, x, gates


# --------------------------------------------------------------------------- measurements
def time_config(cfg, device, repeats, warmup, amp=None, compiled=False, variants=VARIANTS) -> dict[str, Any]:
    """Medians per variant: ``<v>_ms`` (CPU time on CPU, CUDA-event time on GPU) and ``<v>_wall_ms``; ratios."""
    models, x, gates = build(cfg, device)
    compile_s = {}
    if compiled:  # cold compiles: a fresh inductor cache directory, FX-graph / AOT-autograd caches off
        import torch._functorch.config
        import torch._inductor.config

        cache_dir = tempfile.mkdtemp(prefix="star_heads_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
        torch._dynamo.reset()
        models = {k: torch.compile(models[k]) for k in variants}
    steps = {k: make_step(models[k], x, gates, amp) for k in variants}
    if compiled:  # the first call compiles forward and backward
        for k in variants:
            compile_s[k] = interleaved_times({k: steps[k]}, 1, 0, device)[k]["wall"][0]
    times = interleaved_times(steps, repeats, warmup, device)
    out: dict[str, Any] = {}
    for k in variants:
        out[f"{k}_ms"] = median_ms(times[k]["cpu"])
        out[f"{k}_wall_ms"] = median_ms(times[k]["wall"])
        out[f"{k}_wall_min_ms"] = min(times[k]["wall"]) * 1e3
        out[f"{k}_times_ms"] = [round(t * 1e3, 3) for t in times[k]["cpu"]]
    for ref in ("loop", "dense"):
        if ref in variants and "fused" in variants:
            out[f"fused_vs_{ref}"] = out["fused_ms"] / out[f"{ref}_ms"]
            out[f"fused_vs_{ref}_wall"] = out["fused_wall_ms"] / out[f"{ref}_wall_ms"]
            out[f"fused_vs_{ref}_wall_min"] = out["fused_wall_min_ms"] / out[f"{ref}_wall_min_ms"]
    if compiled:
        out["compile_s"] = compile_s
        shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def structure_config(cfg, device) -> dict[str, Any]:
    """Op counts, saved-activation MB and peak step MB per variant (untimed)."""
    models, x, gates = build(cfg, device)
    res: dict[str, Any] = {"ops": {}, "saved_mb": {}, "peak_step_mb": {}}
    for k, m in models.items():
        step = make_step(m, x, gates)
        step()  # allocate grads once, so the peak below is one steady-state step
        res["ops"][k] = count_ops(step)
        res["saved_mb"][k] = saved_activation_bytes(step, [*m.parameters(), x, gates]) / 2**20
        peak = peak_step_bytes(step, device)
        res["peak_step_mb"][k] = None if peak is None else peak / 2**20
        gc.collect()
    return res


def cfg_dict(name: str, cfg) -> dict[str, Any]:
    return {"name": name, **dict(zip(("N", "d", "h", "out", "B"), cfg))}


# repeats (after warm-up) per measurement, full run / --quick; ImageNet100 (~1.5 s of CPU per step) gets fewer
REPEATS = {"fp32": (5, 2), "fp32_big": (3, 2), "sweep": (3, 2), "bf16": (3, 2), "bf16_big": (2, 2), "compile": (3, 2),
           "threads2": (5, 2), "threads2_big": (3, 2), "alloc": (3, 2), "alloc_big": (2, 2)}


def _reps(kind: str, name: str, quick: bool) -> int:
    key = f"{kind}_big" if name in FEWER_REPEATS and f"{kind}_big" in REPEATS else kind
    return REPEATS[key][1 if quick else 0]


def worker(setting: str, quick: bool, device_name: str, full: bool, threads: int) -> dict[str, Any]:
    """Runs the grid in this process. ``full`` adds sweep, structure, bf16, compile, 2 threads and the profile."""
    device = torch.device(device_name)
    torch.set_num_threads(threads)
    main = QUICK_MAIN if quick else MAIN
    warm = 1
    res: dict[str, Any] = {"setting": setting, "device": device_name, "threads": torch.get_num_threads(),
                           "timer": "CUDA events" if device.type == "cuda" else "process CPU time (user+sys)",
                           "load_avg_start": list(os.getloadavg()),
                           "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}
    kind = "fp32" if full else "alloc"
    res["fp32_eager"] = [{**cfg_dict(n, c), "repeats": _reps(kind, n, quick), **time_config(c, device, _reps(kind, n, quick), warm)}
                         for n, c in main.items()]
    if not full:
        res["load_avg_end"] = list(os.getloadavg())
        return res
    res["structure"] = [{**cfg_dict(n, c), **structure_config(c, device)} for n, c in main.items()]
    sweep_n, dims = (QUICK_SWEEP_N, QUICK_SWEEP_DIMS) if quick else (SWEEP_N, SWEEP_DIMS)
    res["n_sweep"] = []
    for n in sweep_n:
        cfg = (n, *dims)
        s = structure_config(cfg, device)
        t = time_config(cfg, device, _reps("sweep", "", quick), warm)
        res["n_sweep"].append({**cfg_dict(f"N={n}", cfg), **t, "ops": s["ops"], "saved_mb": s["saved_mb"]})
    res["bf16_eager"] = [{**cfg_dict(n, c), **time_config(c, device, _reps("bf16", n, quick), warm, torch.bfloat16)}
                         for n, c in main.items()]
    res["compile"] = []
    for n in (QUICK_COMPILE_CONFIGS if quick else COMPILE_CONFIGS):
        try:
            res["compile"].append({**cfg_dict(n, main[n]), **time_config(main[n], device, _reps("compile", n, quick), 1, compiled=True)})
        except Exception as exc:  # noqa: BLE001  (a compiler failure is a result to report, not a crash)
            res["compile"].append({**cfg_dict(n, main[n]), "error": f"{type(exc).__name__}: {exc}"[:300]})
    res["threads2"] = []
    if device.type == "cpu" and (os.cpu_count() or 1) >= 2 and threads == 1 and not quick:
        torch.set_num_threads(2)  # wall clock with both cores: what a user sees, when the machine lets it
        res["threads2"] = [{**cfg_dict(n, c), **time_config(c, device, _reps("threads2", n, quick), warm)}
                           for n, c in main.items()]
        torch.set_num_threads(threads)
    prof_name = "tiny" if quick else "STL10"
    models, x, gates = build(main[prof_name], device)
    res["profile"] = {"config": cfg_dict(prof_name, main[prof_name]),
                      **{k: profile_breakdown(make_step(models[k], x, gates), device, 1 if quick else 2)
                         for k in ("fused", "loop")}}
    res["load_avg_end"] = list(os.getloadavg())
    return res


# --------------------------------------------------------------------------- allocators (subprocesses)
def find_preload(names: tuple[str, ...]) -> str | None:
    for d in LIB_DIRS:
        for n in names:
            if (Path(d) / n).exists():
                return str(Path(d) / n)
    return None


def allocator_settings(quick: bool) -> dict[str, dict[str, str] | None]:
    """Environment overrides per allocator setting; None = not installed on this machine."""
    settings: dict[str, dict[str, str] | None] = {"glibc-tuned": GLIBC_TUNED}
    if quick:
        return settings
    settings["glibc-mmap32M"] = GLIBC_MMAP_32M
    for name, libs in PRELOADS.items():
        lib = find_preload(libs)
        settings[name] = None if lib is None else {"LD_PRELOAD": lib}
    return settings


def run_subprocess_worker(setting: str, env_over: dict[str, str], quick: bool, threads: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env.update(env_over)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", setting, "--worker-out", str(out), "--threads", str(threads)]
        proc = subprocess.run(cmd + (["--quick"] if quick else []), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"setting": setting, "env": env_over, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (CI smoke run)")
    p.add_argument("--out-json", type=Path)
    p.add_argument("--out-md", type=Path)
    p.add_argument("--out-plot", type=Path)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared, oversubscribed machine multi-threaded steps stall "
                        "at OpenMP barriers whenever one thread is descheduled)")
    p.add_argument("--from-json", type=Path, help="re-render the markdown section and plot from a saved JSON (no timing)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        write_json(a.worker_out, worker(a.worker, a.quick, "cpu", full=False, threads=a.threads))
        return {}
    torch.set_num_threads(a.threads)
    quick_dir = Path(tempfile.gettempdir()) / "star_heads_bench_quick"
    out_json = a.out_json or (quick_dir / "expert_bank.json" if a.quick else DOCS / "benchmarks" / "expert_bank.json")
    out_md = a.out_md or (quick_dir / "benchmarks.md" if a.quick else DOCS / "benchmarks.md")
    out_plot = a.out_plot or (quick_dir / "expert_bank_n_sweep.png" if a.quick else DOCS / "images" / "expert_bank_n_sweep.png")
    if a.from_json:
        payload = json.loads(a.from_json.read_text())
    else:
        payload = {"benchmark": "expert_bank", "quick": a.quick, "machine": machine_info(),
                                   "load_avg_start": list(os.getloadavg()), "devices": {}, "allocators": []}
        env_now = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
        default_name = "glibc (default)" if not env_now else "as launched"
        payload["devices"]["cpu"] = worker(default_name, a.quick, "cpu", full=True, threads=a.threads)
        if torch.cuda.is_available():
            payload["devices"]["cuda"] = worker("cuda caching allocator", a.quick, "cuda", full=True, threads=a.threads)
        for name, env_over in allocator_settings(a.quick).items():
            if env_over is None:
                payload["allocators"].append({"setting": name, "error": "library not installed"})
            else:
                payload["allocators"].append(run_subprocess_worker(name, env_over, a.quick, a.threads))
        payload["load_avg_end"] = list(os.getloadavg())
    payload["goals"] = goals(payload)
    write_json(out_json, payload)
    plot_sweep(payload, out_plot)
    write_section(out_md, "expert_bank", markdown(payload, out_plot, out_md))
    print(f"wrote {out_json}, {out_md} (section expert_bank), {out_plot}")
    return payload


if __name__ == "__main__":
    main()
