import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import loop_mixture
from torch import nn

from star_heads.baselines import SeparateHeads, SharedSpecificHead
from star_heads.heads import HeadOutput, MMoEHead, STARHead, STARSimCLRProjectionHead, STARVICRegProjectionHead
from star_heads.optim import param_groups


def test_mmoe_equals_router_plus_per_expert_loop():
    torch.manual_seed(0)
    head = MMoEHead(10, 12, 6, num_experts=5, tasks=("inv", "eq", "aux"))
    x = torch.randn(9, 10)
    out = head(x, return_gates=True, return_expert_outputs=True)
    assert isinstance(out, HeadOutput) and list(out) == ["inv", "eq", "aux"] and len(out) == 3
    gates = torch.softmax((x @ head.router.linear.weight.T + head.router.linear.bias).view(9, 3, 5), -1)
    torch.testing.assert_close(out.gates, gates)
    ref = loop_mixture(head.experts.to_modules(), x, gates)
    for t, name in enumerate(head.tasks):
        torch.testing.assert_close(out[name], ref[t])
    assert out.expert_outputs.shape == (9, 5, 6)


def test_task_call_returns_tensor_equal_to_full_call():
    torch.manual_seed(1)
    head = STARHead(16, 8, num_experts=4).eval()
    x = torch.randn(5, 16)
    full = head(x)
    for task in head.tasks:
        z = head(x, task=task)
        assert isinstance(z, torch.Tensor) and z.shape == (5, 8)
        torch.testing.assert_close(z, full[task])
    one = head(x, task="eq", return_gates=True)
    assert list(one) == ["eq"] and one.gates.shape == (5, 1, 4)
    torch.testing.assert_close(one.gates[:, 0], head.gates(x)[:, 1])


def test_single_task_head_returns_tensor():
    head = MMoEHead(6, 6, 3, num_experts=2, tasks=("inv",))
    assert isinstance(head(torch.randn(4, 6)), torch.Tensor)


@given(seed=st.integers(0, 1000), n=st.integers(2, 6))
def test_permuting_experts_and_gate_columns_leaves_outputs_unchanged(seed, n):
    torch.manual_seed(seed)
    head = MMoEHead(5, 7, 3, num_experts=n).eval()
    for m in head.experts.norms:  # non-trivial running stats
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_()
    x = torch.randn(6, 5)
    perm = torch.randperm(n)
    permuted = MMoEHead(5, 7, 3, num_experts=n).eval()
    modules = head.experts.to_modules()
    permuted.experts = type(head.experts).from_modules([modules[int(i)] for i in perm]).eval()
    with torch.no_grad():
        w = head.router.linear.weight.view(2, n, 5)[:, perm].reshape(2 * n, 5)
        c = head.router.linear.bias.view(2, n)[:, perm].reshape(-1)
        permuted.router.linear.weight.copy_(w)
        permuted.router.linear.bias.copy_(c)
    a, b = head(x), permuted(x)
    for t in head.tasks:
        torch.testing.assert_close(a[t], b[t])


def test_star_defaults_follow_the_paper():
    head = STARHead(512)
    assert head.tasks == ("inv", "eq") and head.num_experts == 8 and head.output_dim == 128
    lins = head.experts.linears
    assert [(l.in_features, l.out_features) for l in lins] == [(512, 512), (512, 512), (512, 128)]
    assert [l.bias is not None for l in lins] == [False, False, True]
    assert [type(m) for m in head.experts.norms] == [nn.BatchNorm1d, nn.BatchNorm1d, nn.Identity]
    assert head.router.linear.in_features == 512 and head.router.linear.out_features == 16


@pytest.mark.parametrize(
    "cls, lightly_defaults",
    [
        (STARSimCLRProjectionHead, [("input_dim", 2048), ("hidden_dim", 2048), ("output_dim", 128), ("num_layers", 2), ("batch_norm", True)]),
        (STARVICRegProjectionHead, [("input_dim", 2048), ("hidden_dim", 8192), ("output_dim", 8192), ("num_layers", 3)]),
    ],
)
def test_lightly_drop_in_signatures(cls, lightly_defaults):
    params = [p for p in inspect.signature(cls).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in params] == lightly_defaults


def test_simclr_drop_in_returns_invariant_tensor():
    torch.manual_seed(2)
    head = STARSimCLRProjectionHead(32, 16, 8, num_experts=3).eval()
    x = torch.randn(4, 32)
    z = head(x)
    assert isinstance(z, torch.Tensor) and z.shape == (4, 8)
    both = head(x, task=None)
    torch.testing.assert_close(z, both["inv"])
    assert len(head.experts.linears) == 2
    no_bn = STARSimCLRProjectionHead(32, 16, 8, batch_norm=False)
    assert all(isinstance(m, nn.Identity) for m in no_bn.experts.norms)


def test_separate_heads_are_independent_mlps():
    torch.manual_seed(3)
    head = SeparateHeads(6, 10, 4)
    x = torch.randn(7, 6)
    out = head(x)
    for t in head.tasks:
        mlp = head.heads[t].to_modules()[0]
        torch.testing.assert_close(out[t], mlp(x))
        torch.testing.assert_close(head(x, task=t), mlp(x))
    out["inv"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in head.heads["eq"].parameters())
    assert all(p.grad is not None and p.grad.any() for p in head.heads["inv"].parameters() if p.ndim > 1)
    eq = SeparateHeads.equimod(6, 10, 4)
    last = eq.heads["inv"].to_modules()[0][-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine
    assert head(x, return_gates=True).gates is None


def test_shared_specific_is_sum_of_task_and_shared_expert():
    torch.manual_seed(4)
    head = SharedSpecificHead(6, 8, 5, tasks=("inv", "eq"))
    x = torch.randn(7, 6)
    mods = head.experts.to_modules()
    out = head(x, return_gates=True)
    torch.testing.assert_close(out["inv"], mods[0](x) + mods[2](x))
    torch.testing.assert_close(out["eq"], mods[1](x) + mods[2](x))
    torch.testing.assert_close(head(x, task="eq"), out["eq"])
    assert out.gates.shape == (7, 2, 3)


@pytest.mark.parametrize("head", [STARHead(6, 4, num_experts=2), SeparateHeads(6, 6, 4), SharedSpecificHead(6, 6, 4)])
def test_heads_bad_input(head):
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"unknown task 'rot'; this head has tasks \('inv', 'eq'\)"):
        head(x, task="rot")
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 6\]"):
        head(torch.randn(3, 5))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        head(torch.randn(3, 6, 1))
    with pytest.raises(TypeError, match="floating-point"):
        head(torch.ones(3, 6, dtype=torch.int32))
    with pytest.raises(KeyError, match="unknown task 'rot'"):
        head(x)["rot"]


def test_tasks_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        STARHead(4, tasks=("inv", "inv"))


def test_param_groups_decay_expert_weights_not_biases_or_norms():
    head = STARHead(8, 4, num_experts=3)
    decay, no_decay = param_groups(head, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert set(decay["names"]) == {"experts.linears.0.weight", "experts.linears.1.weight", "experts.linears.2.weight", "router.linear.weight"}
    assert {"experts.linears.2.bias", "experts.norms.0.weight", "experts.norms.0.bias", "router.linear.bias"} <= set(no_decay["names"])
    assert all(p.ndim == 3 for p in decay["params"][:3])
    n_params = sum(1 for p in head.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    torch.optim.SGD(param_groups(head, 1e-4), lr=0.1)  # accepted by torch optimisers
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(head, -1.0)


def test_jit_script_is_refused_in_our_words_and_trace_works_per_task():
    import warnings

    head = STARHead(8, 4, num_experts=2).eval()
    x, x2 = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(TypeError, match=r"torch.jit.script.*head.single_task\('inv'\)"):
        torch.jit.script(head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python-side shape checks
        with pytest.raises(TypeError, match=r"several tasks.*single_task\('inv'\)"):
            torch.jit.trace(head, x)
        traced = torch.jit.trace(head.single_task("eq"), x)
        drop_in = STARSimCLRProjectionHead(8, 8, 4).eval()
        traced_drop_in = torch.jit.trace(drop_in, x)
    torch.testing.assert_close(traced(x2), head(x2, task="eq"))  # another batch size: no shape baked in
    torch.testing.assert_close(traced_drop_in(x2), drop_in(x2))
    with pytest.raises(ValueError, match="unknown task 'aux'"):
        head.single_task("aux")


def test_state_dict_without_task_names_is_refused():
    saved = STARHead(8, 4, num_experts=2, tasks=("eq", "inv")).state_dict()
    del saved["task_names"]
    head = STARHead(8, 4, num_experts=2)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="has no 'task_names'.*cannot be checked"):
        head.load_state_dict(saved)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_head_validates_x_once_and_runs_its_layers_unchecked(monkeypatch):
    """TaskHead.check_input is the one check of head(x): the router's and the bank's checks do not run again, yet
    both are still called as modules (their hooks fire, so profilers and wrappers see them)."""
    from star_heads import routing
    from star_heads.experts import ExpertBank

    def checked(*args, **kwargs):
        raise AssertionError("a layer's input check ran inside head(x)")

    monkeypatch.setattr(routing, "check_float_tensor", checked)
    monkeypatch.setattr(ExpertBank, "_check", checked)
    torch.manual_seed(0)
    for head in (STARHead(6, 4, num_experts=3), SeparateHeads(6, output_dim=4), SharedSpecificHead(6, output_dim=4)):
        banks = [m for m in head.modules() if isinstance(m, ExpertBank)]
        calls = []
        for bank in banks:
            bank.register_forward_hook(lambda m, a, o: calls.append(m))
        x = torch.randn(5, 6)
        out = head(x, return_gates=True, return_expert_outputs=True)
        assert out["inv"].shape == out["eq"].shape == (5, 4)
        assert len(calls) == len(banks)  # each bank called once, as a module
        with pytest.raises(ValueError, match=r"x must have shape \[\*, 6\]"):
            head(torch.randn(5, 7))  # still checked, once, at the entry point
    assert STARHead(6, 4, num_experts=3).gates(torch.randn(5, 6)).shape == (5, 2, 3)


def test_separate_and_shared_heads_default_their_widths_like_star_head():
    for cls in (SeparateHeads, SharedSpecificHead):
        head = cls(32)
        assert head.hidden_dim == 32 and head.output_dim == 128
        assert head(torch.randn(4, 32), task="inv").shape == (4, 128)
