"""A run's checkpoint belongs to its run; impossible settings are refused in one line before anything is written."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
pytest.importorskip("kornia")
try:
    import lightning_fabric  # noqa: F401
except ImportError:
    pytest.importorskip("lightning.fabric")

import pretrain  # noqa: E402
import transfer  # noqa: E402
from common.runs import RunDir, RunError  # noqa: E402

TINY = ["--steps-per-epoch", "1", "--batch-size", "8", "--num-train", "16", "--num-heldout", "160",
        "--width", "4", "--num-experts", "2", "--no-progress"]


def _cli(capsys, argv, prog=pretrain):
    capsys.readouterr()
    code = prog.cli(argv)
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """Two runs of 2 epochs stopped after the first: an EquiMod one and a VICReg one."""
    root = tmp_path_factory.mktemp("halfway")
    pretrain.main(["--out", str(root / "equimod"), "--epochs", "2", "--stop-after", "1", *TINY])
    pretrain.main(["--out", str(root / "vicreg"), "--method", "vicreg", "--epochs", "2", "--stop-after", "1", *TINY])
    return root


@pytest.fixture
def run(halfway, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(halfway / "equimod", dest)
    return dest


def _refused(capsys, run, words, *flags):
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, err = _cli(capsys, ["--resume", str(run), *flags])
    assert code == 2 and words in err and "\n" not in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files  # nothing touched


def test_a_resume_continues_its_own_checkpoint(run, capsys):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    cfg = json.loads((run / "config.json").read_text())
    assert len(cfg["run_id"]) == 32 and ckpt["run_id"] == ckpt["config"]["run_id"] == cfg["run_id"]
    (run / "checkpoint.pt.sha256").write_text((run / "checkpoint.pt.sha256").read_text().upper().replace("CHECKPOINT", "checkpoint"))
    (run / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")  # a stale temporary of an interrupted save
    (run / ".checkpoint.pt.999.tmp").write_bytes(b"x")
    assert _cli(capsys, ["--resume", str(run)])[0] == 0  # an upper-case digest (sha256sum -c accepts it) verifies
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert not (run / "checkpoint.pt.tmp").exists() and not (run / ".checkpoint.pt.999.tmp").exists()


def test_another_runs_checkpoint_is_refused(run, halfway, capsys):
    for f in ("checkpoint.pt", "checkpoint.pt.sha256"):
        shutil.copy(halfway / "vicreg" / f, run / f)
    _refused(capsys, run, "belongs to another run")


def test_a_hand_edited_config_is_refused_with_the_fix(run, capsys):
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "epochs": 5}))
    _refused(capsys, run, "disagree on epochs (epochs: 5 in config.json, 2 in the checkpoint); the learning-rate schedule")
    (run / "config.json").write_text(json.dumps({**cfg, "lam": 0.5}))
    _refused(capsys, run, "disagree on lam")
    for key in ("run_id",):  # a run written before run ids: the configs are still compared
        cfg.pop(key)
    (run / "config.json").write_text(json.dumps({**cfg, "method": "vicreg"}))
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state.pop("run_id")
    state["config"].pop("run_id")
    RunDir(run).save_checkpoint(state)
    _refused(capsys, run, "disagree on method")


def test_a_missing_or_unreadable_history_is_refused(run, capsys):
    (run / "metrics.jsonl").unlink()
    _refused(capsys, run, "metrics.jsonl does not exist but the checkpoint is at epoch 1")
    (run / "metrics.jsonl").write_text('{"epoch": 2}\n')
    _refused(capsys, run, "lacks epoch(s) [1]")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    _refused(capsys, run, "cannot read")


@pytest.mark.parametrize("damage, words", [
    (lambda r: (r / "checkpoint.pt.sha256").write_text("garbage\n"), "holds 'garbage', not a SHA-256 digest"),
    (lambda r: (r / "checkpoint.pt.sha256").write_bytes(b"\xff\xfe\x00\x81"), "not a SHA-256 checksum file"),
    (lambda r: ((r / "checkpoint.pt.sha256").unlink(), (r / "checkpoint.pt.sha256").mkdir()), "cannot read"),
    (lambda r: ((r / "checkpoint.pt").unlink(), (r / "checkpoint.pt").mkdir()), "is a directory, not a checkpoint"),
])
def test_a_damaged_checksum_or_checkpoint_is_one_line(run, capsys, damage, words):
    damage(run)
    _refused(capsys, run, words)
    with pytest.raises(RunError, match=words.split("(")[0]):
        RunDir(run).load_checkpoint()


def test_a_read_only_run_is_refused_before_training(run, capsys, monkeypatch):
    import common.runs as runs

    real = runs.os.access
    monkeypatch.setattr(runs.os, "access", lambda p, mode: False if Path(p) == run else real(p, mode))
    _refused(capsys, run, f"--resume {run} is not writable")


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--seed", "-1"], "--seed must be in [0, "),
    (["--threads", "100000"], "--threads must be <= "),
    (["--image-size", "100000"], "GiB"),
    (["--num-experts", "1000000"], "GiB"),
    (["--embed-dim", "200"], "--num-heldout must be >= 202"),
    (["--router-init", "noisy", "--head", "separate"], "--router-init noisy applies to routed heads"),
    (["--batch-size", "64"], "--batch-size 64 is larger than the 16 training images"),
])
def test_impossible_settings_are_refused_before_anything_is_written(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    code, err = _cli(capsys, ["--out", str(out), "--epochs", "1", *TINY, *flags])
    assert code == 2 and words in err and "\n" not in err, err
    assert not out.exists()  # a refused run leaves no file behind


@pytest.mark.parametrize("check", ["--no-check-finite", "--check-finite"])
def test_a_diverging_run_is_one_line_without_the_per_step_checks(tmp_path, capsys, check):
    out = tmp_path / "run"
    code, err = _cli(capsys, ["--out", str(out), "--epochs", "1", "--lr", "1e30", check, *TINY])
    assert code == 1 and "\n" not in err and ("non-finite" in err or "NaN/Inf" in err), err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
    import star_heads._value_checks as vc

    assert not vc.value_checks_enabled()  # --check-finite switched the library's checks on for the run only


def test_embed_dim_and_router_init_reach_the_head(tmp_path, capsys):
    from star_heads import build_head

    capsys.readouterr()
    run = pretrain.main(["--out", str(tmp_path / "d"), "--epochs", "1", "--embed-dim", "16", "--log-every", "1", *TINY])
    assert "step 1 loss " in capsys.readouterr().out  # --log-every: the loss of each logging step
    from common.training import build_adapter

    adapter = build_adapter(json.loads((run / "config.json").read_text()), 32)  # features: 8 × --width 4
    adapter.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["adapter"])
    emb = adapter.eval().embed(torch.randn(5, 32))
    assert {k: tuple(v.shape) for k, v in emb.items()} == {"inv": (5, 16), "eq": (5, 16)}
    try:
        build_head("star", 8, num_experts=2, router_init="noisy")
        supported = True
    except TypeError:
        supported = False
    code, err = _cli(capsys, ["--out", str(tmp_path / "r"), "--epochs", "1", "--router-init", "noisy", *TINY])
    if supported:
        assert code == 0 and json.loads((tmp_path / "r" / "config.json").read_text())["router_init"] == "noisy"
    else:
        assert code == 2 and "router_init='noisy' needs a star_heads whose star head takes router_init=" in err
        assert not (tmp_path / "r").exists()


def test_transfer_refuses_a_bad_device_and_a_foreign_results_file(halfway, tmp_path, capsys):
    for device, words in (("foo", "is not a device"), ("meta", "run on cpu or cuda")):
        code, err = _cli(capsys, [str(halfway / "equimod"), "--device", device], prog=transfer)
        assert code == 2 and words in err and "\n" not in err, err
    run = tmp_path / "r"
    shutil.copytree(halfway / "equimod", run)
    (run / "results.json").write_text("{}")
    code, err = _cli(capsys, ["--compare", str(run), str(run)], prog=transfer)
    assert code == 2 and "results.json lacks the keys ['run', 'config', 'final', 'tasks']" in err and "\n" not in err
    assert (run / "results.json").read_text() == "{}"
