"""benchmarks/quality.py: the --quick protocol end to end (temporary folder only), its statistics by hand."""

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


def test_quick_writes_only_to_a_temporary_folder(quick):
    payload, out = quick
    data = json.loads((out / "benchmarks" / "quality.json").read_text())
    assert data["quick"] and [r["arm"] for r in data["runs"]] == list(quality.QUICK_ARMS)
    text = (out / "results.md").read_text()
    assert text.count("<!-- BEGIN quality -->") == 1 and "| STAR N=8 |" in text and "2 SGD steps" in text
    assert (out / "images" / "quality_cca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "star-8-s0" / "checkpoint.pt").exists()


def test_cca_rows_are_consistent(quick):
    payload, out = quick
    rand, sep, star = payload["runs"]
    assert rand.get("final") is None and 0.0 <= rand["acc"]["shape"] <= 1.0
    for r in (sep, star):
        for point in ("step0", "final"):
            c = r[point]
            assert c["n"] == quality.QUICK["num_heldout"] and 0.0 <= c["cca_null"] <= c["cca_mean"] <= 1.0
            assert c["cca_excess"] == pytest.approx(c["cca_mean"] - c["cca_null"]) and 0.0 <= c["svcca"] <= 1.0
        traj = r["trajectory"]
        assert [p["step"] for p in traj] == [0, 2] and traj[0]["cca_mean"] == r["step0"]["cca_mean"]
        # The run's own last-epoch metric is the same statistic of the same model on the same images.
        assert traj[-1]["cca_mean"] == pytest.approx(r["final"]["cca_mean"], abs=1e-6)
    # Parameter matching: the separate heads are within 5 % of STAR-8's parameters.
    assert abs(sep["head_params"] / star["head_params"] - 1) <= 0.05
    # STAR's two routers start uniform and identical, so z_inv ≈ z_eq at step 0.
    assert star["step0"]["cca_mean"] > 0.9


def test_step0_model_is_pretrains_initial_model(tmp_path):
    """initial_model(cfg) equals what pretrain.py starts from: one step at lr 1e-30 leaves the weights unchanged."""
    import pretrain

    run = tmp_path / "run"
    pretrain.main(["--out", str(run), "--head", "separate", "--match-params", "--num-experts", "2", "--epochs", "1",
                   "--steps-per-epoch", "1", "--batch-size", "16", "--num-train", "32", "--num-heldout", "160",
                   "--width", "4", "--lr", "1e-30", "--weight-decay", "0", "--seed", "5", "--no-progress"])
    cfg = json.loads((run / "config.json").read_text())
    backbone, adapter = quality.initial_model(cfg)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    for mine, saved in ((backbone.named_parameters(), ckpt["backbone"]), (adapter.named_parameters(), ckpt["adapter"])):
        for name, p in mine:
            torch.testing.assert_close(p.detach(), saved[name], rtol=0, atol=1e-20)


def test_quick_run_is_reused(quick, tmp_path):
    payload, out = quick
    again = quality.main(["--quick", "--out-dir", str(tmp_path), "--runs-dir", str(out / "runs")])
    assert again["reused_runs"] == len(quality.QUICK_ARMS)
    assert [r.get("final") for r in again["runs"]] == [r.get("final") for r in payload["runs"]]


def _rows(acc: dict, excess: dict) -> list:
    rows = []
    for (arm, seed), a in acc.items():
        row = {"arm": arm, "seed": seed, "acc": {"shape": a[0], "color": a[1], "rotation": a[2], "digits": a[3]},
               "knn_acc": None}
        if arm not in ("random", "single"):
            row["step0"] = {"cca_mean": 0.9, "cca_null": 0.3, "cca_excess": 0.6, "svcca": 0.9}
            row["final"] = {"cca_mean": 0.5, "cca_null": 0.3, "cca_excess": excess[(arm, seed)], "svcca": 0.4}
        rows.append(row)
    return rows


def _machine() -> dict:
    return {"date_utc": "2026-01-01 00:00", "cpu": "cpu", "cpu_family": None, "cores": 2, "load_avg": [0.0],
            "torch_threads": 1, "torch": "2", "gpu": None}


def test_paired_statistics_and_judged_tasks_by_hand():
    arms = [a for a in quality.ARMS if a.name in ("random", "single", "sep-pm8", "star-8")]
    acc = {  # shape: large, consistent gains → judged; colour: gains within noise → not judged
        ("random", 0): (0.50, 0.90, 0.3, 0.9), ("random", 1): (0.52, 0.91, 0.3, 0.9), ("random", 2): (0.48, 0.92, 0.3, 0.9),
        ("sep-pm8", 0): (0.70, 0.95, 0.3, 0.9), ("sep-pm8", 1): (0.71, 0.88, 0.3, 0.9), ("sep-pm8", 2): (0.69, 0.93, 0.3, 0.9),
        ("star-8", 0): (0.74, 0.91, 0.3, 0.9), ("star-8", 1): (0.72, 0.96, 0.3, 0.9), ("star-8", 2): (0.70, 0.90, 0.3, 0.9),
        ("single", 0): (0.60, 0.80, 0.3, 0.9), ("single", 1): (0.62, 0.80, 0.3, 0.9), ("single", 2): (0.61, 0.80, 0.3, 0.9),
    }
    excess = {("sep-pm8", s): v for s, v in enumerate((0.30, 0.32, 0.31))} | {("star-8", s): v for s, v in enumerate((0.25, 0.30, 0.20))}
    s = quality.summarize(_rows(acc, excess), arms)
    assert s["judged_tasks"] == ["shape"]
    cmp, vs_single = s["comparisons"]
    assert (cmp["a"], cmp["b"], vs_single["a"], vs_single["b"]) == ("star-8", "sep-pm8", "star-8", "single")
    assert "cca_excess" not in vs_single and vs_single["shape"]["mean"] == pytest.approx((0.14 + 0.10 + 0.09) / 3)
    d = np.array([0.74 - 0.70, 0.72 - 0.71, 0.70 - 0.69])
    assert cmp["shape"]["diffs"] == pytest.approx(d.tolist())
    assert cmp["shape"]["mean"] == pytest.approx(d.mean()) and cmp["shape"]["sd"] == pytest.approx(d.std(ddof=1))
    assert cmp["shape"]["positive"] == 3 and "color" not in cmp
    e = np.array([0.25 - 0.30, 0.30 - 0.32, 0.20 - 0.31])
    assert cmp["cca_excess"]["mean"] == pytest.approx(e.mean()) and cmp["cca_excess"]["positive"] == 0
    gains = {g["task"]: g for g in s["gains"]}
    g = np.array([0.74 - 0.50, 0.72 - 0.52, 0.70 - 0.48])
    assert gains["shape"]["star-8"]["mean"] == pytest.approx(g.mean()) and gains["shape"]["judged"]
    assert not gains["color"]["judged"] and not gains["rotation"]["judged"]  # zero gain, zero sd: not > 2 sd
    # One seed: no standard deviation, so nothing can be judged.
    one = quality.summarize([r for r in _rows(acc, excess) if r["seed"] == 0], arms)
    assert one["judged_tasks"] == [] and one["comparisons"][0]["cca_excess"]["sd"] is None
    text = quality.render(s, {"settings": quality.SETTINGS, "transfer": quality.TRANSFER, "machine": _machine(),
                              "jobs": 2, "wall_time_s": 60.0, "reused_runs": 0, "seeds": [0, 1, 2],
                              "num_runs": 9, "run_time_s": 600.0})
    assert "| star-8 − single | – | – |" in text and "judged tasks: shape" in text and "1024 SGD steps" in text


def test_arms_are_the_protocol():
    names = [a.name for a in quality.ARMS]
    assert names == ["random", "single", "sep-pm8", "star-8", "sep-pm16", "equimod", "star-16"]
    s = quality.SETTINGS
    assert s["epochs"] * (s["num_train"] // s["batch_size"]) >= 1000 and s["num_heldout"] >= 4096
    equimod = next(a for a in quality.ARMS if a.name == "equimod")
    assert equimod.args[-1] == str(4 * 8 * s["width"])  # EquiMod's hidden / feature ratio 2048 / 512
