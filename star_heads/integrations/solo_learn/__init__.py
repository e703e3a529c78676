"""solo-learn: STAR heads and STAR's equivariant branch for solo-learn methods (solo-learn is imported only when used).

* :func:`replace_projector`: swap a method's projector (and momentum projector) for a STAR head.
* :class:`STAREquivariantMixin`: train the equivariant task inside any solo method, from solo's own yaml recipe.
* :func:`recipe_from_cfg` / :func:`build_augment`: solo's ``cfg.augmentations`` mapped onto ``STARAugment``.
* ``python -m star_heads.integrations.solo_learn.pretrain --config-path <solo>/scripts/pretrain/cifar
  --config-name simclr.yaml +star.num_experts=8``: solo's ``main_pretrain.py`` with the STAR variant of the method.

Install: solo-learn's only PyPI release (1.0.2) pins torch 1.9, so ``pip install solo-learn`` does not resolve
beside a current torch. Install solo-learn from its source (``git clone`` the solo-learn repository,
``pip install -e .`` inside it, or put the checkout on ``PYTHONPATH``), then ``pip install star-heads``.
"""

from star_heads.integrations.solo_learn._swap import (
    SOLO_INSTALL_HINT,
    replace_projector,
)
from star_heads.integrations.solo_learn.mixin import STAREquivariantMixin, build_augment
from star_heads.integrations.solo_learn.recipe import SoloRecipe, recipe_from_cfg

__all__ = ["replace_projector", "STAREquivariantMixin", "SOLO_INSTALL_HINT", "SoloRecipe", "recipe_from_cfg",
           "build_augment", "star_method"]


def star_method(name: str) -> type:
    """The STAR variant of solo's method ``name`` (a key of ``solo.methods.METHODS``): ``STAREquivariantMixin``
    first in the bases of solo's class, so solo's code is unchanged.

    Raises:
        ImportError: solo-learn is not importable.
        ValueError: ``name`` is not one of solo's methods (the message lists them).
    """
    try:
        from solo.methods import METHODS
    except ImportError as err:
        raise ImportError(SOLO_INSTALL_HINT) from err
    if name not in METHODS:
        raise ValueError(f"unknown solo-learn method {name!r}; solo has {sorted(METHODS)}")
    base = METHODS[name]
    return type(f"STAR{base.__name__}", (STAREquivariantMixin, base), {"__module__": __name__})
