import copy
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import loop_mixture, loop_outputs
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from star_heads.experts import ExpertBank

NORMS = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm, "none": None}


def _grads(params):
    return [p.grad.clone() for p in params]


def _run_pair(bank, modules, x, gates=None):
    """Forward+backward through the fused bank and the per-expert loop on the same input and upstream grad."""
    xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    if gates is None:
        yf, yl = bank(xf), loop_outputs(modules, xl)
    else:
        gf, gl = gates.clone().requires_grad_(), gates.clone().requires_grad_()
        yf, yl = bank(xf, gf), loop_mixture(modules, xl, gl)
    upstream = torch.randn_like(yl)
    (yf * upstream).sum().backward()
    (yl * upstream).sum().backward()
    return yf, yl, xf.grad, xl.grad


@given(
    n=st.integers(1, 5),
    d=st.integers(1, 12),
    h=st.integers(1, 12),
    o=st.integers(1, 9),
    layers=st.integers(1, 4),
    b=st.integers(2, 9),
    norm=st.sampled_from(sorted(NORMS)),
    train=st.booleans(),
    routed=st.booleans(),
)
def test_fused_equals_per_expert_loop(n, d, h, o, layers, b, norm, train, routed, device):
    torch.manual_seed(n * 1000 + d * 100 + h * 10 + o)
    bank = ExpertBank(n, d, h, o, layers, norm_layer=NORMS[norm], device=device)
    if norm == "bn":  # non-trivial running stats and affine params, so eval mode is a real check
        with torch.no_grad():
            for m in bank.norms:
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.normal_()
                    m.bias.normal_()
    modules = bank.to_modules()
    bank.train(train)
    modules.train(train)
    x = torch.randn(b, d, device=device)
    gates = torch.softmax(torch.randn(b, 2, n, device=device), -1) if routed else None
    yf, yl, gxf, gxl = _run_pair(bank, modules, x, gates)
    torch.testing.assert_close(yf, yl)
    torch.testing.assert_close(gxf, gxl)
    # every parameter gradient, mapped back expert by expert
    unfused = ExpertBank.from_modules(modules)
    for (name, pf), (_, pu) in zip(bank.named_parameters(), unfused.named_parameters()):
        pu.grad = None
    _copy_loop_grads(modules, unfused)
    for (name, pf), (_, pu) in zip(bank.named_parameters(), unfused.named_parameters()):
        torch.testing.assert_close(pf.grad, pu.grad, msg=lambda m: f"{name}: {m}")
    if train and norm == "bn":  # running statistics updated identically
        re = ExpertBank.from_modules(modules)
        for a, c in zip(bank.buffers(), re.buffers()):
            torch.testing.assert_close(a, c)


def _copy_loop_grads(modules, bank):
    """Stacks the per-expert module gradients into the fused parameter layout of ``bank``."""
    n = len(modules)
    with torch.no_grad():
        fused = dict(bank.named_parameters())
        for k, m in enumerate(modules):
            lins = [l for l in m if isinstance(l, nn.Linear)]
            norms = [l for l in m if isinstance(l, (nn.BatchNorm1d, nn.LayerNorm))]
            for i, lin in enumerate(lins):
                w = fused[f"linears.{i}.weight"]
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                w.grad[k] = lin.weight.grad
                if lin.bias is not None:
                    bb = fused[f"linears.{i}.bias"]
                    if bb.grad is None:
                        bb.grad = torch.zeros_like(bb)
                    bb.grad.view(n, -1)[k] = lin.bias.grad
            for i, nm in enumerate(norms):
                for pname in ("weight", "bias"):
                    p = getattr(nm, pname, None)
                    if p is None:
                        continue
                    f = fused[f"norms.{i}.{pname}"]
                    if f.grad is None:
                        f.grad = torch.zeros_like(f)
                    f.grad.view(n, -1)[k] = p.grad


def test_stl10_config_matches_loop_forward_backward(device):
    torch.manual_seed(0)
    bank = ExpertBank(16, 512, 512, 128, device=device)
    modules = bank.to_modules()
    x = torch.randn(64, 512, device=device)
    gates = torch.softmax(torch.randn(64, 2, 16, device=device), -1)
    yf, yl, gxf, gxl = _run_pair(bank, modules, x, gates)
    torch.testing.assert_close(yf, yl)
    torch.testing.assert_close(gxf, gxl)
    torch.testing.assert_close(bank.linears[1].weight.grad[3], modules[3][3].weight.grad)


def test_round_trip_preserves_everything():
    torch.manual_seed(1)
    bank = ExpertBank(3, 6, 7, 5, last_norm_layer=partial(nn.BatchNorm1d, affine=False))
    bank(torch.randn(10, 6))  # updates running stats
    modules = bank.to_modules()
    assert all(isinstance(m, nn.Sequential) for m in modules)
    assert isinstance(modules[0][-1], nn.BatchNorm1d) and not modules[0][-1].affine
    again = ExpertBank.from_modules(modules)
    sd1, sd2 = bank.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], rtol=0, atol=0)
    bank.eval(), again.eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(bank(x), again(x), rtol=0, atol=0)


def test_init_matches_nn_linear_statistics():
    torch.manual_seed(0)
    n, i, o = 8, 400, 300
    bank = ExpertBank(n, i, 50, o, num_layers=2)
    ref = nn.Linear(50, o)
    w = bank.linears[1].weight  # [n, o, 50]: each expert like nn.Linear(50, o)
    bound = 1 / 50**0.5
    assert w.abs().max() <= bound
    torch.testing.assert_close(w.std(), ref.weight.std(), rtol=0.05, atol=0)
    assert bank.linears[1].bias.abs().max() <= bound
    w0 = bank.linears[0].weight
    assert w0.abs().max() <= 1 / i**0.5 and w0.abs().max() > 0.99 / i**0.5
    # what default fan inference on the stacked tensor would have given is ~sqrt(o) times smaller
    assert w.std() > 10 * (1 / (3 * o * 50) ** 0.5)


def test_state_dict_deepcopy_and_dtype_move():
    torch.manual_seed(2)
    bank = ExpertBank(4, 8, 8, 4)
    clone = ExpertBank(4, 8, 8, 4)
    clone.load_state_dict(bank.state_dict())
    ema = copy.deepcopy(bank)
    x = torch.randn(5, 8)
    bank.eval(), clone.eval(), ema.eval()
    torch.testing.assert_close(bank(x), clone(x), rtol=0, atol=0)
    torch.testing.assert_close(bank(x), ema(x), rtol=0, atol=0)
    ema.linears[0].weight.data.add_(1.0)
    assert not torch.equal(ema.linears[0].weight, bank.linears[0].weight)
    b64 = copy.deepcopy(bank).to(torch.float64)
    y64 = b64(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, loop_outputs(b64.to_modules().eval(), x.double()))


def test_sync_batchnorm_conversion():
    bank = ExpertBank(3, 6, 6, 4)
    modules = bank.to_modules()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bank))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 2
    x = torch.randn(7, 6)
    torch.testing.assert_close(synced(x), loop_outputs(modules, x))  # not distributed: plain BN
    synced.eval(), modules.eval()
    torch.testing.assert_close(synced(x), loop_outputs(modules, x))


def test_bf16_autocast(device):
    torch.manual_seed(3)
    bank = ExpertBank(4, 16, 16, 8, device=device)
    x = torch.randn(12, 16, requires_grad=True, device=device)
    gates = torch.softmax(torch.randn(12, 2, 4, device=device), -1)
    ref = bank(x, gates)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = bank(x, gates)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(n, device="meta"):
    bank = ExpertBank(n, 8, 8, 4, device=device)
    x = torch.randn(6, 8, requires_grad=True, device=device)
    gates = torch.softmax(torch.randn(6, 2, n, device=device), -1)
    with _OpCounter() as c:
        bank(x, gates).sum().backward()
    return c.count


def test_operator_count_is_independent_of_num_experts():
    """No Python loop over experts: the dispatched aten ops of forward+backward do not grow with N (a placement
    fact: counted on the meta device)."""
    counts = {n: _ops_per_step(n) for n in (2, 3, 16, 64)}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(4)
    bank = ExpertBank(4, 8, 8, 4)
    x = torch.randn(6, 8)
    gates = torch.softmax(torch.randn(6, 2, 4), -1)
    eager = copy.deepcopy(bank)
    compiled = torch.compile(bank, fullgraph=True)  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled(x, gates), eager(x, gates))


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4), "2 dimensions"),
        (torch.randn(4, 7), r"dimension 1: expected 6, got 7"),
        (torch.ones(4, 6, dtype=torch.long), "floating-point"),
        ([[1.0] * 6], "torch.Tensor"),
    ],
)
def test_bad_input(x, match):
    bank = ExpertBank(2, 6, 5, 3)
    before = copy.deepcopy(bank.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        bank(x)
    for k, v in bank.state_dict().items():  # nothing changed (running stats, counters)
        assert torch.equal(v, before[k])


def test_bad_gates_and_constructor():
    bank = ExpertBank(3, 6, 5, 3)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"gates must have shape \[4, \*, 3\]"):
        bank(x, torch.rand(4, 2, 2))
    with pytest.raises(ValueError, match="gates must have 3 dimensions"):
        bank(x, torch.rand(4, 3))
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        ExpertBank(0, 6, 5, 3)
    with pytest.raises(TypeError, match="norm_layer must be"):
        ExpertBank(2, 6, 5, 3, norm_layer=nn.GroupNorm)
    with pytest.raises(ValueError, match="empty"):
        ExpertBank.from_modules([])


class _BigCopyCounter(TorchDispatchMode):
    """Records copy/fill/clone ops on activation-sized tensors (what a layout copy or CopySlices would add)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.seen = threshold, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if any(k in name for k in ("copy", "fill", "clone", "contiguous", "zeros")):
            t = args[0] if args and isinstance(args[0], torch.Tensor) else out
            if isinstance(t, torch.Tensor) and t.numel() >= self.threshold:
                self.seen.append((name, tuple(t.shape)))
        return out


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_no_activation_sized_copies_between_layers(norm):
    """Every layer reads the previous one's output where it lies (feature-major [N, h, B]; BatchNorm on its
    [1, N·h, B] view): no layout copy of a hidden activation, forward or backward. LayerNorm works on the
    [N, B, h] transpose, and autograd's batched-matmul backward makes that saved operand contiguous once."""
    n, h, b = 6, 32, 40
    bank = ExpertBank(n, 16, h, 8, norm_layer=NORMS[norm])
    x = torch.randn(b, 16, requires_grad=True)
    gates = torch.softmax(torch.randn(b, 2, n), -1)
    with _BigCopyCounter(threshold=n * h * b) as forward:
        z = bank(x, gates)
    with _BigCopyCounter(threshold=n * h * b) as backward:
        z.sum().backward()
    assert forward.seen == []
    assert backward.seen == ([("clone.default", (n, h, b))] if norm == "ln" else [])


def test_every_parameter_and_buffer_follows_device_and_a_meta_step_runs():
    """Placement: built on ``meta`` (the stand-in for a GPU), every parameter, buffer and output is there,
    forward and backward, routed or not, BatchNorm and LayerNorm."""
    for norm in (nn.BatchNorm1d, nn.LayerNorm):
        bank = ExpertBank(4, 8, 6, 5, norm_layer=norm, last_norm_layer=nn.BatchNorm1d, device="meta")
        assert {t.device.type for t in (*bank.parameters(), *bank.buffers())} == {"meta"}
        x = torch.randn(3, 8, device="meta", requires_grad=True)
        gates = torch.softmax(torch.randn(3, 2, 4, device="meta"), -1)
        z, experts = bank(x, gates, return_expert_outputs=True)
        assert z.shape == (2, 3, 5) and experts.shape == (3, 4, 5) and z.device.type == "meta"
        z.sum().backward()
        assert x.grad.device.type == "meta" and all(p.grad.device.type == "meta" for p in bank.parameters())
