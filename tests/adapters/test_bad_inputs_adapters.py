"""Property-based bad input for the adapters and losses: a clear exception of the documented type that names the
argument, or a finite result of the right shape; never a silent NaN, never a reinterpreted value."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from star_heads.adapters import SimCLRAdapter, VICRegAdapter
from star_heads.losses import EquivariantNTXentLoss, NTXentLoss, VICRegLoss, equivariant_nt_xent, nt_xent, vicreg

BAD_TYPES = st.sampled_from(["1", b"1", None, [1.0], (1.0,), True, False, torch.tensor(1.0), {"a": 1}])
BAD_VALUES = st.sampled_from([-1.0, -1e-9, float("nan"), float("inf"), -float("inf")])


def _raises_naming(fn, name, types=(TypeError, ValueError)):
    with pytest.raises(types) as info:
        fn()
    assert name in str(info.value), f"{name!r} not named in: {info.value}"
    return info.value


@given(value=BAD_TYPES)
def test_weights_of_the_wrong_type_are_type_errors_naming_the_argument(value):
    for name, build in [
        ("lam", lambda v: SimCLRAdapter(8, num_experts=2, output_dim=4, lam=v)),
        ("sim", lambda v: vicreg(torch.randn(4, 3), torch.randn(4, 3), sim=v)),
        ("var", lambda v: vicreg(torch.randn(4, 3), torch.randn(4, 3), var=v)),
        ("cov", lambda v: vicreg(torch.randn(4, 3), torch.randn(4, 3), cov=v)),
        ("lambda_param", lambda v: VICRegLoss(lambda_param=v)),
        ("mu_param", lambda v: VICRegLoss(mu_param=v)),
        ("nu_param", lambda v: VICRegLoss(nu_param=v)),
        ("temperature", lambda v: NTXentLoss(v)),
        ("temperature", lambda v: EquivariantNTXentLoss(v)),
    ]:
        err = _raises_naming(lambda: build(value), name, TypeError)
        assert type(value).__name__ in str(err)


@given(value=BAD_VALUES)
def test_weights_out_of_range_are_value_errors_naming_the_argument(value):
    _raises_naming(lambda: SimCLRAdapter(8, num_experts=2, output_dim=4, lam=value), "lam", ValueError)
    _raises_naming(lambda: vicreg(torch.randn(4, 3), torch.randn(4, 3), sim=value), "sim", ValueError)
    _raises_naming(lambda: VICRegLoss(mu_param=value), "mu_param", ValueError)
    _raises_naming(lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), value), "temperature", ValueError)
    _raises_naming(lambda: VICRegAdapter(8, num_experts=2, output_dim=4, eps=value), "eps", ValueError)


@given(size=st.one_of(st.integers(1, 10**6), st.tuples(st.integers(1, 10**6), st.integers(1, 512))))
def test_a_memory_bank_is_refused_never_ignored(size):
    _raises_naming(lambda: NTXentLoss(0.5, size), "memory_bank_size", NotImplementedError)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(0, 6),
    d=st.integers(1, 6),
    b2=st.integers(0, 6),
    d2=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
)
def test_losses_on_any_shape_and_dtype(b, d, b2, d2, dtype):
    a = torch.randn(b, d).to(dtype)
    c = torch.randn(b2, d2).to(dtype)
    for name, fn in [("nt_xent", nt_xent), ("equivariant_nt_xent", equivariant_nt_xent), ("vicreg", lambda x, y: vicreg(x, y).loss)]:
        ok = dtype.is_floating_point and (b, d) == (b2, d2) and b >= 2  # one row: no negative / no variance
        if ok:
            out = fn(a, c)
            assert out.ndim == 0 and math.isfinite(out.item())
        else:
            with pytest.raises((TypeError, ValueError)) as info:
                fn(a, c)
            msg = str(info.value)
            assert any(w in msg for w in ("z1", "z2", "targets", "predictions", "rows", "batch")), msg


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(0, 5),
    d=st.sampled_from([6, 7]),
    p=st.sampled_from([10, 11, 12]),
    which=st.sampled_from(["h0", "h1", "h2", "params1", "params2", None]),
    dtype=st.sampled_from([torch.float32, torch.int64]),
)
def test_adapter_calls_on_any_shape(b, d, p, which, dtype):
    adapter = SimCLRAdapter(6, num_experts=2, output_dim=4, cca_every=0).train()
    g = torch.Generator().manual_seed(b)
    args = {"h1": torch.randn(4, 6, generator=g), "h2": torch.randn(4, 6, generator=g),
            "h0": torch.randn(4, 6, generator=g), "params1": torch.rand(4, 11, generator=g),
            "params2": torch.rand(4, 11, generator=g)}
    if which is not None:
        args[which] = torch.randn(b, d if which.startswith("h") else p).to(dtype)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    bad = which is not None and (dtype != torch.float32 or b != 4 or (d if which.startswith("h") else p) != {"h": 6}.get(which[0], 11))
    if not bad:
        out = adapter(args.pop("h1"), args.pop("h2"), **args)
        assert math.isfinite(out.loss.item()) and all(z.shape == (4, 4) for z in out.embeddings.values())
        return
    with pytest.raises((TypeError, ValueError)) as info:
        adapter(args.pop("h1"), args.pop("h2"), **args)
    assert which in str(info.value) or (which == "h1" and "h1" in str(info.value))
    assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items())  # nothing changed


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"view_batching": 3}, "view_batching"),
        ({"cca_every": 1.5}, "cca_every"),
        ({"param_dim": "11"}, "param_dim"),
        ({"check_finite": "no"}, "check_finite"),
        ({"gather": 1}, "gather"),
        ({"lam": "1"}, "lam"),
    ],
)
def test_adapter_arguments_of_the_wrong_type_are_type_errors(kwargs, name):
    with pytest.raises(TypeError, match=rf"^{name} must be .*, got \w+ "):
        SimCLRAdapter(8, num_experts=2, output_dim=4, **kwargs)


def test_adapter_choices_of_the_wrong_value_are_value_errors():
    with pytest.raises(ValueError, match=r"view_batching must be one of \('separate', 'concat'\), got 'both'"):
        SimCLRAdapter(8, num_experts=2, output_dim=4, view_batching="both")
    with pytest.raises(ValueError, match="cca_every must be >= 0, got -1"):
        VICRegAdapter(8, num_experts=2, output_dim=4, cca_every=-1)


def test_gathering_adapters_need_torch_distributed(monkeypatch):
    import star_heads.distributed as sd

    monkeypatch.setattr(sd.dist, "is_available", lambda: False)
    for cls in (SimCLRAdapter, VICRegAdapter):
        with pytest.raises(RuntimeError, match=r"gather=True needs torch.distributed"):
            cls(8, num_experts=2, output_dim=4, gather=True)


def test_finite_check_is_opt_in_and_names_the_input():
    import star_heads

    g = torch.Generator().manual_seed(0)
    h = [torch.randn(6, 8, generator=g) for _ in range(3)]
    p = [torch.rand(6, 11, generator=g) for _ in range(2)]
    p[1][2, 4] = float("nan")
    quiet = SimCLRAdapter(8, num_experts=2, output_dim=4, cca_every=0)
    assert quiet(h[1], h[2], h0=h[0], params1=p[0], params2=p[1]).loss.isnan()  # unchecked: NaN shows in the loss
    for adapter, switch in [(SimCLRAdapter(8, num_experts=2, output_dim=4, check_finite=True), False),
                            (SimCLRAdapter(8, num_experts=2, output_dim=4), True)]:
        before = {k: v.clone() for k, v in adapter.state_dict().items()}
        with star_heads.value_checks(switch), pytest.raises(ValueError, match=r"^params2 contains NaN or Inf"):
            adapter(h[1], h[2], h0=h[0], params1=p[0], params2=p[1])
        assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items())
