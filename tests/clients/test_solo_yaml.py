"""solo-learn's own yaml through the STAR entry point (client tier): solo's configs composed with hydra, fake data
(torchvision's FakeData, as solo's tests/ use, or a small image folder through solo's own dataset code), a
Lightning fast_dev_run; both tasks get gradients."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("lightning")
pytest.importorskip("hydra")
pytest.importorskip("solo.methods")

from hydra import compose, initialize_config_dir  # noqa: E402
from solo.data.pretrain_dataloader import dataset_with_index  # noqa: E402
from torchvision.datasets import FakeData  # noqa: E402

from star_heads.integrations.solo_learn import SoloRecipe, recipe_from_cfg  # noqa: E402
from star_heads.integrations.solo_learn.pretrain import run, source_transform  # noqa: E402

SOLO = Path(sys.modules["solo"].__file__).resolve().parents[1]
CONFIGS = SOLO / "scripts" / "pretrain"
pytestmark = pytest.mark.skipif(not CONFIGS.is_dir(), reason="solo-learn's scripts/pretrain configs not in the checkout")

CPU = ["devices=1", "accelerator=cpu", "strategy=auto", "precision=32", "sync_batchnorm=False", "data.num_workers=0",
       "wandb.enabled=False", "checkpoint.enabled=False", "auto_resume.enabled=False", "+fast_dev_run=True",
       "+star.num_experts=2", "+star.log_every=1"]


def _cfg(folder, name, *overrides, batch=4):
    with initialize_config_dir(config_dir=str(CONFIGS / folder), version_base="1.2"):
        return compose(config_name=name, overrides=[*CPU, f"optimizer.batch_size={batch}", *overrides])


def _grads(out):
    """A callback recording, at each optimiser step, the gradient sums of both routers' rows and the predictor."""
    import lightning.pytorch as L

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            head, n = module.projector, module.projector.num_experts
            w = head.router.linear.weight.grad
            out.append({
                "inv_router": w[:n].abs().sum().item(), "eq_router": w[n:].abs().sum().item(),
                "experts": sum(p.grad.abs().sum().item() for p in head.experts.parameters() if p.grad is not None),
                "predictor": min(p.grad.abs().sum().item() for p in module.star_predictor.parameters()),
                "crops": [tuple(c.shape) for c in module._seen_crops],
            })

    return Grads()


def _fake(cfg, n=8, side=None):
    side = side or int(cfg.augmentations[0].crop_size)
    return dataset_with_index(FakeData)(size=n, image_size=(3, side, side), num_classes=4,
                                        transform=source_transform(cfg))


def _fit(cfg, dataset):
    """Runs the entry point; records every crop shape handed to the method and the gradients."""
    from star_heads.integrations.solo_learn import mixin

    grads, seen = [], []
    original = mixin.STAREquivariantMixin._draw

    def draw(self, images):
        views, params, local = original(self, images)
        self._seen_crops = views + local
        seen.append(([tuple(p.shape) for p in params], len(local)))
        return views, params, local

    mixin.STAREquivariantMixin._draw = draw
    try:
        trainer = run(cfg, train_dataset=dataset, val_loader=None, callbacks=[_grads(grads)])
    finally:
        mixin.STAREquivariantMixin._draw = original
    assert trainer.global_step == 1 and len(grads) == 1
    g = grads[0]
    assert g["inv_router"] > 0 and g["eq_router"] > 0 and g["experts"] > 0 and g["predictor"] > 0  # both tasks
    assert "train_star_eq_loss" in trainer.callback_metrics
    assert {"star/routing/eq/entropy", "star/collapse/inv/rank"} <= set(trainer.callback_metrics)
    return trainer, g, seen


@pytest.mark.parametrize("name", ["simclr", "byol", "vicreg"])
def test_cifar_yaml_trains_both_tasks(name):
    cfg = _cfg("cifar", f"{name}.yaml", "backbone.name=wide_resnet28w2")  # solo's smallest backbone: 3 methods stay fast
    trainer, g, seen = _fit(cfg, _fake(cfg))
    model = trainer.lightning_module
    assert type(model).__name__ == f"STAR{type(model).__mro__[2].__name__}"
    assert g["crops"] == [(4, 3, 32, 32)] * 2
    # normalisation: solo's CIFAR-10 statistics, not ImageNet's
    torch.testing.assert_close(model.star_mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    aug = model.star_augment
    # each yaml's own recipe: solo's asymmetric.yaml (BYOL), symmetric.yaml (SimCLR), VICReg's inline recipe
    solarize, scale = {"byol": ([0.0, 0.2], 0.08), "simclr": ([0.0, 0.0], 0.08), "vicreg": ([0.1, 0.1], 0.2)}[name]
    assert [c.solarize_p for c in aug.view_configs] == solarize
    assert aug.view_configs[0].scale == (scale, 1.0)  # the yaml's crop_min_scale
    width = 12 if any(solarize) else 11  # the solarize entry is appended only where a view can solarize
    assert aug.param_dim == width and seen[0][0] == [(4, width)] * 2
    assert (aug.view_configs[0] == aug.view_configs[1]) == (name != "byol")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "byol", "vicreg"])
def test_imagenet100_yaml_trains_both_tasks_at_224(name):
    cfg = _cfg("imagenet-100", f"{name}.yaml", "data.format=image_folder", "data.val_path=null", batch=2)
    trainer, g, _ = _fit(cfg, _fake(cfg, n=4, side=256))
    aug = trainer.lightning_module.star_augment
    assert g["crops"] == [(2, 3, 224, 224)] * 2  # the config's crop size, not 32
    torch.testing.assert_close(trainer.lightning_module.star_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    if name == "byol":  # solo's asymmetric recipe kept: blur 1.0 / 0.1, solarization 0 / 0.2
        assert [c.blur_p for c in aug.view_configs] == [1.0, 0.1]
        assert [c.solarize_p for c in aug.view_configs] == [0.0, 0.2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_imagenet100_multicrop_yaml_trains_on_every_crop(name):
    small = 1 if name == "simclr" else 2  # the small-crop pipeline's index: after one (symmetric) or two pipelines
    cfg = _cfg("imagenet-100-multicrop", f"{name}.yaml", "data.format=image_folder", "data.val_path=null",
               f"augmentations.{small}.num_crops=2", batch=2)  # 2 small crops instead of 6 keeps the test short
    trainer, g, seen = _fit(cfg, _fake(cfg, n=4, side=256))
    model = trainer.lightning_module
    assert (model.num_large_crops, model.num_small_crops) == (2, 2)
    assert g["crops"] == [(2, 3, 224, 224)] * 2 + [(2, 3, 96, 96)] * 2  # invariant objective: every crop
    width = 12 if name == "byol" else 11
    assert seen[0] == ([(2, width)] * 2, 2)  # equivariant objective: the global views' parameters


@pytest.mark.slow
def test_imagenet100_yaml_through_solos_own_image_folder_and_the_command_line(tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / "train" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (300, 260, 3), generator=torch.Generator().manual_seed(10 * c + i))
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / "train" / f"class{c}" / f"{i}.png")
    args = [f"--config-path={CONFIGS / 'cifar'}", "--config-name=simclr.yaml", *CPU, "optimizer.batch_size=4",
            "backbone.name=wide_resnet28w2", "data.dataset=custom", f"data.train_path={tmp_path / 'train'}",
            "data.val_path=null", "data.format=image_folder", "+star.lam=0.5"]
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "star_heads.integrations.solo_learn.pretrain", *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False,
                         env={**__import__("os").environ, "PYTHONPATH": f"{root}:{SOLO}"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr  # Lightning's model summary: the STAR head and the predictor were trained
    assert "fast_dev_run" in text and "STARSimCLRProjectionHead" in text and "star_predictor" in text, text[-3000:]


def test_recipes_star_cannot_draw_are_refused_by_name():
    cfg = _cfg("cifar", "simclr.yaml", "augmentations.0.equalization.prob=0.2")
    with pytest.raises(ValueError, match=r"augmentations\[0\]\.equalization\.prob = 0.2"):
        recipe_from_cfg(cfg)
    cfg = _cfg("cifar", "simclr.yaml", "augmentations.0.rrc.enabled=False")
    with pytest.raises(ValueError, match=r"rrc.enabled = False"):
        recipe_from_cfg(cfg)
    cfg = _cfg("cifar", "simclr.yaml", "augmentations.0.num_crops=1")
    with pytest.raises(ValueError, match="at least 2 large crops"):
        recipe_from_cfg(cfg)
    cfg = _cfg("imagenet-100", "vicreg.yaml", "data.format=dali", "data.val_path=null")
    with pytest.raises(ValueError, match="dali"):
        run(cfg, train_dataset=[], val_loader=None)


def test_the_recipe_reads_every_mapped_key():
    recipe = recipe_from_cfg(_cfg("imagenet-100", "vicreg.yaml"))
    assert isinstance(recipe, SoloRecipe) and recipe.size == 224 and len(recipe.view_configs) == 2
    v = recipe.view_configs[0]
    assert v["scale"] == (0.2, 1.0) and v["solarize_p"] == 0.1 and v["blur_p"] == 0.5 and v["flip_p"] == 0.5
    assert (v["jitter_p"], v["brightness"], v["contrast"], v["saturation"], v["hue"]) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert v["grayscale_p"] == 0.2 and recipe.num_local_crops == 0
    mc = recipe_from_cfg(_cfg("imagenet-100-multicrop", "byol.yaml"))
    assert (mc.num_local_crops, mc.local_size, mc.local_scale) == (6, 96, (0.08, 1.0))
    assert [c["blur_p"] for c in mc.view_configs] == [1.0, 0.1] and mc.local_config["blur_p"] == 0.0
