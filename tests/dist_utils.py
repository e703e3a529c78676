"""Runs a function in several real gloo processes on the CPU (for DDP / all_reduce tests).

Usage::

    def _worker(rank, world_size, data):   # module level, so it can be pickled
        ...                                # torch.distributed is initialised here
        return {"loss": loss.detach()}     # anything torch.save can write

    results = run_distributed(_worker, world_size=2, args=(data,))   # one result per rank

Each worker process checks that ``destroy_process_group`` really ended its process group: on Linux
the process must be back to the threads it had before ``init_process_group`` (gloo runs worker and
socket threads while a group lives). A group that outlives ``destroy_process_group`` is torn down
during interpreter finalisation instead, racing the other ranks' exits, which aborted workers at
random ("terminate called without an active exception"); see ``star_heads/distributed.py``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import star_heads.distributed  # noqa: F401  (imports torch.distributed.nn.functional before any group exists)


def thread_count() -> int | None:
    """Threads of this process (Linux ``/proc``), or None where that cannot be read."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return None


def _entry(rank: int, fn: Callable, world_size: int, init_file: str, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    before = thread_count()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        del result
    finally:
        dist.barrier()
        dist.destroy_process_group()
    after = thread_count()
    if before is not None and after is not None and after > before:
        raise RuntimeError(
            f"rank {rank}: the process group outlived destroy_process_group ({after - before} threads left running); "
            "something still references it (import star_heads before init_process_group)"
        )


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = ()) -> list[Any]:
    """Spawns ``world_size`` gloo processes running ``fn(rank, world_size, *args)``; returns their results."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_entry, args=(fn, world_size, init_file, tmp, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
