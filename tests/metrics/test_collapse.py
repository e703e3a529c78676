"""Collapse readouts against float64 numpy and the limits of the definitions (RankMe: Garrido et al., 2023, Eq. 1)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sync_guard import HostSyncGuard

from star_heads.metrics import (
    CollapseStats,
    collapse_stats,
    effective_rank,
    embedding_std,
)


def _np_std(z):
    z = np.asarray(z, dtype=np.float64)
    unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return unit.std(axis=0, ddof=1).mean()


def _np_rankme(z, eps=1e-7):
    s = np.linalg.svd(np.asarray(z, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return np.exp(-(p * np.log(p)).sum())


@settings(max_examples=25, deadline=None)
@given(b=st.integers(2, 40), d=st.integers(1, 24), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_both_readouts_match_float64_numpy(b, d, seed, scale):
    z = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    assert float(embedding_std(z)) == pytest.approx(_np_std(z.numpy()), rel=1e-9, abs=1e-12)
    assert float(effective_rank(z)) == pytest.approx(_np_rankme(z.numpy()), rel=1e-9)
    # float32 agrees with the float64 reference to float32 accuracy
    assert float(effective_rank(z.float())) == pytest.approx(_np_rankme(z.numpy()), rel=1e-4)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rankme_of_a_rank_k_matrix_is_about_k(k):
    g = torch.Generator().manual_seed(k)
    # equal singular values on k directions: the entropy is exactly log k (up to eps)
    q, _ = torch.linalg.qr(torch.randn(64, k, generator=g, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(32, k, generator=g, dtype=torch.float64))
    z = q @ r.T  # [64, 32] of rank k
    assert float(effective_rank(z)) == pytest.approx(k, rel=1e-4)
    # a generic rank-k product: at most k, and more than k/2 for a well-spread spectrum
    w = torch.randn(512, k, generator=g) @ torch.randn(k, 32, generator=g)
    assert 0.5 * k < float(effective_rank(w)) <= k + 1e-3


def test_isotropic_gaussian_has_full_rank_and_unit_sphere_std():
    d = 16
    z = torch.randn(20000, d, generator=torch.Generator().manual_seed(0))
    assert float(effective_rank(z)) == pytest.approx(d, rel=0.01)  # B >> D: all singular values ~ sqrt(B)
    assert float(embedding_std(z)) == pytest.approx(d**-0.5, rel=0.01)  # each coordinate of a unit vector: var 1/D


def test_a_collapsed_task_reads_zero_std_and_rank_one():
    z = torch.ones(32, 8) * torch.linspace(1, 2, 32)[:, None]  # one direction, varying norm
    assert float(embedding_std(z)) == pytest.approx(0.0, abs=1e-6)
    assert float(effective_rank(z)) == pytest.approx(1.0, abs=1e-4)  # eps on the zero singular values


def test_collapse_stats_per_task_and_as_dict():
    g = torch.Generator().manual_seed(1)
    emb = {"inv": torch.randn(50, 6, generator=g), "eq": torch.randn(50, 3, generator=g) @ torch.randn(3, 6, generator=g)}
    stats = collapse_stats(emb)
    assert isinstance(stats, CollapseStats) and all(isinstance(v, torch.Tensor) for v in stats.rank.values())
    values = stats.as_dict("star/collapse/")
    assert set(values) == {"star/collapse/inv/std", "star/collapse/inv/rank", "star/collapse/eq/std", "star/collapse/eq/rank"}
    assert all(type(v) is float for v in values.values())
    assert values["star/collapse/eq/rank"] <= 3 + 1e-3 < values["star/collapse/inv/rank"]
    assert values["star/collapse/inv/std"] == pytest.approx(_np_std(emb["inv"].numpy()), rel=1e-5)


def test_half_inputs_are_computed_in_float32():
    z = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    assert effective_rank(z.half()).dtype == torch.float32
    assert float(effective_rank(z.bfloat16())) == pytest.approx(_np_rankme(z.bfloat16().float().numpy()), rel=1e-4)


def test_std_is_sync_free_on_the_device():
    z = torch.empty(16, 8, device="meta")
    with HostSyncGuard("meta"):
        out = embedding_std(z)
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
        (torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point"),
        (torch.ones(4), ValueError, "2 dimensions"),
        (torch.ones(1, 3), ValueError, "B >= 2"),
        (torch.ones(4, 0), ValueError, "D >= 1"),
    ],
)
def test_bad_inputs_are_refused_by_name(bad, err, match):
    with pytest.raises(err, match=match):
        effective_rank(bad)
    with pytest.raises(err, match=match):
        embedding_std(bad)


def test_bad_mappings_are_refused():
    with pytest.raises(TypeError, match="mapping"):
        collapse_stats(torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least one task"):
        collapse_stats({})
    with pytest.raises(ValueError, match=r"embeddings\['eq'\]"):
        collapse_stats({"inv": torch.ones(4, 2), "eq": torch.ones(1, 2)})
    with pytest.raises(TypeError, match="prefix"):
        collapse_stats({"inv": torch.randn(4, 2)}).as_dict(None)
    with pytest.raises(ValueError, match="eps"):
        effective_rank(torch.randn(4, 2), eps=-1.0)
