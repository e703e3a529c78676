"""Data for the examples: the embedded ``shapes`` set, scikit-learn ``digits``, torchvision CIFAR10 / STL10.

Images are kept in memory as one tensor ``[n, 3, H, W]`` — float in [0, 1] (shapes, digits) or
uint8 (CIFAR10, STL10) — and turned into float on the training device by :func:`to_float`, so the
augmentations run batched on the GPU.

Splits (all seeded; different seeds give independent draws):

* ``shapes``: pretraining images from the run's seed ``s``; the held-out set (CCA, kNN queries) and
  the transfer train / test sets from fixed seeds (:data:`HELDOUT_SEED`, :data:`TRANSFER_SEEDS`), so
  runs of different seeds are measured on the same images. ``shapes`` draws its objects on a plain
  (black, noisy) background; ``shapes-texture`` on a textured background that is different for every
  image — a per-image fingerprint that solves instance discrimination without looking at the object,
  kept as the negative control (see docs/data.md, "Which background").
* ``digits``: the 1797 bundled digits, permuted with a fixed seed: a fixed 30% is the test split,
  the rest is train (pretraining uses train only).
* ``cifar10`` / ``stl10``: the official train (STL10: train+unlabeled for pretraining) and test splits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DATASETS",
    "DatasetError",
    "ImageSet",
    "PretrainData",
    "SHAPES_BACKGROUND",
    "TransferTask",
    "pretrain_data",
    "to_float",
    "transfer_tasks",
]

DATASETS = ("shapes", "shapes-texture", "digits", "cifar10", "stl10")
# Background of each shapes variant (star_heads.data.make_shapes(background=...)).
SHAPES_BACKGROUND = {"shapes": "plain", "shapes-texture": "texture"}
SHAPES_TASKS = ("shape", "color", "rotation")
HELDOUT_SEED = 1_000_003
TRANSFER_SEEDS = (2_000_003, 3_000_017)
DIGITS_TEST_FRACTION = 0.3


class DatasetError(Exception):
    """A data set cannot be loaded (missing dependency or files); reported as one line."""


@dataclass(frozen=True)
class ImageSet:
    """Images ``[n, 3, H, W]`` (float in [0, 1] or uint8) with optional integer labels ``[n]``."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    num_classes: int | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class PretrainData:
    """Unlabelled pretraining images, a labelled held-out set (CCA, kNN queries) and a kNN bank."""

    train: ImageSet
    heldout: ImageSet
    knn_bank: ImageSet


@dataclass(frozen=True)
class TransferTask:
    """One linear-probe task: labelled train and test images."""

    train: ImageSet
    test: ImageSet
    num_classes: int
    kind: str  # "in-domain", "augmentation-sensitive", "out-of-domain"


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 → float in [0, 1]; float images are returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _subset(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, k)]


@functools.lru_cache(maxsize=4)
def _shapes_data(n: int, image_size: int, seed: int, background: str) -> Any:
    from star_heads.data.shapes import make_shapes

    return make_shapes(n, image_size=image_size, seed=seed, background=background)


def _shapes(name: str, n: int, image_size: int, seed: int, factor: str = "shape") -> ImageSet:
    d = _shapes_data(n, image_size, seed, SHAPES_BACKGROUND[name])
    return ImageSet(d.images, d.factors[factor].long(), int(d.num_classes[factor]))


def _digits(image_size: int) -> tuple[ImageSet, ImageSet]:
    from star_heads.data import load_digits  # noqa: PLC0415

    try:
        images, labels = load_digits(image_size=image_size)
    except ImportError as exc:
        raise DatasetError(f'--dataset digits needs scikit-learn: pip install "star-heads[examples]" ({exc})') from None
    images, labels = torch.as_tensor(images).float(), torch.as_tensor(labels).long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    n_test = int(round(DIGITS_TEST_FRACTION * len(labels)))
    tr, te = perm[n_test:], perm[:n_test]
    return ImageSet(images[tr], labels[tr], 10), ImageSet(images[te], labels[te], 10)


def _torchvision(name: str, split: str, data_dir: str | None, download: bool) -> ImageSet:
    from common.backbones import torchvision_error

    err = torchvision_error()
    if err is not None:
        raise DatasetError(f"--dataset {name} needs torchvision: {err}")
    if data_dir is None:
        raise DatasetError(f"--dataset {name} needs --data-dir (add --download to fetch it there)")
    import torchvision

    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(data_dir, train=(split == "train"), download=download)
            images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(ds.targets).long()
        else:
            ds = torchvision.datasets.STL10(data_dir, split=split, download=download)
            images = torch.as_tensor(ds.data)
            labels = torch.as_tensor(ds.labels).long()
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DatasetError(f"{name} not found under {data_dir} ({exc}); add --download") from None
    return ImageSet(images, labels, 10)


def pretrain_data(
    name: str,
    *,
    image_size: int = 32,
    num_train: int = 4096,
    num_heldout: int = 1024,
    num_knn_bank: int = 2048,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = False,
) -> PretrainData:
    """Loads the pretraining images, the held-out set and the kNN bank of ``name``.

    ``num_*`` size the generated ``shapes`` sets and cap the others.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name in SHAPES_BACKGROUND:
        train = _shapes(name, num_train, image_size, seed)
        bank = ImageSet(train.images[:num_knn_bank], train.labels[:num_knn_bank], train.num_classes)
        return PretrainData(train, _shapes(name, num_heldout, image_size, HELDOUT_SEED), bank)
    if name == "digits":
        train, test = _digits(image_size)
        return PretrainData(train, test, train)
    train = _torchvision(name, "train+unlabeled" if name == "stl10" else "train", data_dir, download)
    bank = _torchvision(name, "train", data_dir, download) if name == "stl10" else train
    test = _torchvision(name, "test", data_dir, download)
    h, b = _subset(len(test), num_heldout, seed), _subset(len(bank), num_knn_bank, seed)
    return PretrainData(
        train, ImageSet(test.images[h], test.labels[h], 10), ImageSet(bank.images[b], bank.labels[b], 10)
    )


def transfer_tasks(
    name: str,
    *,
    tasks: list[str] | None = None,
    image_size: int = 32,
    num_train: int = 2000,
    num_test: int = 1000,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = False,
) -> dict[str, TransferTask]:
    """The linear-probe tasks for a run pretrained on ``name``.

    ``shapes`` (and ``shapes-texture``, on its own background) → ``shape`` (in-domain, semantic), ``color`` and ``rotation`` (augmentation-
    sensitive: colour jitter and crops change them) and ``digits`` (out-of-domain real images).
    ``digits`` → ``digits``. ``cifar10`` → ``cifar10``; ``stl10`` → ``stl10``. ``tasks`` selects
    (and may add ``digits``, ``cifar10`` or ``stl10`` to any run).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    shapes = name in SHAPES_BACKGROUND
    default = [*SHAPES_TASKS, "digits"] if shapes else [name]
    tasks = list(default if tasks is None else tasks)
    known = ({*SHAPES_TASKS} if shapes else set()) | {"digits", "cifar10", "stl10"}
    bad = [t for t in tasks if t not in known]
    if bad:
        raise DatasetError(f"unknown transfer task(s) {', '.join(bad)} for a {name} run; expected some of {', '.join(sorted(known))}")
    out: dict[str, TransferTask] = {}
    for t in tasks:
        if t in SHAPES_TASKS:
            tr = _shapes(name, num_train, image_size, TRANSFER_SEEDS[0], t)
            te = _shapes(name, num_test, image_size, TRANSFER_SEEDS[1], t)
            kind = "in-domain" if t == "shape" else "augmentation-sensitive"
            out[t] = TransferTask(tr, te, int(tr.num_classes), kind)
        elif t == "digits":
            tr, te = _digits(image_size)
            out[t] = TransferTask(tr, te, 10, "in-domain" if name == "digits" else "out-of-domain")
        else:
            tr = _torchvision(t, "train", data_dir, download)
            te = _torchvision(t, "test", data_dir, download)
            out[t] = TransferTask(tr, te, 10, "in-domain" if t == name else "out-of-domain")
    return out
