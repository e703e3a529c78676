import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from star_heads.adapters import EquiModAdapter, SimCLRAdapter, VICRegAdapter, build_head
from star_heads.baselines import SeparateHeads, SharedSpecificHead
from star_heads.equivariance import EquivariantPredictor
from star_heads.heads import STARHead
from star_heads.losses import equivariant_nt_xent, nt_xent, vicreg

ADAPTERS = [SimCLRAdapter, VICRegAdapter, EquiModAdapter]


def _batch(b=24, d=16, p=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g) for _ in range(3)] + [torch.rand(b, p, generator=g) for _ in range(2)]


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("view_batching", ["separate", "concat"])
def test_joint_loss_is_the_paper_objective(cls, view_batching):
    torch.manual_seed(0)
    adapter = cls(16, num_experts=3, output_dim=8, cca_every=0, view_batching=view_batching, lam=0.7)
    h0, h1, h2, p1, p2 = _batch()
    ref = copy.deepcopy(adapter)
    out = adapter(h1, h2, h0=h0, params1=p1, params2=p2)
    # the same objective written out from the parts (STAR, arXiv 2510.27222: L = L_inv + λ·L_eq)
    head, pred, norm = ref.head, ref.predictor, ref.normalizer
    if view_batching == "separate":
        o1, o2, z0 = head(h1), head(h2), head(h0, task="eq")
    else:
        both = head(torch.cat([h0, h1, h2]))
        z0, zi, ze = both["eq"][:24], both["inv"][24:].chunk(2), both["eq"][24:].chunk(2)
        o1, o2 = {"inv": zi[0], "eq": ze[0]}, {"inv": zi[1], "eq": ze[1]}
    a1, a2 = norm(torch.cat([p1, p2])).float().chunk(2)
    targets = torch.cat([o1["eq"], o2["eq"]])
    preds = torch.cat([pred(z0, a1), pred(z0, a2)])
    if cls is VICRegAdapter:
        inv, eq = vicreg(o1["inv"], o2["inv"]).loss, vicreg(targets, preds).loss
    else:
        inv, eq = nt_xent(o1["inv"], o2["inv"], 0.2), equivariant_nt_xent(targets, preds, 0.2)
    torch.testing.assert_close(out.losses["inv"], inv.detach())
    torch.testing.assert_close(out.losses["eq"], eq.detach())
    torch.testing.assert_close(out.loss, inv + 0.7 * eq)
    assert set(out.embeddings) == {"inv1", "inv2", "eq0", "eq1", "eq2", "pred1", "pred2"}
    assert out.gates.shape == (24, 2, 3)
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(24, 2))


@pytest.mark.parametrize("cls", ADAPTERS)
def test_invariant_only_call_is_the_old_objective(cls):
    torch.manual_seed(1)
    adapter = cls(16, num_experts=2, output_dim=8)
    _, h1, h2, _, _ = _batch()
    ref = copy.deepcopy(adapter)
    out = adapter(h1, h2)
    z1, z2 = ref.head(h1, task="inv"), ref.head(h2, task="inv")
    expected = vicreg(z1, z2).loss if cls is VICRegAdapter else nt_xent(z1, z2, 0.2)
    torch.testing.assert_close(out.loss, expected)
    assert out.cca is None and set(out.embeddings) == {"inv1", "inv2"}
    assert int(adapter.normalizer.num_samples) == 0  # no parameters seen


@pytest.mark.parametrize("cls", ADAPTERS)
def test_training_lowers_loss_reaches_backbone_and_logs(cls):
    torch.manual_seed(2)
    backbone = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
    adapter = cls(16, num_experts=4, output_dim=8, cca_every=3)
    opt = torch.optim.SGD(list(backbone.parameters()) + list(adapter.parameters()), lr=0.005 if cls is VICRegAdapter else 0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    losses, results = [], []
    for step in range(12):
        noise = [0.1 * torch.randn(64, 10, generator=g) for _ in range(2)]
        params = [torch.rand(64, 11, generator=g) for _ in range(2)]
        out = adapter(backbone(x + noise[0]), backbone(x + noise[1]), h0=backbone(x), params1=params[0], params2=params[1])
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            assert backbone[0].weight.grad.abs().sum() > 0  # gradients reach the backbone
            assert adapter.head.router.linear.weight.grad.abs().sum() > 0  # and the routers
        opt.step()
        losses.append(out.loss.item())
        if out.cca is not None:
            results.append(out.cca)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert len(results) == 4 and all(0.0 <= r.mean <= 1.0 for r in results)
    assert results[-1].n == 3 * 128 and adapter.monitor.last is results[-1]
    assert int(adapter.normalizer.num_samples) == 12 * 128


def test_user_supplied_losses_are_used():
    calls = []

    def my_loss(z0, z1):
        calls.append((z0.shape, z1.shape))
        return (z0 - z1).pow(2).mean()

    adapter = SimCLRAdapter(16, num_experts=2, output_dim=8, loss=my_loss, eq_loss=lambda a, b: (a - b).abs().mean())
    h0, h1, h2, p1, p2 = _batch()
    out = adapter(h1, h2, h0=h0, params1=p1, params2=p2)
    assert calls == [(torch.Size([24, 8]), torch.Size([24, 8]))]
    targets = torch.cat([out.embeddings["eq1"], out.embeddings["eq2"]])
    preds = torch.cat([out.embeddings["pred1"], out.embeddings["pred2"]])
    torch.testing.assert_close(out.losses["eq"], (targets - preds).abs().mean().detach())


@pytest.mark.parametrize("kind, cls", [("star", STARHead), ("separate", SeparateHeads), ("shared", SharedSpecificHead)])
def test_baseline_heads_plug_in(kind, cls):
    adapter = EquiModAdapter(16, head=kind, output_dim=8, **({"num_experts": 3} if kind == "star" else {}))
    assert isinstance(adapter.head, cls)
    h0, h1, h2, p1, p2 = _batch()
    out = adapter(h1, h2, h0=h0, params1=p1, params2=p2)
    assert torch.isfinite(out.loss)
    assert adapter.predictor.kind == "equimod"


def test_single_head_is_invariant_only():
    adapter = SimCLRAdapter(16, head="single", output_dim=8)
    h0, h1, h2, p1, p2 = _batch()
    assert torch.isfinite(adapter(h1, h2).loss) and adapter.predictor is None and adapter.monitor is None
    with pytest.raises(ValueError, match=r"tasks \('inv',\): a joint call needs an 'eq' task"):
        adapter(h1, h2, h0=h0, params1=p1, params2=p2)
    assert set(adapter.embed(h1)) == {"inv"}


def test_embed_returns_both_tasks_without_grad():
    adapter = SimCLRAdapter(16, num_experts=2, output_dim=8).eval()
    e = adapter.embed(torch.randn(5, 16, requires_grad=True))
    assert set(e) == {"inv", "eq"} and not e["inv"].requires_grad


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"h2": torch.randn(23, 16)}, ValueError, r"h2 must have the batch size of h1 \(24 rows\), got shape \(23, 16\)"),
        ({"h0": torch.randn(24, 15)}, ValueError, r"h0 must have shape \[\*, 16\]"),
        ({"params1": None}, ValueError, r"missing \['params1'\]"),
        ({"params2": torch.rand(24, 10)}, ValueError, r"params2 must have shape \[\*, 11\].*expected 11, got 10"),
        ({"h1": torch.randn(0, 16), "h2": torch.randn(0, 16)}, ValueError, "h1 must hold at least one row"),
        ({"params1": torch.ones(24, 11, dtype=torch.long)}, TypeError, "params1 must be a floating-point"),
        ({"h1": torch.randn(24)}, ValueError, "h1 must have 2 dimensions"),
    ],
)
def test_bad_input_raises_before_any_state_changes(change, error, match):
    adapter = SimCLRAdapter(16, num_experts=2, output_dim=8, cca_every=1)
    h0, h1, h2, p1, p2 = _batch()
    args = {"h1": h1, "h2": h2, "h0": h0, "params1": p1, "params2": p2, **change}
    before = copy.deepcopy(adapter.state_dict())
    with pytest.raises(error, match=match):
        adapter(args.pop("h1"), args.pop("h2"), **args)
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert adapter.monitor.steps == 0


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown head kind 'moe'"):
        SimCLRAdapter(16, head="moe")
    with pytest.raises(ValueError, match="temperature"):
        SimCLRAdapter(16, temperature=0.0)
    with pytest.raises(ValueError, match="lam must be >= 0.0, got -1.0"):
        SimCLRAdapter(16, lam=-1.0)
    with pytest.raises(ValueError, match="normalizer must be one of"):
        SimCLRAdapter(16, normalizer="imagenet")
    with pytest.raises(TypeError, match="normalizer must be one of .* got int"):
        SimCLRAdapter(16, normalizer=3)
    with pytest.raises(ValueError, match="'stl10' holds the published 11-D constants, but param_dim is 12"):
        SimCLRAdapter(16, normalizer="stl10", param_dim=12)


def test_state_dict_round_trip_includes_normaliser():
    torch.manual_seed(3)
    a = VICRegAdapter(16, num_experts=2, output_dim=8)
    h0, h1, h2, p1, p2 = _batch()
    a(h1, h2, h0=h0, params1=p1, params2=p2)
    sd = a.state_dict()
    assert {"normalizer.running_mean", "normalizer.running_var", "normalizer.num_samples"} <= set(sd)
    b = VICRegAdapter(16, num_experts=2, output_dim=8)
    b.load_state_dict(sd)
    a.eval(), b.eval()
    torch.testing.assert_close(a(h1, h2, h0=h0, params1=p1, params2=p2).loss, b(h1, h2, h0=h0, params1=p1, params2=p2).loss)
    torch.testing.assert_close(b.normalizer.mean, a.normalizer.mean)


@given(b=st.integers(4, 12), d=st.integers(2, 9), out=st.integers(2, 6), n=st.integers(1, 4), p=st.integers(1, 5))
def test_output_shapes(b, d, out, n, p):
    adapter = SimCLRAdapter(d, num_experts=n, output_dim=out, hidden_dim=d, param_dim=p, cca_every=0)  # tiny: paper shape
    g = torch.Generator().manual_seed(b)
    hs = [torch.randn(b, d, generator=g) for _ in range(3)]
    res = adapter(hs[1], hs[2], h0=hs[0], params1=torch.rand(b, p, generator=g), params2=torch.rand(b, p, generator=g))
    assert all(v.shape == (b, out) for v in res.embeddings.values())
    assert res.gates.shape == (b, 2, n) and res.loss.ndim == 0


def test_build_head_passthrough_and_hidden_default():
    m = STARHead(8, 4, num_experts=2)
    assert build_head(m, 8) is m
    assert build_head("separate", 12).heads["inv"].hidden_dim == 12
    pred = EquivariantPredictor(4, 11, kind="hyper")
    assert SimCLRAdapter(8, head=m, predictor=pred).predictor is pred


def test_as_dict_is_flat_python_floats_with_every_readout():
    torch.manual_seed(4)
    adapter = VICRegAdapter(16, num_experts=3, output_dim=4, cca_every=1)
    g = torch.Generator().manual_seed(1)
    h0, h1, h2 = (torch.randn(40, 16, generator=g) for _ in range(3))
    out = adapter(h1, h2, h0=h0, params1=torch.rand(40, 11, generator=g), params2=torch.rand(40, 11, generator=g))
    flat = out.as_dict("train/")
    assert all(type(v) is float for v in flat.values())
    assert flat["train/loss"] == out.loss.item() and flat["train/eq"] == out.losses["eq"].item()
    # the VICReg terms come from the loss output's own terms(), not from names the adapter knows
    for part in ("invariance", "variance", "covariance"):
        assert flat[f"train/inv/{part}"] == out.losses[f"inv/{part}"].item()
        assert f"train/eq/{part}" in flat
    assert out.cca is not None and flat["train/cca/mean"] == out.cca.mean and "train/cca/null_mean" in flat
    loads = [flat[f"train/routing/eq/expert_{k}/load"] for k in range(3)]
    torch.testing.assert_close(torch.tensor(loads, dtype=torch.float64), out.gates[:, 1].double().mean(0))
    assert not any(k.startswith("train/routing") for k in out.as_dict("train/", routing=False))
    assert set(adapter(h1, h2).as_dict()) == {"loss", "inv", "inv/invariance", "inv/variance", "inv/covariance"}


class _Terms:
    """A loss output listing its own terms (any names): the adapter reports them without knowing them."""

    def __init__(self, a, b):
        self.loss = (a - b).pow(2).mean() + a.abs().mean()
        self._terms = {"mse": (a - b).pow(2).mean(), "l1": a.abs().mean()}

    def terms(self):
        return self._terms


def test_loss_outputs_list_their_own_terms():
    adapter = SimCLRAdapter(16, num_experts=2, output_dim=8, loss=_Terms, cca_every=0)
    _, h1, h2, _, _ = _batch()
    out = adapter(h1, h2)
    assert set(out.losses) == {"inv", "inv/mse", "inv/l1"}
    torch.testing.assert_close(out.losses["inv"], out.losses["inv/mse"] + out.losses["inv/l1"])


@pytest.mark.parametrize(
    "result, error, match",
    [
        (lambda a, b: 1.0, TypeError, "loss must return a scalar Tensor or an object.*got float"),
        (lambda a, b: None, TypeError, "got NoneType"),
        (lambda a, b: ((a - b).pow(2).mean(), {}), TypeError, "got tuple"),
        (lambda a, b: (a - b).pow(2).mean(0), ValueError, r"scalar \(0-dim\) Tensor, got shape \(8,\)"),
        (lambda a, b: (a - b).pow(2).mean().detach(), ValueError, "without a gradient"),
        (lambda a, b: torch.tensor(3), TypeError, "floating-point Tensor, got dtype torch.int64"),
    ],
)
def test_a_bad_user_loss_fails_at_the_call_not_at_backward(result, error, match):
    _, h1, h2, _, _ = _batch()
    with pytest.raises(error, match=match):
        SimCLRAdapter(16, num_experts=2, output_dim=8, loss=result)(h1, h2)
    h0, h1, h2, p1, p2 = _batch()
    with pytest.raises(error, match=match.replace("loss must", "eq_loss must")):
        SimCLRAdapter(16, num_experts=2, output_dim=8, eq_loss=result, cca_every=0)(h1, h2, h0=h0, params1=p1, params2=p2)
