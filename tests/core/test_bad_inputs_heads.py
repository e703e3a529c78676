"""Bad-input suite for the heads' entry points: a clear exception of the documented type (TypeError for a
wrong type, ValueError for a wrong value, naming the argument), or a finite, correct-shape result — never a
silent NaN, a reinterpreted value or a wrong shape. Plus the state-keeping guarantees (task names in the
state_dict, check_finite before BatchNorm statistics)."""

import copy
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from star_heads import (
    MMoEHead,
    SeparateHeads,
    SharedSpecificHead,
    SoftRouter,
    STARHead,
    STARSimCLRProjectionHead,
    build_head,
    routing_stats,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_VALUE = st.one_of(
    st.integers(-3, 40), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.none(),
    st.text(max_size=3), st.just((4,)), st.just(torch.tensor(4)),
)
SIZE_ARGS = ("input_dim", "hidden_dim", "output_dim", "num_layers", "num_experts")


def _valid_size(name, v):
    low = 1
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _build(kind, sizes):
    d, h, o, layers, n = (sizes[k] for k in SIZE_ARGS)
    if kind == "star":
        return STARHead(d, o, num_experts=n, hidden_dim=h, num_layers=layers)
    if kind == "mmoe":
        return MMoEHead(d, h, o, layers, num_experts=n)
    if kind == "separate":
        return SeparateHeads(d, h, o, layers)
    return SharedSpecificHead(d, h, o, layers)


@SETTINGS
@given(kind=st.sampled_from(["star", "mmoe", "separate", "shared"]), name=st.sampled_from(SIZE_ARGS), value=ANY_VALUE)
def test_constructor_sizes(kind, name, value):
    sizes = dict(input_dim=4, hidden_dim=5, output_dim=3, num_layers=2, num_experts=2)
    if kind in ("separate", "shared") and name == "num_experts":
        return
    sizes[name] = value
    if kind in ("star", "separate", "shared") and name == "hidden_dim" and value is None:  # default: input_dim
        assert _build(kind, sizes).hidden_dim == sizes["input_dim"]
        return
    if _valid_size(name, value):
        head = _build(kind, sizes)
        x = torch.randn(3, sizes["input_dim"])
        z = head(x, task="inv")
        assert z.shape == (3, sizes["output_dim"]) and torch.isfinite(z).all()
        if name in ("hidden_dim", "num_experts", "num_layers", "output_dim", "input_dim"):
            assert getattr(head, name, value) == value or name == "num_layers"  # never reinterpreted
        return
    expected = TypeError if isinstance(value, bool) or not isinstance(value, int) else ValueError
    with pytest.raises(expected, match=name):
        _build(kind, sizes)


@SETTINGS
@given(
    kind=st.sampled_from(["star", "separate", "shared", "dropin"]),
    batch=st.integers(0, 4),
    width=st.integers(1, 7),
    ndim=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]),
    poison=st.sampled_from([None, math.nan, math.inf]),
    train=st.booleans(),
    check_finite=st.booleans(),
)
def test_forward_inputs(kind, batch, width, ndim, dtype, poison, train, check_finite):
    torch.manual_seed(0)
    opts = {"check_finite": check_finite}
    head = {
        "star": lambda: STARHead(5, 3, num_experts=2, **opts),
        "separate": lambda: SeparateHeads(5, 6, 3, **opts),
        "shared": lambda: SharedSpecificHead(5, 6, 3, **opts),
        "dropin": lambda: STARSimCLRProjectionHead(5, 6, 3, num_experts=2, **opts),
    }[kind]()
    head.train(train)
    shape = (batch, width) if ndim == 2 else ((batch,) if ndim == 1 else (batch, width, 1))
    x = torch.randn(shape).to(dtype)
    if poison is not None and x.numel() and dtype.is_floating_point:
        x.view(-1)[0] = poison
    before = copy.deepcopy(head.state_dict())
    ok_shape = ndim == 2 and width == 5 and batch >= 1
    if not dtype.is_floating_point:
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            head(x)
    elif not ok_shape:
        with pytest.raises(ValueError, match="x must"):
            head(x)
    elif dtype != torch.float32:
        with pytest.raises(TypeError, match=f"x has dtype {dtype} but the head's parameters are torch.float32"):
            head(x)
    elif train and batch == 1:
        with pytest.raises(ValueError, match=r"batch of 1 \(shape \(1, 5\)\).*BatchNorm"):
            head(x)
    elif poison is not None and check_finite:
        with pytest.raises(ValueError, match=r"x contains NaN or Inf values \(1 of"):
            head(x)
    else:
        z = head(x, task="inv")
        assert z.shape == (batch, 3)
        if poison is None:
            assert torch.isfinite(z).all()
        return
    after = head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # raised before any state changed


@SETTINGS
@given(task=st.one_of(st.text(max_size=4), st.integers(), st.none(), st.booleans(), st.just(["inv"])),
       flag=st.one_of(st.booleans(), st.integers(0, 2), st.none()))
def test_task_and_flags(task, flag):
    head = STARHead(4, 3, num_experts=2).eval()
    x = torch.randn(2, 4)
    if task is not None and not isinstance(task, str):
        with pytest.raises(TypeError, match="task must be a task name"):
            head(x, task=task)
    elif task not in (None, "inv", "eq"):
        with pytest.raises(ValueError, match=re.escape(f"unknown task {task!r}")):
            head(x, task=task)
    elif not isinstance(flag, bool):
        with pytest.raises(TypeError, match="return_gates must be a bool"):
            head(x, task=task, return_gates=flag)
    else:
        out = head(x, task=task, return_gates=flag)
        tasks = ("inv", "eq") if task is None else (task,)
        if flag or task is None:
            assert tuple(out) == tasks and all(out[t].shape == (2, 3) for t in tasks)
        else:
            assert out.shape == (2, 3)


@SETTINGS
@given(index=st.one_of(st.integers(-5, 5), st.booleans(), st.floats(-2, 2), st.text(max_size=2), st.none()))
def test_router_task_index(index):
    router = SoftRouter(3, 4, 2)
    x = torch.randn(5, 3)
    if index is None:
        assert router(x).shape == (5, 2, 4)
    elif isinstance(index, bool) or not isinstance(index, int):
        with pytest.raises(TypeError, match="task_index must be an int"):
            router(x, task_index=index)
    elif not 0 <= index <= 1:
        with pytest.raises(ValueError, match=r"task_index must be [<>]= [01]"):
            router(x, task_index=index)
    else:
        g = router(x, task_index=index)
        assert g.shape == (5, 1, 4) and torch.allclose(g.sum(-1), torch.ones(5, 1))


@SETTINGS
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=4), scale=st.sampled_from([1.0, 1e-30, 1e30]))
def test_routing_stats_inputs(shape, scale):
    g = torch.rand(shape, dtype=torch.float64) * scale
    if len(shape) not in (2, 3) or shape[0] == 0:
        with pytest.raises(ValueError, match="gates must have shape"):
            routing_stats(g)
        return
    s = routing_stats(g).as_dict()
    assert all(isinstance(v, float) for v in s.values())


@SETTINGS
@given(kind=st.one_of(st.sampled_from(["star", "separate", "shared", "single", "moe", ""]), st.integers(), st.none()),
       num_experts=st.one_of(st.none(), st.integers(-1, 4), st.booleans()))
def test_build_head_inputs(kind, num_experts):
    kwargs = {} if num_experts is None else {"num_experts": num_experts}
    if not isinstance(kind, str):
        with pytest.raises(TypeError, match="kind must be one of"):
            build_head(kind, 4, **kwargs)
    elif kind not in ("star", "separate", "shared", "single"):
        with pytest.raises(ValueError, match=re.escape(f"unknown head kind {kind!r}")):
            build_head(kind, 4, **kwargs)
    elif kind != "star" and num_experts is not None:
        with pytest.raises(ValueError, match=f"not to kind {kind!r}"):
            build_head(kind, 4, **kwargs)
    elif num_experts is not None and (isinstance(num_experts, bool) or num_experts < 1):
        with pytest.raises(TypeError if isinstance(num_experts, bool) else ValueError, match="num_experts"):
            build_head(kind, 4, **kwargs)
    else:
        head = build_head(kind, 4, **kwargs)
        assert head(torch.randn(3, 4), task="inv").shape == (3, 128)


# ------------------------------------------------------------------------- state that must not be corrupted
def test_check_finite_raises_before_batch_norm_statistics_change():
    head = STARHead(6, 4, num_experts=2, check_finite=True)
    x = torch.randn(8, 6)
    x[3, 2] = float("nan")
    stats = copy.deepcopy(head.state_dict())
    with pytest.raises(ValueError, match=r"x contains NaN or Inf values \(1 of 48, shape \(8, 6\)\)"):
        head(x)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in stats.items())
    # without the check the NaN reaches the output, and the running statistics skip the batch (no host sync)
    unchecked = STARHead(6, 4, num_experts=2)
    before = copy.deepcopy(unchecked.state_dict())
    assert torch.isnan(unchecked(x, "inv")).any()
    assert all(torch.equal(v, unchecked.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("make", [lambda t: STARHead(6, 4, num_experts=2, tasks=t), lambda t: SeparateHeads(6, 5, 4, tasks=t),
                                  lambda t: SharedSpecificHead(6, 5, 4, tasks=t)])
def test_task_names_travel_in_the_state_dict(make):
    saved = make(("eq", "inv"))
    state = saved.state_dict()
    assert "task_names" in state and all(isinstance(v, torch.Tensor) for v in state.values())
    other = make(("inv", "eq"))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"saved by a head with tasks \('eq', 'inv'\), this head has tasks \('inv', 'eq'\)"):
        other.load_state_dict(state)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"saved by a head with tasks \('inv', 'eq', 'aux'\)"):
        make(("inv", "eq")).load_state_dict(make(("inv", "eq", "aux")).state_dict(), strict=False)
    same = make(("eq", "inv"))
    same.load_state_dict(state)  # same order: loads
    x = torch.randn(3, 6)
    saved.eval(), same.eval()
    torch.testing.assert_close(same(x, task="eq"), saved(x, task="eq"))
    # a state_dict without task names cannot prove its task order: refused, even for the same order
    unnamed = {k: v for k, v in state.items() if k != "task_names"}
    with pytest.raises(ValueError, match="has no 'task_names'"):
        make(("eq", "inv")).load_state_dict(unnamed)


def test_task_names_survive_nesting_deepcopy_and_dtype_casts():
    model = nn.Sequential(nn.Linear(3, 6), STARHead(6, 4, num_experts=2, tasks=("eq", "inv")))
    clone = copy.deepcopy(model).double()
    assert clone[1].task_names.dtype == torch.uint8
    target = nn.Sequential(nn.Linear(3, 6), STARHead(6, 4, num_experts=2))
    with pytest.raises(ValueError, match="1.task_names|saved by a head with tasks"):
        target.load_state_dict(model.state_dict())
    copy.deepcopy(model).load_state_dict(model.state_dict())


def test_reduced_precision_input_works_under_autocast():
    head = STARHead(6, 4, num_experts=2).eval()
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head(x.bfloat16(), task="inv")
    assert z.shape == (5, 4) and torch.isfinite(z.float()).all()


# ------------------------------------------------------------------------------------ swap_projector
_VOCAB = {
    "lin": lambda w, b: nn.Linear(w, w, bias=b),
    "bn": lambda w, b: nn.BatchNorm1d(w, eps=1e-3),
    "ln": lambda w, b: nn.LayerNorm(w),
    "relu": lambda w, b: nn.ReLU(),
    "gelu": lambda w, b: nn.GELU(approximate="tanh"),
    "drop": lambda w, b: nn.Dropout(0.1),
    "id": lambda w, b: nn.Identity(),
}


@SETTINGS
@given(names=st.lists(st.sampled_from(sorted(_VOCAB)), min_size=1, max_size=8), bias=st.booleans())
def test_swap_projector_represents_exactly_or_refuses(names, bias):
    """Any Sequential: either a clear refusal (nothing replaced), or experts whose layer sequence is the
    projector's (Identity skipped, every bias kept)."""
    from star_heads.integrations.swap import swap_projector

    layers = [_VOCAB[n](6, bias) for n in names]
    model = nn.Module()
    model.projector = nn.Sequential(*layers)
    try:
        head = swap_projector(model, num_experts=2)
    except (TypeError, ValueError) as err:
        assert str(err) and isinstance(model.projector, nn.Sequential)
        return
    assert model.projector is head
    kept = [m for m in layers if not isinstance(m, nn.Identity)]
    expert = list(head.experts.to_modules()[0])
    assert [type(m) for m in expert] == [type(m) for m in kept]
    for old, new in zip(kept, expert):
        if isinstance(old, nn.Linear):
            assert (old.bias is None) == (new.bias is None)
        if isinstance(old, (nn.BatchNorm1d, nn.LayerNorm)):
            assert old.eps == new.eps
    for act, old in zip(head.experts.acts, [m for m in kept if isinstance(m, (nn.ReLU, nn.GELU))]):
        assert type(act) is type(old) and getattr(act, "approximate", None) == getattr(old, "approximate", None)
    z = head(torch.randn(4, 6))
    assert z.shape == (4, 6) and torch.isfinite(z).all()
