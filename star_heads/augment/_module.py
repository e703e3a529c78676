"""``STARAugment``: the SimCLR/STAR view generator that also returns each view's STAR parameter vector.

Per-view settings (BYOL's asymmetric recipe), multi-crop (global + local crops) and solarization; the views are
drawn and made on the images' device without host reads (STAR, arXiv 2510.27222; BYOL, arXiv 2006.07733).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from star_heads._checks import check_float_tensor, check_int
from star_heads._precision import autocast_off
from star_heads._value_checks import value_checks_enabled
from star_heads.augment._multicrop import MultiCropViews
from star_heads.augment._ops import apply_augment, crop_resize
from star_heads.augment._params import (
    AugmentConfig,
    CropUnits,
    _pair,
    check_units,
    param_names,
)
from star_heads.augment._sample import AugmentSample, check_generator, sample_augment

__all__ = ["STARAugment"]


#: BYOL's recipe (arXiv 2006.07733, Table 6): shared settings and the two views' blur / solarization.
_BYOL_SHARED: dict[str, object] = {"scale": (0.08, 1.0), "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.4,
                                   "saturation": 0.2, "hue": 0.1, "grayscale_p": 0.2, "blur_sigma": (0.1, 2.0)}
_BYOL_VIEWS = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})


def _config_from(base: AugmentConfig, spec: object, name: str) -> AugmentConfig:
    """``spec`` (an AugmentConfig, or a dict of overrides of ``base``) as an AugmentConfig."""
    if isinstance(spec, AugmentConfig):
        return spec
    if isinstance(spec, Mapping):
        return base.replace(**spec)
    raise TypeError(f"{name} must be an AugmentConfig or a dict of AugmentConfig overrides, got "
                    f"{type(spec).__name__} {spec!r}")


class STARAugment(nn.Module):
    """Batched, device-side SimCLR/STAR augmentation returning views and their STAR parameters.

    Example:
        >>> aug = STARAugment(32)
        >>> g = torch.Generator().manual_seed(0)
        >>> views, params = aug(torch.rand(8, 3, 48, 48), generator=g)   # [8, 3, 32, 32], [8, 11]
        >>> byol = STARAugment.byol(32)                                   # asymmetric views, 12-D parameters
        >>> (x1, a1), (x2, a2) = byol(torch.rand(8, 3, 48, 48), view=0), byol(torch.rand(8, 3, 48, 48), view=1)

    Args:
        output_size: Size of the global views (int or ``(h, w)``); it overrides the ``output_size`` of every config.
        config: Shared pipeline settings (default: :class:`AugmentConfig`, the paper's values).
        view_configs: One entry per global view, each an :class:`AugmentConfig` or a dict of overrides of the
            shared config (default: two views with the shared config).
        num_local_crops: Local crops drawn by :meth:`multi_crop` (0: none).
        local_size: Local crop size (int or ``(h, w)``; default ``3/7`` of the global size, 96 for 224).
        local_scale: Local crop area range (SwAV / DINO's ``(0.05, 0.14)``).
        local_config: Settings of the local crops (an AugmentConfig or a dict of overrides of view 0's); default
            view 0's. ``local_size`` and ``local_scale`` always set their size and area range.
        crop_units: ``"normalized"`` (crop box as fractions of the source ``H``/``W``, default) or ``"pixels"``
            (source pixels, STAR's original encoding).
        **overrides: Any :class:`AugmentConfig` field for the shared config, e.g. ``blur_p=0.0``.

    Input: ``[B, C, H, W]`` floating point in [0, 1]. ``C`` must be 3 when saturation, hue or grayscale can fire
    (the defaults); otherwise any ``C``. Values outside [0, 1] raise ValueError when ``check_range`` (off by
    default: a host read) or ``star_heads.set_value_checks(True)``.

    Parameter vector: :attr:`param_dim` (11, :data:`PARAM_NAMES`) entries, 12 (``"solarize"`` appended) when any
    view or local crop can solarize; every view of one augment has the same width.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        config: AugmentConfig | None = None,
        *,
        view_configs: Sequence[AugmentConfig | Mapping[str, object]] | None = None,
        num_local_crops: int = 0,
        local_size: int | tuple[int, int] | None = None,
        local_scale: tuple[float, float] = (0.05, 0.14),
        local_config: AugmentConfig | Mapping[str, object] | None = None,
        crop_units: CropUnits = "normalized",
        **overrides: object,
    ) -> None:
        super().__init__()
        if config is not None and not isinstance(config, AugmentConfig):
            raise TypeError(f"config must be an AugmentConfig or None, got {type(config).__name__}")
        size = _pair(output_size, "output_size")
        self.crop_units: CropUnits = check_units(crop_units)
        shared = (config or AugmentConfig()).replace(output_size=size, **overrides)
        if view_configs is None:
            view_configs = (shared, shared)
        if isinstance(view_configs, (str, bytes, Mapping, AugmentConfig)) or not isinstance(view_configs, Sequence):
            raise TypeError(f"view_configs must be a sequence of AugmentConfig or dicts (one per view), got "
                            f"{type(view_configs).__name__} {view_configs!r}")
        if len(view_configs) == 0:
            raise ValueError("view_configs must hold at least one view config, got an empty sequence")
        views = [_config_from(shared, v, f"view_configs[{i}]").replace(output_size=size)
                 for i, v in enumerate(view_configs)]
        for i, v in enumerate(views):
            v.check_fits(f"view_configs[{i}]")
        self.view_configs: tuple[AugmentConfig, ...] = tuple(views)
        self.num_local_crops = check_int(num_local_crops, "num_local_crops", minimum=0)
        lsize = _pair(local_size, "local_size") if local_size is not None else tuple(
            max(1, round(3 * s / 7)) for s in size)
        base = views[0] if local_config is None else _config_from(views[0], local_config, "local_config")
        local = base.replace(output_size=lsize, scale=local_scale)
        if self.num_local_crops:
            local.check_fits("local crops")
        self.local_config: AugmentConfig | None = local if self.num_local_crops else None
        used = self.view_configs + ((local,) if self.num_local_crops else ())
        self._solarize = any(c.solarize_p > 0 for c in used)

    @classmethod
    def byol(cls, output_size: int | tuple[int, int], **kwargs: object) -> STARAugment:
        """BYOL's asymmetric recipe (arXiv 2006.07733, Table 6): crop scale (0.08, 1), jitter 0.4/0.4/0.2/0.1 with
        p = 0.8, grayscale 0.2; blur p = 1.0 / 0.1 and solarization p = 0 / 0.2 for views 0 / 1. ``kwargs`` go to
        the constructor (AugmentConfig fields override the shared recipe; ``view_configs`` replaces the two views).
        """
        view_configs = kwargs.pop("view_configs", _BYOL_VIEWS)
        return cls(output_size, view_configs=view_configs, **{**_BYOL_SHARED, **kwargs})  # type: ignore[arg-type]

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> AugmentConfig:
        """The settings of view 0."""
        return self.view_configs[0]

    @property
    def num_views(self) -> int:
        """Number of global views (``len(view_configs)``)."""
        return len(self.view_configs)

    @property
    def param_dim(self) -> int:
        """Width of every parameter vector this augment returns: 11, or 12 when any view can solarize."""
        return len(self.param_names)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameter vector's entries (:data:`PARAM_NAMES`, plus ``"solarize"`` when any view can)."""
        return param_names(self._solarize)

    def extra_repr(self) -> str:
        local = f", num_local_crops={self.num_local_crops}" if self.num_local_crops else ""
        return (f"output_size={self.config.size}, num_views={self.num_views}{local}, param_dim={self.param_dim}, "
                f"crop_units={self.crop_units!r}")

    # ------------------------------------------------------------------ checks and drawing
    def _view_config(self, view: object) -> AugmentConfig:
        i = check_int(view, "view", minimum=0)
        if i >= self.num_views:
            raise ValueError(f"view must be in [0, {self.num_views - 1}] (this augment has {self.num_views} view "
                             f"configs), got {i}")
        return self.view_configs[i]

    def _check(self, images: object, configs: Sequence[AugmentConfig]) -> torch.Tensor:
        x = check_float_tensor(images, "images", ndim=4)
        if x.shape[0] == 0:
            raise ValueError("images must hold at least one image, got batch size 0")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"images must be at least 1x1 pixels, got shape {tuple(x.shape)}")
        if any(c.needs_rgb for c in configs) and x.shape[1] != 3:
            raise ValueError(
                f"images must have 3 (RGB) channels for colour jitter/grayscale, got {x.shape[1]} "
                "(replicate channels, or pass saturation=0, hue=0, grayscale_p=0)"
            )
        if value_checks_enabled(any(c.check_range for c in (*configs, self.config))):  # a host read: opt-in
            lo_t, hi_t = torch.aminmax(x.detach())
            lo, hi = float(lo_t), float(hi_t)
            if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both comparisons, so NaN images are refused too
                raise ValueError(f"images must lie in [0, 1] (before normalisation), got range [{lo:.4g}, {hi:.4g}]")
        return x

    def _draw(self, configs: Sequence[AugmentConfig], x: torch.Tensor,
              generator: torch.Generator | None) -> list[AugmentSample]:
        """One sample per config, on the images' device: drawn there (a generator on that device, or None), or
        drawn on the generator's device and moved as ONE packed tensor (non-blocking to an accelerator)."""
        B, size = x.shape[0], (x.shape[-2], x.shape[-1])
        if generator is None or generator.device == x.device:
            return [sample_augment(c, B, size, generator, device=x.device) for c in configs]
        drawn = [sample_augment(c, B, size, generator) for c in configs]
        packed = torch.cat([s.pack() for s in drawn])  # [len(configs) * B, 17]
        if packed.device.type == "cpu" and x.device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(x.device, non_blocking=x.device.type != "cpu")
        return [AugmentSample.unpack(p, size, c) for p, c in zip(packed.split(B), configs)]

    def _make(self, x: torch.Tensor, sample: AugmentSample) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_off(x.device.type):
            views = apply_augment(x, sample)
        return views, sample.vector(self.crop_units, solarize=self._solarize)

    # ------------------------------------------------------------------ public API
    def sample(
        self,
        batch: int,
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
        *,
        view: int = 0,
        device: torch.device | str | None = None,
    ) -> AugmentSample:
        """Draws view ``view``'s augmentation of a batch without applying it (see :func:`sample_augment`)."""
        return sample_augment(self._view_config(view), batch, image_size, check_generator(generator), device=device)

    def apply(self, fn_or_images, sample: AugmentSample | None = None):  # type: ignore[override]
        """``apply(fn)`` is :meth:`torch.nn.Module.apply` (so ``model.apply(init_fn)`` and Lightning still walk a
        model holding this module); ``apply(images, sample)`` is kept as an alias of :meth:`replay`."""
        if sample is None and callable(fn_or_images):
            return super().apply(fn_or_images)
        return self.replay(fn_or_images, sample)  # type: ignore[arg-type]  # replay raises for a non-sample

    def replay(self, images: torch.Tensor, sample: AugmentSample) -> torch.Tensor:
        """Applies a drawn :class:`AugmentSample` to ``images``; returns the views.

        The views are made with the sample's own config (view size, interpolation, blur kernel, jitter ops), so a
        replay through any augment reproduces the drawing augment's views exactly. The sample is validated first:
        types, shapes and devices always; crop boxes (inside the image, positive size), op orders and sigmas when
        the sample is on the CPU or value checks are on (reading a GPU sample's values is a host sync).
        """
        if not isinstance(sample, AugmentSample):
            raise TypeError(f"sample must be an AugmentSample (from .sample()), got {type(sample).__name__}")
        sample.validate()
        x = self._check(images, (sample.config,))
        if sample.batch_size != x.shape[0] or tuple(sample.image_size) != tuple(x.shape[-2:]):
            raise ValueError(
                f"sample was drawn for {sample.batch_size} images of size {tuple(sample.image_size)}, "
                f"got {x.shape[0]} of size {tuple(x.shape[-2:])}"
            )
        if sample.device != x.device:
            sample = sample.to(x.device, non_blocking=x.device.type != "cpu")
        with autocast_off(x.device.type):
            return apply_augment(x, sample)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None, *, view: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments a batch with view ``view``'s settings.

        Args:
            images: ``[B, C, H, W]`` float in [0, 1], any device.
            generator: Random source. None draws on the images' device with torch's default generator there
                (seeded by ``torch.manual_seed``); a generator on the images' device draws there; a generator on
                another device (e.g. a CPU generator for GPU images) draws on its device, and the sample moves to
                the images' device in one non-blocking transfer. The same seed gives identical views and
                parameters.
            view: Index into :attr:`view_configs`.

        Returns:
            ``(views [B, C, h, w], params [B, param_dim])``; params are float32 on the images' device, in the order
            of :attr:`param_names`, the crop box in ``self.crop_units``.
        """
        cfg = self._view_config(view)
        generator = check_generator(generator)
        x = self._check(images, (cfg,))
        (s,) = self._draw((cfg,), x, generator)
        return self._make(x, s)

    def multi_crop(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MultiCropViews:
        """Draws every global view (one per view config) and ``num_local_crops`` local crops of a batch.

        Returns:
            A :class:`MultiCropViews`: ``global_views`` / ``global_params`` in view order, ``local_views`` /
            ``local_params`` of size ``local_size``; every parameter vector is ``[B, param_dim]``. One sample
            transfer per call when the generator is on another device than the images.
        """
        generator = check_generator(generator)
        local = (self.local_config,) * self.num_local_crops if self.local_config is not None else ()
        configs = (*self.view_configs, *local)
        x = self._check(images, configs)
        made = [self._make(x, s) for s in self._draw(configs, x, generator)]
        g, l_ = made[: self.num_views], made[self.num_views :]
        return MultiCropViews([v for v, _ in g], [p for _, p in g], [v for v, _ in l_], [p for _, p in l_])

    def original(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented view x0: the whole image resized to the global view size, ``[B, C, h, w]``.

        Validated like :meth:`forward` (shape, dtype, at least one image, the [0, 1] range when value checks are
        on), except that any channel count is accepted.
        """
        x = self._check(images, ())
        B, _, H, W = x.shape
        zero = torch.zeros(B, dtype=torch.long, device=x.device)
        crop = torch.stack([zero, zero, torch.full_like(zero, H), torch.full_like(zero, W)], dim=1)
        with autocast_off(x.device.type):
            return crop_resize(x, crop, None, self.config.size, self.config.antialias)

    def identity_params(self, batch: int, image_size: tuple[int, int], device=None) -> torch.Tensor:
        """The ``[batch, param_dim]`` parameter vector of :meth:`original` (full crop, no flip, neutral jitter)."""
        check_int(batch, "batch", minimum=0)
        H, W = _pair(tuple(image_size) if isinstance(image_size, (list, torch.Size)) else image_size, "image_size")
        out = torch.zeros(batch, self.param_dim, device=device)
        if self.crop_units == "normalized":
            out[:, 2:4] = 1.0
        else:
            out[:, 2], out[:, 3] = float(H), float(W)
        out[:, 5:8] = 1.0  # brightness, contrast, saturation factors
        return out
