"""Single-process tests of star_heads.losses against plain float64 loops over anchors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from star_heads.losses import (
    EquivariantNTXentLoss,
    NTXentLoss,
    VICRegLoss,
    VICRegOutput,
    equivariant_nt_xent,
    nt_xent,
    vicreg,
)


# ----------------------------------------------------------------------------- references
def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(math.sqrt(float(v @ v)), 1e-12)


def ref_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """SimCLR: l_i = -log(exp(sim(z_i,z_j)/tau) / sum_{k!=i} exp(sim(z_i,z_k)/tau)), mean over 2B."""
    z = [_unit(np.asarray(r, dtype=np.float64)) for r in np.concatenate([z1, z2])]
    b = len(z1)
    total = 0.0
    for i in range(2 * b):
        j = i + b if i < b else i - b
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * b) if k != i)
        total += -(float(z[i] @ z[j]) / tau - math.log(denom))
    return total / (2 * b)


def ref_equivariant(a: np.ndarray, p: np.ndarray, tau: float, anchors: str = "both") -> float:
    """Anchor A_i: positive P_i, negatives A_k (k != i) and P_k (k != i); symmetric for P_i."""
    a = [_unit(np.asarray(r, dtype=np.float64)) for r in a]
    p = [_unit(np.asarray(r, dtype=np.float64)) for r in p]
    m = len(a)
    losses = []
    sides = [(a, p), (p, a)] if anchors == "both" else [(a, p)]
    for own, other in sides:
        for i in range(m):
            negatives = [own[k] for k in range(m) if k != i] + [other[k] for k in range(m) if k != i]
            assert len(negatives) == 2 * m - 2  # = 4B - 2 when m = 2B
            pos = math.exp(float(own[i] @ other[i]) / tau)
            neg = sum(math.exp(float(own[i] @ v) / tau) for v in negatives)
            losses.append(-math.log(pos / (pos + neg)))
    return sum(losses) / len(losses)


def ref_vicreg(z1: np.ndarray, z2: np.ndarray, lam=25.0, mu=25.0, nu=1.0, eps=1e-4, half=True):
    z1 = np.asarray(z1, dtype=np.float64)
    z2 = np.asarray(z2, dtype=np.float64)
    n, d = z1.shape
    inv = sum((z1[r, c] - z2[r, c]) ** 2 for r in range(n) for c in range(d)) / (n * d)

    def cov_matrix(z):
        mean = [sum(z[r, c] for r in range(n)) / n for c in range(d)]
        return [[sum((z[r, i] - mean[i]) * (z[r, j] - mean[j]) for r in range(n)) / (n - 1) for j in range(d)] for i in range(d)]

    def v(z):
        c = cov_matrix(z)
        return sum(max(0.0, 1.0 - math.sqrt(c[j][j] + eps)) for j in range(d)) / d

    def c(z):
        cm = cov_matrix(z)
        return sum(cm[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    var = (v(z1) + v(z2)) * (0.5 if half else 1.0)
    cov = c(z1) + c(z2)
    return lam * inv + mu * var + nu * cov, inv, var, cov


def _pair(seed: int, b: int, d: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- against references
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 5), st.sampled_from([0.05, 0.2, 0.5, 1.0]))
def test_nt_xent_matches_reference(seed, b, d, tau):
    z1, z2 = _pair(seed, b, d)
    got = nt_xent(z1, z2, tau)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_nt_xent(z1.numpy(), z2.numpy(), tau), rel=1e-9, abs=1e-9)
    # float32 inputs compute in float32
    got32 = nt_xent(z1.float(), z2.float(), tau)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-4, abs=1e-4)


@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 5), st.sampled_from(["both", "first"]))
def test_equivariant_nt_xent_matches_reference(seed, b, d, anchors):
    a, p = _pair(seed, 2 * b, d)  # targets stack two views of b images
    got = equivariant_nt_xent(a, p, 0.2, anchors=anchors)
    want = ref_equivariant(a.numpy(), p.numpy(), 0.2, anchors)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_equivariant_both_anchors_is_nt_xent_of_targets_and_predictions():
    a, p = _pair(3, 8, 4)
    torch.testing.assert_close(equivariant_nt_xent(a, p), nt_xent(a, p))


@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 4), st.sampled_from(["lightly", "solo"]))
def test_vicreg_matches_reference(seed, b, d, convention):
    z1, z2 = _pair(seed, b, d)
    z1 = z1 * 0.7  # keep some std below 1 so the hinge is active
    out = vicreg(z1, z2, 25.0, 20.0, 2.0, variance_convention=convention)
    loss, inv, var, cov = ref_vicreg(z1.numpy(), z2.numpy(), 25.0, 20.0, 2.0, half=convention == "lightly")
    assert isinstance(out, VICRegOutput)
    for got, want in [(out.loss, loss), (out.invariance, inv), (out.variance, var), (out.covariance, cov)]:
        assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_gradients_match_finite_differences():
    z1, z2 = _pair(0, 4, 3)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: equivariant_nt_xent(a, b, 0.3, anchors="first"), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: vicreg(0.3 * a, b).loss, (z1, z2))


# ----------------------------------------------------------------------------- properties
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 5))
def test_nt_xent_invariances(seed, b, d):
    z1, z2 = _pair(seed, b, d)
    base = nt_xent(z1, z2)
    g = torch.Generator().manual_seed(seed + 1)
    s1 = torch.rand(b, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    s2 = torch.rand(b, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    perm = torch.randperm(b, generator=g)
    torch.testing.assert_close(nt_xent(z1 * s1, z2 * s2), base)  # cosine: per-row scale
    torch.testing.assert_close(nt_xent(z1[perm], z2[perm]), base)  # consistent permutation
    torch.testing.assert_close(nt_xent(z2, z1), base)  # symmetric in the views


@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(1, 5))
def test_vicreg_symmetry_and_permutation(seed, b, d):
    z1, z2 = _pair(seed, b, d)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    base = vicreg(z1, z2)
    torch.testing.assert_close(vicreg(z2, z1).loss, base.loss)
    torch.testing.assert_close(vicreg(z1[perm], z2[perm]).loss, base.loss)


def test_vicreg_conventions_differ_by_half_on_variance():
    z1, z2 = _pair(5, 6, 4)
    z1, z2 = z1 * 0.3, z2 * 0.3
    lightly, solo = vicreg(z1, z2), vicreg(z1, z2, variance_convention="solo")
    torch.testing.assert_close(2 * lightly.variance, solo.variance)
    assert lightly.variance > 0
    torch.testing.assert_close(solo.loss - lightly.loss, 25.0 * lightly.variance)


# ----------------------------------------------------------------------------- numerics
def test_collapsed_embeddings_are_finite_with_finite_gradients():
    for dtype in (torch.float32, torch.float64):
        z1 = torch.full((8, 16), 0.37, dtype=dtype, requires_grad=True)
        z2 = torch.full((8, 16), 0.37, dtype=dtype, requires_grad=True)
        out = vicreg(z1, z2)
        assert out.variance.item() == pytest.approx(1.0 - math.sqrt(1e-4), rel=1e-5)  # ½(v+v), std = sqrt(eps)
        (out.loss + nt_xent(z1, z2) + equivariant_nt_xent(z1, z2)).backward()
        assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    zeros = torch.zeros(4, 3, requires_grad=True)
    loss = nt_xent(zeros, zeros.clone())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zeros.grad).all()


def test_bf16_autocast_statistics_in_float32():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 32)
    x1, x2 = torch.randn(16, 8), torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x1), layer(x2)
        assert z1.dtype == torch.bfloat16
        out = vicreg(z1, z2)
        nx = nt_xent(z1, z2)
    assert out.loss.dtype == torch.float32 and nx.dtype == torch.float32
    want = vicreg(z1.double(), z2.double())  # same bf16 values, float64 statistics
    torch.testing.assert_close(out.covariance.double(), want.covariance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nx.double(), nt_xent(z1.double(), z2.double()), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- modules
def test_modules_match_functions():
    z1, z2 = _pair(1, 6, 5, torch.float32)
    torch.testing.assert_close(NTXentLoss()(z1, z2), nt_xent(z1, z2, 0.5))  # lightly's default temperature
    torch.testing.assert_close(NTXentLoss(0.5)(z1, z2), nt_xent(z1, z2, 0.5))
    torch.testing.assert_close(EquivariantNTXentLoss(0.3)(z1, z2), equivariant_nt_xent(z1, z2, 0.3))
    loss = VICRegLoss()(z1, z2)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    torch.testing.assert_close(loss, vicreg(z1, z2).loss)
    terms = VICRegLoss(1.0, 2.0, 3.0, False, 1e-3, variance_convention="solo", return_terms=True)(z1, z2)
    want = vicreg(z1, z2, 1.0, 2.0, 3.0, 1e-3, variance_convention="solo")
    assert isinstance(terms, VICRegOutput)
    torch.testing.assert_close(terms.loss, want.loss)
    torch.testing.assert_close(terms.loss, terms.invariance + 2 * terms.variance + 3 * terms.covariance)
    assert terms.terms() == {"invariance": terms.invariance, "variance": terms.variance, "covariance": terms.covariance}
    flat = terms.as_dict("train/")
    assert set(flat) == {"train/loss", "train/invariance", "train/variance", "train/covariance"}
    assert all(type(v) is float for v in flat.values()) and flat["train/variance"] == terms.variance.item()


def test_lightly_signature_and_defaults_without_lightly():
    """Positional order and defaults are lightly's: NTXentLoss(temperature, memory_bank_size, gather_distributed)."""
    import inspect

    nt = inspect.signature(NTXentLoss).parameters
    assert [(k, p.default) for k, p in nt.items()] == [
        ("temperature", 0.5), ("memory_bank_size", 0), ("gather_distributed", False)
    ]
    vr = list(inspect.signature(VICRegLoss).parameters.items())[:5]
    assert [(k, p.default) for k, p in vr] == [
        ("lambda_param", 25.0), ("mu_param", 25.0), ("nu_param", 1.0), ("gather_distributed", False), ("eps", 1e-4)
    ]
    assert NTXentLoss(0.1, 0, True).gather_distributed and NTXentLoss(0.1, (0, 16)).temperature == 0.1


@pytest.mark.parametrize("size", [4096, (4096, 16), [128, 8]])
def test_memory_bank_is_refused_not_ignored(size):
    with pytest.raises(NotImplementedError, match="no memory bank"):
        NTXentLoss(0.1, size)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("tau", [0.0, -0.1, float("inf"), float("nan")])
def test_bad_temperature(tau):
    z = torch.randn(4, 3)
    want = "temperature must be > 0" if math.isfinite(tau) else "temperature must be a finite number"
    for build in (lambda: nt_xent(z, z, tau), lambda: equivariant_nt_xent(z, z, tau), lambda: NTXentLoss(tau),
                  lambda: EquivariantNTXentLoss(tau)):
        with pytest.raises(ValueError, match=want):
            build()


def test_bad_shapes_and_types():
    a = torch.randn(4, 3)
    for fn in (nt_xent, equivariant_nt_xent, lambda x, y: vicreg(x, y)):
        with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
            fn(a, torch.randn(5, 3))
        with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
            fn(a, torch.randn(4, 2))
        with pytest.raises(ValueError, match="2 dimensions"):
            fn(torch.randn(4), torch.randn(4))
        with pytest.raises(TypeError, match="floating-point"):
            fn(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long))
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn(a.numpy(), a)
    with pytest.raises(ValueError, match="at least one row"):
        nt_xent(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="at least 2 rows.*got 1"):
        vicreg(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        vicreg(a, a, eps=0.0)
    with pytest.raises(ValueError, match="variance_convention must be one of"):
        vicreg(a, a, variance_convention="paper")
    with pytest.raises(ValueError, match="anchors must be one of"):
        equivariant_nt_xent(a, a, anchors="targets")


def test_gather_without_process_group_is_the_local_loss():
    z1, z2 = _pair(11, 5, 4)
    torch.testing.assert_close(nt_xent(z1, z2, gather=True), nt_xent(z1, z2))
    torch.testing.assert_close(equivariant_nt_xent(z1, z2, gather=True), equivariant_nt_xent(z1, z2))
    torch.testing.assert_close(vicreg(z1, z2, gather=True).loss, vicreg(z1, z2).loss)


def test_docs_examples_run():
    import pathlib
    import re

    path = "docs/losses.md"
    text = (pathlib.Path(__file__).parents[2] / path).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, path, "exec"), {})


# ----------------------------------------------------------------------------- degenerate inputs, argument types
@pytest.mark.parametrize("fn", [nt_xent, equivariant_nt_xent, NTXentLoss(), EquivariantNTXentLoss()])
def test_one_pair_has_no_negative_and_is_refused(fn):
    with pytest.raises(ValueError, match=r"at least 2 rows .* no negative.*got shape \(1, 4\)"):
        fn(torch.randn(1, 4), torch.randn(1, 4))


@pytest.mark.parametrize("fn", [nt_xent, equivariant_nt_xent, lambda a, b: vicreg(a, b), VICRegLoss()])
def test_zero_width_embeddings_are_refused(fn):
    with pytest.raises(ValueError, match=r"at least one embedding dimension, got shape \(4, 0\)"):
        fn(torch.randn(4, 0), torch.randn(4, 0))


@pytest.mark.parametrize("shape", [(4, 9, 8), (4, 3, 3, 8)])
def test_vicregl_shaped_input_is_named(shape):
    z = torch.randn(*shape)
    for fn in (lambda a, b: vicreg(a, b), VICRegLoss()):
        with pytest.raises(ValueError, match=rf"z1 must be \[batch, dim\] embeddings, got {len(shape)} dimensions.*VICRegL"):
            fn(z, z)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: vicreg(torch.randn(4, 3), torch.randn(4, 3), eps="a"), "eps"),
        (lambda: VICRegLoss(variance_convention=3), "variance_convention"),
        (lambda: VICRegLoss(eps="a"), "eps"),
        (lambda: VICRegLoss(return_terms=1), "return_terms"),
        (lambda: EquivariantNTXentLoss(anchors=3), "anchors"),
        (lambda: equivariant_nt_xent(torch.randn(4, 3), torch.randn(4, 3), anchors=3), "anchors"),
        (lambda: EquivariantNTXentLoss(gather_distributed=1), "gather_distributed"),
        (lambda: NTXentLoss(gather_distributed="yes"), "gather_distributed"),
        (lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), gather=1), "gather"),
    ],
)
def test_wrong_argument_types_are_type_errors_in_the_house_style(build, name):
    with pytest.raises(TypeError, match=rf"^{name} must be .*, got \w+ "):
        build()


def test_gather_needs_torch_distributed(monkeypatch):
    import star_heads.distributed as sd

    monkeypatch.setattr(sd.dist, "is_available", lambda: False)
    for build in (lambda: NTXentLoss(gather_distributed=True), lambda: VICRegLoss(gather_distributed=True),
                  lambda: EquivariantNTXentLoss(gather_distributed=True),
                  lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), gather=True)):
        with pytest.raises(RuntimeError, match=r"gather(_distributed)?=True needs torch.distributed.*is_available\(\) is False"):
            build()
    NTXentLoss(gather_distributed=False)  # nothing to check


def test_vicreg_output_as_dict_refuses_a_non_string_prefix():
    with pytest.raises(TypeError, match="prefix must be a str, got NoneType"):
        vicreg(torch.randn(4, 3), torch.randn(4, 3)).as_dict(None)
