"""Per-dimension standardisation of augmentation parameters with fitted or tracked statistics.

Replaces the hard-coded dataset constants of the reference code (STAR, arXiv 2510.27222, "Augmentation
parameters"): the mean / std live in buffers (saved in the state_dict), and are either tracked
while training, fitted once, or set from published constants.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from star_heads import distributed as _dist
from star_heads._checks import (
    check_bool,
    check_choice,
    check_float,
    check_float_tensor,
    check_positive_int,
)
from star_heads._value_checks import value_checks_enabled
from star_heads.augment._params import CropUnits

#: Side of the STL10 images the published crop constants are measured in (pixels).
STL10_IMAGE_SIZE = 96

__all__ = ["STL10_PARAM_MEAN", "STL10_PARAM_STD", "AugParamNormalizer"]

#: Published STL10 mean of the 11-D STAR parameter vector (STAR, arXiv 2510.27222, released code). Order: crop top, crop
#: left, crop height, crop width (PIXELS of the 96x96 STL10 source image), horizontal flip {0,1},
#: brightness, contrast, saturation, hue factors, grayscale {0,1}, blur sigma.
STL10_PARAM_MEAN: tuple[float, ...] = (
    13.0968, 13.1474, 69.8042, 69.7284, 0.4986, 1.00169, 0.99847, 0.99962, -9.05e-5, 0.2066, 0.53593,
)
#: Published STL10 std of the 11-D STAR parameter vector (same order and units as the mean).
STL10_PARAM_STD: tuple[float, ...] = (
    11.5036, 11.3602, 14.5891, 14.5419, 0.5000, 0.20763, 0.20505, 0.20647, 0.051809, 0.40487, 0.65824,
)


class AugParamNormalizer(nn.Module):
    """Standardises parameter vectors per dimension: ``(a - mean) / std``.

    Statistics (population mean / variance, float64 buffers ``running_mean``, ``running_var``
    and an int64 ``num_samples``) are updated in training mode when ``track_running_stats``:

    * ``momentum=None``: the exact cumulative mean / variance of every row seen so far (Chan's
      parallel merge, float64);
    * ``momentum=m``: an exponential moving average ``s <- (1 - m) s + m s_batch``; the first
      batch initialises the statistics.

    The batch is standardised with the statistics *after* the update. In eval mode (or with
    ``track_running_stats=False``) the stored statistics are used unchanged. Before any data
    the normaliser is the identity (mean 0, std 1).

    A batch holding a NaN or Inf leaves the statistics exactly as they were (decided on the device with
    ``torch.where``, no host read; distributed, when any rank's batch does); its output still carries the
    non-finite values, so the loss shows them.

    Dimensions whose std is ``<= eps`` (e.g. a flag that was never set) are only centred (scale
    1, as sklearn's StandardScaler), so they never produce NaN/Inf.

    Distributed: when torch.distributed is initialised and ``sync_distributed`` is True, the
    batch statistics are all-reduced (float64 sums) before the update, so every rank holds the
    statistics of the concatenated global batch, equal to a single process seeing it all.

    Note: ``module.float()`` / ``.half()`` cast the float64 buffers like any buffer; updates are
    still computed in float64.

    Args:
        dim: Width of the parameter vector (``aug.param_dim`` of a :class:`~star_heads.augment.STARAugment`: 11
            for the STAR encoding, 12 with solarization; 4 for a quaternion latent). See :meth:`for_augment`.
        momentum: None for exact cumulative statistics, or an EMA factor in (0, 1].
        eps: Std threshold below which a dimension is not scaled.
        track_running_stats: Update statistics in training mode.
        sync_distributed: All-reduce batch statistics across ranks when distributed.
        check_finite: Raise ValueError on NaN/Inf parameters before updating the statistics. A host
            read (one host-device sync per call), so off by default; ``star_heads.set_value_checks(True)``
            turns it on everywhere. Without it a non-finite batch is skipped by the statistics (see above).
        crop_units: The units of the crop box (dimensions 0-3 of the 11-D STAR vector) that the
            statistics are measured in: ``"normalized"`` (fractions of the source image, the default
            of :class:`~star_heads.augment.STARAugment`) or ``"pixels"``; None (default) when the
            statistics are fitted or tracked from the data itself. When set, every call checks that
            the crop sizes (dimensions 2-3) are in those units — all ``<= 1`` for normalised boxes,
            some ``> 1`` for pixel boxes — and raises ValueError otherwise, instead of silently
            standardising pixels with fraction statistics or the reverse. The check reads values: it runs
            on CPU tensors (no device sync) and, on an accelerator, when value checks are on.
    """

    running_mean: Tensor
    running_var: Tensor
    num_samples: Tensor

    def __init__(
        self,
        dim: int,
        *,
        momentum: float | None = None,
        eps: float = 1e-6,
        track_running_stats: bool = True,
        sync_distributed: bool = True,
        check_finite: bool = False,
        crop_units: CropUnits | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        if crop_units is not None:
            check_choice(crop_units, "crop_units", CropUnits)
            if dim < 4:
                raise ValueError(f"crop_units needs a parameter vector with a crop box (dim >= 4), got dim {dim}")
        self.crop_units: CropUnits | None = crop_units
        if momentum is not None:
            momentum = check_float(momentum, "momentum (None or in (0, 1])", minimum=0.0, maximum=1.0,
                                   min_inclusive=False)
        self.momentum = momentum
        self.eps = check_float(eps, "eps", minimum=0.0)
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        self.sync_distributed = check_bool(sync_distributed, "sync_distributed")
        self.check_finite = check_bool(check_finite, "check_finite")
        self.register_buffer("running_mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("running_var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("num_samples", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_constants(
        cls,
        mean: Sequence[float] | Tensor,
        std: Sequence[float] | Tensor,
        *,
        track_running_stats: bool = False,
        **kwargs,
    ) -> AugParamNormalizer:
        """A normaliser with fixed published statistics.

        Frozen by default. With ``track_running_stats=True`` the constants only serve until the
        first training batch, whose statistics replace them (cumulative and EMA modes alike,
        because ``num_samples`` starts at 0). Pass ``crop_units`` to have every call check that the
        crop box comes in the units of the constants.
        """
        mean_t, std_t = _constants(mean, "mean"), _constants(std, "std")
        if mean_t.shape != std_t.shape or mean_t.numel() == 0:
            raise ValueError(
                f"mean and std must be non-empty with equal length, got {mean_t.numel()} and {std_t.numel()}"
            )
        if not bool(torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()) or bool((std_t < 0).any()):
            raise ValueError("mean and std must be finite and std >= 0")
        norm = cls(mean_t.numel(), track_running_stats=track_running_stats, **kwargs)
        norm.running_mean.copy_(mean_t)
        norm.running_var.copy_(std_t.square())
        return norm

    @classmethod
    def for_augment(cls, augment: nn.Module, **kwargs) -> AugParamNormalizer:
        """A normaliser sized for ``augment``'s parameter vectors (``augment.param_dim``: 11, or 12 when a view of
        a :class:`~star_heads.augment.STARAugment` can solarize), with tracked statistics; ``kwargs`` as the
        constructor's. Its crop units are recorded (``crop_units=augment.crop_units``) unless given."""
        dim = getattr(augment, "param_dim", None)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"augment must have an int param_dim (a STARAugment), got {type(augment).__name__}")
        kwargs.setdefault("crop_units", getattr(augment, "crop_units", None))
        return cls(int(dim), **kwargs)

    @classmethod
    def stl10(cls, crop_units: CropUnits = "pixels", **kwargs) -> AugParamNormalizer:
        """The published STL10 constants (11-D), frozen by default.

        The paper's constants measure the crop box in pixels of 96x96 images (``crop_units="pixels"``,
        for ``STARAugment(..., crop_units="pixels")`` on 96-pixel sources). ``crop_units="normalized"``
        converts them (crop mean and std divided by 96) for the normalised boxes that
        :class:`~star_heads.augment.STARAugment` returns by default. Either way the crop units of every
        input are checked (see ``crop_units`` in the class docstring), so a mismatch is an error.
        """
        check_choice(crop_units, "crop_units", CropUnits)
        mean, std = list(STL10_PARAM_MEAN), list(STL10_PARAM_STD)
        if crop_units == "normalized":
            mean[:4] = [v / STL10_IMAGE_SIZE for v in mean[:4]]
            std[:4] = [v / STL10_IMAGE_SIZE for v in std[:4]]
        return cls.from_constants(mean, std, crop_units=crop_units, **kwargs)

    # ------------------------------------------------------------------ statistics
    @property
    def mean(self) -> Tensor:
        """Current per-dimension mean (float64)."""
        return self.running_mean.double()

    @property
    def std(self) -> Tensor:
        """Current per-dimension (population) std (float64)."""
        return self.running_var.double().clamp_min(0).sqrt()

    def _check(self, params: object) -> Tensor:
        params = check_float_tensor(params, "params", sizes=[None, self.dim])
        reads_free = params.device.type == "cpu" or value_checks_enabled()
        if self.crop_units is not None and params.shape[0] > 0 and reads_free:
            size = float(params[:, 2:4].detach().abs().amax())
            if self.crop_units == "normalized" and not size <= 1.0 + 1e-6:
                raise ValueError(
                    f"params crop box looks like pixels (largest crop size {size:.4g} > 1) but this normaliser's "
                    "statistics are for normalised boxes (fractions of the image); pass STARAugment(crop_units="
                    "'normalized') parameters, or build the normaliser with crop_units='pixels'"
                )
            if self.crop_units == "pixels" and not size > 1.0:
                raise ValueError(
                    f"params crop box looks normalised (largest crop size {size:.4g} <= 1) but this normaliser's "
                    "statistics are in pixels (the STL10 constants: pixels of 96x96 images); use "
                    "AugParamNormalizer.stl10(crop_units='normalized') or STARAugment(..., crop_units='pixels')"
                )
        return params

    @torch.no_grad()
    def _batch_stats(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(count, number of non-finite values, mean, population var) of the batch as float64 tensors,
        all-reduced over ranks when distributed. No host-device synchronisation."""
        x = params.detach().double()
        sync = self.sync_distributed and _dist.is_distributed() and _dist.world_size() > 1
        if not sync and x.shape[0] == 0:
            raise ValueError("params must hold at least one row to update the statistics, got 0")
        bad = (~torch.isfinite(x)).sum().double()[None]
        head = torch.cat([x.new_full((1,), float(x.shape[0])), bad, x.sum(0)])
        head = _dist.all_reduce_sum(head) if sync else head
        count, bad = head[0], head[1]
        mean = head[2:] / count.clamp_min(1)
        m2 = (x - mean).square().sum(0)
        m2 = _dist.all_reduce_sum(m2) if sync else m2
        return count, bad, mean, m2 / count.clamp_min(1)

    @torch.no_grad()
    def update(self, params: Tensor) -> None:
        """Merges a batch ``[B, dim]`` into the running statistics (validated first).

        Runs without host-device synchronisation, except the finiteness check of ``check_finite`` (or
        the global value-check switch). A batch with a non-finite value changes nothing.
        """
        finite = value_checks_enabled(self.check_finite)
        params = check_float_tensor(params, "params", sizes=[None, self.dim], finite=finite)
        count, bad, mean_b, var_b = self._batch_stats(params)
        n_a = self.num_samples.double()
        mean_a, var_a = self.running_mean.double(), self.running_var.double()
        if self.momentum is None:  # Chan's merge; with n_a = 0 it gives the batch statistics exactly
            n = (n_a + count).clamp_min(1)
            delta = mean_b - mean_a
            mean = mean_a + delta * (count / n)
            var = (n_a * var_a + count * var_b + delta.square() * (n_a * count / n)) / n
        else:  # EMA; the first batch initialises the statistics
            m = self.momentum
            first = n_a == 0
            mean = torch.where(first, mean_b, (1 - m) * mean_a + m * mean_b)
            var = torch.where(first, var_b, (1 - m) * var_a + m * var_b)
        # an empty global batch (possible only when distributed) or one with a NaN/Inf changes nothing
        take = (count > 0) & (bad == 0)
        self.running_mean.copy_(torch.where(take, mean, mean_a))
        self.running_var.copy_(torch.where(take, var, var_a))
        self.num_samples.add_(torch.where(take, count, 0.0).round().long())

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity (mean 0, var 1, no samples)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_samples.zero_()

    @torch.no_grad()
    def fit(self, params: Tensor) -> AugParamNormalizer:
        """One-shot fit: replaces the statistics by those of ``params`` ``[N, dim]`` (all ranks)."""
        params = check_float_tensor(params, "params", sizes=[None, self.dim], finite=True)
        if params.shape[0] == 0 and not _dist.is_distributed():
            raise ValueError("params must hold at least one row to fit, got 0")
        self.reset()
        self.update(params)
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, params: Tensor) -> Tensor:
        """Standardises ``params`` ``[B, dim]``; returns ``[B, dim]`` in the input dtype."""
        params = self._check(params)
        if self.training and self.track_running_stats:
            self.update(params)
        std = self.std
        scale = torch.where(std > self.eps, std, torch.ones_like(std))
        out = (params.double() - self.mean) / scale
        return out.to(params.dtype)

    def extra_repr(self) -> str:
        units = "" if self.crop_units is None else f", crop_units={self.crop_units!r}"
        seen = f", num_samples={int(self.num_samples)}" if self.num_samples.device.type == "cpu" else ""
        return (
            f"{self.dim}{units}, momentum={self.momentum}, eps={self.eps}, "
            f"track_running_stats={self.track_running_stats}{seen}"
        )


def _constants(values: object, name: str) -> Tensor:
    """``values`` (a tensor or a sequence of real numbers) as a flat float64 CPU tensor; TypeError otherwise."""
    if isinstance(values, Tensor):
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor or a sequence of numbers, got dtype {values.dtype}")
        return values.detach().to("cpu", torch.float64).flatten()
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
        return torch.as_tensor(values, dtype=torch.float64).flatten()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values
    ):
        raise TypeError(f"{name} must be a tensor or a sequence of real numbers, got {type(values).__name__} "
                        f"{values!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)
