"""The fused BatchNorm+ReLU+Linear kernel against the per-expert loop, and the memory wins it guards (issue 11).

Independent reference: ``bank.to_modules()`` — standard ``nn.Linear`` / ``nn.BatchNorm1d`` / ``nn.ReLU`` run
expert by expert (tests/core/oracle.py).
"""

import copy
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from oracle import loop_mixture
from star_heads.experts import ExpertBank


def _step(model_out, upstream):
    (model_out * upstream).sum().backward()


def _compare_with_loop(bank, modules, steps, b, seed, train_flags):
    """Several forward+backward steps through both; outputs, input grads, every parameter grad and buffer equal."""
    n, d = bank.num_experts, bank.input_dim
    gen = torch.Generator().manual_seed(seed)
    for train in train_flags:
        bank.train(train)
        modules.train(train)
        x = torch.randn(b, d, generator=gen)
        gates = torch.softmax(torch.randn(b, 2, n, generator=gen), -1)
        xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        gf, gl = gates.clone().requires_grad_(), gates.clone().requires_grad_()
        yf, yl = bank(xf, gf), loop_mixture(modules, xl, gl)
        torch.testing.assert_close(yf, yl, rtol=1e-5, atol=1e-5)
        up = torch.randn(yl.shape, generator=gen)
        _step(yf, up)
        _step(yl, up)
        torch.testing.assert_close(xf.grad, xl.grad, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(gf.grad, gl.grad, rtol=1e-3, atol=1e-4)
    unfused = bank.to_modules()  # the bank's parameters and buffers, expert by expert
    for k in range(n):
        # fp32 noise is relative to the largest gradient in the expert: e.g. a bias right before a BatchNorm has
        # an exactly-zero gradient that both sides only approximate
        atol = 1e-4 * max([1.0] + [float(p.grad.abs().max()) for p in modules[k].parameters()])
        for (name, p_loop), (_, p_bank) in zip(modules[k].named_parameters(), unfused[k].named_parameters()):
            layer = int(name.split(".")[0])
            fused = _fused_param(bank, k, modules[k], layer, name.split(".")[1])
            torch.testing.assert_close(fused.grad, p_loop.grad, rtol=1e-3, atol=atol, msg=lambda m: f"expert {k} {name}: {m}")
        for (name, b_loop), (_, b_bank) in zip(modules[k].named_buffers(), unfused[k].named_buffers()):
            torch.testing.assert_close(b_bank, b_loop, rtol=1e-5, atol=1e-6, msg=lambda m: f"expert {k} {name}: {m}")


def _fused_param(bank, k, expert, index, pname):
    """The slice of the bank's gradient that belongs to module ``index`` of expert ``k`` (a view with .grad)."""
    module = expert[index]
    lin_i = sum(isinstance(m, nn.Linear) for m in list(expert)[: index + 1]) - 1
    if isinstance(module, nn.Linear):
        p = getattr(bank.linears[lin_i], pname)
    else:
        p = getattr(bank.norms[lin_i], pname)

    class _Slice:
        grad = p.grad[k] if p.ndim == 3 else p.grad.view(bank.num_experts, -1)[k]

    return _Slice


@given(
    n=st.integers(1, 4),
    d=st.integers(1, 7),
    h=st.integers(1, 7),
    o=st.integers(1, 5),
    layers=st.integers(2, 4),
    b=st.integers(4, 9),  # B = 2, 3 make BatchNorm's backward ill-conditioned (fp32 noise, not the kernel)
    momentum=st.sampled_from([0.1, 0.5, None]),
    affine=st.booleans(),
    track=st.booleans(),
    hidden_bias=st.booleans(),
)
def test_fused_batch_norm_relu_linear_equals_loop(n, d, h, o, layers, b, momentum, affine, track, hidden_bias):
    """Outputs, every gradient and BN running statistics (momentum, cumulative average, unbiased running var,
    num_batches_tracked) over train/train/eval steps, for every BatchNorm option the fast kernel takes."""
    torch.manual_seed(n + 10 * d + 100 * h + 1000 * o)
    norm = partial(nn.BatchNorm1d, momentum=momentum, affine=affine, track_running_stats=track)
    bank = ExpertBank(n, d, h, o, layers, norm_layer=norm, hidden_bias=hidden_bias)
    if affine:
        with torch.no_grad():
            for m in bank.norms:
                if isinstance(m, nn.BatchNorm1d):
                    m.weight.normal_()
                    m.bias.normal_()
    modules = bank.to_modules()
    _compare_with_loop(bank, modules, 3, b, seed=n * 7 + b, train_flags=(True, True, False))


def test_float64_and_non_centred_inputs_match_loop():
    """float64, and activations with a large mean relative to their spread (the centred reductions matter)."""
    torch.manual_seed(0)
    bank = ExpertBank(3, 5, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        bank.linears[0].weight.add_(3.0)  # first-layer outputs ~ 10x their batch spread
    modules = bank.to_modules()
    x = torch.randn(16, 5, dtype=torch.float64) + 5
    gates = torch.softmax(torch.randn(16, 2, 3, dtype=torch.float64), -1)
    xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, yl = bank(xf, gates), loop_mixture(modules, xl, gates)
    torch.testing.assert_close(yf, yl)
    up = torch.randn_like(yl)
    _step(yf, up)
    _step(yl, up)
    torch.testing.assert_close(xf.grad, xl.grad)
    torch.testing.assert_close(bank.norms[0].weight.grad.view(3, -1)[1], modules[1][1].weight.grad)
    torch.testing.assert_close(bank.linears[1].weight.grad[2], modules[2][3].weight.grad)


def test_retain_graph_second_backward_is_exact():
    """Backward reuses only buffers it allocates itself, never a saved tensor: a second backward through a
    retained graph gives the same gradients (gradient-surgery / multi-loss methods do this)."""
    torch.manual_seed(1)
    bank = ExpertBank(4, 6, 8, 3)
    x = torch.randn(10, 6, requires_grad=True)
    gates = torch.softmax(torch.randn(10, 2, 4), -1)
    z = bank(x, gates)
    first = torch.autograd.grad(z.square().sum(), [x, *bank.parameters()], retain_graph=True)
    second = torch.autograd.grad(z.square().sum(), [x, *bank.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sync_batchnorm_conversion_keeps_loop_semantics():
    torch.manual_seed(2)
    bank = ExpertBank(3, 6, 6, 4)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bank))
    assert [type(m) for m in synced.norms] == [nn.SyncBatchNorm, nn.SyncBatchNorm, nn.Identity]
    modules = nn.SyncBatchNorm.convert_sync_batchnorm(bank.to_modules())
    _compare_with_loop(synced, modules, 2, 7, seed=3, train_flags=(True, False))


class _Saved:
    def __init__(self, exclude):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.excluded:
            self.bytes[s.data_ptr()] = s.nbytes()
        return t


def _saved_bytes(model, x, gates):
    rec = _Saved([*model.parameters(), x, gates])
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        out = model(x, gates) if not isinstance(model, nn.ModuleList) else loop_mixture(model, x, gates)
    out.sum().backward()
    return sum(rec.bytes.values())


@pytest.mark.parametrize("n, h, b", [(4, 32, 64), (16, 16, 48)])
def test_saved_activations_at_most_loop_and_bounded(n, h, b):
    """Autograd keeps one activation per hidden layer (the BatchNorm input) plus the output: at most 60 % of
    what the per-expert loop keeps, and exactly this bound."""
    torch.manual_seed(3)
    d, o, layers = 24, 8, 3
    bank = ExpertBank(n, d, h, o, layers)
    x = torch.randn(b, d, requires_grad=True)
    gates = torch.softmax(torch.randn(b, 2, n), -1)
    fused = _saved_bytes(bank, x, gates)
    loop = _saved_bytes(bank.to_modules(), x, gates)
    act = 4 * b * n * h
    assert fused <= (layers - 1) * act + 4 * b * n * o + 4 * 2 * n * h * 2  # + per-channel mean/invstd
    assert fused <= 0.6 * loop, (fused, loop)


class _BigAllocs(TorchDispatchMode):
    """Counts tensors of at least ``threshold`` elements that ops return (fresh activation-sized buffers)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.count = threshold, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {a.untyped_storage().data_ptr() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.count += sum(isinstance(t, torch.Tensor) and t.numel() >= self.threshold
                          and t.untyped_storage().data_ptr() not in inputs for t in outs)
        return out


@pytest.mark.parametrize("n", [2, 8, 32])
def test_activation_sized_allocations_per_step_are_fixed(n):
    """A 3-layer BN/ReLU bank step allocates a fixed number of activation-sized buffers whatever N: forward 5
    (three layer outputs, two BatchNorm outputs), backward 1 for the mixture's gradient and 2 per hidden block
    (the recomputed ReLU output, later reused for ∂a, and ∂y), at most one more small-N matmul gradient;
    ``out=`` and in-place ops write into these instead of allocating."""
    h, b = 16, 32
    bank = ExpertBank(n, 8, h, h)  # output as wide as the hidden layers: every layer output counts
    x = torch.randn(b, 8, requires_grad=True)
    gates = torch.softmax(torch.randn(b, 2, n), -1)
    with _BigAllocs(b * n * h) as c:
        bank(x, gates).sum().backward()
    assert c.count <= 11, c.count


@pytest.mark.slow
def test_torch_compile_fullgraph_training_matches_eager():
    """fullgraph compile in training mode: outputs, input and parameter grads, running statistics."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    bank = ExpertBank(4, 8, 8, 4, hidden_bias=True)
    eager = copy.deepcopy(bank)
    compiled = torch.compile(bank, fullgraph=True)
    for _ in range(2):
        x = torch.randn(6, 8)
        gates = torch.softmax(torch.randn(6, 2, 4), -1)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe, gates), compiled(xc, gates)
        torch.testing.assert_close(yc, ye)
        up = torch.randn_like(ye)
        _step(ye, up)
        _step(yc, up)
        torch.testing.assert_close(xc.grad, xe.grad)
    for (name, p), (_, q) in zip(eager.named_parameters(), bank.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")
    for (name, p), (_, q) in zip(eager.named_buffers(), bank.named_buffers()):
        torch.testing.assert_close(q, p, msg=lambda m: f"{name}: {m}")
