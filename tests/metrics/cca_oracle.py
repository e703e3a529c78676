"""Independent float64 numpy/scipy references for the CCA tests, and a planted-correlation generator."""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla


def centre(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a - a.mean(axis=0, keepdims=True)


def cca_textbook(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """σ(Cxx^{-1/2} Cxy Cyy^{-1/2}) with scipy's matrix square root (full-rank, well-conditioned data only)."""
    xc, yc = centre(x), centre(y)
    n = xc.shape[0]
    cxx, cyy, cxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    wx = sla.inv(np.real(sla.sqrtm(cxx)))
    wy = sla.inv(np.real(sla.sqrtm(cyy)))
    return np.clip(sla.svdvals(wx @ cxy @ wy), 0.0, 1.0)


def cca_orth(x: np.ndarray, y: np.ndarray, rcond: float = 1e-5) -> np.ndarray:
    """Cosines of the principal angles between the centred column spaces (scipy.linalg.orth with rcond)."""
    xc, yc = centre(x), centre(y)
    qx = sla.orth(xc, rcond=rcond) if np.abs(xc).max() > 0 else xc[:, :0]
    qy = sla.orth(yc, rcond=rcond) if np.abs(yc).max() > 0 else yc[:, :0]
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        return np.zeros(0)
    return np.clip(sla.svdvals(qx.T @ qy), 0.0, 1.0)


def planted(n: int, rho: list[float], p: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X [n, p], Y [n, q] whose population canonical correlations are ``rho`` (padded with zeros).

    Latent pairs (s_i, s_i') with corr(s_i, s_i') = ρ_i, independent noise columns elsewhere, then
    random invertible mixing of each view and an offset.
    """
    rng = np.random.default_rng(seed)
    k = len(rho)
    assert k <= min(p, q)
    x0 = rng.standard_normal((n, p))
    y0 = rng.standard_normal((n, q))
    r = np.asarray(rho, dtype=np.float64)
    y0[:, :k] = r * x0[:, :k] + np.sqrt(1.0 - r**2) * y0[:, :k]
    a = rng.standard_normal((p, p)) + 3 * np.eye(p)
    b = rng.standard_normal((q, q)) + 3 * np.eye(q)
    return x0 @ a + rng.standard_normal(p), y0 @ b - rng.standard_normal(q)


def svcca_oracle(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    def reduce(a: np.ndarray) -> np.ndarray:
        ac = centre(a)
        u, s, _ = np.linalg.svd(ac, full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        r = int(np.argmax(frac >= keep - 1e-12)) + 1
        return u[:, :r] * s[:r]

    return float(np.mean(cca_orth(reduce(x), reduce(y))))


def pwcca_oracle(x: np.ndarray, y: np.ndarray) -> float:
    """Morcos et al. (2018) following google/svcca's compute_pwcca, on centred full-rank data."""
    if x.shape[1] > y.shape[1]:
        x, y = y, x
    xc, yc = centre(x), centre(y)
    n = xc.shape[0]
    cxx, cyy, cxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    ix = sla.inv(np.real(sla.sqrtm(cxx)))
    iy = sla.inv(np.real(sla.sqrtm(cyy)))
    u, rho, _ = np.linalg.svd(ix @ cxy @ iy, full_matrices=False)
    dirns = xc @ (ix @ u)  # canonical variates of the smaller view, [n, k]
    p_mat, _ = np.linalg.qr(dirns)
    weights = np.abs(p_mat.T @ xc).sum(axis=1)
    weights = weights / weights.sum()
    return float(np.sum(weights * rho))
