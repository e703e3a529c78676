"""Run directories, checkpoints, RNG capture and backbones of the examples (examples/common)."""

import hashlib
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import common.runs as runs_mod  # noqa: E402
from common.backbones import ConvNet, build_backbone, resolve_backbone, torchvision_error  # noqa: E402
from common.runs import RunDir, RunError, capture_rng, check_writable_dir, restore_rng  # noqa: E402


def test_create_refuses_a_directory_holding_a_run(tmp_path):
    run = RunDir.create(tmp_path / "r")
    run.write_config({"a": 1})
    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="already holds a run"):
        RunDir.create(run.path)
    assert run.read_config() == {"a": 1}
    RunDir.create(run.path, overwrite=True)
    assert not run.config_path.exists()
    assert (run.path / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_open_needs_config_and_checkpoint(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        RunDir.open(tmp_path / "missing")
    with pytest.raises(RunError, match="no config.json"):
        RunDir.open(tmp_path)
    RunDir(tmp_path).write_config({})
    with pytest.raises(RunError, match="no checkpoint.pt"):
        RunDir.open(tmp_path)
    assert RunDir.open(tmp_path, need_checkpoint=False).path == tmp_path


def test_metrics_and_checkpoint_round_trip(tmp_path):
    run = RunDir.create(tmp_path)
    for e in (1, 2, 3):
        run.append_metrics({"epoch": e, "loss": 1.0 / e})
    run.truncate_metrics(2)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    state = {"epoch": 2, "w": torch.arange(4.0)}
    run.save_checkpoint(state)
    back = run.load_checkpoint()
    assert back["epoch"] == 2 and torch.equal(back["w"], state["w"])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    digest = hashlib.sha256(run.checkpoint_path.read_bytes()).hexdigest()
    assert run.digest_path.read_text() == f"{digest}  checkpoint.pt\n"  # sha256sum -c format
    assert torch.load(run.checkpoint_path, weights_only=False)["epoch"] == 2  # still a plain torch.save file
    with pytest.raises(RunError, match=r"lacks the keys \['optimizer'\]"):
        run.load_checkpoint(required=("epoch", "optimizer"))
    run.checkpoint_path.write_text("not a checkpoint")
    with pytest.raises(RunError, match="is damaged"):
        run.load_checkpoint()


def test_a_flipped_byte_is_refused_and_a_crash_mid_save_still_verifies(tmp_path):
    run = RunDir.create(tmp_path)
    run.save_checkpoint({"epoch": 1, "w": torch.ones(64)})
    good = run.checkpoint_path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    run.checkpoint_path.write_bytes(bytes(data))
    with pytest.raises(RunError, match="is damaged: its SHA-256"):
        run.load_checkpoint()
    run.checkpoint_path.write_bytes(good)
    # A crash between the steps of save_checkpoint: both digests are accepted while the file is replaced.
    first = run.digest_path.read_text()
    real_write = runs_mod.atomic_write_bytes

    def crash(path, payload):
        if Path(path).name == "checkpoint.pt":
            raise KeyboardInterrupt
        real_write(path, payload)

    runs_mod.atomic_write_bytes = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            run.save_checkpoint({"epoch": 2, "w": torch.zeros(64)})
    finally:
        runs_mod.atomic_write_bytes = real_write
    assert run.digest_path.read_text() != first and run.load_checkpoint()["epoch"] == 1
    run.digest_path.unlink()
    with pytest.raises(RunError, match="no checksum file"):
        run.load_checkpoint()


def test_metrics_survive_a_partial_last_line_and_refuse_damage(tmp_path):
    run = RunDir.create(tmp_path)
    run.append_metrics({"epoch": 1})
    with run.metrics_path.open("a") as fh:
        fh.write('{"epoch": 2, "lo')  # a write cut short
    with pytest.warns(UserWarning, match="partial last line"):
        assert run.read_metrics() == [{"epoch": 1}]
    with pytest.warns(UserWarning):
        run.append_metrics({"epoch": 2})
    assert run.metrics_path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    run.metrics_path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(RunError, match="line 2 is damaged"):
        run.read_metrics()


@pytest.mark.parametrize("text, words", [("", "is empty"), ("{'a': 1", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_a_damaged_config_is_one_clear_error(tmp_path, text, words):
    RunDir.create(tmp_path).config_path.write_text(text)
    with pytest.raises(RunError, match=words):
        RunDir.open(tmp_path, need_checkpoint=False).read_config()
    RunDir(tmp_path).write_config({"a": 1})
    with pytest.raises(RunError, match=r"lacks the keys \['b'\]"):
        RunDir(tmp_path).read_config(required=("a", "b"))


def test_create_checks_the_target_first_and_discard_removes_only_what_it_made(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file, not a directory"):
        RunDir.create(tmp_path / "file" / "run")
    with pytest.raises(RunError, match="exists and is not a directory"):
        RunDir.create(tmp_path / "file")
    with pytest.raises(RunError, match="cannot be created"):
        check_writable_dir(tmp_path / "file" / "a" / "b")
    run = RunDir.create(tmp_path / "new" / "deeper" / "run")
    assert run.path.is_dir()
    run.discard()
    assert not (tmp_path / "new").exists() and (tmp_path / "file").exists()


def test_rng_capture_restore_continues_every_stream():
    gen = torch.Generator().manual_seed(7)
    state = capture_rng(gen)
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.rand(5), np.random.rand(2), random.random(), torch.rand(4, generator=gen)  # move every stream
    restore_rng(state, gen)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and torch.equal(first[3], again[3])


def test_convnet_shapes_and_backbone_choice():
    net, dim = build_backbone("convnet", width=8)
    assert dim == 64 and net(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    assert ConvNet(4)(torch.rand(1, 3, 96, 96)).shape == (1, 32)
    assert resolve_backbone("auto", "shapes") == "convnet"
    assert resolve_backbone("resnet50", "shapes") == "resnet50"
    with pytest.raises(ValueError, match="unknown backbone"):
        resolve_backbone("vit", "shapes")
    with pytest.raises(ValueError, match="width"):
        ConvNet(0)


def test_resnet_without_torchvision_says_so():
    if torchvision_error() is None:
        net, dim = build_backbone("resnet18", cifar_stem=True)
        assert dim == 512 and net(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    else:
        assert resolve_backbone("auto", "cifar10") == "convnet"
        with pytest.raises(RuntimeError, match="needs torchvision"):
            build_backbone("resnet18")
