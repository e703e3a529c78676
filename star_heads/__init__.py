"""star-heads: STAR projection heads for joint invariant/equivariant self-supervised learning."""

from star_heads._version import __version__

__all__ = ["__version__"]
