"""``MultiCropViews``: the global and local crops of one batch with their parameter vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MultiCropViews"]


@dataclass(frozen=True)
class MultiCropViews:
    """Views of a batch drawn by :meth:`STARAugment.multi_crop` (multi-crop: SwAV, arXiv 2006.09882; DINO).

    The invariant objective uses every crop; the equivariant objective uses the global views and their parameters
    (STAR, arXiv 2510.27222, Sec. 3: the predictor maps the original image's embedding to a view's).

    Attributes:
        global_views: One ``[B, C, h, w]`` tensor per view config of the augment.
        global_params: Their ``[B, P]`` parameter vectors (``P = aug.param_dim``).
        local_views: ``num_local_crops`` tensors ``[B, C, h_l, w_l]`` (the augment's ``local_size``).
        local_params: Their ``[B, P]`` parameter vectors.
    """

    global_views: list[torch.Tensor]
    global_params: list[torch.Tensor]
    local_views: list[torch.Tensor]
    local_params: list[torch.Tensor]

    @property
    def views(self) -> list[torch.Tensor]:
        """Every crop, global views first."""
        return [*self.global_views, *self.local_views]

    @property
    def params(self) -> list[torch.Tensor]:
        """Every crop's parameters, in the order of :attr:`views`."""
        return [*self.global_params, *self.local_params]

    def __len__(self) -> int:
        return len(self.global_views) + len(self.local_views)
