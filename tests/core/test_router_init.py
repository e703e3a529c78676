"""SoftRouter(init=...): the gates at initialisation follow the rule, draws are seeded, the default is unchanged."""

import pytest
import torch
from torch import nn

from star_heads import ROUTER_INITS, MMoEHead, SoftRouter, STARHead, build_head


def _reference_default(d, n, t, seed):
    """What the router was before the option existed: one nn.Linear(d → T·N) right after the seed."""
    torch.manual_seed(seed)
    return nn.Linear(d, t * n)


def test_default_is_unchanged_bit_for_bit_and_draws_the_same():
    ref = _reference_default(16, 8, 2, seed=3)
    after_ref = torch.rand(3)
    torch.manual_seed(3)
    r = SoftRouter(16, 8, 2)
    assert torch.equal(r.linear.weight, ref.weight) and torch.equal(r.linear.bias, ref.bias)
    assert torch.equal(torch.rand(3), after_ref)  # the global RNG advanced exactly as before
    assert r.init == "default" and r.init_scale is None and ROUTER_INITS == ("default", "task-distinct", "noisy")


@pytest.mark.parametrize("n, t", [(8, 2), (16, 2), (7, 3), (3, 3)])
def test_task_distinct_tops_are_disjoint_blocks(n, t):
    torch.manual_seed(0)
    r = SoftRouter(32, n, t, init="task-distinct")
    bias = r.linear.bias.detach().reshape(t, n)
    owner = torch.arange(n) * t // n  # expert k belongs to task ⌊k·T/N⌋
    expected = torch.where(owner == torch.arange(t)[:, None], 3.0, -3.0)
    assert torch.equal(bias, expected)
    gates = r(torch.randn(512, 32))  # [b, t, n]
    top = [set((gates[:, i].mean(0) > 1 / n).nonzero().flatten().tolist()) for i in range(t)]
    for i in range(t):
        assert top[i] == set((owner == i).nonzero().flatten().tolist())
        assert all(top[i].isdisjoint(top[j]) for j in range(t) if j != i)
    # per sample, every task's largest gate is on one of its own experts
    assert torch.equal(owner[gates.argmax(-1)], torch.arange(t).expand(512, t))


def test_task_distinct_weights_are_the_defaults_and_scale_is_used():
    ref = _reference_default(16, 8, 2, seed=1)
    torch.manual_seed(1)
    r = SoftRouter(16, 8, 2, init="task-distinct", init_scale=0.5)
    assert torch.equal(r.linear.weight, ref.weight)
    assert torch.equal(r.linear.bias.abs(), torch.full((16,), 0.5)) and r.init_scale == 0.5


def test_noisy_bias_has_std_s_over_many_routers_and_is_seeded():
    torch.manual_seed(0)
    biases = torch.stack([SoftRouter(4, 8, 2, init="noisy", init_scale=1.5).linear.bias.detach() for _ in range(400)])
    assert biases.mean().abs() < 0.05 and abs(biases.std().item() - 1.5) < 0.05
    # tasks are independent: the per-expert correlation between the two tasks' biases is ≈ 0
    inv, eq = biases[:, :8].flatten(), biases[:, 8:].flatten()
    assert abs(torch.corrcoef(torch.stack([inv, eq]))[0, 1].item()) < 0.05
    torch.manual_seed(7)
    a = SoftRouter(4, 8, 2, init="noisy")
    torch.manual_seed(7)
    b = SoftRouter(4, 8, 2, init="noisy")
    assert torch.equal(a.linear.bias, b.linear.bias) and a.init_scale == 2.0
    torch.manual_seed(7)
    c = SoftRouter(4, 8, 2)
    assert torch.equal(a.linear.weight, c.linear.weight)  # only the bias differs from the default start


def test_unconditional_router_gets_the_same_rule():
    r = SoftRouter(4, 4, 2, conditional=False, init="task-distinct", init_scale=2.0)
    assert torch.equal(r.logits.detach(), torch.tensor([2.0, 2, -2, -2, -2, -2, 2, 2]))


def test_heads_and_build_head_pass_it_through():
    torch.manual_seed(0)
    h = STARHead(16, 8, num_experts=4, router_init="task-distinct", router_init_scale=1.0)
    assert h.router.init == "task-distinct" and torch.equal(h.router.linear.bias.abs(), torch.ones(8))
    torch.manual_seed(0)
    ref = STARHead(16, 8, num_experts=4)
    torch.manual_seed(0)
    built = build_head("star", 16, num_experts=4, hidden_dim=16, output_dim=8, router_init="noisy")
    assert built.router.init == "noisy" and built.router.init_scale == 2.0
    for (name, p), (_, q) in zip(ref.named_parameters(), built.named_parameters()):
        assert torch.equal(p, q) or name == "router.linear.bias"  # experts and router weights: the same draws
    m = MMoEHead(16, 8, 8, num_experts=4, router_init="noisy", router_init_scale=0.1)
    assert m.router.init_scale == 0.1
    # a baseline sized against a STAR head with this start is the same size as with the default start
    sep = build_head("separate", 16, num_experts=4, match_params=True, router_init="task-distinct")
    assert sep.hidden_dim == build_head("separate", 16, num_experts=4, match_params=True).hidden_dim
    with pytest.raises(ValueError, match="not to kind 'separate'"):
        build_head("separate", 16, router_init="noisy")


def test_bad_options():
    with pytest.raises(ValueError, match="init must be one of"):
        SoftRouter(4, 4, 2, init="uniform")
    with pytest.raises(TypeError, match="init must be one of"):
        SoftRouter(4, 4, 2, init=1)
    with pytest.raises(ValueError, match="init_scale applies to init 'task-distinct' or 'noisy'"):
        SoftRouter(4, 4, 2, init_scale=1.0)
    with pytest.raises(ValueError, match="needs num_tasks >= 2 and num_experts >= num_tasks; got num_tasks=1"):
        SoftRouter(4, 4, 1, init="task-distinct")
    with pytest.raises(ValueError, match="num_experts >= num_tasks; got num_tasks=3, num_experts=2"):
        SoftRouter(4, 2, 3, init="task-distinct")
    with pytest.raises(ValueError, match="init_scale"):
        SoftRouter(4, 4, 2, init="noisy", init_scale=0.0)


def test_meta_device_builds_without_data():
    r = SoftRouter(8, 4, 2, init="noisy", device="meta")
    assert r.linear.bias.is_meta
