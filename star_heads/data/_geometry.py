"""Unit shapes of the ``shapes`` data set: signed distance functions in object coordinates, centroid at the origin.

Each shape has "radius" about 1 (every point lies within ``EXTENT`` of its area centroid), so that ``scale``
(the radius as a fraction of the image side) sets its size and ``pos`` its centroid. ``PERIOD`` is the angle of
its rotational symmetry: rotations that differ by a multiple of it give the same picture.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SHAPE_NAMES", "PERIOD", "AREA", "EXTENT", "sdf"]

SHAPE_NAMES: tuple[str, ...] = ("square", "triangle", "plus", "star", "bar", "ell", "half_disc", "c_ring")

_SQ = 0.7  # square half-side
_PL, _PT = 0.95, 0.3  # plus arm half-length, half-thickness
_SR, _SI = 1.0, 0.5  # star outer / inner radius
_BL, _BT = 1.0, 0.32  # bar half-length, half-thickness
_EL, _ET = 1.4, 0.45  # ell arm length, thickness
_HR = 0.95  # half-disc radius
_RO, _RI, _RG = 0.88, 0.5, math.radians(35.0)  # c-ring outer / inner radius, gap half-angle

# Centroid offsets (closed forms): ell along the diagonal, half-disc 4R/(3π), c-ring annular sector.
_EC = (_EL * _ET * (_EL / 2) + _EL * _ET * (_ET / 2) - _ET * _ET * (_ET / 2)) / (2 * _EL * _ET - _ET**2)
_HD = 4 * _HR / (3 * math.pi)
_BETA = math.pi - _RG
_RC = (2 / 3) * (_RO**3 - _RI**3) / (_RO**2 - _RI**2) * math.sin(_BETA) / _BETA

PERIOD: dict[str, float] = {
    "square": math.pi / 2,
    "triangle": 2 * math.pi / 3,
    "plus": math.pi / 2,
    "star": 2 * math.pi / 5,
    "bar": math.pi,
    "ell": 2 * math.pi,
    "half_disc": 2 * math.pi,
    "c_ring": 2 * math.pi,
}
AREA: dict[str, float] = {
    "square": 4 * _SQ**2,
    "triangle": 3 * math.sqrt(3) / 4,
    "plus": 8 * _PL * _PT - 4 * _PT**2,
    "star": 5 * _SR * _SI * math.sin(math.pi / 5),
    "bar": 4 * _BL * _BT,
    "ell": 2 * _EL * _ET - _ET**2,
    "half_disc": math.pi * _HR**2 / 2,
    "c_ring": _BETA * (_RO**2 - _RI**2),
}
EXTENT = 1.05


def _box(u: torch.Tensor, v: torch.Tensor, hu: float, hv: float) -> torch.Tensor:
    return torch.maximum(u.abs() - hu, v.abs() - hv)


def sdf(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of the points ``(u, v)`` to shape ``name``, in object units.

    Exact along straight edges and arcs; shapes built by unions/intersections use ``min``/``max`` of their
    parts, which is exact near the boundary except within a corner's width (enough for 1-pixel antialiasing).
    """
    if name == "square":
        return _box(u, v, _SQ, _SQ)
    if name == "triangle":  # circumradius 1, apex towards -v; edges at distance 1/2 from the centroid
        d = [u * math.cos(a) + v * math.sin(a) - 0.5 for a in (math.pi / 2 + 2 * math.pi * k / 3 for k in range(3))]
        return torch.maximum(torch.maximum(d[0], d[1]), d[2])
    if name == "plus":
        return torch.minimum(_box(u, v, _PL, _PT), _box(u, v, _PT, _PL))
    if name == "star":  # fold into the sector of one tip at angle 0; distance to the edge tip -> inner vertex
        rho = torch.sqrt(u * u + v * v)
        sector = 2 * math.pi / 5
        phi = torch.remainder(torch.atan2(v, u) + sector / 2, sector) - sector / 2
        x, y = rho * torch.cos(phi), rho * torch.sin(phi).abs()
        ex, ey = _SI * math.cos(sector / 2) - _SR, _SI * math.sin(sector / 2)
        return ((x - _SR) * ey - y * ex) / math.hypot(ex, ey)
    if name == "bar":
        return _box(u, v, _BL, _BT)
    if name == "ell":
        x, y = u + _EC, v + _EC
        foot = _box(x - _EL / 2, y - _ET / 2, _EL / 2, _ET / 2)
        stem = _box(x - _ET / 2, y - _EL / 2, _ET / 2, _EL / 2)
        return torch.minimum(foot, stem)
    if name == "half_disc":
        y = v + _HD
        return torch.maximum(torch.sqrt(u * u + y * y) - _HR, -y)
    if name == "c_ring":  # ring centre at +_RC along u, gap (a cone around +u) cut out
        x = u - _RC
        r = torch.sqrt(x * x + v * v)
        ring = torch.maximum(r - _RO, _RI - r)
        gap = x * math.sin(_RG) - v.abs() * math.cos(_RG)  # > 0 inside the cone
        return torch.maximum(ring, gap)
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_NAMES}")
