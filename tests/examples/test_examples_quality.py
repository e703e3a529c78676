"""benchmarks/quality.py: the --quick protocol end to end (temporary folder only), the grids' design, its
statistics by hand."""

import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
pytest.importorskip("kornia")
pytest.importorskip("sklearn")

from benchmarks import quality  # noqa: E402


def _tracked() -> dict:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*") if p.is_file()]
    return {f: (ROOT / f).stat().st_mtime_ns for f in files if (ROOT / f).is_file()}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run, as ``python -m benchmarks.quality --quick`` does it (default output folder)."""
    tmp = tmp_path_factory.mktemp("quality")
    before, old = _tracked(), tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        payload = quality.main(["--quick"])
    finally:
        tempfile.tempdir = old
    assert _tracked() == before, "--quick changed a tracked file"
    (out,) = tmp.glob("star_heads_bench_*")
    return payload, out


def test_uses_only_the_examples_building_blocks():
    """The benchmark imports ``common.*`` building blocks, never an example script."""
    tree = ast.parse((ROOT / "benchmarks" / "quality.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not modules & {"pretrain", "transfer", "demo"}
    assert {m for m in modules if m.startswith("common")} <= {
        "common.backbones", "common.datasets", "common.probe", "common.training"}


@pytest.mark.slow
def test_quick_writes_only_to_a_temporary_folder(quick):
    payload, out = quick
    data = json.loads((out / "benchmarks" / "quality_quick.json").read_text())
    assert data["quick"] and [r["arm"] for r in data["runs"]] == [a.name for a in quality.QUICK_GRID.arms]
    text = (out / "results.md").read_text()
    assert text.count("<!-- BEGIN quality-quick -->") == 1 and "| STAR N=8 |" in text and "4 SGD steps" in text
    assert "| star-8-noisy − star-8 |" in text and "eq crop" in text
    assert (out / "images" / "quality_quick_cca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = next((out / "runs").glob("star-8-w4-*-s0"))
    assert (run / "final.pt").exists() and (run / "initial.pt").exists() and (run / "quality.json").exists()


@pytest.mark.slow
def test_cca_and_equivariance_rows_are_consistent(quick):
    payload, out = quick
    rows = {r["arm"]: r for r in payload["runs"]}
    assert rows["random"].get("final") is None and 0.0 <= rows["random"]["acc"]["shape"] <= 1.0
    for name in ("sep-pm8", "star-8", "star-8-noisy"):
        r = rows[name]
        for point in ("step0", "final"):
            c = r[point]
            assert c["n"] == quality.QUICK["num_heldout"] and 0.0 <= c["cca_null"] <= c["cca_mean"] <= 1.0
            assert c["cca_excess"] == pytest.approx(c["cca_mean"] - c["cca_null"]) and 0.0 <= c["svcca"] <= 1.0
            assert c["top"] == sorted(c["top"], reverse=True) and len(c["top"]) == quality.TOP_K
            assert c["top"][0] <= 1.0 + 1e-9 and c["top"][-1] >= c["cca_mean"] - 1e-9  # top-k ≥ the mean
            for task in ("inv", "eq"):
                eq = c["equivariance"][task]
                assert set(eq["groups"]) == set(quality.GROUPS) and all(v <= 1.0 for v in eq["groups"].values())
                assert eq["n_fit"] + eq["n_score"] == 2 * quality.QUICK_MEASURE["equiv_images"]
        traj = r["trajectory"]
        assert [p["step"] for p in traj] == [0, 2, 4] and traj[0]["cca_mean"] == r["step0"]["cca_mean"]
        # The run's own last-epoch metric is the same statistic of the same model on the same images.
        assert traj[-1]["cca_mean"] == pytest.approx(r["final"]["cca_mean"], abs=1e-6)
    assert abs(rows["sep-pm8"]["head_params"] / rows["star-8"]["head_params"] - 1) <= 0.05
    # Routing at the end: the run's last-epoch mean gates, and each task's share on the other task's half
    assert "gate_mean" not in rows["sep-pm8"] and "other_half_gate" not in rows["random"]
    for name in ("star-8", "star-8-noisy"):
        r, info = rows[name], json.loads((out / "runs" / f"{name}-w4-o16-e2-spe2-s0" / "train.json").read_text())
        gates = info["metrics"][-1]["gate_mean"]
        assert r["gate_mean"] == gates and all(sum(g) == pytest.approx(1.0, abs=1e-5) for g in gates)
        assert r["other_half_gate"] == pytest.approx([sum(gates[0][4:]), sum(gates[1][:4])])
    routing = {e["arm"] for e in payload["summary"]["routing"]}
    assert routing == {"star-8", "star-8-noisy"}
    assert "| head | inv on the eq half | eq on the inv half |" in (out / "results.md").read_text()
    # Both routers start near-uniform and identical by default, so z_inv ≈ z_eq; a noisy start separates them.
    assert rows["star-8-noisy"]["step0"]["cca_mean"] < rows["star-8"]["step0"]["cca_mean"]


def test_router_starts_change_only_the_router_bias():
    """Same seed: backbone, experts, router weights and predictor are identical across router starts."""
    settings = {**quality.QUICK, "width": 2}
    ref_backbone, ref = quality.build_model(quality.STAR8, 3, settings)
    sep_backbone, sep = quality.build_model(quality.SEP8, 3, settings)
    for arm in (quality.STAR8_NOISY, quality.STAR8_DISTINCT):
        backbone, adapter = quality.build_model(arm, 3, settings)
        for (n, p), (_, q) in zip(backbone.state_dict().items(), ref_backbone.state_dict().items()):
            assert torch.equal(p, q), n
        differ = [n for (n, p), (_, q) in zip(adapter.state_dict().items(), ref.state_dict().items())
                  if not torch.equal(p, q)]
        assert differ == ["head.router.linear.bias"]
        assert adapter.head.router.init == arm.router_init
    for (n, p), (_, q) in zip(sep_backbone.state_dict().items(), ref_backbone.state_dict().items()):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(sep.predictor.state_dict().items(), ref.predictor.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_quick_run_is_reused(quick, tmp_path):
    payload, out = quick
    again = quality.main(["--quick", "--out-dir", str(tmp_path), "--runs-dir", str(out / "runs")])
    assert again["reused_runs"] == len(quality.QUICK_GRID.arms)
    assert [r.get("final") for r in again["runs"]] == [r.get("final") for r in payload["runs"]]


def _rows(acc: dict, excess: dict) -> list:
    rows = []
    for (arm, seed), a in acc.items():
        row = {"arm": arm, "seed": seed, "acc": {"shape": a[0], "color": a[1]}, "knn_acc": None}
        if arm != "random":
            eq = {t: {"groups": {g: 0.1 * (seed + 1) * (t == "eq") for g in quality.GROUPS}} for t in ("inv", "eq")}
            row["step0"] = {"cca_mean": 0.9, "cca_null": 0.3, "cca_excess": 0.6, "svcca": 0.9, "top": [1, 1, 1],
                            "equivariance": eq}
            row["final"] = {"cca_mean": 0.3 + excess[(arm, seed)], "cca_null": 0.3, "cca_excess": excess[(arm, seed)],
                            "svcca": 0.4, "top": [0.99, 0.9, 0.8], "equivariance": eq}
        rows.append(row)
    return rows


def _machine() -> dict:
    return {"date_utc": "2026-01-01 00:00", "cpu": "cpu", "cpu_family": None, "cores": 2, "load_avg": [0.0],
            "torch_threads": 1, "torch": "2", "gpu": None}


def test_paired_statistics_and_judged_tasks_by_hand():
    arms = [quality.RANDOM, quality.SEP8, quality.STAR8]
    acc = {  # shape: large, consistent gains → judged; colour: gains within noise → not judged
        ("random", 0): (0.50, 0.90), ("random", 1): (0.52, 0.91), ("random", 2): (0.48, 0.92),
        ("sep-pm8", 0): (0.70, 0.95), ("sep-pm8", 1): (0.71, 0.88), ("sep-pm8", 2): (0.69, 0.93),
        ("star-8", 0): (0.74, 0.91), ("star-8", 1): (0.72, 0.96), ("star-8", 2): (0.70, 0.90),
    }
    excess = {("sep-pm8", s): v for s, v in enumerate((0.30, 0.32, 0.31))} | {("star-8", s): v for s, v in enumerate((0.25, 0.30, 0.20))}
    s = quality.summarize(_rows(acc, excess), arms, (("star-8", "sep-pm8"),))
    assert s["judged_tasks"] == ["shape"]
    (cmp,) = s["comparisons"]
    d = np.array([0.74 - 0.70, 0.72 - 0.71, 0.70 - 0.69])
    assert cmp["shape"]["diffs"] == pytest.approx(d.tolist())
    assert cmp["shape"]["mean"] == pytest.approx(d.mean()) and cmp["shape"]["sd"] == pytest.approx(d.std(ddof=1))
    assert cmp["shape"]["positive"] == 3
    e = np.array([0.25 - 0.30, 0.30 - 0.32, 0.20 - 0.31])
    assert cmp["cca_excess"]["mean"] == pytest.approx(e.mean()) and cmp["cca_excess"]["positive"] == 0
    assert cmp["cca_mean"]["diffs"] == pytest.approx(e.tolist())
    assert cmp["r2_eq"]["diffs"] == pytest.approx([0.0, 0.0, 0.0]) and cmp["rho1"]["mean"] == pytest.approx(0.0)
    gains = {g["task"]: g for g in s["gains"]}
    g = np.array([0.74 - 0.50, 0.72 - 0.52, 0.70 - 0.48])
    assert gains["shape"]["star-8"]["mean"] == pytest.approx(g.mean()) and gains["shape"]["judged"]
    assert not gains["color"]["judged"]
    eq_row = next(r for r in s["equivariance"] if r["arm"] == "star-8")
    assert eq_row["final_eq_crop"] == "0.20 ± 0.10" and eq_row["final_inv_crop"] == "0.00 ± 0.00"
    one = quality.summarize([r for r in _rows(acc, excess) if r["seed"] == 0], arms, (("star-8", "sep-pm8"),))
    assert one["judged_tasks"] == [] and one["comparisons"][0]["cca_excess"]["sd"] is None
    text = quality.render(s, {"settings": quality.BASE, "measure": quality.MEASURE, "machine": _machine(),
                              "jobs": 2, "wall_time_s": 60.0, "reused_runs": 0, "seeds": [0, 1, 2],
                              "num_runs": 9, "run_time_s": 600.0})
    assert "judged tasks: shape" in text and "1024 SGD steps" in text and "16-D embeddings" in text
    assert "| star-8 − sep-pm8 | -0.060 ± 0.046 (0/3) | -0.060 ± 0.046 (0/3) |" in text


def test_grids_are_the_design():
    g = quality.GRIDS
    narrow = g["narrow"].settings
    assert 4 * narrow["output_dim"] <= 8 * narrow["width"]  # embeddings at most a quarter of the features
    assert narrow["epochs"] * (narrow["num_train"] // narrow["batch_size"]) == 1024 and narrow["num_heldout"] >= 4096
    assert g["long"].settings == {**narrow, "epochs": 4 * narrow["epochs"]}
    assert g["long-8"].settings == g["long"].settings
    assert g["long-dropin"].settings == {**g["long"].settings, "hidden": "auto"}
    assert g["router-init"].settings == g["router-init-8"].settings == narrow
    inits = {(a.num_experts, a.router_init) for k in ("router-init", "router-init-8") for a in g[k].arms
             if a.head == "star"}
    assert inits == {(n, i) for n in (8, 16) for i in ("default", "task-distinct", "noisy")}
    for grid in g.values():  # every STAR arm has its parameter-matched separate heads beside it
        names = {a.name for a in grid.arms}
        assert all(f"sep-pm{a.num_experts}" in names for a in grid.arms if a.head == "star")


def test_heads_have_the_papers_expert_shape_unless_asked_for_drop_in_sizing():
    """hidden "d": STAR experts d -> d -> d -> out and separate heads matched to that head (closed form)."""
    from star_heads.sizing import count_parameters

    settings = {**quality.QUICK, "width": 2, "output_dim": 4}
    d, n, o = 16, 8, 4
    _, star = quality.build_model(quality.STAR8, 0, settings)
    # n experts of Linear(d, d, no bias) + BN(d) + Linear(d, d, no bias) + BN(d) + Linear(d, o); router d -> 2n
    assert count_parameters(star.head) == n * (d * d + 2 * d + d * d + 2 * d + d * o + o) + d * 2 * n + 2 * n
    _, sep = quality.build_model(quality.SEP8, 0, settings)
    assert abs(count_parameters(sep.head) / count_parameters(star.head) - 1) <= 0.05
    _, small = quality.build_model(quality.STAR8, 0, {**settings, "hidden": "auto"})
    assert count_parameters(small.head) < count_parameters(star.head)
    with pytest.raises(ValueError, match="hidden"):
        quality.build_model(quality.STAR8, 0, {**settings, "hidden": 16})


def test_a_cached_run_built_by_other_code_is_not_reused(monkeypatch):
    """The cache key holds each module's parameter count as the current code builds it."""
    settings = {**quality.QUICK, "width": 2}
    key = quality._train_key(quality.STAR8, 0, settings)
    assert key["params"]["head"] > 0 and key["settings"] == settings
    assert quality._train_key(quality.STAR8, 0, {**settings, "hidden": "auto"})["params"] != key["params"]
    quality._model_params.cache_clear()
    real = quality.build_model

    def wider(arm, seed, s):  # the same settings, but code that builds a different head
        return real(arm, seed, {**s, "output_dim": s["output_dim"] + 1})

    monkeypatch.setattr(quality, "build_model", wider)
    try:
        assert quality._train_key(quality.STAR8, 0, settings) != key
    finally:
        quality._model_params.cache_clear()
