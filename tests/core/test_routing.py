import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from star_heads.routing import SoftRouter, routing_stats


@given(b=st.integers(1, 8), d=st.integers(1, 10), n=st.integers(1, 9), t=st.integers(1, 3), temp=st.floats(0.1, 5.0))
def test_gates_are_distributions_matching_softmax(b, d, n, t, temp):
    torch.manual_seed(b + 10 * d + 100 * n)
    router = SoftRouter(d, n, t, temperature=temp)
    x = torch.randn(b, d)
    gates = router(x)
    assert gates.shape == (b, t, n)
    torch.testing.assert_close(gates.sum(-1), torch.ones(b, t))
    assert (gates >= 0).all()
    # reference: task j's router is rows [j·n, (j+1)·n) of the stacked Linear, softmax(logits / temperature)
    w, c = router.linear.weight.double(), router.linear.bias.double()
    for j in range(t):
        logits = x.double() @ w[j * n : (j + 1) * n].T + c[j * n : (j + 1) * n]
        ref = torch.softmax(logits / temp, -1)
        torch.testing.assert_close(gates[:, j].double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(router(x, task_index=j)[:, 0], gates[:, j])


def test_unconditional_gates_ignore_input_and_learn():
    router = SoftRouter(4, 5, 2, conditional=False)
    g1, g2 = router(torch.randn(3, 4)), router(torch.randn(3, 4) * 100)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g1, torch.full((3, 2, 5), 0.2))
    g1[:, 0, 0].sum().backward()
    assert router.logits.grad.abs().sum() > 0


@given(n=st.integers(2, 8), k=st.integers(1, 8))
def test_top_k_keeps_k_largest_and_renormalises(n, k):
    k = min(k, n)
    torch.manual_seed(n * 10 + k)
    router = SoftRouter(6, n, 2, top_k=k)
    x = torch.randn(5, 6)
    gates = router(x)
    dense = SoftRouter(6, n, 2)
    dense.load_state_dict(router.state_dict())
    full = dense(x)
    assert ((gates > 0).sum(-1) == k).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 2))
    kept = full.topk(k, -1).indices
    ref = torch.zeros_like(full).scatter(-1, kept, full.gather(-1, kept))
    torch.testing.assert_close(gates, ref / ref.sum(-1, keepdim=True))


def test_learned_temperature_gets_gradient():
    router = SoftRouter(4, 3, 1, temperature=2.0, learn_temperature=True)
    assert math.isclose(router.temperature.item(), 2.0, rel_tol=1e-6)
    router(torch.randn(6, 4))[:, 0, 0].sum().backward()
    assert router.log_temperature.grad is not None and router.log_temperature.grad != 0


def test_router_bad_arguments():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        SoftRouter(3, 4, top_k=5)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        SoftRouter(3, 4, top_k=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SoftRouter(3, 4, temperature=0.0)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        SoftRouter(3, 0)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 3\], got \(2, 4\)"):
        SoftRouter(3, 4)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        SoftRouter(3, 4)(torch.ones(2, 3, dtype=torch.int64))


def _np_stats(g):
    g = g.astype(np.float64)
    ent = -(np.where(g > 0, g * np.log(np.where(g > 0, g, 1)), 0)).sum(-1)
    mean = g.mean(0)
    ment = -(np.where(mean > 0, mean * np.log(np.where(mean > 0, mean, 1)), 0)).sum(-1)
    return mean, ent.mean(0), np.exp(ment), np.exp(ent).mean(0)


@given(b=st.integers(1, 9), t=st.integers(1, 3), n=st.integers(1, 6), hard=st.booleans())
def test_routing_stats_against_numpy(b, t, n, hard):
    torch.manual_seed(b * 7 + t * 3 + n)
    logits = torch.randn(b, t, n) * (50 if hard else 1)
    g = torch.softmax(logits, -1)
    s = routing_stats(g)
    mean, ent, eff, seff = _np_stats(g.numpy())
    np.testing.assert_allclose(s.mean_gate.numpy(), mean, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(s.entropy.numpy(), ent, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s.effective_experts.numpy(), eff, rtol=1e-6)
    np.testing.assert_allclose(s.sample_effective_experts.numpy(), seff, rtol=1e-6)
    assert ((s.effective_experts >= 1 - 1e-9) & (s.effective_experts <= n + 1e-9)).all()
    top = mean.max(0)
    overlap = np.where(top > 0, mean.min(0) / np.where(top > 0, top, 1), 0.0)  # unused expert: 0
    np.testing.assert_allclose(s.task_overlap.numpy(), overlap, rtol=1e-6)


def test_routing_stats_specialised_vs_shared():
    # task 0 uses experts {0, 1}, task 1 uses {1, 2}: expert 1 is shared, 0 and 2 are task-specific
    g = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]]).repeat(4, 1, 1)
    s = routing_stats(g, tasks=("inv", "eq"))
    torch.testing.assert_close(s.task_overlap, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(s.effective_experts, torch.full((2,), 2.0, dtype=torch.float64))
    d = s.as_dict()
    assert d["inv/effective_experts"] == pytest.approx(2.0)
    assert [d[f"expert_{k}/task_overlap"] for k in range(3)] == [0.0, 1.0, 0.0]
    assert [d[f"eq/expert_{k}/load"] for k in range(3)] == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"\[B, T, N\]"):
        routing_stats(torch.rand(2, 2, 2, 2))


@given(b=st.integers(1, 6), t=st.integers(1, 3), n=st.integers(1, 5))
def test_as_dict_is_flat_python_floats_with_every_statistic(b, t, n):
    torch.manual_seed(b + 10 * t + 100 * n)
    g = torch.softmax(torch.randn(b, t, n), -1)
    names = tuple(f"task{i}" for i in range(t))
    s = routing_stats(g, tasks=names)
    d = s.as_dict(prefix="train/routing/")
    assert all(type(v) is float for v in d.values()) and all(isinstance(k, str) for k in d)
    assert len(d) == t * (3 + n) + n and all(k.startswith("train/routing/") for k in d)
    for i, name in enumerate(names):
        assert d[f"train/routing/{name}/entropy"] == pytest.approx(float(s.entropy[i]))
        assert d[f"train/routing/{name}/sample_effective_experts"] == pytest.approx(float(s.sample_effective_experts[i]))
        loads = [d[f"train/routing/{name}/expert_{k}/load"] for k in range(n)]
        np.testing.assert_allclose(loads, g[:, i].double().mean(0).numpy(), rtol=1e-12)
    # without names the tasks are numbered
    assert f"{t - 1}/entropy" in routing_stats(g).as_dict()


def test_as_dict_feeds_tensorboard_add_scalars(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    d = routing_stats(torch.softmax(torch.randn(4, 2, 3), -1), tasks=("inv", "eq")).as_dict()
    with tensorboard.SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalars("routing", d, global_step=0)
        for k, v in d.items():
            writer.add_scalar(k, v, 0)


def test_routing_stats_bad_arguments():
    g = torch.softmax(torch.randn(4, 2, 3), -1)
    with pytest.raises(ValueError, match=r"tasks has 1 names \('inv',\), but gates have 2 tasks"):
        routing_stats(g, tasks=("inv",))
    with pytest.raises(TypeError, match="tasks must be a sequence of strings"):
        routing_stats(g, tasks="inv")
    with pytest.raises(TypeError, match="prefix must be a str"):
        routing_stats(g).as_dict(("inv", "eq"))
    with pytest.raises(ValueError, match="B >= 1"):
        routing_stats(torch.rand(0, 2, 3))


def test_task_index_is_validated():
    router = SoftRouter(3, 4, 2)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"task_index must be <= 1, got 7"):
        router(x, task_index=7)
    with pytest.raises(ValueError, match=r"task_index must be >= 0, got -1"):
        router(x, task_index=-1)
    with pytest.raises(TypeError, match="task_index must be an int, got bool"):
        router(x, task_index=True)
    with pytest.raises(TypeError, match="temperature must be a real number, got str"):
        SoftRouter(3, 4, temperature="1")
    with pytest.raises(ValueError, match="temperature must be a finite number, got inf"):
        SoftRouter(3, 4, temperature=float("inf"))
    with pytest.raises(TypeError, match="num_experts must be an int, got bool"):
        SoftRouter(3, True)
    with pytest.raises(TypeError, match="conditional must be a bool"):
        SoftRouter(3, 4, conditional=0)
