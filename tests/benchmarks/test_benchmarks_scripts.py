"""Each benchmark script's ``--quick`` run, as a user runs it (``python -m benchmarks.NAME --quick``).

It must finish, write its JSON and markdown into a temporary folder (never a tracked file), and report the
hardware-independent facts the docs rely on. Speed is never asserted (see docs/benchmarks.md); what is
checked is structure, arithmetic on the reported numbers, and facts that hold on any machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the docs are what a run would write
        return [f for f in (ROOT / "docs").rglob("*") if f.is_file()]


def _snapshot() -> dict[Path, tuple[int, int]]:
    return {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in _tracked_files()}


def run_quick(name: str, tmp_path: Path) -> Path:
    """Runs ``python -m benchmarks.<name> --quick`` with TMPDIR = tmp_path; returns the folder it wrote."""
    before = _snapshot()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _snapshot() == before, "a --quick run changed a tracked file"
    (out,) = tmp_path.glob("star_heads_bench_*")
    return out


def _section(md: Path, name: str) -> str:
    text = md.read_text()
    assert text.count(f"<!-- BEGIN {name} -->") == 1 and text.count(f"<!-- END {name} -->") == 1
    return text.split(f"<!-- BEGIN {name} -->")[1].split(f"<!-- END {name} -->")[0]


def test_expert_bank_quick(tmp_path):
    out = run_quick("expert_bank", tmp_path)
    data = json.loads((out / "benchmarks" / "expert_bank.json").read_text())
    assert data["benchmark"] == "expert_bank" and data["quick"] is True and data["machine"]["torch_threads"] == 1
    rows = data["configs"] + data["sweep"]
    for r in rows:
        t = {k: r["fp32"][k]["cpu_ms"] for k in ("fused", "loop", "gemm")}
        assert all(v > 0 for v in t.values()) and len(r["fp32"]["fused"]["cpu_all_ms"]) == data["repeats"]
        assert r["fused_vs_loop"] == pytest.approx(t["fused"] / t["loop"])
        assert r["fused_vs_gemm"] == pytest.approx(t["fused"] / t["gemm"])
        # the fused bank keeps no more activation memory for backward than the loop of the same experts
        assert 0 < r["saved_mb"]["fused"] <= r["saved_mb"]["loop"] * (1 + 1e-9)
        assert r["peak_mb"]["fused"] is None or r["peak_mb"]["fused"] > 0
    for r in data["configs"]:
        assert r["bf16_fused_vs_loop"] == pytest.approx(r["bf16"]["fused"]["cpu_ms"] / r["bf16"]["loop"]["cpu_ms"])
        assert "compile" not in r  # --quick skips torch.compile (tens of seconds per graph)
    ns = [r["N"] for r in data["sweep"]]
    ops_fused, ops_loop = [r["ops"]["fused"] for r in data["sweep"]], [r["ops"]["loop"] for r in data["sweep"]]
    assert len(set(ops_fused)) == 1, "the fused bank's operator count must not grow with N"
    per_expert = (ops_loop[1] - ops_loop[0]) / (ns[1] - ns[0])  # the loop dispatches every expert's operators
    assert per_expert > 0 and all(v == ops_loop[0] + per_expert * (n - ns[0]) for n, v in zip(ns, ops_loop))
    for k in ("fused", "loop"):  # activation memory is affine in N
        s = [r["saved_mb"][k] for r in data["sweep"]]
        slope = (s[1] - s[0]) / (ns[1] - ns[0])
        assert all(v == pytest.approx(s[0] + slope * (n - ns[0])) for n, v in zip(ns, s))
    section = _section(out / "benchmarks.md", "expert_bank")
    assert "| config | (N, d, h, out, B) | fused ms |" in section and data["machine"]["cpu"] in section
    if data["plot"]:
        assert (out / data["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_step_quick(tmp_path):
    out = run_quick("train_step", tmp_path)
    data = json.loads((out / "benchmarks" / "train_step.json").read_text())
    r = data["result"]
    assert data["benchmark"] == "train_step" and data["quick"] is True
    t = {k: v["cpu_ms"] for k, v in r["time"].items()}
    assert set(t) == {"star", "equimod", "simclr", "backbone"} and all(v > 0 for v in t.values())
    assert r["star_vs_equimod"] == pytest.approx(t["star"] / t["equimod"])
    assert r["head_ms"]["star"] == pytest.approx(t["star"] - t["backbone"])
    # closed-form parameter counts, from the width the run reports (whatever backbone it used)
    d, n, o, e, tasks = r["feature_dim"], r["config"]["experts"], 128, r["config"]["equimod_hidden"], 2
    h = d  # STAR experts d -> d -> d -> 128: two bias-free Linears + BatchNorm, a last Linear with bias
    star_head = n * (d * h + h * h + h * o + o) + 2 * 2 * n * h + (d * tasks * n + tasks * n)
    equimod_head = 2 * (d * e + e * e + e * o + 2 * 2 * e)  # last Linear without bias, last BN affine-free
    assert r["params"]["star"]["head"] == star_head
    assert r["params"]["equimod"]["head"] == equimod_head and r["params"]["simclr"]["head"] == equimod_head // 2
    assert r["params"]["simclr"]["predictor"] == 0 and r["params"]["star"]["predictor"] > 0
    assert len({p["backbone"] for p in r["params"].values()}) == 1
    assert all(v > 0 for v in r["saved_mb"].values())
    assert r["saved_mb"]["simclr"] < r["saved_mb"]["equimod"]  # two views through one head vs three through two
    cca = r["cca_logging"]
    assert set(cca["per_step_ms"]) == {"1", "10", "100"} and cca["update_ms"] > 0
    for k, v in cca["per_step_ms"].items():  # accumulate every step, compute once per k steps
        assert v == pytest.approx(cca["update_ms"] + cca["compute_ms"] / int(k))
    mc = r["multicrop"]  # the STAR step and adapter with K = 0, 2, 6 local crops; ratios against K = 0
    assert set(mc["step_ms"]) == set(mc["adapter_ms"]) == {"0", "2", "6"}
    for k in ("2", "6"):
        assert mc["step_over_k0"][k] == pytest.approx(mc["step_ms"][k] / mc["step_ms"]["0"])
        assert mc["adapter_over_k0"][k] == pytest.approx(mc["adapter_ms"][k] / mc["adapter_ms"]["0"])
    assert mc["step_over_k0"]["6"] > 1  # six more backbone calls cannot be free
    section = _section(out / "benchmarks.md", "train_step")
    assert "| variant | step ms |" in section and "| local crops K | step ms |" in section


def test_cca_quick(tmp_path):
    out = run_quick("cca", tmp_path)
    data = json.loads((out / "benchmarks" / "cca.json").read_text())
    assert data["benchmark"] == "cca" and data["quick"] is True
    for r in data["rows"]:
        assert r["ours_ms"] > 0 and r["numpy_ms"] > 0
        assert r["ours_vs_numpy"] == pytest.approx(r["ours_ms"] / r["numpy_ms"])
        tol = 1e-10 if r["cond"] <= 100 else 1e-6  # against numpy's float64 QR + SVD of the same data
        assert r["ours_err"] < tol and r["meter_err"] < tol
    assert any(r["cond"] > 100 for r in data["rows"])  # an ill-conditioned row
    nulls = [r["null_mean"] for r in data["null_table"]]
    assert all(0 < b < a < 1 for a, b in zip(nulls, nulls[1:]))  # the null shrinks with n
    try:
        import sklearn  # noqa: F401
    except ImportError:
        assert not any("sklearn_ms" in r for r in data["rows"])
    else:
        assert sum("sklearn_ms" in r for r in data["rows"]) == 1
    assert "| n | p = q |" in _section(out / "benchmarks.md", "cca")


def test_augment_quick(tmp_path):
    pytest.importorskip("kornia")
    out = run_quick("augment", tmp_path)
    data = json.loads((out / "benchmarks" / "augment.json").read_text())
    (row,) = data["rows"]
    assert row["size"] == 16 and row["star_img_s"] > 0 and row["kornia_img_s"] > 0
    assert row["star_over_kornia_speed"] == pytest.approx(row["star_img_s"] / row["kornia_img_s"])
    (shapes,) = data["shapes"]
    assert shapes["num_samples"] == 64 and shapes["seconds"] > 0
    assert "STARAugment" in _section(out / "augment.md", "augment_speed")
    assert "64 images at 16×16" in _section(out / "data.md", "shapes_speed")
