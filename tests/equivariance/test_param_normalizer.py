"""AugParamNormalizer: non-finite batches never reach the running statistics (decided on the device), opt-in finite
and unit checks, sizing from an augment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sync_guard import HostSyncError, HostSyncGuard

from star_heads import value_checks
from star_heads.equivariance import AugParamNormalizer


@given(seed=st.integers(0, 10_000), momentum=st.sampled_from([None, 0.3]), where=st.integers(0, 3),
       poison=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_a_non_finite_batch_is_skipped_and_its_output_shows_it(seed, momentum, where, poison):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(5, 4, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(4)]
    bad = batches[where].clone()
    bad[2, 1] = poison
    guarded, clean = AugParamNormalizer(4, momentum=momentum).train(), AugParamNormalizer(4, momentum=momentum).train()
    for i, b in enumerate(batches):
        if i == where:
            out = guarded(bad)
            assert not torch.isfinite(out[2, 1]) and torch.isfinite(out[[0, 1, 3, 4]]).all()
        guarded(b)
        clean(b)
    for k, v in clean.state_dict().items():  # as if the poisoned batch had never come
        torch.testing.assert_close(guarded.state_dict()[k], v, rtol=0, atol=0)
    every = torch.cat(batches).numpy()
    if momentum is None:
        np.testing.assert_allclose(guarded.mean.numpy(), every.mean(0), rtol=1e-12)


def test_eval_mode_passes_nan_through_and_keeps_statistics():
    norm = AugParamNormalizer(3).train()
    norm(torch.randn(8, 3))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    out = norm.eval()(torch.tensor([[float("nan"), 0.0, 1.0]]))
    assert torch.isnan(out[0, 0]) and torch.isfinite(out[0, 1:]).all()
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in before.items())


def test_finite_check_is_opt_in():
    x = torch.full((2, 3), float("nan"))
    AugParamNormalizer(3).train()(x)  # default: no host read, no error
    with pytest.raises(ValueError, match="NaN or Inf"):
        AugParamNormalizer(3, check_finite=True).train()(x)
    norm = AugParamNormalizer(3).train()
    with value_checks(), pytest.raises(ValueError, match="NaN or Inf"):
        norm(x)
    assert int(norm.num_samples) == 0


def test_crop_units_check_reads_values_only_on_the_cpu_or_when_asked():
    norm = AugParamNormalizer.stl10(crop_units="normalized")
    pixels = torch.full((2, 11), 40.0)
    with pytest.raises(ValueError, match="crop box looks like pixels"):
        norm(pixels)  # CPU values: reading them syncs nothing
    meta = AugParamNormalizer.stl10(crop_units="normalized").to("meta")
    with HostSyncGuard("meta"):
        meta(torch.empty(2, 11, device="meta"))  # an accelerator: no read unless value checks are on
    with value_checks(), pytest.raises((HostSyncError, RuntimeError, NotImplementedError)), HostSyncGuard("meta"):
        meta(torch.empty(2, 11, device="meta"))


def test_for_augment_and_constants():
    pytest.importorskip("scipy")
    from star_heads.augment import STARAugment

    norm = AugParamNormalizer.for_augment(STARAugment.byol(16), momentum=0.1)
    assert norm.dim == 12 and norm.momentum == 0.1 and norm.crop_units == "normalized"
    arr = AugParamNormalizer.from_constants(np.array([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(arr.std, torch.tensor([3.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="momentum"):
        AugParamNormalizer(3, momentum=1.5)
    with pytest.raises(TypeError, match="momentum"):
        AugParamNormalizer(3, momentum=True)
    assert "num_samples" not in repr(AugParamNormalizer(3).to("meta"))  # no value read to print a meta module


def _poisoned_rank_worker(rank, world_size, batches):
    norm = AugParamNormalizer(3).train()
    for i, b in enumerate(batches):
        part = b[rank * 2 : rank * 2 + 2].clone()
        if i == 1 and rank == 1:
            part[0, 2] = float("nan")  # only rank 1 sees the NaN
        norm(part)
    return norm.state_dict()


@pytest.mark.distributed
def test_a_nan_on_one_rank_is_skipped_by_every_rank():
    from dist_utils import run_distributed

    batches = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    states = run_distributed(_poisoned_rank_worker, world_size=2, args=(batches,))
    single = AugParamNormalizer(3).train()
    for i, b in enumerate(batches):
        if i != 1:  # the poisoned global batch never happened
            single(b)
    for state in states:
        for k, v in single.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-12)
