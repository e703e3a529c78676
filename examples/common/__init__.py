"""Small building blocks shared by the example scripts (pretrain.py, transfer.py, demo.py).

Not part of the installed ``star_heads`` package: the scripts put ``examples/`` on ``sys.path``
and import these modules as ``common.<module>``. When ``star_heads`` is not installed (a plain
source checkout), the repository root is put on ``sys.path`` so the scripts still run.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("star_heads") is None:  # pragma: no cover - depends on the environment
    _root = Path(__file__).resolve().parents[2]
    if (_root / "star_heads" / "__init__.py").exists():
        sys.path.insert(0, str(_root))

__all__ = ["backbones", "budget", "datasets", "fabric", "knn", "options", "plots", "probe", "runs", "training"]
