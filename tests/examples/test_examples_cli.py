"""End-to-end smoke tests of the example CLIs, run as subprocesses (as users and the README run them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples"
TINY = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--num-train", "32", "--num-heldout", "160",
        "--width", "4", "--num-experts", "2", "--no-progress"]
pytest.importorskip("kornia")
pytest.importorskip("sklearn")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def _run(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_pretrain_then_transfer_end_to_end(tmp_path):
    run = tmp_path / "run"
    _run(str(EX / "pretrain.py"), "--out", str(run), *TINY)
    for f in ("config.json", "metrics.jsonl", "checkpoint.pt", "cca.png", "gates.png", "losses.png"):
        assert (run / f).exists(), f
        if f.endswith(".png"):
            assert (run / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["step"] == 2
    row = rows[0]
    assert row["loss"] == pytest.approx(row["loss_inv"] + row["loss_eq"], rel=1e-5)  # λ = 1
    assert 0.0 <= row["cca_null"] <= 1.0 and 0.0 <= row["cca_mean"] <= 1.0
    gates = torch.tensor(row["gate_mean"])
    assert gates.shape == (2, 2) and torch.allclose(gates.sum(1), torch.ones(2, dtype=gates.dtype))
    assert 0.0 <= row["knn_acc"] <= 1.0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["feature_dim"] == 32
    assert any(k.startswith("net.") for k in ckpt["backbone"])  # the backbone transfer needs

    proc = _run(str(EX / "transfer.py"), str(run), "--grid-points", "2", "--num-train", "60", "--num-test", "40",
                "--max-iter", "20")
    res = json.loads((run / "results.json").read_text())
    assert set(res["tasks"]) == {"shape", "color", "rotation", "digits"}
    assert res["tasks"]["digits"]["n_test"] == 539 and res["tasks"]["shape"]["n_test"] == 40
    for t in res["tasks"].values():
        assert 0.0 <= t["accuracy"] <= 1.0 and t["best_wd"] in res["grid"]
    assert "| shape (in-domain) |" in proc.stdout and "CCA(inv, eq)" in proc.stdout
    cmp = _run(str(EX / "transfer.py"), "--compare", str(run), str(run))
    assert cmp.stdout.count("run (equimod/star-2)") == 2


def test_demo_quick_runs_and_replaces_only_its_own_run(tmp_path, capsys):
    out = tmp_path / "demo"
    proc = _run(str(EX / "demo.py"), "--quick", "--out", str(out))  # the README command's CI form
    assert "Final CCA(inv, eq)" in proc.stdout and "| digits (out-of-domain) |" in proc.stdout
    assert json.loads((out / "config.json").read_text())["tag"] == "demo"
    sys.path.insert(0, str(EX))
    import demo

    first = (out / "checkpoint.pt").stat().st_mtime_ns
    assert demo.cli(["--quick", "--out", str(out)]) == 0  # a previous demo run is replaced
    assert (out / "checkpoint.pt").stat().st_mtime_ns != first
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"head": "separate"}')
    capsys.readouterr()
    assert demo.cli(["--quick", "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not made by demo.py" in err
    assert (other / "config.json").read_text() == '{"head": "separate"}'


@pytest.mark.distributed
def test_ddp_two_processes_with_torchrun(tmp_path):
    run = tmp_path / "ddp"
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EX / "pretrain.py"),
         "--out", str(run), "--device", "cpu", *TINY)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 2  # each rank took batch 8 of the global 16
    assert rows[0]["ddp_param_spread"] == 0.0  # replicas stayed identical (gradient all-reduce)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng"]) == 2  # every rank's RNG state, for an exact resume
    assert all(torch.isfinite(v).all() for v in ckpt["backbone"].values() if v.is_floating_point())
