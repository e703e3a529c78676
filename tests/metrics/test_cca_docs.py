"""docs/cca.md stays true: its examples run and its sample-size table matches the null baseline."""

import re
from pathlib import Path

import pytest
import torch

from star_heads.metrics import null_mean_canonical_correlation

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cca.md"


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(PAGE), "exec"), {})


def test_sample_size_table_matches_null_baseline():
    text = PAGE.read_text()
    ns = [int(v) for v in re.search(r"\| n \(p = q = 128\) \|(.*)\|", text).group(1).split("|")]
    values = [float(v) for v in re.search(r"\| mean CCA of independent views \|(.*)\|", text).group(1).split("|")]
    assert len(ns) == len(values) >= 5
    ones = torch.ones(128)
    for n, v in list(zip(ns, values))[::3]:  # a few columns: each null costs ~0.1-0.5 s on a busy CPU
        assert null_mean_canonical_correlation(n, ones, ones) == pytest.approx(v, abs=6e-4)
