"""Runs a function in several real gloo processes on the CPU (for DDP / all_reduce tests).

Usage::

    def _worker(rank, world_size, data):   # module level, so it can be pickled
        ...                                # torch.distributed is initialised here
        return {"loss": loss.detach()}     # anything torch.save can write

    results = run_distributed(_worker, world_size=2, args=(data,))   # one result per rank
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable, world_size: int, init_file: str, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = ()) -> list[Any]:
    """Spawns ``world_size`` gloo processes running ``fn(rank, world_size, *args)``; returns their results."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_entry, args=(fn, world_size, init_file, tmp, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
