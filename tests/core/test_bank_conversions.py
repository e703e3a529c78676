"""ExpertBank.to_modules / from_modules are exact or refuse, and per-expert slicing lives in the layers."""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import loop_outputs
from torch import nn

from star_heads.expert_layers import ExpertLayerNorm, ExpertLinear, export_norm, load_norm, make_expert_norm
from star_heads.experts import ExpertBank


def _experts(n, make):
    torch.manual_seed(0)
    return [make() for _ in range(n)]


def _assert_same_function(bank, modules, x, train=False):
    bank.train(train)
    for m in modules:
        m.train(train)
    torch.testing.assert_close(bank(x), loop_outputs(modules, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),  # a hidden bias is kept
        lambda: nn.Sequential(nn.Linear(4, 5, bias=True), nn.BatchNorm1d(5), nn.LeakyReLU(0.3), nn.Linear(5, 2, bias=False)),
        lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.GELU(approximate="tanh"), nn.Linear(5, 5),
                              nn.LayerNorm(5), nn.GELU(approximate="tanh"), nn.Linear(5, 3)),
        lambda: nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6, momentum=None, eps=1e-3), nn.ELU(alpha=0.5),
                              nn.Linear(6, 3), nn.BatchNorm1d(3, affine=False)),
        lambda: nn.Sequential(nn.Linear(4, 3)),
        lambda: nn.Sequential(nn.Linear(4, 5, bias=False), nn.Softplus(beta=2.0, threshold=5.0), nn.Linear(5, 2)),
    ],
)
def test_round_trip_is_exact(make):
    modules = _experts(3, make)
    x = torch.randn(7, 4)
    with torch.no_grad():  # non-trivial norm statistics and affine parameters
        for m in modules:
            for layer in m:
                if isinstance(layer, nn.BatchNorm1d):
                    layer.running_mean.normal_()
                    layer.running_var.uniform_(0.5, 2.0)
                if getattr(layer, "weight", None) is not None and not isinstance(layer, nn.Linear):
                    layer.weight.normal_()
                    layer.bias.normal_()
    bank = ExpertBank.from_modules(modules)
    _assert_same_function(bank, modules, x, train=False)
    back = bank.to_modules()
    for a, b in zip(modules, back):  # structure, options and every tensor come back
        assert [type(l) for l in a] == [type(l) for l in b]
        assert [repr(l) for l in a] == [repr(l) for l in b]
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    _assert_same_function(bank, modules, x, train=True)  # training mode: batch statistics, same updates
    for a, b in zip(modules, bank.to_modules()):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(v, b.state_dict()[k])


def test_hidden_bias_options():
    bank = ExpertBank(2, 4, 5, 3, num_layers=3, hidden_bias=[True, False])
    assert [l.bias is not None for l in bank.linears] == [True, False, True]
    bank = ExpertBank(2, 4, 5, 3, hidden_bias=True, last_bias=False)
    assert [l.bias is not None for l in bank.linears] == [True, True, False]
    with pytest.raises(ValueError, match=r"one entry per hidden layer \(2\), got 1"):
        ExpertBank(2, 4, 5, 3, hidden_bias=[True])
    with pytest.raises(TypeError, match="hidden_bias must be a bool"):
        ExpertBank(2, 4, 5, 3, hidden_bias="yes")


@pytest.mark.parametrize(
    "expert, match",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.ReLU(), nn.Linear(4, 2)), "module 1: cannot represent Dropout"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 2)), "module 1: cannot represent Softmax"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)), "module 2: cannot represent BatchNorm1d"),
        (nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2)), "module 1: cannot represent PReLU"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()), "activation after the last Linear"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(5, 2)), "Linear 1 takes 5 features"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), "same width"),
        (nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)),
         "same activation"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
         "same norm"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, bias=False), nn.Linear(4, 2)), "module 1: cannot represent LayerNorm"),
    ],
)
def test_from_modules_refuses_what_it_cannot_represent(expert, match):
    with pytest.raises(ValueError, match=match):
        ExpertBank.from_modules([expert])


def test_from_modules_refuses_mismatched_experts_and_non_sequential():
    a = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    c = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.3), nn.Linear(4, 2))
    for other in (b, c):
        with pytest.raises(ValueError, match="expert 1 differs from expert 0"):
            ExpertBank.from_modules([a, other])
    with pytest.raises(TypeError, match="expert 0 must be an nn.Sequential"):
        ExpertBank.from_modules([nn.Linear(4, 2)])


@pytest.mark.parametrize("act", [nn.Softmax, partial(nn.Softmax, dim=-1), nn.Dropout, nn.MultiheadAttention, nn.PReLU])
def test_non_elementwise_activation_refused(act):
    with pytest.raises(TypeError, match="act_layer must be an elementwise activation"):
        ExpertBank(2, 4, 5, 3, act_layer=act)


def test_activation_instance_keeps_options_and_is_copied():
    act = nn.LeakyReLU(0.3)
    bank = ExpertBank(2, 4, 5, 3, act_layer=act)
    assert all(a is not act and a.negative_slope == 0.3 for a in bank.acts)
    exported = bank.to_modules()[0][2]
    assert isinstance(exported, nn.LeakyReLU) and exported.negative_slope == 0.3 and not exported.inplace


def test_layers_export_and_load_experts():
    torch.manual_seed(3)
    lin = ExpertLinear(3, 4, 5, bias=True)
    single = lin.export_expert(1)
    torch.testing.assert_close(single.weight, lin.weight[1], rtol=0, atol=0)
    torch.testing.assert_close(single.bias, lin.bias.view(3, 5)[1], rtol=0, atol=0)
    other = nn.Linear(4, 5)
    lin.load_expert(2, other)
    torch.testing.assert_close(lin.export_expert(2).weight, other.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected Linear\(out, in, bias\) = \(5, 4, True\), got \(5, 4, False\)"):
        lin.load_expert(0, nn.Linear(4, 5, bias=False))
    with pytest.raises(TypeError, match="expected nn.Linear"):
        lin.load_expert(0, nn.ReLU())
    ln = ExpertLayerNorm(3, 5)
    ln.weight.data.normal_()
    single = ln.export_expert(2)
    torch.testing.assert_close(single.weight, ln.weight.view(3, 5)[2], rtol=0, atol=0)
    bn = make_expert_norm(partial(nn.BatchNorm1d, momentum=0.3), 3, 5)
    bn.running_mean.normal_()
    one = export_norm(bn, 1, 3)
    assert one.momentum == 0.3 and one.num_features == 5
    torch.testing.assert_close(one.running_mean, bn.running_mean.view(3, 5)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected a norm with options"):
        load_norm(bn, 0, 3, nn.BatchNorm1d(5, momentum=0.1))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4), d=st.integers(1, 6), h=st.integers(1, 6), o=st.integers(1, 5), layers=st.integers(1, 4),
    biases=st.lists(st.booleans(), min_size=4, max_size=4), norm=st.sampled_from(["bn", "ln", None]),
    act=st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.3), nn.GELU(approximate="tanh"), nn.Tanh(), None]),
)
def test_from_modules_round_trip_property(n, d, h, o, layers, biases, norm, act):
    """Any supported expert (bias or not at every layer, any supported norm and elementwise activation)
    fuses into a bank computing exactly the same function, and unfuses back to the same modules."""
    torch.manual_seed(n + 10 * d + 100 * h)
    norms = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm, None: None}

    def make():
        mods, width = [], d
        for i in range(layers):
            out = o if i == layers - 1 else h
            mods.append(nn.Linear(width, out, bias=biases[i]))
            if i < layers - 1:
                if norm:
                    mods.append(norms[norm](out))
                if act is not None:
                    mods.append(type(act)(**{k: v for k, v in vars(act).items() if not k.startswith("_") and k != "training"}))
            width = out
        return nn.Sequential(*mods)

    modules = [make() for _ in range(n)]
    bank = ExpertBank.from_modules(modules)
    x = torch.randn(5, d)
    _assert_same_function(bank, modules, x, train=False)
    back = bank.to_modules()
    assert [repr(m) for m in back] == [repr(m) for m in modules]


class _MyBatchNorm(nn.BatchNorm1d):
    """A subclass may compute anything: the grammar takes exactly the listed classes."""


_GRAMMAR_CASES = [
    lambda: [nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.Softsign(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.Threshold(0.1, -1.0), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.LogSigmoid(), nn.Linear(6, 6), nn.LogSigmoid(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)],  # no activation: the bank computes it
    lambda: [nn.Linear(4, 6), nn.Identity(), nn.GELU(approximate="tanh"), nn.Linear(6, 3), nn.LayerNorm(3)],
    lambda: [nn.Linear(4, 6, bias=True), nn.ReLU(), nn.Linear(6, 6, bias=False), nn.ReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.InstanceNorm1d(6), nn.ReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), _MyBatchNorm(6), nn.ReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.ReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.LayerNorm(6, bias=False), nn.ReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.RReLU(), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.Softmax(-1), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.Dropout(0.1), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3)],
    lambda: [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU()],
    lambda: [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)],
    lambda: [nn.Linear(4, 6), nn.LeakyReLU(0.1), nn.Linear(6, 6), nn.LeakyReLU(0.2), nn.Linear(6, 3)],
    lambda: [nn.ReLU(), nn.Linear(4, 3)],
]


@pytest.mark.parametrize("make", _GRAMMAR_CASES)
def test_from_modules_and_swap_projector_accept_the_same_blocks(make):
    """One grammar: an expert is fused by from_modules exactly when swap_projector takes it as a projector,
    and both read the same options; what is accepted computes the modules' function exactly."""
    from star_heads.integrations.swap import swap_projector

    torch.manual_seed(0)
    layers = make()
    errors = []
    try:
        bank = ExpertBank.from_modules([nn.Sequential(*layers)])
    except (TypeError, ValueError) as err:
        bank, errors = None, [err]
    holder = nn.Module()
    holder.projector = nn.Sequential(*make())
    try:
        head = swap_projector(holder, num_experts=2, expert_hidden_dim=6)
    except (TypeError, ValueError) as err:
        head, errors = None, [*errors, err]
    assert (bank is None) == (head is None), errors
    if bank is not None:
        assert [type(m) for m in bank.norms] == [type(m) for m in head.experts.norms]
        assert [repr(a) for a in bank.acts] == [repr(a) for a in head.experts.acts]
        assert [lin.bias is not None for lin in bank.linears] == [lin.bias is not None for lin in head.experts.linears]
        x = torch.randn(5, 4)
        _assert_same_function(bank, [nn.Sequential(*layers)], x, train=False)
