"""The bank's one expert layer (plain torch ops) against the per-expert loop: values, every gradient, running
statistics, precision under autocast, memory, compile.

Independent reference: ``bank.to_modules()`` — standard ``nn.Linear`` / ``nn.BatchNorm1d`` / ``nn.ReLU`` run
expert by expert (tests/core/oracle.py), and a float64 copy of either for the precision test.
"""

import copy
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import loop_mixture
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from star_heads.experts import ExpertBank


def _step(model_out, upstream):
    (model_out * upstream).sum().backward()


def _compare_with_loop(bank, modules, b, seed, train_flags, device, rtol=1e-10, atol=1e-10):
    """Forward+backward steps through both; outputs, input grads, every parameter grad and buffer equal."""
    n, d, dtype = bank.num_experts, bank.input_dim, bank.linears[0].weight.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    for train in train_flags:
        bank.train(train)
        modules.train(train)
        x = torch.randn(b, d, generator=gen, device=device, dtype=dtype)
        gates = torch.softmax(torch.randn(b, 2, n, generator=gen, device=device, dtype=dtype), -1)
        xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
        gf, gl = gates.clone().requires_grad_(), gates.clone().requires_grad_()
        yf, yl = bank(xf, gf), loop_mixture(modules, xl, gl)
        torch.testing.assert_close(yf, yl, rtol=rtol, atol=atol)
        up = torch.randn(yl.shape, generator=gen, device=device, dtype=dtype)
        _step(yf, up)
        _step(yl, up)
        torch.testing.assert_close(xf.grad, xl.grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(gf.grad, gl.grad, rtol=rtol, atol=atol)
    unfused = bank.to_modules()  # the bank's buffers, expert by expert
    for k in range(n):
        for name, p_loop in modules[k].named_parameters():
            layer, pname = int(name.split(".")[0]), name.split(".")[1]
            fused = _fused_grad(bank, k, modules[k], layer, pname)
            torch.testing.assert_close(fused, p_loop.grad, rtol=rtol, atol=atol, msg=lambda m: f"expert {k} {name}: {m}")
        for (name, b_loop), (_, b_bank) in zip(modules[k].named_buffers(), unfused[k].named_buffers()):
            torch.testing.assert_close(b_bank, b_loop, rtol=rtol, atol=atol, msg=lambda m: f"expert {k} {name}: {m}")


def _fused_grad(bank, k, expert, index, pname):
    """The slice of the bank's gradient that belongs to module ``index`` of expert ``k``."""
    lin_i = sum(isinstance(m, nn.Linear) for m in list(expert)[: index + 1]) - 1
    owner = bank.linears[lin_i] if isinstance(expert[index], nn.Linear) else bank.norms[lin_i]
    g = getattr(owner, pname).grad
    return g[k] if g.ndim == 3 else g.view(bank.num_experts, -1)[k]


@given(
    n=st.integers(1, 4),
    d=st.integers(1, 7),
    h=st.integers(1, 7),
    o=st.integers(1, 5),
    layers=st.integers(2, 4),
    b=st.integers(2, 9),
    momentum=st.sampled_from([0.1, 0.5, None]),
    affine=st.booleans(),
    track=st.booleans(),
    hidden_bias=st.booleans(),
)
def test_batch_norm_bank_equals_loop(n, d, h, o, layers, b, momentum, affine, track, hidden_bias, device):
    """float64: outputs, every gradient and BN running statistics (momentum, cumulative average, unbiased running
    var, num_batches_tracked) over train/train/eval steps, for every BatchNorm option, to 1e-10."""
    torch.manual_seed(n + 10 * d + 100 * h + 1000 * o)
    norm = partial(nn.BatchNorm1d, momentum=momentum, affine=affine, track_running_stats=track)
    bank = ExpertBank(n, d, h, o, layers, norm_layer=norm, hidden_bias=hidden_bias, dtype=torch.float64).to(device)
    if affine:
        with torch.no_grad():
            for m in bank.norms:
                if isinstance(m, nn.BatchNorm1d):
                    m.weight.normal_()
                    m.bias.normal_()
    modules = bank.to_modules()
    _compare_with_loop(bank, modules, b, seed=n * 7 + b, train_flags=(True, True, False), device=device)


def test_float32_and_non_centred_inputs_match_loop(device):
    """float32, activations with a large mean relative to their spread (the centred reductions matter)."""
    torch.manual_seed(0)
    bank = ExpertBank(3, 5, 6, 4, device=device)
    with torch.no_grad():
        bank.linears[0].weight.add_(3.0)  # first-layer outputs ~ 10x their batch spread
    _compare_with_loop(bank, bank.to_modules(), 16, seed=1, train_flags=(True, False), device=device, rtol=1e-4, atol=1e-4)


def test_retain_graph_second_backward_is_exact(device):
    """A second backward through a retained graph gives the same gradients (gradient-surgery / multi-loss)."""
    torch.manual_seed(1)
    bank = ExpertBank(4, 6, 8, 3, device=device)
    x = torch.randn(10, 6, requires_grad=True, device=device)
    gates = torch.softmax(torch.randn(10, 2, 4, device=device), -1)
    z = bank(x, gates)
    first = torch.autograd.grad(z.square().sum(), [x, *bank.parameters()], retain_graph=True)
    second = torch.autograd.grad(z.square().sum(), [x, *bank.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sync_batchnorm_conversion_keeps_loop_semantics(device):
    """``convert_sync_batchnorm`` swaps the bank's norms for SyncBatchNorm, which runs on the same [1, N·h, B]
    view (one process: its local statistics are the batch's), guarded like BatchNorm1d."""
    torch.manual_seed(2)
    bank = ExpertBank(3, 6, 6, 4, dtype=torch.float64, device=device)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bank))
    assert [type(m) for m in synced.norms] == [nn.SyncBatchNorm, nn.SyncBatchNorm, nn.Identity]
    modules = nn.SyncBatchNorm.convert_sync_batchnorm(bank.to_modules())
    _compare_with_loop(synced, modules, 7, seed=3, train_flags=(True, False), device=device)


# ---------------------------------------------------------------------------------------------- precision
def _grads_under_autocast(model, run, x, gates, up, dtype, scale):
    """Parameter gradients (float64, divided by ``scale``) of ``(run(model) · up).sum() · scale``."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        y = run(model, x, gates)
    ((y.double() * up).sum() * scale).backward()
    return [p.grad.double() / scale for p in model.parameters()]


def _loop_grads_in_bank_layout(bank, modules):
    """The per-expert loop's parameter gradients, stacked into the bank's parameter layout."""
    fused = ExpertBank.from_modules(modules)
    for p in fused.parameters():
        p.grad = torch.zeros_like(p)
    for k, expert in enumerate(modules):
        for index, module in enumerate(expert):
            for pname, p in module.named_parameters(recurse=False):
                lin_i = sum(isinstance(m, nn.Linear) for m in list(expert)[: index + 1]) - 1
                owner = fused.linears[lin_i] if isinstance(module, nn.Linear) else fused.norms[lin_i]
                g = getattr(owner, pname).grad
                (g[k] if g.ndim == 3 else g.view(bank.num_experts, -1)[k]).copy_(p.grad)
    return [p.grad.double() for p in fused.parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2.0**12])
def test_autocast_gradients_within_the_loop_error(dtype, scale, device):
    """Under bf16 / fp16 autocast (with and without a loss scale), every parameter gradient of the bank is as
    close to the float64 reference as the per-expert loop's under the same autocast: relative error at most
    1.25× the loop's plus half the dtype's epsilon (two roundings of the same sums)."""
    if device.type == "cpu" and dtype is torch.float16 and not _cpu_autocast_supports(dtype):
        pytest.skip("this torch has no float16 CPU autocast")
    torch.manual_seed(0)
    n, d, h, o, b = 4, 32, 48, 16, 64
    bank = ExpertBank(n, d, h, o, device=device)
    with torch.no_grad():
        for m in bank.norms[:-1]:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    modules, reference = bank.to_modules(), copy.deepcopy(bank).double()
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(b, d, generator=gen, device=device)
    gates = torch.softmax(torch.randn(b, 2, n, generator=gen, device=device), -1)
    up = torch.randn(2, b, o, generator=gen, device=device, dtype=torch.float64) * 1e-3
    ref = _grads_under_autocast(reference, lambda m, x, g: m(x.double(), g.double()), x, gates, up, None, 1.0)
    fused = _grads_under_autocast(bank, lambda m, x, g: m(x, g), x, gates, up, dtype, scale)
    _grads_under_autocast(modules, loop_mixture, x, gates, up, dtype, scale)
    loop = [g / scale for g in _loop_grads_in_bank_layout(bank, modules)]
    eps = torch.finfo(dtype).eps
    for (name, _), f, lp, r in zip(bank.named_parameters(), fused, loop, ref):
        err_fused, err_loop = float((f - r).norm() / r.norm()), float((lp - r).norm() / r.norm())
        assert err_fused <= 1.25 * err_loop + eps / 2, (name, err_fused, err_loop)
        assert err_loop < 0.2, (name, err_loop)  # the reference comparison itself is meaningful


def _cpu_autocast_supports(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------------- memory
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
    """Autograd keeps what the per-expert loop keeps, and no more than this bound: per hidden layer the
    BatchNorm input and the activation's output (the next Linear reads the same tensor), plus the output and
    the per-channel BatchNorm statistics."""
    torch.manual_seed(3)
    d, o, layers = 24, 8, 3
    bank = ExpertBank(n, d, h, o, layers)
    x = torch.randn(b, d, requires_grad=True)
    gates = torch.softmax(torch.randn(b, 2, n), -1)
    fused = _saved_bytes(bank, x, gates)
    loop = _saved_bytes(bank.to_modules(), x, gates)
    act = 4 * b * n * h
    assert fused <= 2 * (layers - 1) * act + 4 * b * n * o + 4 * 2 * n * h * (layers - 1)
    assert fused <= loop, (fused, loop)


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
    """A 3-layer BN/ReLU bank step allocates a fixed number of activation-sized buffers whatever N. Forward 6:
    three layer outputs, two BatchNorm outputs (ReLU runs in place on them), the output in the mixture's
    [B, N, o] layout; backward 7: the output's gradient, two per hidden block (ReLU's and BatchNorm's input
    gradients) and the two batched matmuls' input gradients. With N = 2 the [T, B, o] mixture also reaches
    the threshold."""
    h, b = 16, 32
    bank = ExpertBank(n, 8, h, h)  # output as wide as the hidden layers: every layer output counts
    x = torch.randn(b, 8, requires_grad=True)
    gates = torch.softmax(torch.randn(b, 2, n), -1)
    with _BigAllocs(b * n * h) as forward:
        z = bank(x, gates)
    with _BigAllocs(b * n * h) as backward:
        z.sum().backward()
    assert forward.count == 6 + (n == 2) and backward.count == 7, (forward.count, backward.count)


# ---------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_torch_compile_fullgraph_training_matches_eager(device):
    """fullgraph compile in training mode: outputs, input and parameter grads, running statistics."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    bank = ExpertBank(4, 8, 8, 4, hidden_bias=True, device=device)
    eager = copy.deepcopy(bank)
    compiled = torch.compile(bank, fullgraph=True)
    for _ in range(2):
        x = torch.randn(6, 8, device=device)
        gates = torch.softmax(torch.randn(6, 2, 4, device=device), -1)
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


@pytest.mark.slow
def test_torch_compile_fullgraph_of_a_head_matches_eager(device):
    """A STAR head (router + bank, BatchNorm guard included) compiles as one graph and equals eager: embeddings,
    input and parameter gradients, running statistics, over two training steps."""
    from star_heads import STARHead

    torch._dynamo.reset()
    torch.manual_seed(5)
    head = STARHead(8, 4, num_experts=3, device=device)
    eager = copy.deepcopy(head)
    compiled = torch.compile(head, fullgraph=True)
    for _ in range(2):
        x = torch.randn(6, 8, device=device)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        for t in ye.embeddings:
            torch.testing.assert_close(yc.embeddings[t], ye.embeddings[t])
        sum(z.square().sum() for z in ye.embeddings.values()).backward()
        sum(z.square().sum() for z in yc.embeddings.values()).backward()
        torch.testing.assert_close(xc.grad, xe.grad)
    for (name, p), (_, q) in zip(eager.named_parameters(), head.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")
    for (name, p), (_, q) in zip(eager.named_buffers(), head.named_buffers()):
        torch.testing.assert_close(q, p, msg=lambda m: f"{name}: {m}")
