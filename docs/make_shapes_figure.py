"""Contact sheet of the embedded ``shapes`` data set: one row per shape class, 12 samples each.

Run from the repository root: ``python docs/make_shapes_figure.py`` with the package installed (or
``PYTHONPATH=.``); needs matplotlib: ``pip install "star-heads[examples]"``.
Writes docs/images/shapes.png.
"""

from __future__ import annotations

from pathlib import Path

import torch

from star_heads.data.shapes import SHAPE_NAMES, make_shapes

OUT = Path(__file__).resolve().parent / "images" / "shapes.png"
PER_ROW = 12


def main() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover
        raise SystemExit('this figure needs matplotlib: pip install "star-heads[examples]"') from err
    data = make_shapes(400, image_size=32, seed=0)
    shape = data.factors["shape"]
    fig, axes = plt.subplots(len(SHAPE_NAMES), PER_ROW, figsize=(PER_ROW * 0.9, len(SHAPE_NAMES) * 0.95))
    for row, name in enumerate(SHAPE_NAMES):
        idx = (shape == row).nonzero().flatten()[:PER_ROW]
        for col, i in enumerate(idx.tolist()):
            ax = axes[row, col]
            ax.imshow(data.images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            f = data.factors
            ax.set_title(f"c{int(f['color'][i])} r{int(f['rotation'][i])}", fontsize=6, pad=1)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("shapes (32x32, seed 0): rows = shape class; c = colour label, r = rotation bin", fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
