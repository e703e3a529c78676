"""star_heads.distributed and the gather=True losses, checked with 2 real gloo processes.

Each rank gets half the batch; DDP averages gradients. Every parameter gradient and the
rank-averaged loss must equal the single-process run on the full batch. A naive gather whose
backward drops the other ranks' gradient (lightly's open bug) must fail the same comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import star_heads.distributed as sd
from star_heads.losses import equivariant_nt_xent, nt_xent, vicreg

B, IN, D, P = 8, 6, 5, 3
KINDS = ("nt_xent", "equivariant", "vicreg")


class _Encoder(nn.Module):
    """Tiny model producing both views' embeddings and equivariant predictions in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(IN, D)
        self.pred = nn.Linear(D + P, D)

    def forward(self, x0, x1, x2, p1, p2):
        z0, z1, z2 = self.enc(x0), self.enc(x1), self.enc(x2)
        targets = torch.cat([z1, z2])
        predictions = self.pred(torch.cat([torch.cat([z0, p1], 1), torch.cat([z0, p2], 1)]))
        # the invariant losses see view 2 through the predictor too, so every parameter gets a gradient
        return z1, self.pred(torch.cat([z2, p2], 1)), targets, predictions


def _loss(kind, z1, z2, targets, predictions, gather):
    if kind == "nt_xent":
        return nt_xent(z1, z2, 0.2, gather=gather)
    if kind == "equivariant":
        return equivariant_nt_xent(targets, predictions, 0.2, gather=gather)
    return vicreg(z1 * 0.3, z2 * 0.3, gather=gather).loss  # scaled so the variance hinge is active


def _data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, IN, generator=g) for _ in range(3)]
    ps = [torch.randn(B, P, generator=g) for _ in range(2)]
    torch.manual_seed(1)
    return xs + ps, _Encoder().state_dict()


def _single_process(kind, data, state):
    model = _Encoder()
    model.load_state_dict(state)
    loss = _loss(kind, *model(*data), gather=False)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


class _NaiveGather(torch.autograd.Function):
    """all_gather whose backward returns the local slice only (no all-reduce): the buggy pattern."""

    @staticmethod
    def forward(ctx, x):
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _ddp_run(kind, data, state, rank, world_size):
    model = _Encoder()
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model)
    n = B // world_size
    local = [t[rank * n : (rank + 1) * n] for t in data]
    loss = _loss(kind, *ddp(*local), gather=True)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _count_gather_collectives():
    """all_gather calls of 5 gathers of one shape, then 2 of a new shape: the shape is checked once per shape."""
    real, calls = dist.all_gather, []
    dist.all_gather = lambda parts, x, *a, **k: (calls.append(x.dtype), real(parts, x, *a, **k))[1]
    try:
        sd.clear_shape_cache()
        for _ in range(5):
            sd.gather(torch.ones(4, 2))
        first = list(calls)
        for _ in range(2):
            sd.gather(torch.ones(3, 2))
    finally:
        dist.all_gather = real
    return first, calls


def _worker(rank, world_size, data, state):
    out = {"rank": sd.rank(), "world_size": sd.world_size(), "is_distributed": sd.is_distributed()}
    # gather: forward concatenates in rank order; backward sums every rank's gradient
    x = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_(True)
    y = sd.gather(x)
    weights = torch.arange(12.0).reshape(6, 2) * (rank + 1)
    (y * weights).sum().backward()
    out["gathered"], out["gather_grad"] = y.detach(), x.grad.clone()
    out["all_reduce_sum"] = sd.all_reduce_sum(torch.tensor([float(rank + 1)]))
    try:
        sd.gather(torch.zeros(2 + rank, 3))
    except ValueError as err:
        out["shape_error"] = str(err)
    out["collectives"] = _count_gather_collectives()
    for kind in KINDS:
        out[kind] = _ddp_run(kind, data, state, rank, world_size)
    real = sd.gather
    sd.gather = _NaiveGather.apply
    try:
        for kind in KINDS:
            out["naive_" + kind] = _ddp_run(kind, data, state, rank, world_size)
    finally:
        sd.gather = real
    return out


@pytest.fixture(scope="module")
def dist_results():
    data, state = _data()
    return data, state, run_distributed(_worker, world_size=2, args=(data, state))


def test_not_distributed_helpers_are_identity():
    x = torch.randn(3, 2)
    assert sd.gather(x) is x
    assert (sd.world_size(), sd.rank(), sd.is_distributed()) == (1, 0, False)
    torch.testing.assert_close(sd.all_reduce_sum(x), x)


@pytest.mark.distributed
def test_gather_forward_backward(dist_results):
    _, _, res = dist_results
    want = torch.cat([torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10])
    w = torch.arange(12.0).reshape(6, 2)
    for r, out in enumerate(res):
        assert (out["rank"], out["world_size"], out["is_distributed"]) == (r, 2, True)
        torch.testing.assert_close(out["gathered"], want)
        # d/dx_r of sum_r' <y, w*(r'+1)> = (1 + 2) * w[rows of r]
        torch.testing.assert_close(out["gather_grad"], 3 * w[3 * r : 3 * r + 3])
        assert out["all_reduce_sum"].item() == 3.0
        assert "same shape on every rank" in out["shape_error"] and "(2, 3)" in out["shape_error"]
        first, calls = out["collectives"]
        assert first == [torch.int64] + [torch.float32] * 5  # one shape check, then the data only
        assert calls == first + [torch.int64] + [torch.float32] * 2  # a new shape: checked once more


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_gather_equals_single_process(dist_results, kind):
    data, state, res = dist_results
    loss, grads = _single_process(kind, data, state)
    torch.testing.assert_close((res[0][kind][0] + res[1][kind][0]) / 2, loss, rtol=1e-5, atol=1e-6)
    for out in res:
        for name, g in grads.items():
            torch.testing.assert_close(out[kind][1][name], g, rtol=1e-4, atol=1e-6, msg=f"{kind}: {name}")


@pytest.mark.distributed
@pytest.mark.parametrize("kind", KINDS)
def test_naive_gather_fails_the_comparison(dist_results, kind):
    data, state, res = dist_results
    loss, grads = _single_process(kind, data, state)
    # the forward is the same, so the loss still matches ...
    torch.testing.assert_close((res[0]["naive_" + kind][0] + res[1]["naive_" + kind][0]) / 2, loss, rtol=1e-5, atol=1e-6)
    # ... but some gradient is off by far more than the tolerance used above
    worst = max(
        ((res[0]["naive_" + kind][1][name] - g).abs().max() / g.abs().max()).item() for name, g in grads.items()
    )
    assert worst > 1e-2
