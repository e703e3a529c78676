"""DDP with 2 gloo processes equals one process on the concatenated batch (BatchNorm-free head and
predictor: SyncBatchNorm only syncs on GPUs, so per-rank BatchNorm statistics differ by design)."""

import pytest
import torch
from dist_utils import run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from star_heads.adapters import SimCLRAdapter, VICRegAdapter
from star_heads.equivariance import EquivariantPredictor
from star_heads.heads import STARHead


class _Model(nn.Module):
    def __init__(self, cls):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(6, 12)
        head = STARHead(12, 8, num_experts=3, norm_layer=None)
        pred = EquivariantPredictor(8, 11, hidden_dim=16, norm_layer=nn.Identity)
        self.adapter = cls(12, head=head, predictor=pred, gather=True, cca_every=1)

    def forward(self, x0, x1, x2, p1, p2):
        f = self.backbone
        return self.adapter(f(x1), f(x2), h0=f(x0), params1=p1, params2=p2)


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 6, generator=g) for _ in range(3)] + [torch.rand(16, 11, generator=g) * 5 for _ in range(2)]


def _run(model, batch):
    out = model(*batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, model.module.adapter if isinstance(model, DDP) else model.adapter, out.cca


def _worker(rank, world_size, cls):
    model = DDP(_Model(cls))
    batch = [t.chunk(world_size)[rank] for t in _data()]
    loss, grads, adapter, cca = _run(model, batch)
    loss_mean = loss.clone()
    torch.distributed.all_reduce(loss_mean)
    return {
        "loss": loss_mean / world_size,
        "grads": {n.removeprefix("module."): g for n, g in grads.items()},
        "norm_mean": adapter.normalizer.running_mean.clone(),
        "cca": cca.mean,
    }


@pytest.mark.distributed
@pytest.mark.parametrize("cls", [SimCLRAdapter, VICRegAdapter])
def test_ddp_equals_single_process(cls):
    ref_loss, ref_grads, ref_adapter, ref_cca = _run(_Model(cls), _data())
    results = run_distributed(_worker, world_size=2, args=(cls,))
    for r in results:
        torch.testing.assert_close(r["loss"], ref_loss)
        assert r["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(r["grads"][name], g, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(r["norm_mean"], ref_adapter.normalizer.running_mean)
        assert r["cca"] == pytest.approx(ref_cca.mean, abs=1e-6)  # fp32 embeddings, float64 statistics
