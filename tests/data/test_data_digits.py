"""scikit-learn digits as RGB images, and the stratified split helper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from star_heads.data.digits import load_digits, stratified_split

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """Plain align_corners=False bilinear weights (upsampling), float64."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def test_digits_match_sklearn_and_a_plain_bilinear_upsampling():
    raw = sklearn_datasets.load_digits()
    x8, y = load_digits(8)
    assert x8.shape == (1797, 3, 8, 8) and torch.equal(y, torch.as_tensor(raw.target))
    np.testing.assert_allclose(x8[:, 0].numpy(), raw.images / 16.0, rtol=0, atol=1e-7)
    assert torch.equal(x8[:, 0], x8[:, 1]) and torch.equal(x8[:, 0], x8[:, 2])
    x, _ = load_digits(32)
    assert x.shape == (1797, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    m = _bilinear_1d(8, 32)
    ref = np.einsum("ik,nkl,jl->nij", m, raw.images[:50] / 16.0, m)
    np.testing.assert_allclose(x[:50, 2].numpy(), ref, rtol=0, atol=1e-6)


def test_missing_sklearn_names_the_extra():
    code = (
        "import sys; sys.modules['sklearn'] = None; sys.modules['sklearn.datasets'] = None\n"
        "from star_heads.data import load_digits\n"
        "try:\n    load_digits()\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env())
    assert 'pip install "star-heads[data]"' in out.stdout


def test_the_data_extra_is_scikit_learn_only():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in extras["optional-dependencies"]["data"]] == ["scikit-learn"]


def test_stratified_split_is_disjoint_complete_and_per_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    parts = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    allidx = torch.cat(parts)
    assert torch.equal(torch.sort(allidx).values, torch.arange(100))
    for part, frac in zip(parts, (0.6, 0.2, 0.2)):
        counts = torch.bincount(labels[part], minlength=3)
        assert (counts - torch.tensor([50, 30, 20]) * frac).abs().max() <= 1
    again = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not torch.equal(stratified_split(labels, (0.6, 0.2, 0.2), seed=4)[0], parts[0])
    half = stratified_split(labels, (0.5,), seed=0)[0]
    assert torch.equal(torch.bincount(labels[half], minlength=3), torch.tensor([25, 15, 10]))


@pytest.mark.parametrize(
    "labels, fractions, err, words",
    [
        (torch.zeros(5), (0.5,), TypeError, "integer"),
        (torch.zeros(2, 3, dtype=torch.long), (0.5,), TypeError, "1-D"),
        (torch.zeros(5, dtype=torch.long), (0.7, 0.5), ValueError, "sum to at most 1"),
        (torch.zeros(5, dtype=torch.long), (0.0,), ValueError, "positive"),
    ],
)
def test_split_bad_input(labels, fractions, err, words):
    with pytest.raises(err, match=words):
        stratified_split(labels, fractions)


def test_bad_image_size():
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        load_digits(0)
    with pytest.raises(TypeError, match="image_size must be an int"):
        load_digits(32.0)


def _env() -> dict[str, str]:
    """Environment whose PYTHONPATH finds this checkout's star_heads even when it is not installed."""
    import star_heads

    root = str(Path(star_heads.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("fractions, error", [((float("nan"), 0.2), ValueError), ((0.5, float("inf")), ValueError),
                                              (("0.5",), TypeError), ("0.5", TypeError), ((0.5, True), TypeError)])
def test_stratified_split_refuses_non_finite_or_non_numeric_fractions(fractions, error):
    from star_heads.data import stratified_split

    with pytest.raises(error, match="fractions"):
        stratified_split(torch.arange(10) % 2, fractions)
