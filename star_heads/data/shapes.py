"""``shapes``: a seeded procedural RGB image set, made on the fly (no files, no download), with its factors as labels.

Each image holds one object: one of 8 shape classes (:data:`SHAPE_NAMES`), filled with one of 8 hues (the colour
label; small hue/saturation/value jitter around it), at a random position, scale and rotation, over a textured
background (a smooth random colour field plus a finer luminance texture) with pixel noise. Rendering is vectorised
over images (one pass per shape class, in chunks) and antialiased from each shape's signed distance function.

Factors (``ShapesData.factors``, one value per image):
    shape, color, rotation, scale_bin: int64 labels (``num_classes`` gives their counts).
    angle: rotation in radians, [0, 2π), clockwise on screen (the image y axis points down).
    phase: ``(angle mod period) / period`` in [0, 1), where period is the shape's rotational symmetry
        (:data:`PERIOD`); ``rotation = floor(phase · rotation_bins)``. The label is therefore always visible in the
        image: a square rotated by 90° is the same picture and has the same label.
    scale: object radius as a fraction of the image side; ``scale_bin`` splits its range into 3 equal bins.
    pos_x, pos_y: area centroid of the object as a fraction of the image width/height (pixel column ``j`` spans
        ``[j, j + 1) / size``); objects always lie fully inside the image.
    hue, saturation, value: the object's HSV colour (hue in turns).
Shape and colour labels are exactly balanced (each class count differs by at most 1); the rest are uniform draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from star_heads._checks import check_positive_int
from star_heads.data._geometry import EXTENT, PERIOD, SHAPE_NAMES, sdf

__all__ = ["SHAPE_NAMES", "NUM_COLORS", "ShapesData", "make_shapes", "make_shapes_splits"]

NUM_COLORS = 8
SCALE_RANGE = (0.18, 0.32)
BACKGROUNDS = ("texture", "plain")
_CHUNK = 512


@dataclass(frozen=True)
class ShapesData:
    """A generated ``shapes`` set.

    Attributes:
        images: ``[n, 3, S, S]`` float32 in [0, 1].
        factors: Name → ``[n]`` tensor (see the module docstring).
        num_classes: Number of classes of each categorical factor (shape, color, rotation, scale_bin).
    """

    images: torch.Tensor
    factors: dict[str, torch.Tensor]
    num_classes: dict[str, int]

    def __len__(self) -> int:
        return self.images.shape[0]

    def labels(self, target: str = "shape") -> torch.Tensor:
        """The ``[n]`` values of one factor (KeyError lists the known names)."""
        if target not in self.factors:
            raise KeyError(f"unknown factor {target!r}; known: {sorted(self.factors)}")
        return self.factors[target]

    def as_dataset(self, target: str = "shape") -> TensorDataset:
        """A ``TensorDataset`` of ``(image, factors[target])`` pairs."""
        return TensorDataset(self.images, self.labels(target))


def _balanced(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return (torch.arange(n) % k)[torch.randperm(n, generator=g)]


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[n]`` HSV (hue in turns) → ``[n, 3]`` RGB, closed form ``v - v·s·clamp(min(k, 4 - k), 0, 1)``."""
    out = []
    for m in (5.0, 3.0, 1.0):
        k = torch.remainder(m + 6.0 * h, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def _smooth(z: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of ``z [n, c, k, k]`` to ``size`` as two small matrix products (F.interpolate's weights)."""
    k = z.shape[-1]
    m = F.interpolate(torch.eye(k, device=z.device)[:, None], size=size, mode="linear", align_corners=False)[:, 0]
    return torch.einsum("ks,nckl,lt->ncst", m, z, m)


def _coverage(
    shape: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, px: torch.Tensor, py: torch.Tensor,
    size: int, device: torch.device,
) -> torch.Tensor:
    """``[n, S, S]`` fraction of each pixel covered by the object: ``clamp(1/2 - sdf · scale · S, 0, 1)``.

    The signed distance at the pixel centre, in pixels, gives a one-pixel linear ramp across each edge (exact
    coverage for a straight edge through the pixel, to first order).
    """
    n = shape.shape[0]
    cover = torch.zeros(n, size, size, device=device)
    t = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    for c, name in enumerate(SHAPE_NAMES):
        for idx in (shape == c).nonzero().flatten().split(_CHUNK):
            if idx.numel() == 0:
                continue
            a, s = angle[idx][:, None, None].to(device), scale[idx][:, None, None].to(device)
            dx = t[None, None, :] - px[idx][:, None, None].to(device)
            dy = t[None, :, None] - py[idx][:, None, None].to(device)
            ca, sa = torch.cos(a), torch.sin(a)
            d = sdf(name, (ca * dx + sa * dy) / s, (ca * dy - sa * dx) / s)
            cover[idx.to(device)] = torch.clamp(0.5 - d * (s * size), 0.0, 1.0)
    return cover


def make_shapes(
    num_samples: int,
    *,
    image_size: int = 32,
    seed: int = 0,
    device: torch.device | str | None = None,
    background: str = "texture",
    noise: float = 0.03,
    rotation_bins: int = 4,
) -> ShapesData:
    """Generates ``num_samples`` seeded ``shapes`` images with their factors.

    Args:
        num_samples: Number of images (>= 1).
        image_size: Side ``S`` in pixels (>= 16; objects are 6-10 px in radius at 32).
        seed: Seed of the CPU generator every draw comes from (same seed → same images and factors).
        device: Where the images are rendered and returned (factors stay on the CPU); default CPU.
        background: ``"texture"`` (default) or ``"plain"`` (black; with ``noise=0`` the image is exactly
            ``coverage · colour``, handy for checks).
        noise: Standard deviation of the Gaussian pixel noise added to the whole image.
        rotation_bins: Number of ``rotation`` label bins over one symmetry period.

    Returns:
        A :class:`ShapesData`. The factor draws do not depend on ``background``/``noise``, so two calls that differ
        only in those show the same objects.
    """
    n = check_positive_int(num_samples, "num_samples")
    size = check_positive_int(image_size, "image_size", minimum=16)
    bins = check_positive_int(rotation_bins, "rotation_bins")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)

    shape = _balanced(n, len(SHAPE_NAMES), g)
    color = _balanced(n, NUM_COLORS, g)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * (2 * math.pi)
    period = torch.tensor([PERIOD[s] for s in SHAPE_NAMES], dtype=torch.float64)[shape]
    phase = torch.remainder(angle, period) / period
    rotation = torch.clamp((phase * bins).floor().long(), max=bins - 1)
    lo, hi = SCALE_RANGE
    u01 = torch.rand(n, generator=g, dtype=torch.float64)
    scale = lo + (hi - lo) * u01
    scale_bin = torch.clamp((u01 * 3).floor().long(), max=2)
    margin = EXTENT * scale + 1.0 / size  # keep the object (and its antialiased edge) inside the image
    pos = margin[:, None] + (1 - 2 * margin[:, None]) * torch.rand(n, 2, generator=g, dtype=torch.float64)
    jitter = 0.8 * (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
    hue = torch.remainder((color.double() + jitter) / NUM_COLORS, 1.0)
    sat = 0.65 + 0.35 * torch.rand(n, generator=g, dtype=torch.float64)
    val = 0.7 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    rgb = _hsv_to_rgb(hue, sat, val).float().to(device)

    cover = _coverage(shape, angle.float(), scale.float(), pos[:, 0].float(), pos[:, 1].float(), size, device)
    if background == "texture":
        base = 0.1 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
        tint = torch.rand(n, 3, 4, 4, generator=g) - 0.5
        grain = torch.rand(n, 1, 8, 8, generator=g) - 0.5
        lum = _smooth(grain.to(device), size).mul_(0.15).add_(base.to(device))  # [n, 1, S, S]
        bg = _smooth(tint.to(device), size).mul_(0.25).add_(lum)
    else:
        bg = torch.zeros(n, 3, size, size, device=device)
    images = torch.lerp(bg, rgb[:, :, None, None].expand_as(bg), cover[:, None])
    if noise > 0:
        images.add_(torch.randn(n, 3, size, size, generator=g).mul_(noise).to(device))
    images = images.clamp_(0.0, 1.0).contiguous()

    factors = {
        "shape": shape, "color": color, "rotation": rotation, "scale_bin": scale_bin,
        "angle": angle.float(), "phase": phase.float(), "scale": scale.float(),
        "pos_x": pos[:, 0].float(), "pos_y": pos[:, 1].float(),
        "hue": hue.float(), "saturation": sat.float(), "value": val.float(),
    }
    num_classes = {"shape": len(SHAPE_NAMES), "color": NUM_COLORS, "rotation": bins, "scale_bin": 3}
    return ShapesData(images, factors, num_classes)


def make_shapes_splits(
    train: int, val: int, test: int, *, seed: int = 0, **kwargs: object
) -> dict[str, ShapesData]:
    """Three ``shapes`` splits drawn with different seeds derived from ``seed``.

    Args:
        train, val, test: Sizes of the splits (>= 1 each).
        seed: Master seed; each split uses its own seed drawn from a generator seeded with it.
        **kwargs: Passed to :func:`make_shapes` (``image_size``, ``device``, ...).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    sizes = {"train": train, "val": val, "test": test}
    for name, k in sizes.items():
        check_positive_int(k, name)
    seeds = torch.randint(0, 2**62, (3,), generator=torch.Generator().manual_seed(seed)).tolist()
    if len(set(seeds)) != 3:  # pragma: no cover - probability ~ 2**-61
        raise RuntimeError("derived split seeds collided")
    return {name: make_shapes(k, seed=s, **kwargs) for (name, k), s in zip(sizes.items(), seeds)}
