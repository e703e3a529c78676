"""Local crops (multi-crop) and parameter vectors of any width through the adapters."""

import copy

import pytest
import torch
from torch import nn

from star_heads.adapters import EquiModAdapter, SimCLRAdapter, VICRegAdapter
from star_heads.augment import STARAugment
from star_heads.losses import equivariant_nt_xent, nt_xent, vicreg

B, D = 16, 12


def _data(local, p=11, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(B, D, generator=g).to(device).requires_grad_(True) for _ in range(3 + local)]
    return hs[:3], [torch.rand(B, p, generator=g).to(device) for _ in range(2)], hs[3:]


@pytest.mark.parametrize("cls", [SimCLRAdapter, VICRegAdapter])
@pytest.mark.parametrize("local", [1, 3])
@pytest.mark.parametrize("joint", [True, False])
def test_multi_crop_loss_is_the_documented_pair_average(cls, local, joint, device):
    torch.manual_seed(0)
    adapter = cls(D, num_experts=3, output_dim=6, cca_every=0, lam=0.5, device=device)
    ref = copy.deepcopy(adapter)
    (h0, h1, h2), (p1, p2), h_local = _data(local, device=device)
    kwargs = {"h0": h0, "params1": p1, "params2": p2} if joint else {}
    out = adapter(h1, h2, h_local=h_local, **kwargs)

    # the formula of JointAdapter.forward, written out from the parts (lightly's SwaV/DINO pair average)
    inv = (lambda a, b: vicreg(a, b)) if cls is VICRegAdapter else (lambda a, b: nt_xent(a, b, 0.2))
    total = (lambda r: r.loss) if cls is VICRegAdapter else (lambda r: r)
    zl = [ref.head(h, task="inv") for h in h_local]
    if joint:
        o1, o2, z0 = ref.head(h1), ref.head(h2), ref.head(h0, task="eq")
        z1, z2 = o1["inv"], o2["inv"]
    else:
        z1, z2 = ref.head(h1, task="inv"), ref.head(h2, task="inv")
    pairs = [(1.0, inv(z1, z2))] + [(0.5, inv(zg, z)) for z in zl for zg in (z1, z2)]
    l_inv = sum(w * total(r) for w, r in pairs) / (1 + local)
    torch.testing.assert_close(out.losses["inv"], l_inv.detach())
    if cls is VICRegAdapter:
        for term in ("invariance", "variance", "covariance"):
            want = sum(w * getattr(r, term) for w, r in pairs) / (1 + local)
            torch.testing.assert_close(out.losses[f"inv/{term}"], want.detach())
    if joint:  # the equivariant term sees the global views only
        a1, a2 = ref.normalizer(torch.cat([p1, p2])).float().chunk(2)
        targets = torch.cat([o1["eq"], o2["eq"]])
        preds = torch.cat([ref.predictor(z0, a1), ref.predictor(z0, a2)])
        l_eq = vicreg(targets, preds).loss if cls is VICRegAdapter else equivariant_nt_xent(targets, preds, 0.2)
        torch.testing.assert_close(out.loss, l_inv + 0.5 * l_eq)
    else:
        torch.testing.assert_close(out.loss, l_inv)
    assert [k for k in out.embeddings if k.startswith("inv_local")] == [f"inv_local{k + 1}" for k in range(local)]
    out.loss.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in h_local)


@pytest.mark.parametrize("view_batching", ["separate", "concat"])
def test_no_local_crops_is_the_two_view_objective(view_batching):
    torch.manual_seed(1)
    adapter = SimCLRAdapter(D, num_experts=2, output_dim=6, cca_every=0, view_batching=view_batching)
    ref = copy.deepcopy(adapter)
    (h0, h1, h2), (p1, p2), _ = _data(0)
    a = adapter(h1, h2, h0=h0, params1=p1, params2=p2, h_local=[])
    b = ref(h1, h2, h0=h0, params1=p1, params2=p2)
    torch.testing.assert_close(a.loss, b.loss)


def test_concat_batching_runs_the_local_crops_in_one_head_call():
    torch.manual_seed(2)
    adapter = VICRegAdapter(D, num_experts=2, output_dim=6, cca_every=0, view_batching="concat")
    calls = []
    adapter.head.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True)
    (h0, h1, h2), (p1, p2), h_local = _data(2)
    adapter(h1, h2, h0=h0, params1=p1, params2=p2, h_local=h_local)
    assert sorted(calls) == [2 * B, 3 * B]  # locals together (task "inv"), then x0, x1, x2 together


@pytest.mark.parametrize("cls", [SimCLRAdapter, VICRegAdapter, EquiModAdapter])
@pytest.mark.parametrize("param_dim", [11, 12])
def test_param_dim_sizes_the_predictor_and_normaliser_and_trains(cls, param_dim):
    torch.manual_seed(3)
    backbone = nn.Linear(8, D)
    adapter = cls(D, num_experts=2, output_dim=6, param_dim=param_dim, cca_every=0)
    assert adapter.predictor.param_dim == param_dim and adapter.normalizer.dim == param_dim
    opt = torch.optim.SGD([*backbone.parameters(), *adapter.parameters()], lr=0.01)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, 8, generator=g)
    params = [torch.rand(B, param_dim, generator=g) for _ in range(2)]
    for _ in range(3):
        out = adapter(backbone(x + 0.1), backbone(x - 0.1), h0=backbone(x), params1=params[0], params2=params[1])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert torch.isfinite(out.loss) and adapter.normalizer.num_samples.item() == 3 * 2 * B
    assert adapter.predictor.param_encoder.weight.grad is not None if cls is not EquiModAdapter else True
    with pytest.raises(ValueError, match=rf"params1 must have shape \[\*, {param_dim}\]"):
        adapter(x[:, :D].new_ones(B, D), x.new_ones(B, D), h0=x.new_ones(B, D),
                params1=torch.rand(B, param_dim + 1), params2=torch.rand(B, param_dim + 1))


def test_an_augmentations_param_dim_sizes_the_adapter():
    aug = STARAugment(16)
    width = getattr(aug, "param_dim", 11)
    images = torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    (_, p1), (_, p2) = aug(images), aug(images)
    adapter = SimCLRAdapter(D, num_experts=2, output_dim=6, param_dim=width, cca_every=0)
    h = torch.randn(3, B, D)
    out = adapter(h[1], h[2], h0=h[0], params1=p1, params2=p2)
    assert p1.shape == (B, width) and torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "h_local, error, match",
    [
        (torch.randn(B, D), TypeError, "h_local must be a list of .* got Tensor"),
        ([torch.randn(B, D), torch.randn(B - 1, D)], ValueError, r"h_local\[1\] must have the batch size of h1"),
        ([torch.randn(B, D + 1)], ValueError, r"h_local\[0\] must have shape \[\*, 12\]"),
        ([torch.ones(B, D, dtype=torch.long)], TypeError, r"h_local\[0\] must be a floating-point tensor"),
    ],
)
def test_bad_local_crops_are_refused_before_any_state_changes(h_local, error, match):
    adapter = SimCLRAdapter(D, num_experts=2, output_dim=6, cca_every=1)
    (h0, h1, h2), (p1, p2), _ = _data(0)
    before = copy.deepcopy(adapter.state_dict())
    with pytest.raises(error, match=match):
        adapter(h1, h2, h0=h0, params1=p1, params2=p2, h_local=h_local)
    assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items()) and adapter.monitor.steps == 0


@pytest.mark.parametrize("normalizer", ["running", "stl10"])
def test_device_and_dtype_reach_every_parameter_and_buffer(normalizer):
    meta = VICRegAdapter(D, num_experts=2, output_dim=6, normalizer=normalizer, device="meta")
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {"meta"}
    wide = SimCLRAdapter(D, num_experts=2, output_dim=6, dtype=torch.float64, cca_every=0)
    assert {p.dtype for p in wide.parameters()} == {torch.float64}
    (h0, h1, h2), (p1, p2), _ = _data(0)
    out = wide(h1.double(), h2.double(), h0=h0.double(), params1=p1.double(), params2=p2.double())
    assert out.loss.dtype == torch.float64 and out.embeddings["pred1"].dtype == torch.float64
