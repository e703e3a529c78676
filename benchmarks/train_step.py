"""One full pretraining step with the STAR head vs EquiMod's separate heads vs a single SimCLR head (issue 6).

Each step: backbone forward on the views (three separate calls x0, x1, x2 as in the STAR reference code; SimCLR
only x1, x2), head, equivariant predictor, losses (NT-Xent τ=0.2 and equivariant NT-Xent τ=0.2, λ=1), backward,
SGD step (lr 0.03, momentum 0.9, weight decay 5e-4). Same backbone and batch for all variants; the components
are used directly (head, predictor, loss functions) so that nothing else is timed. Views and the (already
standardised) 11-D augmentation parameters are random tensors: augmentation is data-loading work, the same
for every variant, and left out.

* ``star`` — :class:`~star_heads.heads.STARHead` ``(d, N=16)`` (experts d→d→d→128) + ``EquivariantPredictor(kind="star")``.
* ``equimod`` — :meth:`~star_heads.baselines.SeparateHeads.equimod` (two d→2048→2048→128 heads ending in
  BN(affine=False)) + ``EquivariantPredictor(kind="equimod")``.
* ``simclr`` — EquiMod's invariant head alone, two views, NT-Xent only.
* ``backbone`` — the three backbone calls and a trivial loss: what the heads add is the difference.

Backbone: torchvision ResNet-18 when torchvision imports, otherwise the examples' ConvNet (width 64 → d = 512,
the ResNet-18 width, on 32×32 images). Also reported: parameter counts, activation bytes saved for backward, heap
growth of one step, and the cost of logging CCA(z_inv, z_eq) every k steps with
:class:`~star_heads.metrics.CCAMonitor`.

Usage::

    python benchmarks/train_step.py [--quick] [--out-json P] [--out-md P]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._report import DOCS, machine_info, write_json, write_section  # noqa: E402
from benchmarks._speed import interleaved_times, median_ms, peak_step_bytes, saved_activation_bytes  # noqa: E402
from examples.common.backbones import build_backbone, torchvision_error  # noqa: E402
from star_heads.baselines import SeparateHeads  # noqa: E402
from star_heads.equivariance import EquivariantPredictor  # noqa: E402
from star_heads.heads import STARHead  # noqa: E402
from star_heads.losses import equivariant_nt_xent, nt_xent  # noqa: E402

FULL = {"batch": 256, "image": 32, "width": 64, "experts": 16, "equimod_hidden": 2048, "repeats": 5, "warmup": 1,
        "cca_every": 100}
QUICK = {"batch": 64, "image": 16, "width": 8, "experts": 4, "equimod_hidden": 64, "repeats": 2, "warmup": 1,
         "cca_every": 8}
RESNET18_96PX_MACS = 1.814e9 * (96 / 224) ** 2  # ResNet-18 multiply-adds at 224 px, scaled to STL10's 96 px
VARIANTS = ("star", "equimod", "simclr", "backbone")
CCA_EVERY = (1, 10, 100)
PARAM_DIM, TAU, LAM = 11, 0.2, 1.0


class Method(nn.Module):
    """Backbone + head + predictor; ``loss(x0, x1, x2, a1, a2)`` is the method's full objective."""

    def __init__(self, kind: str, backbone: nn.Module, d: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.kind, self.backbone = kind, backbone
        if kind == "star":
            self.head = STARHead(d, 128, num_experts=cfg["experts"])
            self.predictor = EquivariantPredictor(128, PARAM_DIM, kind="star", hidden_dim=512 if d >= 512 else d)
        elif kind == "equimod":
            self.head = SeparateHeads.equimod(d, cfg["equimod_hidden"], 128)
            self.predictor = EquivariantPredictor(128, PARAM_DIM, kind="equimod")
        elif kind == "simclr":
            self.head = SeparateHeads.equimod(d, cfg["equimod_hidden"], 128, tasks=("inv",))

    def loss(self, x0, x1, x2, a1, a2) -> torch.Tensor:
        if self.kind == "backbone":
            return sum(self.backbone(x).square().mean() for x in (x0, x1, x2))
        if self.kind == "simclr":
            return nt_xent(self.head(self.backbone(x1)), self.head(self.backbone(x2)), TAU)
        h0, h1, h2 = (self.backbone(x) for x in (x0, x1, x2))  # three calls: BN statistics per view group
        o1, o2 = self.head(h1), self.head(h2)
        z0 = self.head(h0, task="eq")
        pred = torch.cat([self.predictor(z0, a1), self.predictor(z0, a2)])
        l_inv = nt_xent(o1["inv"], o2["inv"], TAU)
        l_eq = equivariant_nt_xent(torch.cat([o1["eq"], o2["eq"]]), pred, TAU)
        self.last_embeddings = (o1["inv"].detach(), o1["eq"].detach())
        return l_inv + LAM * l_eq


def n_params(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def conv_macs(backbone: nn.Module, image: int, device: torch.device) -> int:
    """Multiply-adds of one image through the backbone's convolutions and linears (forward hooks)."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total[0] += mod.in_features * mod.out_features

    hooks = [m.register_forward_hook(hook) for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        backbone(torch.zeros(1, 3, image, image, device=device))
    backbone.train(was)
    for h in hooks:
        h.remove()
    return total[0]


def build_all(cfg: dict[str, Any], device: torch.device) -> tuple[dict[str, Method], str, int, tuple]:
    use_resnet = torchvision_error() is None
    name = "resnet18" if use_resnet else "convnet"
    torch.manual_seed(0)
    reference, d = build_backbone(name, width=cfg["width"])
    methods = {}
    for k in VARIANTS:
        bb, _ = build_backbone(name, width=cfg["width"])
        bb.load_state_dict(reference.state_dict())
        methods[k] = Method(k, bb, d, cfg).to(device)
    b, s = cfg["batch"], cfg["image"]
    g = torch.Generator(device).manual_seed(0)
    data = tuple(torch.randn(b, 3, s, s, device=device, generator=g) for _ in range(3)) + tuple(
        torch.randn(b, PARAM_DIM, device=device, generator=g) for _ in range(2))
    label = f"torchvision ResNet-18 (d={d})" if use_resnet else f"examples ConvNet(width={cfg['width']}) (d={d}), torchvision not importable"
    return methods, label, d, data


def make_train_step(m: Method, data: tuple) -> Any:
    opt = torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        m.loss(*data).backward()
        opt.step()

    return step


def cca_logging_cost(batch: int, device: torch.device, steps: int) -> dict[str, Any]:
    """Milliseconds of CCAMonitor.update per step (accumulate) and per result (compute), amortised for each k."""
    try:
        from star_heads.metrics import CCAMonitor
    except ImportError as exc:
        return {"error": f"star_heads.metrics.CCAMonitor unavailable: {exc}"}
    g = torch.Generator(device).manual_seed(0)
    z_inv = torch.randn(batch, 128, device=device, generator=g)
    z_eq = 0.5 * z_inv + torch.randn(batch, 128, device=device, generator=g)
    mon = CCAMonitor(every=steps, null_baseline=True, sync=False)
    t_upd = []
    for _ in range(steps - 1):
        t0 = time.process_time()
        mon.update(z_inv, z_eq)
        t_upd.append(time.process_time() - t0)
    t0 = time.process_time()
    result = mon.update(z_inv, z_eq)  # the steps-th call: accumulate + compute (with null baseline)
    t_compute = time.process_time() - t0 - median_ms(t_upd) / 1e3
    assert result is not None
    upd = median_ms(t_upd)
    return {"update_ms": upd, "compute_ms": t_compute * 1e3, "embed_dim": 128, "batch": batch,
            "per_step_ms": {str(k): upd + t_compute * 1e3 / k for k in CCA_EVERY}}


def run(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    methods, label, d, data = build_all(cfg, device)
    steps = {k: make_train_step(m, data) for k, m in methods.items()}
    res: dict[str, Any] = {"backbone": label, "feature_dim": d, "config": dict(cfg), "device": str(device),
                           "threads": torch.get_num_threads(),
                           "timer": "CUDA events" if device.type == "cuda" else "process CPU time (user+sys)",
                           "load_avg_start": list(os.getloadavg())}
    res["params"] = {k: {"backbone": n_params(m.backbone), "head": n_params(getattr(m, "head", None)),
                         "predictor": n_params(getattr(m, "predictor", None))} for k, m in methods.items()}
    times = interleaved_times(steps, cfg["repeats"], cfg["warmup"], device)
    res["step_ms"] = {k: median_ms(times[k]["cpu"]) for k in VARIANTS}
    res["step_wall_ms"] = {k: median_ms(times[k]["wall"]) for k in VARIANTS}
    res["step_times_ms"] = {k: [round(t * 1e3, 2) for t in times[k]["cpu"]] for k in VARIANTS}
    res["saved_mb"], res["peak_step_mb"] = {}, {}
    for k, m in methods.items():
        res["saved_mb"][k] = saved_activation_bytes(lambda: m.loss(*data).backward(), [*m.parameters(), *data]) / 2**20
        peak = peak_step_bytes(steps[k], device)
        res["peak_step_mb"][k] = None if peak is None else peak / 2**20
    s = res["step_ms"]
    res["ratios"] = {"star_vs_equimod": s["star"] / s["equimod"], "star_vs_simclr": s["star"] / s["simclr"],
                     "equimod_vs_simclr": s["equimod"] / s["simclr"]}
    bb = s["backbone"]
    res["head_overhead_ms"] = {k: s[k] - bb for k in ("star", "equimod")}
    macs = conv_macs(methods["star"].backbone, cfg["image"], device)
    scale = RESNET18_96PX_MACS / macs
    res["projection"] = {
        "backbone_macs_per_image": macs, "resnet18_96px_macs_per_image": RESNET18_96PX_MACS, "scale": scale,
        "star_vs_equimod_projected": (s["star"] - bb + scale * bb) / (s["equimod"] - bb + scale * bb),
    }
    res["cca_logging"] = cca_logging_cost(cfg["batch"], device, cfg["cca_every"])
    if "per_step_ms" in res["cca_logging"]:
        res["cca_logging"]["share_of_star_step"] = {k: v / s["star"] for k, v in res["cca_logging"]["per_step_ms"].items()}
    res["goal"] = {"star_vs_equimod": res["ratios"]["star_vs_equimod"], "target": 1.15,
                   "met": res["ratios"]["star_vs_equimod"] <= 1.15}
    res["load_avg_end"] = list(os.getloadavg())
    return res


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _step_table(r: dict[str, Any]) -> str:
    c, s = r["config"], r["step_ms"]
    names = {"star": f"STAR head (N={c['experts']}) + STAR predictor", "equimod": "EquiMod separate heads + predictor",
             "simclr": "SimCLR (one head, 2 views)", "backbone": "backbone only (3 views)"}
    rows = []
    for k in VARIANTS:
        p = r["params"][k]
        rows.append([names[k], _fmt(s[k]), _fmt(s[k] / s["equimod"]), _fmt(r["step_wall_ms"][k]),
                     f"{p['head'] / 1e6:.2f} M", f"{p['predictor'] / 1e6:.3f} M", f"{p['backbone'] / 1e6:.2f} M",
                     _fmt(r["saved_mb"][k]), _fmt(r["peak_step_mb"][k])])
    lines = ["| variant | step ms | / EquiMod | wall ms | head params | predictor params | backbone params | "
             "saved MB | peak step MB |", "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown(payload: dict[str, Any]) -> str:
    m, r = payload["machine"], payload["cpu"]
    c, s = r["config"], r["step_ms"]
    pr, g = r["projection"], r["goal"]
    cca = r["cca_logging"]
    if "per_step_ms" in cca:
        cca_line = (f"CCA logging with `CCAMonitor(every=k)` on z_inv, z_eq [{cca['batch']}, 128]: accumulate "
                    f"{cca['update_ms']:.2f} ms per step, compute (with null baseline) {cca['compute_ms']:.1f} ms per "
                    "result; per step amortised: " + ", ".join(
                        f"k={k}: {v:.2f} ms ({100 * cca['share_of_star_step'][k]:.2f}% of the STAR step)"
                        for k, v in cca["per_step_ms"].items()) + ".")
    else:
        cca_line = f"CCA logging cost: not measured ({cca['error']})."
    load = f"{payload['load_avg_start'][0]:.1f} at start, {payload['load_avg_end'][0]:.1f} at end"
    parts = [
        "## One pretraining step: STAR vs EquiMod vs SimCLR (`benchmarks/train_step.py`)",
        f"CPU: **{m['cpu']}** ({os.cpu_count()} cores), {r['threads']} torch thread(s), torch {m['torch']}; "
        f"1-minute load average {load}.{' **--quick run (tiny sizes)**.' if payload['quick'] else ''} "
        f"Backbone: {r['backbone']}; batch {c['batch']} of {c['image']}×{c['image']} images, three backbone calls "
        "(x0, x1, x2; SimCLR two); SGD lr 0.03, momentum 0.9, wd 5e-4; NT-Xent τ=0.2 (+ equivariant NT-Xent, λ=1). "
        f"*step ms* = median process CPU time of {c['repeats']} interleaved steps after {c['warmup']} warm-up "
        "(see the expert-bank section for why CPU time); saved MB = activations kept for backward; peak step MB = "
        "heap growth during one step (glibc `mallinfo2` after every op).",
        _step_table(r),
        f"Goal: STAR step ≤ 1.15× the separate-heads step at the STL10 head config (here N={c['experts']}, "
        f"d={r['feature_dim']}, batch {c['batch']}): measured "
        f"**{g['star_vs_equimod']:.3f}×** ({'met' if g['met'] else 'not met'}). The heads add "
        f"{r['head_overhead_ms']['star']:.0f} ms (STAR) and {r['head_overhead_ms']['equimod']:.0f} ms (EquiMod) to the "
        f"{s['backbone']:.0f} ms backbone step.",
        f"The backbone here does {pr['backbone_macs_per_image'] / 1e6:.0f} M multiply-adds per image, ResNet-18 on "
        f"96 px STL10 images {pr['resnet18_96px_macs_per_image'] / 1e6:.0f} M ({pr['scale']:.1f}×): scaling the measured "
        f"backbone time by that factor (a projection, not a measurement) gives STAR/EquiMod ≈ "
        f"{pr['star_vs_equimod_projected']:.3f}.",
        cca_line,
    ]
    if "cuda" in payload:
        gpu = payload["cuda"]
        parts += [f"GPU ({m.get('gpu')}), same step, CUDA-event time, peak = `torch.cuda.max_memory_allocated` growth:",
                  _step_table(gpu), f"STAR / EquiMod on the GPU: **{gpu['goal']['star_vs_equimod']:.3f}×**."]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (CI smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see expert_bank.py)")
    p.add_argument("--out-json", type=Path)
    p.add_argument("--out-md", type=Path)
    p.add_argument("--from-json", type=Path, help="re-render the markdown section from a saved JSON (no timing)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    quick_dir = Path(tempfile.gettempdir()) / "star_heads_bench_quick"
    out_json = a.out_json or (quick_dir / "train_step.json" if a.quick else DOCS / "benchmarks" / "train_step.json")
    out_md = a.out_md or (quick_dir / "benchmarks.md" if a.quick else DOCS / "benchmarks.md")
    if a.from_json:
        payload = json.loads(a.from_json.read_text())
    else:
        cfg = QUICK if a.quick else FULL
        payload = {"benchmark": "train_step", "quick": a.quick, "machine": machine_info(),
                   "load_avg_start": list(os.getloadavg())}
        payload["cpu"] = run(cfg, torch.device("cpu"))
        if torch.cuda.is_available():
            payload["cuda"] = run(cfg, torch.device("cuda"))
        payload["load_avg_end"] = list(os.getloadavg())
    write_json(out_json, payload)
    write_section(out_md, "train_step", markdown(payload))
    print(f"wrote {out_json}, {out_md} (section train_step)")
    return payload


if __name__ == "__main__":
    main()
