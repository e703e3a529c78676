"""Measurement helpers shared by the speed benchmarks (expert_bank.py, train_step.py).

* :func:`interleaved_times` — wall time of several step functions, interleaved (rotating order) so that load
  from other processes hits all of them alike; CUDA steps are timed with CUDA events after a synchronise.
* :func:`count_ops` — aten operators dispatched by one step (TorchDispatchMode): hardware independent.
* :func:`saved_activation_bytes` — bytes of the distinct tensor storages autograd saves for backward,
  parameters and inputs excluded (saved-tensor hooks): deterministic, hardware independent.
* :func:`peak_step_bytes` — heap growth during one step: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
  glibc's ``mallinfo2`` (bytes in use, heap + mmapped) sampled after every dispatched op, which sees every
  tensor an op returns (an op's internal scratch buffers freed before it returns are missed).
* :func:`profile_breakdown` — torch.profiler self time per category (GEMM, BatchNorm, other aten ops,
  autograd / framework overhead) and the number of aten calls per step *including* those an operator makes
  internally (which :func:`count_ops` does not see: it counts the operators dispatched from Python).
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["interleaved_times", "median_ms", "make_step", "count_ops", "saved_activation_bytes",
           "peak_step_bytes", "profile_breakdown", "GEMM_OPS"]

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::convolution",
            "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution")


def make_step(model: nn.Module, x: torch.Tensor, gates: torch.Tensor, amp: torch.dtype | None = None) -> Callable[[], None]:
    """One forward+backward of ``model(x, gates)`` against a fixed random upstream gradient (grads reset first)."""
    params = list(model.parameters())
    up: dict[str, torch.Tensor] = {}

    def step() -> None:
        for t in (*params, x, gates):
            t.grad = None
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            z = model(x, gates)
        if "up" not in up:
            up["up"] = torch.randn(z.shape, device=z.device, generator=torch.Generator(z.device).manual_seed(1))
        (z.float() * up["up"]).sum().backward()

    return step


def _time_one(fn: Callable[[], Any], device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds of this process); CUDA: (CUDA-event seconds, None)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, None
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved_times(
    steps: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """``{name: {"wall": [s...], "cpu": [s...]}}``; round r runs the steps in an order rotated by r.

    On CPU, "cpu" is the process CPU time (user + system, page faults included) of the step: with one torch
    thread it is the work done, unaffected by the scheduler handing the core to other processes. On CUDA
    "cpu" repeats the CUDA-event time.
    """
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            wall, cpu = _time_one(steps[n], device)
            times[n]["wall"].append(wall)
            times[n]["cpu"].append(wall if cpu is None else cpu)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], Any]) -> int:
    """Number of aten operators dispatched by ``step()`` (forward and backward)."""
    with _OpCounter() as counter:
        step()
    return counter.count


def saved_activation_bytes(step: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages saved for backward by ``step()``, not counting those of ``exclude``."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2() -> Callable[[], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def used() -> int:
        m = fn()
        return m.uordblks + m.hblkhd

    return used


_HEAP_USED = _mallinfo2()


class _HeapPeak(TorchDispatchMode):
    def __init__(self, used: Callable[[], int]) -> None:
        super().__init__()
        self.used, self.peak = used, used()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.used())
        return out


def peak_step_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated above the level before ``step()`` (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if _HEAP_USED is None:
        return None
    base = _HEAP_USED()
    with _HeapPeak(_HEAP_USED) as mode:
        step()
    return mode.peak - base


def _category(key: str) -> str:
    if key in GEMM_OPS:
        return "gemm"
    if "batch_norm" in key:
        return "batch_norm"
    if key.startswith("aten::"):
        return "other_aten"
    return "autograd_overhead"


def profile_breakdown(step: Callable[[], Any], device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Milliseconds per step of profiler self time by category, the top ops, and the share of each category."""
    from torch.profiler import ProfilerActivity, profile

    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    cats: dict[str, float] = {}
    ops: list[tuple[str, float]] = []
    calls = 0
    for e in prof.key_averages():
        calls += e.count if e.key.startswith("aten::") else 0
        ms = getattr(e, attr) / 1e3 / steps
        cats[_category(e.key)] = cats.get(_category(e.key), 0.0) + ms
        ops.append((e.key, ms))
    total = sum(cats.values()) or 1.0
    top = sorted(ops, key=lambda kv: -kv[1])[:8]
    return {"ms_per_step": cats, "share": {k: v / total for k, v in cats.items()}, "total_ms": total,
            "top_ops_ms": dict(top), "aten_calls_per_step": calls / steps}
