"""Input-pipeline speed: STARAugment beside kornia.augmentation's own pipeline of the same ops, and the
generation time of the embedded ``shapes`` data set.

kornia's pipeline (RandomResizedCrop, horizontal flip, ColorJitter p=0.8, RandomGrayscale p=0.2,
RandomGaussianBlur p=0.5) returns no STAR parameter vector; STARAugment returns the views and their
11-D parameters. Medians of interleaved repeats, one torch thread by default (see docs/benchmarks.md
for why). Writes JSON, the ``augment_speed`` section of docs/augment.md and the ``shapes_speed`` section
of docs/data.md.

    python benchmarks/augment.py            # full run
    python benchmarks/augment.py --quick    # CI smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._report import DOCS, machine_info, markdown_table, write_json, write_section  # noqa: E402
from star_heads.augment import AugmentConfig, STARAugment  # noqa: E402
from star_heads.data import make_shapes  # noqa: E402


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
        star = lambda: aug(images, generator=gen)  # noqa: E731
        korn = lambda: ref(images)  # noqa: E731
        times: dict[str, list[float]] = {"star": [], "kornia": []}
        star(), korn()
        for r in range(repeats):
            order = (("star", star), ("kornia", korn)) if r % 2 == 0 else (("kornia", korn), ("star", star))
            for name, fn in order:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        s, k = statistics.median(times["star"]), statistics.median(times["kornia"])
        rows.append({
            "views": f"{size} → {size}", "size": size, "batch": batch, "repeats": repeats,
            "star_img_s": batch / s, "kornia_img_s": batch / k, "star_over_kornia_speed": k / s,
        })
    return rows


def shapes_timing(cases: list[tuple[int, int]], repeats: int) -> list[dict]:
    """Median wall time of ``make_shapes(n, image_size=s)`` for each ``(n, s)``."""
    rows = []
    for n, size in cases:
        times = []
        for r in range(repeats):
            t = time.perf_counter()
            make_shapes(n, image_size=size, seed=r)
            times.append(time.perf_counter() - t)
        rows.append({"num_samples": n, "image_size": size, "repeats": repeats, "seconds": statistics.median(times)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (CI smoke run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-json", default=str(DOCS / "benchmarks" / "augment.json"))
    p.add_argument("--out-md", default=str(DOCS / "augment.md"))
    p.add_argument("--out-data-md", default=str(DOCS / "data.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, batch, repeats = ([16], 8, 2) if args.quick else ([32, 96], 256, 5)
    rows = run(sizes, batch, repeats)
    shapes = shapes_timing([(64, 16)] if args.quick else [(10_000, 32), (10_000, 64)], 1 if args.quick else 3)
    info = machine_info()
    write_json(args.out_json, {"machine": info, "quick": args.quick, "rows": rows, "shapes": shapes})
    table = markdown_table(
        [{**r, "STARAugment": f"{r['star_img_s']:.0f} img/s", "kornia pipeline": f"{r['kornia_img_s']:.0f} img/s",
          "speed ratio": f"{r['star_over_kornia_speed']:.2f}×"} for r in rows],
        ["views", "STARAugment", "kornia pipeline", "speed ratio"],
    )
    body = (
        f"Measured by `benchmarks/augment.py` on {info['cpu']} ({args.threads} torch thread(s), torch {info['torch']}), "
        f"batch {batch}, median of {repeats} interleaved repeats, beside kornia.augmentation's own pipeline of the "
        "same ops (which returns no STAR parameter vector); speed ratio > 1 means STARAugment is faster.\n\n" + table
    )
    write_section(args.out_md, "augment_speed", body)
    gen = ", ".join(f"{r['num_samples']:,} images at {r['image_size']}×{r['image_size']} in {r['seconds']:.2f} s" for r in shapes)
    write_section(
        args.out_data_md, "shapes_speed",
        f"Generation time, measured by `benchmarks/augment.py` on {info['cpu']} ({args.threads} torch thread(s), "
        f"median of {shapes[0]['repeats']}): **{gen}.**",
    )
    print(table)
    print(gen)


if __name__ == "__main__":
    main()
