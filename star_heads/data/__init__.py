"""Embedded data for examples and tests: the procedural ``shapes`` set and scikit-learn's digits. See docs/data.md."""

from star_heads.data.digits import load_digits, stratified_split
from star_heads.data.shapes import NUM_COLORS, SHAPE_NAMES, ShapesData, make_shapes, make_shapes_splits

__all__ = [
    "SHAPE_NAMES",
    "NUM_COLORS",
    "ShapesData",
    "make_shapes",
    "make_shapes_splits",
    "load_digits",
    "stratified_split",
]
