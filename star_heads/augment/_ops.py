"""Making the views of a sampled augmentation: crop + resize + flip as two interpolation matrices, then masked ops.

Crop-and-resize of a batch with a different box per image is written as ``view = R_y · crop(x) · R_xᵀ`` with
per-image interpolation matrices ``R_y [h, H]`` and ``R_x [w, W]`` whose rows hold the bilinear weights of
``F.interpolate(crop, size, mode="bilinear", align_corners=False, antialias=...)`` (triangle filter stretched by the
shrink factor when antialiasing, renormalised at the crop border). A flip reverses the rows of ``R_x``.

Colour jitter (torchvision semantics, per-image op order; brightness, contrast and saturation as one affine step,
hue as a closed-form HSV rotation), grayscale, Gaussian blur (one sigma per image, reflect padding, separable
convolution) and solarization run on the whole batch and are kept per image by a mask (``torch.where``): no index
subset, no host read, no copy, the same kernels on every batch. An op whose strength or probability is 0 in the
config is skipped (a Python decision).

Axis legend: B batch, C channels, H/W source height/width, h/w view height/width, k blur kernel size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from star_heads.augment._params import SOLARIZE_THRESHOLD
from star_heads.augment._sample import AugmentSample

__all__ = ["apply_augment", "colour_jitter", "crop_resize", "gaussian_blur", "hue_shift", "resize_matrix"]


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


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``[B, 1, h, w]`` of RGB ``[B, 3, h, w]`` (kornia's / torchvision's float grayscale)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _linear_jitter(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor, active: torch.Tensor,
                   enabled: tuple[int, ...]) -> torch.Tensor:
    """One step of brightness / contrast / saturation, a different op per image, in one affine pass.

    torchvision's three ops are ``clamp(f x + (1 - f) r)`` (``torch.lerp(r, x, f)``) with ``r`` = 0 (brightness),
    the mean gray value
    (contrast; the mean of all channels for non-RGB images) or the gray image (saturation). Images where ``active``
    is False, or whose op is not a linear one, are returned unchanged.

    Args:
        x: ``[B, C, h, w]``.
        op: ``[B]`` op id (0 brightness, 1 contrast, 2 saturation, 3 hue) at this step.
        factor: ``[B]`` that op's factor.
        active: ``[B]`` bool.
        enabled: The linear ops that can fire (strength > 0).
    """
    ref = x.new_zeros(())  # brightness blends with black
    if 1 in enabled or 2 in enabled:
        gray = _luma(x) if x.shape[1] == 3 else None
        if 1 in enabled:  # contrast: the mean gray value
            mean = gray.mean((-2, -1), keepdim=True) if gray is not None else x.mean((-3, -2, -1), keepdim=True)
            ref = torch.where((op == 1)[:, None, None, None], mean, ref)
        if 2 in enabled and gray is not None:  # saturation: the gray image
            ref = torch.where((op == 2)[:, None, None, None], gray, ref)
    out = torch.lerp(ref.expand_as(x), x, factor[:, None, None, None].expand_as(x))  # f x + (1 - f) ref
    fires = active & sum((op == o for o in enabled if o < 3), torch.zeros_like(active))
    return _where(fires, out.clamp(0.0, 1.0), x)


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the HSV hue of RGB images ``[B, 3, h, w]`` by ``shift [B]`` turns (torchvision's ``adjust_hue``).

    With ``M``/``m`` the largest / smallest channel and chroma ``C = M - m``, the hue in sextants is
    ``h = (g - b) / C`` (``M = r``), ``(b - r) / C + 2`` (``M = g``) or ``(r - g) / C + 4``; value and saturation
    are kept, so the shifted pixel is ``M - C clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h + 6 shift) mod 6``
    and ``n = 5, 3, 1`` for red, green, blue (the closed form of HSV → RGB). Gray pixels (``C = 0``) are unchanged.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    top = torch.maximum(torch.maximum(r, g), b)
    chroma = top - torch.minimum(torch.minimum(r, g), b)
    c = torch.where(chroma > 0, chroma, 1.0)
    h = torch.where(top == r, (g - b) / c, torch.where(top == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    h = h + (6.0 * shift)[:, None, None, None]
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h + n, 6.0)
        out.append(top - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.cat(out, dim=1)


def colour_jitter(x: torch.Tensor, sample: AugmentSample) -> torch.Tensor:
    """torchvision's ColorJitter with each image's own op order, on the whole batch, hue computed once.

    Hue sits at position ``p`` of an image's order: the linear ops before it (positions ``k < p``), the hue shift,
    then the linear ops after it (``k > p``). So the batch takes at most three masked linear steps, one hue step
    (the expensive one) and three more linear steps; without hue, four linear steps.
    """
    enabled = sample.config.jitter_ops
    factors = sample.factors.to(x.dtype)
    order, jitter = sample.order, sample.jitter
    linear = tuple(o for o in enabled if o < 3)

    def step(v: torch.Tensor, k: int, active: torch.Tensor) -> torch.Tensor:
        if not linear:
            return v
        op = order[:, k]
        return _linear_jitter(v, op, factors.gather(1, op[:, None])[:, 0], active, linear)

    if 3 not in enabled:
        for k in range(4):
            x = step(x, k, jitter)
        return x
    p = (order == 3).long().argmax(dim=1)  # [B] position of the hue op
    for k in range(3):
        x = step(x, k, jitter & (p > k))
    x = _where(jitter, hue_shift(x, factors[:, 3]), x)
    for k in range(1, 4):
        x = step(x, k, jitter & (p < k))
    return x


def apply_augment(images: torch.Tensor, sample: AugmentSample) -> torch.Tensor:
    """Applies a sampled augmentation (with ``sample.config``) to ``images [B, C, H, W]``; returns ``[B, C, h, w]``.

    Pipeline order (SimCLR / BYOL): crop+resize, flip, colour jitter (ops in ``sample.order``), grayscale, blur,
    solarize. ``sample`` must be on the images' device.
    """
    config = sample.config
    x = crop_resize(images, sample.crop, sample.flip, config.size, config.antialias)
    if config.jitter_ops:
        x = colour_jitter(x, sample)
    if config.grayscale_p > 0:
        x = _where(sample.grayscale, _luma(x).expand_as(x), x)
    if config.blur_p > 0:
        x = _where(sample.sigma > 0, gaussian_blur(x, sample.sigma, config.kernel_size), x)
    if config.solarize_p > 0:
        x = _where(sample.solarize, torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x), x)
    return x
