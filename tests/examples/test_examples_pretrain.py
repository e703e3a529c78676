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
    run = pretrain.main(["--out", str(tmp_path / "amp"), "--epochs", "1", "--precision", "bf16-mixed", "--head", "single",
                         "--method", "simclr", *TINY])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["invariant_only"] and cfg["precision"] == "bf16-mixed"
    row = _metrics(run)[0]
    assert set(k for k in row if k.startswith("loss_")) == {"loss_inv"}
    assert row["cca_mean"] is None and row["gate_mean"] is None  # no equivariant embedding, no router
    assert torch.isfinite(torch.tensor(row["loss"]))


@pytest.mark.parametrize("flags, words", [
    (["--image-size", "0"], "--image-size must be >= 8"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lam", "-1"], "--lam must be a finite number >= 0"),
    (["--momentum", "1"], "--momentum must be < 1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--match-params"], "--match-params sizes a baseline head to STAR"),
])
def test_every_bad_value_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    code, err = _cli(capsys, ["--out", str(out), *TINY, *flags])
    assert code == 2 and words in err and "\n" not in err
    assert not out.exists()


def test_out_under_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _cli(capsys, ["--out", str(tmp_path / "file" / "run"), *TINY])
    assert code == 2 and "is a file, not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run whose final plots were interrupted (as by SIGINT), then resumed."""
    run = tmp_path_factory.mktemp("finished") / "run"
    import common.plots as plots

    real = plots.plot_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    plots.plot_run = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain.main(["--out", str(run), "--epochs", "1", *TINY])
    finally:
        plots.plot_run = real
    assert (run / "checkpoint.pt").exists() and not list(run.glob("*.png"))
    return run


def test_resume_recreates_the_plots_of_a_finished_run(finished, capsys):
    capsys.readouterr()
    pretrain.main(["--resume", str(finished)])
    assert "re-created cca.png, gates.png, losses.png" in capsys.readouterr().out
    for f in ("cca.png", "gates.png", "losses.png"):
        assert (finished / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (finished / "gates.png").unlink()
    pretrain.main(["--resume", str(finished)])
    assert (finished / "gates.png").exists() and "re-created gates.png" in capsys.readouterr().out
    pretrain.main(["--resume", str(finished), "--device", "cpu", "--lr", "0.03"])  # runtime / unchanged flags
    assert "nothing to do" in capsys.readouterr().out


def test_resume_refuses_contradicting_flags_a_new_world_size_and_damage(finished, tmp_path, capsys):
    for flags, words in ((["--lr", "0.1"], "--lr 0.1 contradicts the run being resumed (lr=0.03)"),
                         (["--epochs", "5"], "--epochs 5 contradicts"),
                         (["--head", "separate"], "--head separate contradicts"),
                         (["--out", str(tmp_path)], "--out cannot be combined with --resume")):
        code, err = _cli(capsys, ["--resume", str(finished), *flags])
        assert code == 2 and words in err and "\n" not in err, err
    run = tmp_path / "copy"
    import shutil

    shutil.copytree(finished, run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "world_size": 2}))
    code, err = _cli(capsys, ["--resume", str(run)])
    assert code == 2 and "trained with 2 process(es); resume it with the same number (got 1)" in err
    (run / "config.json").write_text("")
    code, err = _cli(capsys, ["--resume", str(run)])
    assert code == 2 and "config.json is empty" in err
    (run / "config.json").write_text(json.dumps(cfg))
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (run / "checkpoint.pt").write_bytes(bytes(data))
    before = (run / "metrics.jsonl").read_text()
    code, err = _cli(capsys, ["--resume", str(run), "--stop-after", "1"])
    assert code == 2 and "checkpoint.pt is damaged" in err
    assert (run / "metrics.jsonl").read_text() == before and bytes(data) == (run / "checkpoint.pt").read_bytes()
    from common.runs import RunDir

    RunDir(run).save_checkpoint({"epoch": 1})
    code, err = _cli(capsys, ["--resume", str(run)])
    assert code == 2 and "lacks the keys ['adapter', 'backbone', 'optimizer', 'rng', 'scheduler', 'step']" in err


def test_transfer_validates_first_and_prints_before_it_writes(finished, capsys, monkeypatch):
    code, err = _cli(capsys, [str(finished), "--max-iter", "0"], prog=transfer)
    assert code == 2 and "--max-iter must be an int >= 1, got 0" in err
    assert not (finished / "results.json").exists()

    def refuse(path, text):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(transfer, "atomic_write_text", refuse)
    code = transfer.cli([str(finished), "--tasks", "shape", "--grid-points", "1", "--num-train", "40",
                         "--num-test", "20", "--max-iter", "5"])
    captured = capsys.readouterr()
    assert code == 2 and "| shape (in-domain) |" in captured.out  # the results reached the user
    assert "cannot write" in captured.err and "Permission denied" in captured.err
    assert not (finished / "results.json").exists()


def test_a_diverging_run_stops_before_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(capsys, ["--out", str(out), "--epochs", "1", "--lr", "1e30", *TINY])
    assert code == 1 and "\n" not in err and ("non-finite loss" in err or "NaN/Inf" in err), err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_paper_lr_rule_all_wd_and_param_matched_separate_heads(tmp_path):
    from star_heads import build_head
    from star_heads.sizing import count_parameters

    run = pretrain.main(["--out", str(tmp_path / "r"), "--epochs", "1", "--steps-per-epoch", "1", "--head", "separate",
                         "--match-params", "--lr-rule", "paper", "--wd-policy", "all", *TINY[2:]])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr_effective"] == pytest.approx(0.03 * 16 / 256)
    opt = _states(run)["optimizer"]
    assert len(opt["param_groups"]) == 1 and opt["param_groups"][0]["weight_decay"] == 5e-4
    assert opt["param_groups"][0]["initial_lr"] == pytest.approx(0.03 * 16 / 256)
    head = {k[5:]: v for k, v in _states(run)["adapter"].items() if k.startswith("head.")}
    # backbone features: 8 × --width 4; the examples' heads have the paper's expert shape (hidden = d)
    matched = build_head("separate", 32, hidden_dim=32, num_experts=2, match_params=True)
    assert {k: tuple(v.shape) for k, v in matched.state_dict().items() if isinstance(v, torch.Tensor)} == {
        k: tuple(v.shape) for k, v in head.items() if isinstance(v, torch.Tensor)}
    n_star = count_parameters(build_head("star", 32, hidden_dim=32, num_experts=2))  # the STAR head it matches
    assert abs(count_parameters(matched) - n_star) <= 0.05 * n_star


def test_non_finite_features_never_reach_the_batchnorm_statistics():
    from common.training import NonFiniteError, SSLModel, build_adapter
    from torch import nn

    cfg = {"method": "equimod", "head": "star", "num_experts": 2, "lam": 1.0, "temperature": 0.2}
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8))
    model = SSLModel(backbone, build_adapter(cfg, 8), check_finite=True).train()
    x = [torch.rand(4, 3, 4, 4) for _ in range(3)]
    p = [torch.rand(4, 11) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = x[1].clone()
    bad[2, 0, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/Inf in the augmented views"):
        model(x[0], bad, x[2], *p)
    with torch.no_grad():
        model.backbone[1].weight[0, 0] = float("inf")  # finite views, non-finite features
    with pytest.raises(NonFiniteError, match="backbone features"):
        model(*x, *p)
    after = model.state_dict()
    stats = [k for k in before if k.startswith("adapter.") and ("running" in k or "num_" in k)]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)  # head, predictor, normaliser untouched
    with torch.no_grad():
        model.backbone[1].weight.copy_(before["backbone.1.weight"])
    out = model(*x, *p)  # the same model runs once the values are finite
    assert torch.isfinite(out.loss)
