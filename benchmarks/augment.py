"""Input-pipeline speed: STARAugment beside kornia.augmentation's pipeline of the same ops, the cost of multi-crop,
and ``make_shapes``.

    python -m benchmarks.augment [--quick] [--out-dir DIR]

kornia's pipeline (RandomResizedCrop, horizontal flip, ColorJitter p=0.8, RandomGrayscale p=0.2,
RandomGaussianBlur p=0.5) returns no STAR parameter vector; STARAugment returns the views and their 11-D
parameters. Multi-crop: ``aug.multi_crop`` with 2 global + 6 local crops beside the two global views alone
(``aug(x, view=0)``, ``aug(x, view=1)``). One torch thread, median process CPU time of interleaved repeats. A full
run writes
``docs/benchmarks/augment.json``, the ``augment_speed`` section of ``docs/augment.md`` and the ``shapes_speed``
section of ``docs/data.md``; ``--quick`` writes them under a temporary folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks._common import (
    interleaved,
    machine_info,
    output_dir,
    single_thread,
    table,
    write_json,
    write_section,
)
from star_heads.augment import AugmentConfig, STARAugment
from star_heads.data import make_shapes


def kornia_pipeline(cfg: AugmentConfig, size: int) -> torch.nn.Module:
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=cfg.scale, ratio=cfg.ratio),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.grayscale_p),
        K.RandomGaussianBlur(cfg.kernel_size, cfg.blur_sigma, p=cfg.blur_p),
    )


def run(sizes: list[int], batch: int, repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        aug = STARAugment(size)
        ref = kornia_pipeline(aug.config, size)
        images = torch.rand(batch, 3, size, size)
        gen = torch.Generator().manual_seed(0)
        t = interleaved({"star": lambda a=aug, x=images, g=gen: a(x, generator=g),
                         "kornia": lambda r=ref, x=images: r(x)}, repeats)
        s, k = t["star"]["cpu_ms"] / 1e3, t["kornia"]["cpu_ms"] / 1e3
        rows.append({"views": f"{size} → {size}", "size": size, "batch": batch, "repeats": repeats,
                     "star_img_s": batch / s, "kornia_img_s": batch / k, "star_over_kornia_speed": k / s})
    return rows


def run_multicrop(size: int, batch: int, repeats: int, num_local: int = 6) -> dict:
    """``multi_crop`` (2 global + ``num_local`` local crops, default local size) beside the 2 global views alone."""
    aug = STARAugment(size, num_local_crops=num_local)
    images = torch.rand(batch, 3, size, size)
    gen = torch.Generator().manual_seed(0)
    t = interleaved({"two": lambda: (aug(images, generator=gen, view=0), aug(images, generator=gen, view=1)),
                     "multi": lambda: aug.multi_crop(images, generator=gen)}, repeats)
    two, multi = t["two"]["cpu_ms"], t["multi"]["cpu_ms"]
    return {"size": size, "local_size": aug.local_config.size[0], "num_local_crops": num_local, "batch": batch,
            "repeats": repeats, "two_views_ms": two, "multi_crop_ms": multi, "multi_over_two": multi / two}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats; writes to a temporary folder")
    ap.add_argument("--out-dir", type=Path, help="write under this folder instead of docs/ (or the temporary one)")
    a = ap.parse_args(argv)
    single_thread()
    out = output_dir(a.out_dir, a.quick)
    sizes, batch, repeats = ([16], 8, 2) if a.quick else ([32, 96], 256, 5)
    rows = run(sizes, batch, repeats)
    mc = run_multicrop(16 if a.quick else 96, 8 if a.quick else 128, repeats)
    cases = [(64, 16)] if a.quick else [(10_000, 32), (10_000, 64)]
    shapes = []
    for n, size in cases:
        t = interleaved({"gen": lambda n=n, size=size: make_shapes(n, image_size=size, seed=0)}, 1 if a.quick else 3,
                        warmup=0)
        shapes.append({"num_samples": n, "image_size": size, "seconds": t["gen"]["cpu_ms"] / 1e3})
    info = machine_info()
    write_json(out / "benchmarks" / "augment.json",
               {"machine": info, "quick": a.quick, "rows": rows, "multi_crop": mc, "shapes": shapes})
    cells = [{**r, "star": f"{r['star_img_s']:.0f} img/s", "kornia": f"{r['kornia_img_s']:.0f} img/s",
              "ratio": f"{r['star_over_kornia_speed']:.2f}×"} for r in rows]
    write_section(out / "augment.md", "augment_speed", (
        f"Measured by `benchmarks/augment.py` on {info['cpu']} (1 torch thread, torch {info['torch']}), batch {batch}, "
        f"median process CPU time of {repeats} interleaved repeats, beside kornia.augmentation's own pipeline of the "
        "same ops (which returns no STAR parameter vector); speed ratio > 1 means STARAugment is faster.\n\n"
        + table(cells, {"views": "views", "star": "STARAugment", "kornia": "kornia pipeline", "ratio": "speed ratio"})))
    write_section(out / "augment.md", "multicrop_speed", (
        f"Measured by `benchmarks/augment.py` on {info['cpu']} (1 torch thread, torch {info['torch']}), batch "
        f"{mc['batch']} of {mc['size']}×{mc['size']} images, median process CPU time of {mc['repeats']} interleaved "
        f"repeats: the two global views alone (`aug(x, view=0)`, `aug(x, view=1)`) take **{mc['two_views_ms']:.0f} ms**; "
        f"`aug.multi_crop(x)` with 2 global + {mc['num_local_crops']} local crops ({mc['local_size']}×"
        f"{mc['local_size']}) takes **{mc['multi_crop_ms']:.0f} ms**, {mc['multi_over_two']:.2f}× as long."))
    gen = ", ".join(f"{r['num_samples']:,} images at {r['image_size']}×{r['image_size']} in {r['seconds']:.2f} s" for r in shapes)
    write_section(out / "data.md", "shapes_speed", f"Generation time, measured by `benchmarks/augment.py` on {info['cpu']} "
                  f"(1 torch thread, process CPU time, median of {1 if a.quick else 3}): **{gen}.**")
    print(f"wrote {out}/benchmarks/augment.json, {out}/augment.md, {out}/data.md\n{gen}")


if __name__ == "__main__":
    main()
