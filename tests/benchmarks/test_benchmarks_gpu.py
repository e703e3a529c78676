"""``python -m benchmarks.gpu``: the CPU dry run of every code path, and the polite exit without CUDA.

Speed is never asserted; what is checked is the structure of the report, arithmetic on its numbers and facts
that hold on any machine (the library core makes no host sync; a compile with backend='eager' is exact).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu


def _run(tmp_path, *extra):
    out = tmp_path / "gpu"
    assert gpu.main(["--quick", "--device", "cpu", "--out", str(out), *extra]) == 0
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_quick_cpu_dry_run(tmp_path):
    p, md = _run(tmp_path, "--skip-pretrain")
    assert p["benchmark"] == "gpu" and p["quick"] is True and p["device"] == "cpu" and p["pretrain"] is None
    for component in ("ExpertBank", "STARHead", "EquivariantPredictor"):  # the library core: sync-free
        assert p["syncs"][component] == 0, p["syncs"]
    assert {"nt_xent", "SimCLRAdapter joint step"} <= set(p["syncs"])
    assert [r["name"] for r in p["bank"]] == list(gpu.QUICK_CONFIGS)
    for r in p["bank"]:
        for prec in ("fp32", "bf16"):
            t = {k: r[f"{prec}_{k}_ms"] for k in gpu.VARIANTS}
            assert all(v > 0 for v in t.values())
            assert r[f"{prec}_fused_vs_loop"] == pytest.approx(t["fused"] / t["loop"])
        assert r["peak_fused_mb"] is None or r["peak_fused_mb"] > 0
    (c,) = p["compile"]
    assert "error" not in c and c["max_abs_diff"] == 0.0 and c["speedup"] == pytest.approx(c["eager_ms"] / c["compiled_ms"])
    (a,) = p["autocast"]
    for k in ("fused", "loop"):  # bf16 rounds (so not 0) but stays near fp32
        assert 0 < a[f"{k}_out_err"] < 0.05 and 0 < a[f"{k}_grad_err"] < 0.5
    assert "| component | syncs |" in md and "| config | (N, d, h, out, B) | fp32 fused ms |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_and_exits_0(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "DOCS", tmp_path)  # nothing may be written, here or in docs/
    assert gpu.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_quick_cpu_dry_run_with_pretraining(tmp_path):
    """The examples/pretrain.py part: two tiny one-epoch runs; step time from the difference of their epochs."""
    p, md = _run(tmp_path)
    pre = p["pretrain"]
    assert "error" not in pre, pre
    assert pre["steps"] == [2, 1] and pre["epoch_s_2"] > 0 and pre["epoch_s_1"] > 0
    assert pre["step_ms"] == pytest.approx(1e3 * (pre["epoch_s_2"] - pre["epoch_s_1"]))
    assert "`examples/pretrain.py`" in md
