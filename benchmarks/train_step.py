"""One pretraining step with a STAR head vs EquiMod's separate heads vs a single SimCLR head.

    python -m benchmarks.train_step [--quick] [--out-dir DIR] [--repeats R] [--backbone convnet|resnet18]

Every step is what a user's loop runs through the public adapters: three backbone calls (x0, x1, x2, as in
STAR's reference code; SimCLR two), the adapter's joint objective (invariant NT-Xent + λ·equivariant NT-Xent,
τ = 0.2, λ = 1; STAR, arXiv 2510.27222, Sec. 3), backward, SGD (lr 0.03, momentum 0.9, wd 5e-4). Same
backbone weights and batch for every variant; views and 11-D augmentation parameters are random tensors
(augmentation is data loading, the same for all variants).

* ``star`` — ``SimCLRAdapter(d, num_experts=16, hidden_dim=d)``: STAR head (experts d → d → d → 128) + STAR predictor;
* ``equimod`` — ``EquiModAdapter(d, head=SeparateHeads.equimod(d))``: two d → 2048 → 2048 → 128 heads;
* ``simclr`` — EquiMod's invariant head alone, invariant-only call (two views);
* ``backbone`` — the three backbone calls and a trivial loss: what the heads add is the difference.

The backbone is a fixed 4-stage ConvNet (width 64 → d = 512, ResNet-18's width) unless ``--backbone
resnet18`` (torchvision) is asked for, so that results do not depend on what is installed. Also: parameters,
bytes saved for backward, peak bytes of a step, the cost of ``CCAMonitor(every=k)`` on the two embeddings, and
the cost of multi-crop: the STAR step with K local crops (``h_local=``, crops at 3/7 of the image size, as
``STARAugment``'s default) beside K = 0, for the whole step and for the adapter alone (features given).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._common import (
    interleaved,
    machine_info,
    machine_line,
    output_dir,
    peak_bytes,
    saved_bytes,
    single_thread,
    table,
    write_json,
    write_section,
)
from star_heads.adapters import EquiModAdapter, SimCLRAdapter
from star_heads.baselines import SeparateHeads
from star_heads.metrics import CCAMonitor

FULL = {"batch": 256, "image": 32, "width": 64, "experts": 16, "equimod_hidden": 2048, "repeats": 5, "cca_dim": 128}
QUICK = {"batch": 32, "image": 16, "width": 8, "experts": 4, "equimod_hidden": 64, "repeats": 2, "cca_dim": 8}
VARIANTS = ("star", "equimod", "simclr", "backbone")
CCA_EVERY = (1, 10, 100)
LOCAL_CROPS = (2, 6)
MB = 2**20


def convnet(width: int) -> nn.Sequential:
    """Four ``Conv3x3 → BatchNorm → ReLU`` stages of widths w, 2w, 4w, 8w, max-pools between, global pooling."""
    chans, layers = [3, width, 2 * width, 4 * width, 8 * width], []
    for i in range(4):
        layers += [nn.MaxPool2d(2)] * (i > 0)
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def backbone(name: str, width: int) -> tuple[nn.Module, int]:
    if name == "resnet18":
        import torchvision

        net = torchvision.models.resnet18()
        net.fc = nn.Identity()
        return net, 512
    return convnet(width), 8 * width


class Method(nn.Module):
    """Backbone + adapter; ``loss(x0, x1, x2, a1, a2)`` is the variant's whole objective."""

    def __init__(self, kind: str, net: nn.Module, d: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.kind, self.net = kind, net
        if kind == "star":
            self.adapter = SimCLRAdapter(d, num_experts=cfg["experts"], hidden_dim=d, cca_every=0)  # the paper shape
        elif kind == "equimod":
            self.adapter = EquiModAdapter(d, head=SeparateHeads.equimod(d, cfg["equimod_hidden"], 128), cca_every=0)
        elif kind == "simclr":
            head = SeparateHeads.equimod(d, cfg["equimod_hidden"], 128, tasks=("inv",))
            self.adapter = SimCLRAdapter(d, head=head, cca_every=0)

    def loss(self, x0, x1, x2, a1, a2) -> torch.Tensor:
        if self.kind == "backbone":
            return sum(self.net(x).square().mean() for x in (x0, x1, x2))
        if self.kind == "simclr":
            return self.adapter(self.net(x1), self.net(x2)).loss
        h0, h1, h2 = (self.net(x) for x in (x0, x1, x2))  # three calls: BatchNorm statistics per view
        return self.adapter(h1, h2, h0=h0, params1=a1, params2=a2).loss


def n_params(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def cca_logging(batch: int, dim: int, repeats: int) -> dict[str, Any]:
    """ms of ``CCAMonitor.update`` on ``[2B, dim]`` embeddings: accumulating, and the call that computes a result."""
    g = torch.Generator().manual_seed(0)
    z_inv = torch.randn(2 * batch, dim, generator=g)
    z_eq = 0.5 * z_inv + torch.randn(2 * batch, dim, generator=g)
    accumulate = CCAMonitor(every=10**9)
    t_upd = interleaved({"u": lambda: accumulate.update(z_inv, z_eq)}, repeats, warmup=1)["u"]["cpu_ms"]
    monitor = CCAMonitor(every=1)  # every call computes (null baseline included; cached per sample count)
    t_res = interleaved({"r": lambda: monitor.update(z_inv, z_eq)}, repeats, warmup=1)["r"]["cpu_ms"]
    return {"rows": 2 * batch, "dim": dim, "update_ms": t_upd, "compute_ms": t_res - t_upd,
            "per_step_ms": {str(k): t_upd + (t_res - t_upd) / k for k in CCA_EVERY}}


def run(cfg: dict[str, Any], name: str, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    reference, d = backbone(name, cfg["width"])
    methods = {}
    for k in VARIANTS:
        net, _ = backbone(name, cfg["width"])
        net.load_state_dict(reference.state_dict())
        methods[k] = Method(k, net, d, cfg)
    g = torch.Generator().manual_seed(0)
    b, s = cfg["batch"], cfg["image"]
    data = [torch.randn(b, 3, s, s, generator=g) for _ in range(3)] + [torch.randn(b, 11, generator=g) for _ in range(2)]
    steps = {}
    for k, m in methods.items():
        opt = torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)

        def step(m=m, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            m.loss(*data).backward()
            opt.step()

        steps[k] = step
    r: dict[str, Any] = {"backbone": name, "feature_dim": d, "config": cfg, "repeats": repeats}
    r["params"] = {k: {"backbone": n_params(m.net), "head": n_params(getattr(getattr(m, "adapter", None), "head", None)),
                       "predictor": n_params(getattr(getattr(m, "adapter", None), "predictor", None))}
                   for k, m in methods.items()}
    r["time"] = interleaved(steps, repeats)
    r["saved_mb"] = {k: saved_bytes(lambda m=m: m.loss(*data).backward(), [*m.parameters(), *data]) / MB
                     for k, m in methods.items()}
    r["peak_mb"] = {}
    for k, m in methods.items():
        m.zero_grad(set_to_none=True)
        peak = peak_bytes(lambda m=m: m.loss(*data).backward())
        r["peak_mb"][k] = None if peak is None else peak / MB
    t = {k: v["cpu_ms"] for k, v in r["time"].items()}
    r["star_vs_equimod"], r["star_vs_simclr"] = t["star"] / t["equimod"], t["star"] / t["simclr"]
    r["head_ms"] = {k: t[k] - t["backbone"] for k in ("star", "equimod")}  # same three backbone calls
    r["cca_logging"] = cca_logging(b, cfg["cca_dim"], max(repeats, 5))
    r["cca_logging"]["share_of_star_step"] = {k: v / t["star"] for k, v in r["cca_logging"]["per_step_ms"].items()}
    r["multicrop"] = multicrop(cfg, name, repeats)
    return r


def multicrop(cfg: dict[str, Any], name: str, repeats: int) -> dict[str, Any]:
    """CPU ms of the STAR step (backbone + adapter + backward + SGD) and of the adapter alone (features given,
    forward + backward) with K = 0 and each K in ``LOCAL_CROPS`` local crops; ratios against K = 0."""
    torch.manual_seed(0)
    net, d = backbone(name, cfg["width"])
    adapter = SimCLRAdapter(d, num_experts=cfg["experts"], hidden_dim=d, cca_every=0)
    params = [*net.parameters(), *adapter.parameters()]
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    b, s = cfg["batch"], cfg["image"]
    local = max(8, round(s * 3 / 7))
    views = [torch.randn(b, 3, s, s, generator=g) for _ in range(3)]
    crops = [torch.randn(b, 3, local, local, generator=g) for _ in range(max(LOCAL_CROPS))]
    a1, a2 = (torch.rand(b, 11, generator=g) for _ in range(2))
    feats = [torch.randn(b, d, generator=g, requires_grad=True) for _ in range(3 + max(LOCAL_CROPS))]

    def step(k: int) -> None:
        opt.zero_grad(set_to_none=True)
        h0, h1, h2 = (net(x) for x in views)
        h_local = [net(x) for x in crops[:k]] or None
        adapter(h1, h2, h0=h0, params1=a1, params2=a2, h_local=h_local).loss.backward()
        opt.step()

    def head(k: int) -> None:
        adapter.zero_grad(set_to_none=True)
        out = adapter(feats[1], feats[2], h0=feats[0], params1=a1, params2=a2, h_local=feats[3:3 + k] or None)
        out.loss.backward()

    ks = (0, *LOCAL_CROPS)
    t_step = interleaved({str(k): (lambda k=k: step(k)) for k in ks}, repeats)
    t_head = interleaved({str(k): (lambda k=k: head(k)) for k in ks}, max(repeats, 5))
    step_ms = {str(k): t_step[str(k)]["cpu_ms"] for k in ks}
    head_ms = {str(k): t_head[str(k)]["cpu_ms"] for k in ks}
    return {"local_size": local, "step_ms": step_ms, "adapter_ms": head_ms,
            "step_over_k0": {k: v / step_ms["0"] for k, v in step_ms.items()},
            "adapter_over_k0": {k: v / head_ms["0"] for k, v in head_ms.items()}}


def render(p: dict[str, Any]) -> str:
    r, c = p["result"], p["result"]["config"]
    names = {"star": f"STAR head (N = {c['experts']}) + STAR predictor", "equimod": "EquiMod separate heads + predictor",
             "simclr": "SimCLR (EquiMod's invariant head, 2 views)", "backbone": "backbone only (3 views)"}
    rows = [{"variant": names[k], "ms": r["time"][k]["cpu_ms"], "rel": r["time"][k]["cpu_ms"] / r["time"]["equimod"]["cpu_ms"],
             "head": f"{r['params'][k]['head'] / 1e6:.2f} M", "pred": f"{r['params'][k]['predictor'] / 1e6:.3f} M",
             "saved": r["saved_mb"][k], "peak": r["peak_mb"][k]} for k in VARIANTS]
    cca = r["cca_logging"]
    cca_rows = [{"k": k, "ms": v, "share": f"{100 * cca['share_of_star_step'][k]:.2f} %"} for k, v in cca["per_step_ms"].items()]
    mc = r["multicrop"]
    mc_rows = [{"k": k, "step": mc["step_ms"][k], "srel": mc["step_over_k0"][k], "head": mc["adapter_ms"][k],
                "hrel": mc["adapter_over_k0"][k]} for k in mc["step_ms"]]
    return "\n\n".join([
        machine_line(p["machine"]) + f" Backbone: {r['backbone']} (d = {r['feature_dim']}, "
        f"{r['params']['star']['backbone'] / 1e6:.2f} M parameters), batch {c['batch']} of {c['image']}×{c['image']} "
        f"images; median process CPU time of {r['repeats']} interleaved steps.",
        table(rows, {"variant": "variant", "ms": "step ms", "rel": "/ EquiMod", "head": "head params",
                     "pred": "predictor params", "saved": "saved MB", "peak": "peak MB"}),
        f"STAR / EquiMod step: **{r['star_vs_equimod']:.3f}**; the heads, predictors and losses add "
        f"{r['head_ms']['star']:.0f} ms (STAR) and {r['head_ms']['equimod']:.0f} ms (EquiMod) to the backbone's "
        f"{r['time']['backbone']['cpu_ms']:.0f} ms (three views).",
        f"`CCAMonitor(every=k)` on z_inv, z_eq `[{cca['rows']}, {cca['dim']}]`: {cca['update_ms']:.2f} ms to accumulate a "
        f"step, {cca['compute_ms']:.1f} ms to compute a result (the null baseline is cached after the first); per step:",
        table(cca_rows, {"k": "every k", "ms": "ms per step", "share": "share of the STAR step"}),
        f"Multi-crop: the STAR step with K local crops of {mc['local_size']}×{mc['local_size']} (`h_local=`; one "
        "more backbone call and one more invariant head pass per crop, `1 + 2K` invariant losses) beside K = 0; "
        "the adapter alone is its forward + backward on given features:",
        table(mc_rows, {"k": "local crops K", "step": "step ms", "srel": "step / K = 0", "head": "adapter ms",
                        "hrel": "adapter / K = 0"}),
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats; writes to a temporary folder")
    ap.add_argument("--out-dir", type=Path, help="write under this folder instead of docs/ (or the temporary one)")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--backbone", choices=("convnet", "resnet18"), default="convnet")
    a = ap.parse_args(argv)
    single_thread()
    cfg, out = QUICK if a.quick else FULL, output_dir(a.out_dir, a.quick)
    p = {"benchmark": "train_step", "quick": a.quick, "machine": machine_info(), "timer": "process CPU time",
         "result": run(cfg, a.backbone, a.repeats or cfg["repeats"])}
    write_json(out / "benchmarks" / "train_step.json", p)
    write_section(out / "benchmarks.md", "train_step", render(p))
    print(f"wrote {out}/benchmarks/train_step.json, {out}/benchmarks.md (section train_step)")
    return p


if __name__ == "__main__":
    main()
