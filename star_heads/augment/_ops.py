"""Applying a sampled augmentation: crop + resize + flip as two interpolation matrices, then kornia's functional ops.

Crop-and-resize of a batch with a different box per image is written as ``view = R_y · crop(x) · R_xᵀ`` with
per-image interpolation matrices ``R_y [h, H]`` and ``R_x [w, W]`` whose rows hold the bilinear weights of
``F.interpolate(crop, size, mode="bilinear", align_corners=False, antialias=...)`` (triangle filter stretched by the
shrink factor when antialiasing, renormalised at the crop border). A flip reverses the rows of ``R_x``. Colour jitter
(torchvision semantics, per-image op order), grayscale and Gaussian blur (one sigma per image, reflect padding) use
kornia's functional API on the subset of images each op applies to.

Axis legend: B batch, C channels, H/W source height/width, h/w view height/width.
"""

from __future__ import annotations

import torch

from star_heads.augment._params import AugmentConfig, AugmentSample

__all__ = ["require_kornia", "resize_matrix", "crop_resize", "apply_augment"]


def require_kornia():
    """Imports kornia or raises an ImportError that names the extra to install."""
    try:
        import kornia
    except ImportError as err:  # pragma: no cover - exercised by monkeypatching sys.modules
        raise ImportError(
            'star_heads.augment needs kornia: pip install "star-heads[augment]"'
        ) from err
    return kornia


def resize_matrix(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, antialias: bool
) -> torch.Tensor:
    """Per-image 1-D bilinear interpolation matrices for ``[start, start + length)`` → ``out_size`` samples.

    Output sample ``i`` sits at crop coordinate ``c_i = s (i + 0.5)`` with ``s = length / out_size``; input pixel
    ``j`` gets weight ``max(0, 1 - |j + 0.5 - c_i| / a)`` with ``a = max(s, 1)`` when antialiasing (else ``a = 1``),
    restricted to the crop and normalised to sum 1 (PyTorch's ``align_corners=False`` convention).

    Args:
        start: ``[B]`` int crop start.
        length: ``[B]`` int crop length (>= 1).
        in_size: Source size along this axis.
        out_size: Output size along this axis.
        antialias: Stretch the filter when shrinking.

    Returns:
        ``[B, out_size, in_size]`` float64 matrix.
    """
    dev = start.device
    s = (length.double() / out_size)[:, None, None]  # [B, 1, 1]
    centre = s * (torch.arange(out_size, device=dev, dtype=torch.float64)[None, :, None] + 0.5)
    j = torch.arange(in_size, device=dev, dtype=torch.float64)[None, None, :] - start.double()[:, None, None]
    a = torch.clamp(s, min=1.0) if antialias else torch.ones_like(s)
    w = torch.clamp(1.0 - (j + 0.5 - centre).abs() / a, min=0.0)
    w = w * ((j >= 0) & (j < length.double()[:, None, None]))
    return w / w.sum(dim=-1, keepdim=True)


def crop_resize(
    images: torch.Tensor,
    crop: torch.Tensor,
    flip: torch.Tensor,
    size: tuple[int, int],
    antialias: bool,
) -> torch.Tensor:
    """Crops ``(top, left, height, width)`` per image, resizes to ``size`` and mirrors where ``flip``.

    Args:
        images: ``[B, C, H, W]``.
        crop: ``[B, 4]`` int64 boxes in pixels.
        flip: ``[B]`` bool.
        size: ``(h, w)``.
        antialias: See :func:`resize_matrix`.

    Returns:
        ``[B, C, h, w]`` in the dtype of ``images``.
    """
    H, W = images.shape[-2:]
    crop, flip = crop.to(images.device), flip.to(images.device)
    ry = resize_matrix(crop[:, 0], crop[:, 2], H, size[0], antialias)  # [B, h, H]
    rx = resize_matrix(crop[:, 1], crop[:, 3], W, size[1], antialias)  # [B, w, W]
    rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    ry, rx = ry.to(images.dtype), rx.to(images.dtype)
    cols = torch.einsum("bcHW,bwW->bcHw", images, rx)
    return torch.einsum("bhH,bcHw->bchw", ry, cols)


def _subset_apply(x: torch.Tensor, sel: torch.Tensor, fn) -> torch.Tensor:
    idx = sel.nonzero().flatten()
    if idx.numel() == 0:
        return x
    idx = idx.to(x.device)
    return x.index_copy(0, idx, fn(x.index_select(0, idx), idx))


def apply_augment(images: torch.Tensor, sample: AugmentSample, config: AugmentConfig) -> torch.Tensor:
    """Applies a sampled augmentation to ``images [B, C, H, W]`` and returns the views ``[B, C, h, w]``.

    Pipeline order (SimCLR/STAR): crop+resize, flip, colour jitter (ops in ``sample.order``), grayscale, blur.
    """
    kornia = require_kornia()
    enh = kornia.enhance
    x = crop_resize(images, sample.crop, sample.flip, config.size, config.antialias)
    jitter, order = sample.jitter.cpu(), sample.order.cpu()
    factors = sample.factors.to(device=x.device, dtype=x.dtype)
    ops = (
        lambda v, f: enh.adjust_brightness_accumulative(v, f),
        lambda v, f: enh.adjust_contrast_with_mean_subtraction(v, f),
        lambda v, f: enh.adjust_saturation_with_gray_subtraction(v, f),
        lambda v, f: enh.adjust_hue(v, f * (2.0 * torch.pi)),  # torchvision turns -> kornia radians
    )
    strength = (config.brightness, config.contrast, config.saturation, config.hue)
    if bool(jitter.any()):
        for k in range(4):
            for op_id, op in enumerate(ops):
                if strength[op_id] == 0:  # factor is neutral for every image: skip (hue round trip is inexact)
                    continue
                sel = jitter & (order[:, k] == op_id)
                x = _subset_apply(x, sel, lambda v, idx, op=op, op_id=op_id: op(v, factors[idx, op_id]))
    gray = kornia.color.rgb_to_grayscale
    x = _subset_apply(x, sample.grayscale.cpu(), lambda v, idx: gray(v).expand_as(v))
    k = config.kernel_size
    sig = sample.sigma.to(device=x.device, dtype=x.dtype)

    def blur(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return kornia.filters.gaussian_blur2d(v, (k, k), sig[idx][:, None].expand(-1, 2), border_type="reflect")

    return _subset_apply(x, sample.sigma.cpu() > 0, blur)
