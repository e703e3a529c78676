"""Adapters that put a STAR head (and the equivariant objective) into SimCLR-, VICReg- and EquiMod-style trainers."""

from star_heads.adapters.base import AdapterOutput, JointAdapter
from star_heads.adapters.factory import HEAD_KINDS, build_head
from star_heads.adapters.simclr import EquiModAdapter, SimCLRAdapter
from star_heads.adapters.vicreg import VICRegAdapter

__all__ = [
    "AdapterOutput", "JointAdapter", "SimCLRAdapter", "VICRegAdapter", "EquiModAdapter", "build_head", "HEAD_KINDS",
]
