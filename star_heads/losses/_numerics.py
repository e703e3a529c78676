"""Numerics shared by the losses (private): a covariance penalty that cannot overflow.

Axis legend: ``n`` rows (samples), ``d`` embedding width.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["off_diagonal_square_mean"]


def off_diagonal_square_mean(z: Tensor) -> Tensor:
    """``(1/d) Σ_{i≠j} Cov(Z)_ij²`` with the unbiased (n − 1) covariance of ``z`` ``[n, d]`` (VICReg's c(Z)).

    Computed on ``z`` centred and divided by its largest absolute entry ``s`` (a power of two, so the division is
    exact), then scaled back by ``s⁴``: no intermediate (the Gram matrix, the squares, their sum over d² entries)
    overflows before the result itself would, at any scale of ``z``. The diagonal is zeroed with ``masked_fill``
    of an identity mask, a fixed-shape op (``masked_select`` would read the mask on the host). Without a host read
    of ``s``: the scale is a device tensor.
    """
    n, d = z.shape
    centred = z - z.mean(dim=0)
    peak = centred.detach().abs().amax()
    # 2^floor(log2(peak)): exact to divide by; 1 for an all-zero (fully collapsed) batch
    scale = torch.where(peak > 0, torch.exp2(torch.floor(torch.log2(peak))), torch.ones_like(peak))
    scaled = centred / scale  # entries in (-2, 2)
    cov = scaled.T @ scaled / (n - 1)  # [d, d], entries ≤ 4n/(n-1) in magnitude
    diagonal = torch.eye(d, dtype=torch.bool, device=z.device)
    squares = cov.square().masked_fill(diagonal, 0.0)
    square = scale * scale
    return squares.sum() / d * square * square  # one factor at a time: finite whenever the result is
