"""solo-learn's ``main_pretrain.py`` for the STAR variant of a solo method, from solo's own yaml, solo unchanged::

    python -m star_heads.integrations.solo_learn.pretrain \\
        --config-path <solo>/scripts/pretrain/cifar --config-name simclr.yaml +star.num_experts=8

What differs from solo's entry point: the method is :func:`~star_heads.integrations.solo_learn.star_method` of
``cfg.method`` (``STAREquivariantMixin`` over solo's class, its projector a STAR head); the dataset yields
**un-augmented** images (``ToTensor``; image-folder datasets are first resized to ``star.source_size``) and the mixin
draws solo's recipe on the device with each crop's parameters (see
:mod:`~star_heads.integrations.solo_learn.recipe` for what is mapped and what is refused); a
:class:`~star_heads.integrations.lightning.STARLoggingCallback` logs routing, collapse and CCA readouts. DALI
(``data.format: dali``) is refused: the STAR path augments on the device itself.

``star.*`` keys (all optional): ``num_experts`` (8), ``lam`` (1.0), ``temperature`` (0.2), ``source_size``
(image-folder datasets: side images are resized and centre-cropped to before the crops are drawn; default
``round(crop_size * 8 / 7)``, 256 for 224), ``log_every`` (50; 0 turns the logging callback off), ``cca_every`` (100).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from star_heads.integrations.solo_learn import SOLO_INSTALL_HINT, star_method
from star_heads.integrations.solo_learn.recipe import _get

__all__ = ["main", "run", "source_transform"]

_NATIVE = {"cifar10": 32, "cifar100": 32, "stl10": 96}


def source_transform(cfg: Any) -> Any:
    """The dataset transform: ``ToTensor`` at the native size (CIFAR, STL-10), else resize + centre crop to
    ``star.source_size`` so that a batch stacks."""
    from torchvision import transforms

    dataset = str(_get(cfg, "data.dataset", "custom"))
    crop = int(cfg.augmentations[0].crop_size)
    if dataset in _NATIVE and _get(cfg, "star.source_size", None) is None:
        return transforms.ToTensor()
    side = int(_get(cfg, "star.source_size", round(crop * 8 / 7)))
    if side < crop:
        raise ValueError(f"star.source_size {side} is smaller than the crop size {crop}")
    return transforms.Compose([transforms.Resize(side), transforms.CenterCrop(side), transforms.ToTensor()])


def _callbacks(cfg: Any) -> list:
    from star_heads.integrations.lightning import STARLoggingCallback

    callbacks: list = []
    if _get(cfg, "checkpoint.enabled", False):
        from solo.utils.checkpointer import Checkpointer

        callbacks.append(Checkpointer(cfg, logdir=os.path.join(cfg.checkpoint.dir, cfg.method),
                                      frequency=cfg.checkpoint.frequency, keep_prev=cfg.checkpoint.keep_prev))
    every = int(_get(cfg, "star.log_every", 50))
    if every > 0:
        callbacks.append(STARLoggingCallback(every=every, cca_every=int(_get(cfg, "star.cca_every", 100))))
    return callbacks


def run(cfg: Any, *, train_dataset: Any = None, val_loader: Any = "solo", callbacks: list | None = None) -> Any:
    """Parses ``cfg`` as solo does, builds the STAR method, the data and the Trainer, and fits; returns the Trainer.

    Args:
        cfg: A solo pretrain config (an omegaconf ``DictConfig`` from solo's yaml).
        train_dataset: Replaces solo's dataset (it must yield ``(index, image [3, H, W] in [0, 1], target)``).
        val_loader: ``"solo"`` builds solo's validation loader where solo would; None skips validation.
        callbacks: Extra Lightning callbacks.
    """
    try:
        from lightning.pytorch import Trainer, seed_everything
        from omegaconf import OmegaConf
        from solo.args.pretrain import parse_cfg
        from solo.data.pretrain_dataloader import prepare_dataloader, prepare_datasets
    except ImportError as err:
        raise ImportError(f"{SOLO_INSTALL_HINT}; it also needs lightning, omegaconf and torchvision") from err

    OmegaConf.set_struct(cfg, False)
    if isinstance(cfg.get("devices"), int):  # solo's parse_cfg counts a list; `devices=1` is what a CPU run passes
        cfg.devices = list(range(cfg.devices))
    cfg = parse_cfg(cfg)
    if cfg.data.format == "dali":
        raise ValueError(
            "data.format=dali is not supported on the STAR path (STAR draws the crops and their parameters on the "
            "device itself); pass data.format=image_folder"
        )
    seed_everything(cfg.seed)
    model = star_method(cfg.method)(cfg)
    from solo.utils.misc import make_contiguous

    make_contiguous(model)
    if not cfg.performance.disable_channel_last:
        import torch

        model = model.to(memory_format=torch.channels_last)

    if val_loader == "solo":
        val_loader = _solo_val_loader(cfg)
    if train_dataset is None:
        train_dataset = prepare_datasets(cfg.data.dataset, source_transform(cfg), train_data_path=cfg.data.train_path,
                                         data_format=cfg.data.format, no_labels=cfg.data.no_labels,
                                         data_fraction=cfg.data.fraction)
    train_loader = prepare_dataloader(train_dataset, batch_size=cfg.optimizer.batch_size,
                                      num_workers=cfg.data.num_workers)

    kwargs = OmegaConf.to_container(cfg)
    valid = inspect.signature(Trainer.__init__).parameters
    kwargs = {k: kwargs[k] for k in valid if k in kwargs}
    if cfg.accelerator == "cpu":  # Lightning's CPU accelerator takes a process count, not device ids
        kwargs["devices"] = len(cfg.devices)
    ckpt_path, wandb_run_id = _resume(cfg)
    kwargs.update({"logger": _logger(cfg, wandb_run_id), "callbacks": _callbacks(cfg) + list(callbacks or []),
                   "enable_checkpointing": False, "strategy": _strategy(cfg)})
    trainer = Trainer(**kwargs)
    trainer.fit(model, train_loader, val_loader, ckpt_path=ckpt_path)
    return trainer


def _solo_val_loader(cfg: Any) -> Any:
    if cfg.data.dataset == "custom" and (cfg.data.no_labels or cfg.data.val_path is None):
        return None
    if cfg.data.dataset in ("imagenet100", "imagenet") and cfg.data.val_path is None:
        return None
    from solo.data.classification_dataloader import prepare_data

    _, loader = prepare_data(cfg.data.dataset, train_data_path=cfg.data.train_path, val_data_path=cfg.data.val_path,
                             data_format=cfg.data.format, batch_size=cfg.optimizer.batch_size,
                             num_workers=cfg.data.num_workers)
    return loader


def _resume(cfg: Any) -> tuple[Any, Any]:
    """solo's resume rules: an explicit ``resume_from_checkpoint``, else its ``AutoResumer`` when enabled."""
    explicit = _get(cfg, "resume_from_checkpoint", None)
    if explicit is not None or not _get(cfg, "auto_resume.enabled", False):
        return explicit, None
    from solo.utils.auto_resumer import AutoResumer

    resumer = AutoResumer(
        checkpoint_dir=os.path.join(cfg.checkpoint.dir, cfg.method), max_hours=cfg.auto_resume.max_hours
    )
    path, run_id = resumer.find_checkpoint(cfg)
    if path is not None:
        print(f"Resuming from previous checkpoint that matches specifications: {path!r}")
    return path, run_id


def _logger(cfg: Any, run_id: Any = None) -> Any:
    if not _get(cfg, "wandb.enabled", False):
        return None
    from lightning.pytorch.loggers.wandb import WandbLogger
    from omegaconf import OmegaConf

    logger = WandbLogger(name=cfg.name, project=cfg.wandb.project, entity=cfg.wandb.entity, offline=cfg.wandb.offline,
                         resume="allow" if run_id else None, id=run_id)
    logger.log_hyperparams(OmegaConf.to_container(cfg))
    return logger


def _strategy(cfg: Any) -> Any:
    if cfg.strategy == "ddp":
        from lightning.pytorch.strategies.ddp import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return cfg.strategy


def main() -> None:
    """The hydra entry point (``--config-path`` / ``--config-name`` / overrides, as solo's ``main_pretrain.py``)."""
    try:
        import hydra
    except ImportError as err:
        raise ImportError(
            f"the solo-learn entry point needs hydra-core (solo's own dependency); {SOLO_INSTALL_HINT}"
        ) from err

    hydra.main(version_base="1.2", config_path=None)(run)()


if __name__ == "__main__":
    main()
