"""Tests of star_heads.equivariance: AugParamNormalizer and EquivariantPredictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_utils import run_distributed
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from star_heads import value_checks
from star_heads.equivariance import (
    STL10_PARAM_MEAN,
    STL10_PARAM_STD,
    AugParamNormalizer,
    EquivariantPredictor,
)


def _batches(seed: int, sizes: list[int], dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) * 30 + 50 for n in sizes]


# ============================================================================ normaliser
@given(st.integers(0, 10_000), st.lists(st.integers(1, 7), min_size=1, max_size=5), st.integers(1, 4))
def test_cumulative_statistics_are_exact(seed, sizes, dim):
    norm = AugParamNormalizer(dim).train()
    batches = _batches(seed, sizes, dim)
    for b in batches:
        out = norm(b)
    every = np.concatenate([b.numpy().astype(np.float64) for b in batches])
    mean, std = every.mean(0), every.std(0)  # population std
    np.testing.assert_allclose(norm.mean.numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(norm.std.numpy(), std, rtol=1e-8, atol=1e-8)
    assert int(norm.num_samples) == sum(sizes)
    # the last batch was standardised with the statistics after its own update
    scale = np.where(std > 1e-6, std, 1.0)
    np.testing.assert_allclose(out.numpy(), (batches[-1].numpy() - mean) / scale, rtol=1e-5, atol=1e-5)


def test_ema_statistics_follow_the_recurrence():
    m = 0.25
    norm = AugParamNormalizer(3, momentum=m).train()
    batches = _batches(1, [5, 4, 6], 3)
    mean = var = None
    for b in batches:
        norm(b)
        x = b.numpy().astype(np.float64)
        if mean is None:
            mean, var = x.mean(0), x.var(0)
        else:
            mean, var = (1 - m) * mean + m * x.mean(0), (1 - m) * var + m * x.var(0)
    np.testing.assert_allclose(norm.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(norm.running_var.numpy(), var, rtol=1e-12)


def test_eval_mode_freezes_and_identity_before_data():
    norm = AugParamNormalizer(2)
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    torch.testing.assert_close(norm.eval()(x), x)  # mean 0, std 1 before any data
    assert int(norm.num_samples) == 0
    norm.train()(x)
    before = norm.state_dict()
    y = norm.eval()(x * 5)
    for k, v in norm.state_dict().items():
        torch.testing.assert_close(v, before[k])
    torch.testing.assert_close(y, (x * 5 - torch.tensor([2.0, 1.0])) / torch.tensor([1.0, 3.0]))


def test_constant_dimensions_never_give_nan():
    norm = AugParamNormalizer(3).train()
    x = torch.randn(16, 3)
    x[:, 1] = 0.0  # a flag never set
    x[:, 2] = 7.5  # a constant
    out = norm(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1:], torch.zeros(16, 2))
    flagged = norm.eval()(torch.tensor([[0.0, 1.0, 7.5]]))  # flag set later: centred, not blown up
    assert flagged[0, 1].item() == pytest.approx(1.0)


def test_state_dict_round_trip():
    norm = AugParamNormalizer(4, momentum=0.1).train()
    for b in _batches(2, [6, 3], 4):
        norm(b)
    sd = norm.state_dict()
    assert set(sd) == {"running_mean", "running_var", "num_samples"}
    assert sd["running_mean"].dtype == torch.float64
    fresh = AugParamNormalizer(4, momentum=0.1)
    fresh.load_state_dict(sd)
    x = _batches(3, [5], 4)[0]
    torch.testing.assert_close(fresh.eval()(x), norm.eval()(x))


def test_stl10_constants_and_from_constants():
    assert STL10_PARAM_MEAN == (13.0968, 13.1474, 69.8042, 69.7284, 0.4986, 1.00169, 0.99847, 0.99962, -9.05e-5, 0.2066, 0.53593)
    assert STL10_PARAM_STD == (11.5036, 11.3602, 14.5891, 14.5419, 0.5000, 0.20763, 0.20505, 0.20647, 0.051809, 0.40487, 0.65824)
    norm = AugParamNormalizer.stl10().train()
    x = torch.tensor([[10.0, 20.0, 60.0, 80.0, 1.0, 1.2, 0.9, 1.1, 0.05, 0.0, 1.3]], dtype=torch.float64)
    want = [(x[0, i].item() - STL10_PARAM_MEAN[i]) / STL10_PARAM_STD[i] for i in range(11)]
    np.testing.assert_allclose(norm(x)[0].numpy(), want, rtol=1e-12)
    assert int(norm.num_samples) == 0  # published constants are frozen by default
    torch.testing.assert_close(norm.mean, torch.tensor(STL10_PARAM_MEAN, dtype=torch.float64))
    tracked = AugParamNormalizer.from_constants([1.0, 2.0], [3.0, 4.0], track_running_stats=True).train()
    tracked(torch.zeros(2, 2))
    assert int(tracked.num_samples) == 2
    torch.testing.assert_close(tracked.mean, torch.zeros(2, dtype=torch.float64))  # the first batch replaces them


def test_fit_replaces_statistics():
    norm = AugParamNormalizer(3)
    norm.train()(torch.randn(4, 3) + 100)
    data = _batches(4, [20], 3)[0]
    assert norm.fit(data) is norm
    np.testing.assert_allclose(norm.mean.numpy(), data.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(norm.std.numpy(), data.double().std(0, unbiased=False).numpy(), rtol=1e-10)
    assert int(norm.num_samples) == 20


def test_bad_input_leaves_statistics_untouched():
    norm = AugParamNormalizer(11).train()
    norm(torch.randn(4, 11))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with pytest.raises(ValueError, match=r"params must have shape \[\*, 11\].*expected 11, got 10"):
        norm(torch.randn(4, 10))
    with pytest.raises(ValueError, match="3 dimensions|2 dimensions"):
        norm(torch.randn(4, 11, 1))
    with value_checks(), pytest.raises(ValueError, match="NaN"):  # the opt-in value check (a host read)
        norm(torch.full((2, 11), float("nan")))
    out = norm(torch.full((2, 11), float("nan")))  # default: no host read, the statistics skip the batch
    assert torch.isnan(out).all()
    with pytest.raises(TypeError, match="floating-point"):
        norm(torch.ones(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one row"):
        norm(torch.zeros(0, 11))
    with pytest.raises(ValueError, match="at least one row"):
        norm.fit(torch.zeros(0, 11))
    for k, v in norm.state_dict().items():
        torch.testing.assert_close(v, before[k])
    with pytest.raises(ValueError, match="momentum"):
        AugParamNormalizer(3, momentum=0.0)
    with pytest.raises(ValueError, match="equal length"):
        AugParamNormalizer.from_constants([0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="std >= 0"):
        AugParamNormalizer.from_constants([0.0], [-1.0])
    with pytest.raises(ValueError, match="dim must be >= 1"):
        AugParamNormalizer(0)


def _normalizer_worker(rank, world_size, batches, momenta):
    results = {}
    for momentum in momenta:
        norm = AugParamNormalizer(3, momentum=momentum).train()
        outs = []
        for b in batches:
            n = b.shape[0] // world_size
            outs.append(norm(b[rank * n : (rank + 1) * n]))
        results[momentum] = {"state": norm.state_dict(), "out": torch.cat(outs)}
    return results


@pytest.mark.distributed
def test_distributed_statistics_equal_single_process():
    batches = _batches(5, [8, 6, 4], 3)
    momenta = (None, 0.3)
    res = run_distributed(_normalizer_worker, world_size=2, args=(batches, momenta))
    for momentum in momenta:
        single = AugParamNormalizer(3, momentum=momentum).train()
        outs = [single(b) for b in batches]
        for r, by_momentum in enumerate(res):
            got = by_momentum[momentum]
            for k, v in single.state_dict().items():
                torch.testing.assert_close(got["state"][k], v, rtol=1e-12, atol=1e-12)
            want = torch.cat([o[r * (o.shape[0] // 2) : (r + 1) * (o.shape[0] // 2)] for o in outs])
            torch.testing.assert_close(got["out"], want)


# ============================================================================ predictor
def _bn(x, bn: nn.BatchNorm1d, training: bool):
    if training:
        mean, var = x.mean(0), x.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (x - mean) / torch.sqrt(var + bn.eps)
    return y * bn.weight + bn.bias if bn.affine else y


def _manual_star(m: EquivariantPredictor, z0, a, training):
    psi = a @ m.param_encoder.weight.T + m.param_encoder.bias
    l1, n1, _, l2, n2, _, l3 = m.mlp
    h = torch.relu(_bn(torch.cat([z0, psi], 1) @ l1.weight.T, n1, training))
    h = torch.relu(_bn(h @ l2.weight.T, n2, training))
    return z0 + h @ l3.weight.T + l3.bias


def _manual_equimod(m: EquivariantPredictor, z0, a, training):
    lin_p, bn_p = m.param_encoder
    lin, bn = m.mlp
    proj = _bn(a @ lin_p.weight.T, bn_p, training)
    return _bn(torch.cat([z0, proj], 1) @ lin.weight.T, bn, training)


@pytest.mark.parametrize("kind", ["star", "equimod"])
def test_predictor_matches_formula(kind):
    torch.manual_seed(0)
    m = EquivariantPredictor(16, 11, kind=kind, hidden_dim=24).double()
    for p in m.parameters():  # non-trivial affine parameters in the norms
        nn.init.normal_(p, std=0.5)
    z0, a = torch.randn(10, 16, dtype=torch.float64), torch.randn(10, 11, dtype=torch.float64)
    manual = _manual_star if kind == "star" else _manual_equimod
    want_train = manual(m, z0, a, True)
    torch.testing.assert_close(m.train()(z0, a), want_train)
    torch.testing.assert_close(m.eval()(z0, a), manual(m, z0, a, False))  # running stats now updated


def test_star_layout_and_residual():
    m = EquivariantPredictor()  # paper defaults: D = 128, P = 11, H = 512
    linears = [l for l in m.mlp if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(256, 512), (512, 512), (512, 128)]
    assert [l.bias is not None for l in linears] == [False, False, True]
    assert (m.param_encoder.in_features, m.param_encoder.out_features) == (11, 128) and m.param_encoder.bias is not None
    assert [type(l) for l in m.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    z0, a = torch.randn(6, 128), torch.randn(6, 11)
    m.eval()
    torch.testing.assert_close(m(z0, a) - z0, m.mlp(torch.cat([z0, m.param_encoder(a)], 1)), rtol=1e-5, atol=1e-5)
    eq = EquivariantPredictor(kind="equimod")
    assert eq.param_encoder[0].bias is None and eq.mlp[0].bias is None
    assert eq.param_encoder[1].affine and not eq.mlp[1].affine


@given(
    st.integers(2, 6),
    st.integers(2, 9),  # d = 1 with LayerNorm is constant (zero gradient) by construction
    st.integers(1, 12),
    st.sampled_from(["star", "equimod", "hyper"]),
    st.sampled_from([nn.BatchNorm1d, nn.LayerNorm]),
)
def test_predictor_shapes_and_gradients(b, d, p, kind, norm_layer):
    m = EquivariantPredictor(d, p, kind=kind, hidden_dim=8, norm_layer=norm_layer, act_layer=nn.GELU)
    z0 = torch.randn(b, d, requires_grad=True)
    a = torch.randn(b, p, requires_grad=True)
    out = m(z0, a)
    assert out.shape == (b, d) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert z0.grad is not None and a.grad is not None and a.grad.abs().sum() > 0


def test_hyper_predictor_is_a_latent_dependent_linear_map():
    torch.manual_seed(0)
    m = EquivariantPredictor(6, param_dim=4, kind="hyper").double()
    z0, q = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    basis = m.param_encoder.weight  # [D*D, P]: column p is the flattened matrix M_p (row-major)
    for b in range(5):
        w = sum(q[b, p] * basis[:, p].reshape(6, 6) for p in range(4))
        torch.testing.assert_close(m(z0[b : b + 1], q[b : b + 1])[0], w @ z0[b])
    # linear in z0 for a fixed latent
    torch.testing.assert_close(m(2 * z0 - z0.flip(0), q), 2 * m(z0, q) - m(z0.flip(0), q))
    assert m.param_encoder.bias is None and not hasattr(m, "mlp")


def test_quaternion_latent():
    q = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)  # SIE-style rotation latent
    m = EquivariantPredictor(32, param_dim=4)
    assert m(torch.randn(5, 32), q).shape == (5, 32)


def test_predictor_bad_input():
    m = EquivariantPredictor(8, 11, hidden_dim=4)
    with pytest.raises(ValueError, match=r"params must have shape \[\*, 11\].*got \(3, 4\)"):
        m(torch.randn(3, 8), torch.randn(3, 4))
    with pytest.raises(ValueError, match="z0 has 3 rows, params has 2"):
        m(torch.randn(3, 8), torch.randn(2, 11))
    with pytest.raises(ValueError, match=r"z0 must have shape \[\*, 8\]"):
        m(torch.randn(3, 7), torch.randn(3, 11))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.randn(3, 8), torch.ones(3, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="kind must be"):
        EquivariantPredictor(kind="sie")
    with pytest.raises(ValueError, match="param_dim must be >= 1"):
        EquivariantPredictor(param_dim=0)


@pytest.mark.parametrize("kind", ["star", "equimod", "hyper"])
def test_predictor_under_bf16_autocast(kind):
    torch.manual_seed(0)
    m = EquivariantPredictor(16, 11, kind=kind, hidden_dim=32)
    z0, a = torch.randn(8, 16), torch.randn(8, 11)
    want = m(z0, a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(z0, a)
    assert got.shape == (8, 16) and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.1)


def _python_blocks(path: str) -> list[str]:
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / path).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_examples_run():
    path = "docs/equivariance.md"
    blocks = _python_blocks(path)
    assert blocks
    for block in blocks:
        exec(compile(block, path, "exec"), {})


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_normaliser_update_has_no_graph_break_without_finite_check(momentum):
    """No .item() / host sync in the update: it compiles as one graph (fullgraph raises on a break)."""
    torch._dynamo.reset()
    eager = AugParamNormalizer(5, momentum=momentum, check_finite=False)
    compiled_mod = AugParamNormalizer(5, momentum=momentum, check_finite=False)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = torch.rand(7, 5, generator=g) * 3
        torch.testing.assert_close(compiled(batch), eager(batch))
    torch.testing.assert_close(compiled_mod.running_var, eager.running_var)
    assert int(compiled_mod.num_samples) == 21
