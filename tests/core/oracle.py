"""Independent references for the fused expert bank: the per-expert loop over standard modules."""

import torch


def loop_outputs(modules, x):
    """[B, N, o] by running each unfused expert on its own."""
    return torch.stack([m(x) for m in modules], dim=1)


def loop_mixture(modules, x, gates):
    """[T, B, o]: z_t = Σ_k g[:, t, k] · E_k(x), written as a plain sum over experts."""
    outs = [m(x) for m in modules]
    z = sum(gates[:, :, k, None] * outs[k][:, None, :] for k in range(len(outs)))  # [B, T, o]
    return z.transpose(0, 1)
