"""``import star_heads`` is light: public names load on first use, all of them resolve, and the lazy table matches
the typed imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import star_heads

INIT = Path(star_heads.__file__)


def _run(code: str) -> str:
    root = str(INIT.resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return out.stdout


def test_import_loads_no_heavy_submodule():
    loaded = _run(
        "import sys, star_heads\n"
        "print(' '.join(m for m in sys.modules if m.startswith(('star_heads.', 'einops', 'kornia', 'sklearn'))))"
    ).split()
    heavy = {"star_heads.heads", "star_heads.adapters", "star_heads.metrics", "star_heads.augment", "einops",
             "kornia", "sklearn"}
    assert not heavy & set(loaded), loaded


def test_every_public_name_resolves_and_is_the_defining_modules_object():
    import importlib

    for name in star_heads.__all__:
        value = getattr(star_heads, name)
        module = star_heads._WHERE.get(name)
        if module is not None:
            assert value is getattr(importlib.import_module(module), name)
    assert set(star_heads._WHERE) <= set(star_heads.__all__)
    assert set(star_heads.__all__) <= set(dir(star_heads))
    from star_heads import STARHead, heads  # names and submodules both

    assert STARHead is heads.STARHead


def test_the_lazy_table_matches_the_type_checking_imports():
    tree = ast.parse(INIT.read_text())
    (block,) = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
    typed = {(n.module, a.name) for n in block.body for a in n.names}
    assert typed == {(m, name) for name, m in star_heads._WHERE.items()}


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        star_heads.nope  # noqa: B018
    assert not hasattr(star_heads, "nope")


def test_import_costs_little_over_torch():
    """``python -X importtime``: star_heads' own share (its cumulative time minus torch's) is a few ms, not tens."""
    lines = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import torch, star_heads"], capture_output=True, text=True,
        check=True, cwd=str(INIT.resolve().parent.parent),
    ).stderr.splitlines()
    cumulative = {line.split("|")[2].strip(): int(line.split("|")[1]) for line in lines if line.count("|") == 2
                  and line.split("|")[1].strip().isdigit()}
    own_us = cumulative["star_heads"]
    # generous bound for a loaded CI machine; measured 1-5 ms (the heads, metrics, augment load on first use)
    assert own_us < 25_000, f"import star_heads took {own_us / 1000:.1f} ms over torch"


def test_a_first_import_inside_a_device_context_leaves_no_module_constant_on_that_device():
    """Lazy imports can run inside ``with torch.device("meta")`` (a model built on meta to count its size): no
    module may keep a tensor made at import time, or it would live on whatever device was the default then."""
    import subprocess
    import sys

    code = (
        "import torch, star_heads\n"
        "with torch.device('meta'):\n"
        "    names = [getattr(star_heads, n) for n in star_heads.__all__]\n"
        "import star_heads.metrics.equivariance as e, sys\n"
        "bad = [f'{m}.{k}' for m, mod in list(sys.modules.items()) if m.startswith('star_heads')\n"
        "       for k, v in vars(mod).items() if isinstance(v, torch.Tensor) and v.device.type == 'meta']\n"
        "print(bad)\n"
        "z = torch.randn(64, 4, dtype=torch.float64)\n"
        "p = torch.randn(64, 2, dtype=torch.float64)\n"
        "e.augmentation_r2(z, z + 1, p, p + z[:, :2], torch.arange(64) // 2, param_names=['crop_top', 'flip'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
