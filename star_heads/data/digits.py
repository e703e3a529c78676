"""scikit-learn's bundled 8×8 handwritten digits as small RGB images (out-of-domain real images, no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from star_heads._checks import check_float, check_positive_int

__all__ = ["load_digits", "stratified_split"]


def load_digits(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads the 1797 digits of ``sklearn.datasets.load_digits`` as ``[n, 3, s, s]`` float32 images in [0, 1].

    Pixel values 0..16 are divided by 16, upsampled bilinearly (``align_corners=False``, antialiased when
    shrinking) to ``image_size`` and replicated to 3 channels.

    Args:
        image_size: Output side ``s`` (>= 1).

    Returns:
        ``(images [n, 3, s, s], labels [n] int64 in 0..9)``.

    Raises:
        ImportError: scikit-learn is missing (``pip install "star-heads[data]"``, scikit-learn only).
    """
    size = check_positive_int(image_size, "image_size")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise ImportError('load_digits needs scikit-learn: pip install "star-heads[data]"') from err
    bunch = _sk_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # [n, 1, 8, 8]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


def stratified_split(
    labels: torch.Tensor, fractions: tuple[float, ...] = (0.6, 0.2, 0.2), *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Seeded stratified split of ``range(n)``: each part holds about ``fraction`` of every class.

    Within each class the indices are shuffled and cut at ``round(cumsum(fractions) · count)``, so the parts are
    disjoint and cover every index when the fractions sum to 1.

    Args:
        labels: ``[n]`` integer class labels.
        fractions: Positive part sizes, summing to at most 1.
        seed: Shuffle seed.

    Returns:
        One sorted int64 index tensor per fraction.
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise TypeError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)} "
                        f"with shape {tuple(getattr(labels, 'shape', ()))}")
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, (tuple, list)):
        raise TypeError(f"fractions must be a tuple of floats, got {type(fractions).__name__} {fractions!r}")
    fractions = tuple(check_float(f, "fractions entry") for f in fractions)  # finite real numbers (NaN refused)
    if not fractions or any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {fractions!r}")
    g = torch.Generator().manual_seed(seed)
    bounds = torch.tensor([0.0, *torch.tensor(fractions, dtype=torch.float64).cumsum(0).tolist()])
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    labels = labels.cpu()
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cuts = torch.round(bounds * idx.numel()).long().tolist()
        for k in range(len(fractions)):
            parts[k].append(idx[cuts[k] : cuts[k + 1]])
    return tuple(torch.sort(torch.cat(p)).values for p in parts)
