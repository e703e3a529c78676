import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t


@pytest.mark.distributed
def test_run_distributed_all_reduce():
    results = run_distributed(_sum_ranks, world_size=2)
    assert [r.item() for r in results] == [3.0, 3.0]
