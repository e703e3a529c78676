"""examples/demo.py: the untrained baseline beside the pretrained backbone, and the data it learns from."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "examples")]
pytest.importorskip("kornia")
pytest.importorskip("sklearn")

import demo  # noqa: E402
from common.backbones import build_backbone, write_untrained_run  # noqa: E402
from common.datasets import SHAPES_BACKGROUND, pretrain_data, transfer_tasks  # noqa: E402

from star_heads.data import make_shapes  # noqa: E402


def test_demo_prints_untrained_vs_pretrained_shape_margin(tmp_path, capsys):
    out = demo.main(["--quick", "--out", str(tmp_path / "demo")])
    text = capsys.readouterr().out
    pre, base = out["pretrained"], out["untrained"]
    shape, shape0 = pre["tasks"]["shape"]["accuracy"], base["tasks"]["shape"]["accuracy"]
    assert out["shape_margin"] == pytest.approx(shape - shape0)
    assert (f"In-domain shape probe: pretrained {100 * shape:.1f} % vs untrained {100 * shape0:.1f} %" in text
            and f"{100 * (shape - shape0):+.1f} points" in text)
    assert "| untrained (equimod/random) | demo (equimod/star-4) |" in text.replace("task | ", "")
    # The baseline is the pretraining run's own starting point: same data set, seed, backbone and width.
    cfg = json.loads((tmp_path / "demo" / "config.json").read_text())
    cfg0 = json.loads((tmp_path / "demo" / "untrained" / "config.json").read_text())
    assert {k: cfg0[k] for k in ("dataset", "seed", "backbone", "width")} == {k: cfg[k] for k in ("dataset", "seed", "backbone", "width")}
    assert cfg0["head"] == "random" and cfg0["tag"] == "demo-untrained" and cfg["dataset"] == "shapes"
    ckpt = torch.load(tmp_path / "demo" / "untrained" / "checkpoint.pt", weights_only=False)
    torch.manual_seed(cfg["seed"])
    fresh = build_backbone("convnet", width=cfg["width"])[0].state_dict()
    assert fresh.keys() == ckpt["backbone"].keys() and all(torch.equal(fresh[k], ckpt["backbone"][k]) for k in fresh)
    trained = torch.load(tmp_path / "demo" / "checkpoint.pt", weights_only=False)["backbone"]
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)  # pretraining moved the weights


def test_untrained_run_is_seeded_like_pretraining(tmp_path):
    cfg = {"seed": 3, "backbone": "convnet", "width": 4, "cifar_stem": False, "dataset": "shapes", "image_size": 32}
    write_untrained_run(tmp_path / "a", cfg)
    write_untrained_run(tmp_path / "b", {**cfg, "seed": 4})
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["backbone"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["backbone"]
    torch.manual_seed(3)
    ref = build_backbone("convnet", width=4)[0].state_dict()
    assert all(torch.equal(a[k], ref[k]) for k in ref) and not all(torch.equal(a[k], b[k]) for k in ref)


def test_shapes_datasets_use_their_background():
    """`shapes` is the plain-background set (learnable), `shapes-texture` the textured negative control."""
    assert SHAPES_BACKGROUND == {"shapes": "plain", "shapes-texture": "texture"}
    for name, bg in SHAPES_BACKGROUND.items():
        data = pretrain_data(name, num_train=40, num_heldout=30, num_knn_bank=20)
        ref = make_shapes(40, seed=0, background=bg)
        assert torch.equal(data.train.images, ref.images) and torch.equal(data.train.labels, ref.factors["shape"])
        assert len(data.knn_bank) == 20 and torch.equal(data.knn_bank.images, ref.images[:20])
        tasks = transfer_tasks(name, tasks=["shape", "color"], num_train=30, num_test=20)
        assert set(tasks) == {"shape", "color"} and tasks["shape"].num_classes == 8
    plain = pretrain_data("shapes", num_train=40, num_heldout=30).train.images
    texture = pretrain_data("shapes-texture", num_train=40, num_heldout=30).train.images
    # Same objects (factor draws do not depend on the background), different pixels around them.
    assert not torch.equal(plain, texture)
    corner = plain[:, :, :2, :2]  # objects never reach the image corner: black plus noise σ = 0.03
    assert float(corner.mean()) < 0.05 and float(texture[:, :, :2, :2].mean()) > 0.1
