"""What every benchmark script shares: the timer, the untimed step measurements, one table renderer, outputs.

* :func:`interleaved` — the one timer: process CPU time and wall time of several step functions, run in a
  rotating order so that load from other processes hits them alike (CUDA: synchronised wall time).
* :func:`count_ops`, :func:`saved_bytes`, :func:`peak_bytes` — hardware-independent facts about one step.
* :func:`table` — the one markdown table renderer; :func:`write_section` replaces the text between
  ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in a markdown file, leaving the rest (hand-written) alone.
* :func:`output_dir` — ``docs/`` for a full run, a fresh temporary folder for ``--quick`` (never tracked files).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DOCS = Path(__file__).resolve().parents[1] / "docs"


# ------------------------------------------------------------------ outputs
def output_dir(out_dir: Path | None, quick: bool) -> Path:
    """Where a run writes: ``out_dir`` if given, else a new temporary folder (``--quick``) or ``docs/``."""
    if out_dir is not None:
        return Path(out_dir)
    return Path(tempfile.mkdtemp(prefix="star_heads_bench_")) if quick else DOCS


def machine_info() -> dict[str, Any]:
    """CPU model (as ``lscpu`` names it), family/model numbers, core count, torch threads and version, GPU."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    info = {"cpu": fields.get("model name", platform.processor() or platform.machine()),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_avg": list(os.getloadavg()), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    return info


def machine_line(m: dict[str, Any]) -> str:
    """One sentence naming the machine of a run (for the generated sections)."""
    fam = f", family {m['cpu_family']} model {m['cpu_model']}" if m.get("cpu_family") else ""
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    return (f"Measured {m['date_utc']} UTC on {m['cpu']}{fam} ({m['cores']} cores, shared; 1-minute load "
            f"{m['load_avg'][0]:.1f} at start), {m['torch_threads']} torch thread(s), torch {m['torch']}, {gpu}.")


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def write_section(path: Path | str, name: str, body: str, title: str = "Benchmarks") -> Path:
    """Replaces the ``name`` section of the markdown file ``path`` (appends it, or creates the file with ``title``)."""
    path = Path(path)
    text = path.read_text() if path.exists() else f"# {title}\n"
    block = f"<!-- BEGIN {name} -->\n{body.strip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: Iterable[dict[str, Any]], columns: dict[str, str] | list[str]) -> str:
    """A markdown table of ``rows``: ``columns`` lists the keys, or maps them to headers; floats to 3 digits."""
    columns = columns if isinstance(columns, dict) else {c: c for c in columns}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ timing
def single_thread() -> None:
    """One torch thread and, where threadpoolctl is installed, one BLAS thread for numpy (which the metrics may
    call, and which ignores ``torch.set_num_threads``)."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(steps: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                device: torch.device = torch.device("cpu")) -> dict[str, dict[str, Any]]:
    """Times each step ``repeats`` times; round r runs them in an order rotated by r.

    Returns ``{name: {"cpu_ms": median, "wall_ms": median, "cpu_all_ms": [...]}}``. ``cpu`` is this process's
    CPU time (user + system, page faults included): with one torch thread it is the work done, whatever share
    of a core the scheduler gave the process. On CUDA both are the synchronised wall time.
    """
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[n]()
            _sync(device)
            wall[n].append((time.perf_counter() - t0) * 1e3)
            cpu[n].append(wall[n][-1] if device.type == "cuda" else (time.process_time() - c0) * 1e3)
    return {n: {"cpu_ms": statistics.median(cpu[n]), "wall_ms": statistics.median(wall[n]),
                "cpu_all_ms": [round(t, 2) for t in cpu[n]]} for n in names}


# ------------------------------------------------------------------ untimed facts about one step
class _Counter(TorchDispatchMode):
    def __init__(self, after: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.count, self.after = 0, after

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += 1
        if self.after is not None:
            self.after()
        return out


def count_ops(step: Callable[[], Any]) -> int:
    """aten operators dispatched by ``step()`` (forward and backward; an operator's internal calls not counted)."""
    with _Counter() as counter:
        step()
    return counter.count


def saved_bytes(step: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``step()``, not counting those of
    ``exclude`` (parameters and inputs): the activation memory a step keeps between forward and backward."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in excluded:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> Callable[[], int] | None:
    """glibc's bytes in use (heap chunks + mmapped chunks), or None where ``mallinfo2`` does not exist."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return lambda: (m := fn()).uordblks + m.hblkhd


_HEAP = _heap_in_use()
_COUNTER_WARM = False


def peak_bytes(step: Callable[[], Any], device: torch.device = torch.device("cpu")) -> int | None:
    """Peak bytes allocated during ``step()`` above the level before it (None where it cannot be measured).

    CPU: glibc's bytes in use, read after every dispatched aten operator: every tensor alive at that moment
    (activations, saved tensors, gradients, temporaries) is counted; scratch an operator frees before it
    returns, and memory the allocator keeps cached after a free, are not. CUDA: the caching allocator's
    ``max_memory_allocated``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if _HEAP is None:
        return None
    global _COUNTER_WARM
    if not _COUNTER_WARM:  # the first dispatch-mode run of a process allocates ~20 MB of its own (measured)
        with _Counter(lambda: None):
            (torch.ones(2, requires_grad=True) * 2).sum().backward()
        _COUNTER_WARM = True
    base, peak = _HEAP(), [0]

    def sample() -> None:
        peak[0] = max(peak[0], _HEAP())

    with _Counter(sample):
        step()
    return max(peak[0], base) - base
