"""Self-supervised losses: NT-Xent (SimCLR), equivariant NT-Xent (STAR/EquiMod), VICReg."""

from star_heads.losses.contrastive import EquivariantNTXentLoss, NTXentLoss, equivariant_nt_xent, nt_xent
from star_heads.losses.vicreg import VICRegLoss, VICRegOutput, vicreg

__all__ = [
    "EquivariantNTXentLoss",
    "NTXentLoss",
    "VICRegLoss",
    "VICRegOutput",
    "equivariant_nt_xent",
    "nt_xent",
    "vicreg",
]
