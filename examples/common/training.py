"""Pieces of the pretraining loop shared by pretrain.py, transfer.py and benchmarks/quality.py.

* :class:`SSLModel` — backbone + adapter in one module (what DDP wraps): three backbone calls
  (x0, x1, x2) for the joint objective, two for the invariant-only one.
* :func:`build_adapter`, :func:`build_augment` — the library objects a run config asks for.
* :func:`make_loader` — batches of in-memory images through a (Distributed)Sampler reseeded per epoch.
* :func:`evaluate` — per-epoch held-out metrics: CCA(inv, eq) with its null baseline, gate usage,
  kNN accuracy of backbone features.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from common.datasets import PretrainData, to_float
from common.knn import knn_accuracy

__all__ = [
    "SSLModel", "build_adapter", "build_augment", "build_head_module", "evaluate", "extract_features", "make_loader",
    "original_view", "progress",
]


class SSLModel(nn.Module):
    """Backbone and adapter; ``forward`` returns the adapter's output (``.loss``, ``.losses``, ...)."""

    def __init__(self, backbone: nn.Module, adapter: nn.Module, *, joint: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.joint = joint

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> Any:
        h1, h2 = self.backbone(x1), self.backbone(x2)
        if not self.joint:
            return self.adapter(h1, h2)
        return self.adapter(h1, h2, h0=self.backbone(x0), params1=p1, params2=p2)


def build_adapter(cfg: dict[str, Any], feat_dim: int, *, distributed: bool = False) -> nn.Module:
    """The ``star_heads.adapters`` adapter of ``cfg['method']`` with ``cfg['head']``."""
    from star_heads import adapters
    from star_heads.augment import PARAM_DIM

    cls = {"simclr": adapters.SimCLRAdapter, "vicreg": adapters.VICRegAdapter, "equimod": adapters.EquiModAdapter}
    # cca_every=0: the examples measure CCA(inv, eq) on a fixed held-out set every epoch instead of on
    # training batches (and a resumed run then logs exactly what an uninterrupted one does).
    kwargs: dict[str, Any] = dict(head=build_head_module(cfg, feat_dim), param_dim=PARAM_DIM,
                                  lam=cfg["lam"], gather=distributed, predictor=cfg.get("predictor", "star"),
                                  cca_every=0)
    if cfg["method"] != "vicreg":
        kwargs.update(temperature=cfg["temperature"], eq_temperature=cfg["temperature"])
    return cls[cfg["method"]](feat_dim, **kwargs)


def build_head_module(cfg: dict[str, Any], feat_dim: int) -> nn.Module:
    """The projection head of ``cfg``: ``head``, ``num_experts``, ``hidden_dim`` and ``match_params``.

    ``equimod`` is EquiMod's head shape (``SeparateHeads.equimod``, hidden ``cfg['hidden_dim']`` or 2048);
    ``match_params`` sizes a baseline kind to the STAR head with ``num_experts`` experts (``build_head``).
    """
    from star_heads import SeparateHeads, build_head

    hidden = cfg.get("hidden_dim")
    if cfg["head"] == "equimod":
        return SeparateHeads.equimod(feat_dim, hidden_dim=hidden or 2048)
    star_sized = cfg["head"] == "star" or cfg.get("match_params", False)
    return build_head(cfg["head"], feat_dim, hidden_dim=hidden, num_experts=cfg["num_experts"] if star_sized else None,
                      match_params=cfg.get("match_params", False))


def build_augment(cfg: dict[str, Any], device: torch.device) -> nn.Module:
    """STAR's augmentation pipeline (11-D parameters, crop box normalised by image size)."""
    from star_heads.augment import STARAugment

    return STARAugment(cfg["image_size"]).to(device)


class _Batches(Dataset):
    """Indexes a whole batch at once (``dataset[list_of_indices]``) from an in-memory tensor."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(idx)]


def make_loader(images: torch.Tensor, cfg: dict[str, Any], rank: int, world: int,
                device: torch.device) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled batches of ``batch_size / world`` images for this rank; call ``sampler.set_epoch(e)``.

    The shuffle depends only on (seed, epoch), so a resumed run sees the same batches.
    """
    ds = _Batches(images)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"], drop_last=True)
    batches = BatchSampler(sampler, cfg["batch_size"] // world, drop_last=True)
    loader = DataLoader(ds, sampler=batches, batch_size=None, num_workers=cfg["workers"],
                        pin_memory=device.type == "cuda", persistent_workers=cfg["workers"] > 0)
    return loader, sampler


def original_view(aug: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The un-augmented view x0 (``aug.original``: whole image resized to the view size); no copy when sizes match."""
    return x if tuple(x.shape[-2:]) == tuple(aug.config.size) else aug.original(x)


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, aug: nn.Module | None, device: torch.device,
                     *, amp_enabled: bool = False, batch_size: int = 512) -> torch.Tensor:
    """Backbone features ``[n, d]`` (float32, on ``device``) of un-augmented images, in eval mode."""
    out = []
    with _eval_mode(backbone):
        for chunk in images.split(batch_size):
            x = to_float(chunk.to(device, non_blocking=True))
            if aug is not None:
                x = original_view(aug, x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled):
                out.append(backbone(x).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate(backbone: nn.Module, adapter: nn.Module, data: PretrainData, aug: nn.Module, device: torch.device,
             *, amp_enabled: bool = False, batch_size: int = 512, cache: dict | None = None) -> dict[str, Any]:
    """Held-out metrics of one epoch.

    Returns ``cca_mean``, ``cca_null`` (mean canonical correlation between the invariant and
    equivariant embeddings of the held-out images, and the same for shuffled pairs), ``cca_rank``,
    ``gate_mean`` ([T][N] mean gate per task and expert), ``gate_entropy``, ``effective_experts``
    (per task), ``task_overlap`` (per expert: min over tasks / max over tasks of its mean gate) and ``knn_acc`` (weighted 20-NN on backbone features, bank → held-out labels).
    Entries that do not apply (no equivariant embedding, no router) are None. Pass the same
    ``cache`` dict every epoch: its ``CCAMeter`` (and the meter's cached null baseline) is reused.
    """
    from star_heads.metrics import CCAMeter

    row: dict[str, Any] = {"cca_mean": None, "cca_null": None, "cca_rank": None, "gate_mean": None,
                           "gate_entropy": None, "effective_experts": None, "task_overlap": None, "knn_acc": None}
    h = extract_features(backbone, data.heldout.images, aug, device, amp_enabled=amp_enabled, batch_size=batch_size)
    with _eval_mode(adapter):
        emb = adapter.embed(h)
        if "eq" in emb:
            cache = {} if cache is None else cache
            dims = (emb["inv"].shape[1], emb["eq"].shape[1])
            meter = cache.get("cca")
            if meter is None or (meter.p, meter.q) != dims:
                meter = cache["cca"] = CCAMeter(*dims)
            meter.reset()
            meter.update(emb["inv"].double(), emb["eq"].double())
            res = meter.compute()
            row.update(cca_mean=float(res.mean), cca_null=None if res.null_mean is None else float(res.null_mean),
                       cca_rank=int(min(res.rank_x, res.rank_y)))
        gates = _gates(adapter.head, h)
    if gates is not None:
        from star_heads import routing_stats

        stats = routing_stats(gates)
        row.update(
            gate_mean=_tolist(stats.mean_gate),
            gate_entropy=_tolist(stats.entropy),
            effective_experts=_tolist(stats.effective_experts),
            task_overlap=_tolist(stats.task_overlap),
        )
    if data.heldout.labels is not None and data.knn_bank.labels is not None:
        bank = extract_features(backbone, data.knn_bank.images, aug, device, amp_enabled=amp_enabled, batch_size=batch_size)
        n_cls = int(max(int(data.knn_bank.labels.max()), int(data.heldout.labels.max()))) + 1
        row["knn_acc"] = knn_accuracy(bank, data.knn_bank.labels.to(device), h, data.heldout.labels.to(device), n_cls)
    return row


def _gates(head: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """Gates [B, T, N] of a routed head, or None for heads without a router."""
    if not hasattr(head, "router"):
        return None
    out = head(h, return_gates=True)
    return getattr(out, "gates", None)


def _tolist(x: Any) -> Any:
    return x.detach().cpu().tolist() if isinstance(x, torch.Tensor) else x


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, *, enabled: bool = True) -> Any:
    """A tqdm bar when tqdm is installed and ``enabled``, else a no-op object with the same methods."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
