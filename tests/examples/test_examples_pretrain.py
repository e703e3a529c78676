"""pretrain.py in-process: exact resume, bad input (one line, exit code 2, nothing overwritten), bf16 autocast."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
pytest.importorskip("kornia")

import pretrain  # noqa: E402
import transfer  # noqa: E402

TINY = ["--steps-per-epoch", "2", "--batch-size", "16", "--num-train", "48", "--num-heldout", "160",
        "--width", "4", "--num-experts", "2", "--no-progress"]


def _states(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=False)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_time_s")
    return rows


def test_resume_equals_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain.main(["--out", str(a), "--epochs", "2", *TINY])
    pretrain.main(["--out", str(b), "--epochs", "2", "--stop-after", "1", *TINY])
    assert _states(b)["epoch"] == 1 and len(_metrics(b)) == 1
    pretrain.main(["--resume", str(b)])
    sa, sb = _states(a), _states(b)
    assert sa["epoch"] == sb["epoch"] == 2 and sa["step"] == sb["step"] == 4
    for part in ("backbone", "adapter"):
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k}"
    assert sa["scheduler"] == sb["scheduler"]
    assert _metrics(a) == _metrics(b)
    # The first epoch of a fresh run differs from the second (the check above is not vacuous).
    assert _metrics(a)[0]["loss"] != _metrics(a)[1]["loss"]


def _cli(capsys, argv, prog=pretrain):
    code = prog.cli(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_input_is_one_line_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--out", str(out), "--dataset", "imagenet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'imagenet'" in err and "\n" not in err
    for flag, value in (("--head", "moe"), ("--method", "byol")):
        with pytest.raises(SystemExit):
            pretrain.main(["--out", str(out), flag, value])
        assert "invalid choice" in capsys.readouterr().err
    code, err = _cli(capsys, ["--out", str(out), "--dataset", "cifar10", *TINY])
    if "torchvision" in err:  # torchvision missing here: one clear line
        assert code == 2 and "\n" not in err and "needs torchvision" in err
    code, err = _cli(capsys, ["--out", str(out), "--num-heldout", "64"])
    assert code == 2 and "--num-heldout must be >= 130" in err
    code, err = _cli(capsys, ["--epochs", "1"])
    assert code == 2 and "--out RUN_DIR is required" in err
    assert not out.exists()

    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    code, err = _cli(capsys, ["--out", str(out), *TINY])
    assert code == 2 and "already holds a run" in err and "\n" not in err
    assert (out / "config.json").read_text() == '{"mine": true}'
    code, err = _cli(capsys, ["--resume", str(out)])
    assert code == 2 and "no checkpoint.pt" in err
    code, err = _cli(capsys, [str(out)], prog=transfer)
    assert code == 2 and "no checkpoint.pt" in err and "\n" not in err
    code, err = _cli(capsys, [str(tmp_path / "missing")], prog=transfer)
    assert code == 2 and "does not exist" in err
    assert not (out / "results.json").exists() and (out / "config.json").read_text() == '{"mine": true}'


def test_bf16_autocast_and_invariant_only_head(tmp_path):
    run = pretrain.main(["--out", str(tmp_path / "amp"), "--epochs", "1", "--amp", "--head", "single",
                         "--method", "simclr", *TINY])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["invariant_only"] and cfg["amp"]
    row = _metrics(run)[0]
    assert set(k for k in row if k.startswith("loss_")) == {"loss_inv"}
    assert row["cca_mean"] is None and row["gate_mean"] is None  # no equivariant embedding, no router
    assert torch.isfinite(torch.tensor(row["loss"]))
