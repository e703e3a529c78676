"""Making the views of a sampled augmentation: crop + resize + flip as two interpolation matrices, then masked ops.

Crop-and-resize of a batch with a different box per image is written as ``view = R_y · crop(x) · R_xᵀ`` with
per-image interpolation matrices ``R_y [h, H]`` and ``R_x [w, W]`` whose rows hold the bilinear weights of
``F.interpolate(crop, size, mode="bilinear", align_corners=False, antialias=...)`` (triangle filter stretched by the
shrink factor when antialiasing, renormalised at the crop border). A flip reverses the rows of ``R_x``.

Colour jitter (torchvision semantics, per-image op order, kornia's functional ops), grayscale, Gaussian blur (one
sigma per image, reflect padding, separable convolution written here) and solarization run on the whole batch and
are kept per image by a mask (``torch.where``): no index subset, no host read, no copy, the same kernels on every
batch. An op whose strength or probability is 0 in the config is skipped (a Python decision).

Axis legend: B batch, C channels, H/W source height/width, h/w view height/width, k blur kernel size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from star_heads.augment._params import SOLARIZE_THRESHOLD
from star_heads.augment._sample import AugmentSample

__all__ = ["require_kornia", "resize_matrix", "crop_resize", "gaussian_blur", "apply_augment"]


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
    flip: torch.Tensor | None,
    size: tuple[int, int],
    antialias: bool,
) -> torch.Tensor:
    """Crops ``(top, left, height, width)`` per image, resizes to ``size`` and mirrors where ``flip``.

    Args:
        images: ``[B, C, H, W]``.
        crop: ``[B, 4]`` int64 boxes in pixels, on the images' device.
        flip: ``[B]`` bool on the images' device, or None for no flip.
        size: ``(h, w)``.
        antialias: See :func:`resize_matrix`.

    Returns:
        ``[B, C, h, w]`` in the dtype of ``images``.
    """
    H, W = images.shape[-2:]
    ry = resize_matrix(crop[:, 0], crop[:, 2], H, size[0], antialias)  # [B, h, H]
    rx = resize_matrix(crop[:, 1], crop[:, 3], W, size[1], antialias)  # [B, w, W]
    if flip is not None:
        rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    ry, rx = ry.to(images.dtype), rx.to(images.dtype)
    cols = torch.einsum("bcHW,bwW->bcHw", images, rx)
    return torch.einsum("bhH,bcHw->bchw", ry, cols)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blurs each image with its own sigma: separable ``k x k`` Gaussian, reflect padding (kornia's
    ``gaussian_blur2d(..., border_type="reflect")``, written with plain ops so that no value is checked on the host).

    Args:
        x: ``[B, C, h, w]`` with ``kernel_size // 2 < min(h, w)``.
        sigma: ``[B]`` sigmas (> 0 where the result is used; values <= 1e-3 give the identity kernel).
        kernel_size: Odd ``k``.

    Returns:
        ``[B, C, h, w]``.
    """
    B, C = x.shape[:2]
    t = torch.arange(kernel_size, device=x.device, dtype=torch.float64) - kernel_size // 2  # [k]
    s = sigma.to(torch.float64).clamp_min(1e-3)[:, None]  # [B, 1]
    g = torch.exp(-0.5 * (t[None, :] / s).square())
    g = (g / g.sum(dim=1, keepdim=True)).to(x.dtype)  # [B, k]
    weight = rearrange(g[:, None, :].expand(B, C, kernel_size), "B C k -> (B C) 1 k")
    p = kernel_size // 2
    v = rearrange(F.pad(x, (p, p, p, p), mode="reflect"), "B C h w -> 1 (B C) h w")
    v = F.conv2d(v, weight[:, :, :, None], groups=B * C)  # along h
    v = F.conv2d(v, weight[:, :, None, :], groups=B * C)  # along w
    return rearrange(v, "1 (B C) h w -> B C h w", B=B)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[:, None, None, None], a, b)


def apply_augment(images: torch.Tensor, sample: AugmentSample) -> torch.Tensor:
    """Applies a sampled augmentation (with ``sample.config``) to ``images [B, C, H, W]``; returns ``[B, C, h, w]``.

    Pipeline order (SimCLR / BYOL): crop+resize, flip, colour jitter (ops in ``sample.order``), grayscale, blur,
    solarize. ``sample`` must be on the images' device.
    """
    kornia = require_kornia()
    enh = kornia.enhance
    config = sample.config
    x = crop_resize(images, sample.crop, sample.flip, config.size, config.antialias)
    ops = config.jitter_ops
    if ops:
        factors = sample.factors.to(x.dtype)
        fns = (
            enh.adjust_brightness_accumulative,
            enh.adjust_contrast_with_mean_subtraction,
            enh.adjust_saturation_with_gray_subtraction,
            lambda v, f: enh.adjust_hue(v, f * (2.0 * torch.pi)),  # torchvision turns -> kornia radians
        )
        for k in range(4):  # the k-th op of each image's own order
            y = x
            for op in ops:
                y = _where(sample.jitter & (sample.order[:, k] == op), fns[op](x, factors[:, op]), y)
            x = y
    if config.grayscale_p > 0:
        x = _where(sample.grayscale, kornia.color.rgb_to_grayscale(x).expand_as(x), x)
    if config.blur_p > 0:
        x = _where(sample.sigma > 0, gaussian_blur(x, sample.sigma, config.kernel_size), x)
    if config.solarize_p > 0:
        x = _where(sample.solarize, torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x), x)
    return x
