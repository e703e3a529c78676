"""Pieces of the pretraining loop shared by pretrain.py, transfer.py and benchmarks/quality.py.

* :class:`SSLModel` — backbone + adapter in one module (what DDP and ``torch.compile`` wrap): three
  backbone calls (x0, x1, x2) for the joint objective, two for the invariant-only one; optional
  NaN/Inf checks of the views and of the backbone features before they reach any BatchNorm.
* :func:`train_step` — one optimiser step: two augmented views, the model, backward, step. No host
  sync unless the finite checks are on.
* :func:`build_adapter`, :func:`build_augment`, :func:`build_optimizer` — the library objects a run
  config asks for.
* :func:`make_loader` — batches of in-memory images through a (Distributed)Sampler reseeded per epoch.
* :func:`evaluate` — per-epoch held-out metrics: CCA(inv, eq) with its null baseline, gate usage,
  kNN accuracy of backbone features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from common.datasets import PretrainData, to_float
from common.knn import knn_accuracy

__all__ = [
    "NonFiniteError", "SSLModel", "all_finite", "build_adapter", "build_augment", "build_head_module", "build_optimizer",
    "evaluate", "extract_features", "make_loader", "original_view", "progress", "train_step",
]


class NonFiniteError(RuntimeError):
    """Training met a NaN/Inf (input, features or loss) and stopped before it reached any saved state."""


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every value of every tensor is finite, on every rank (one host sync; one all-reduce when
    distributed, so that all ranks stop together instead of waiting on each other)."""
    ok = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = ok.to(torch.int32).reshape(1)
        flag = flag.cuda() if dist.get_backend() == "nccl" else flag.cpu()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(ok)


class SSLModel(nn.Module):
    """Backbone and adapter; ``forward`` returns the adapter's output (``.loss``, ``.losses``, ...).

    With ``check_finite`` the views are checked before the backbone and the features before the
    adapter (so before the BatchNorm layers of the backbone, the head and the predictor, and before
    the parameter normaliser update their running statistics); a NaN/Inf raises :class:`NonFiniteError`
    on every rank. Each check is one host-device synchronisation. The forward takes tensors only (no
    per-step Python value), so ``torch.compile`` builds one graph for every step.

    ``channels_last`` puts the views in the channels-last memory format the convolutions of a CUDA
    backbone prefer (pair it with ``backbone.to(memory_format=torch.channels_last)``).
    """

    def __init__(self, backbone: nn.Module, adapter: nn.Module, *, joint: bool = True, check_finite: bool = False,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.joint = joint
        self.check_finite = check_finite
        self.channels_last = channels_last

    def _require_finite(self, what: str, *tensors: torch.Tensor) -> None:
        if self.check_finite and not all_finite(*tensors):
            raise NonFiniteError(f"NaN/Inf in the {what}; stopped before it reached the BatchNorm statistics")

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> Any:
        views = (x1, x2, x0, p1, p2) if self.joint else (x1, x2)
        self._require_finite("augmented views or their parameters", *views)
        h1, h2 = self._features(x1), self._features(x2)
        if not self.joint:
            self._require_finite("backbone features", h1, h2)
            return self.adapter(h1, h2)
        h0 = self._features(x0)
        self._require_finite("backbone features", h1, h2, h0)
        return self.adapter(h1, h2, h0=h0, params1=p1, params2=p2)


def train_step(model: Callable[..., Any], aug: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, *,
               generator: torch.Generator | None = None, backward: Callable[[torch.Tensor], Any] | None = None,
               check_finite: bool = False) -> Any:
    """One optimiser step on a batch of float ``images`` already on the device; returns the model's output.

    Two views and the original x0 (STAR, arXiv 2510.27222, Sec. 3: ``L = L_inv + λ·L_eq``) go through
    ``model`` (an :class:`SSLModel`, possibly wrapped by Fabric / DDP / ``torch.compile``); ``backward``
    (default ``loss.backward()``; ``fabric.backward`` scales an fp16 loss) and ``opt.step()`` follow.
    Nothing here reads a value back to the host unless ``check_finite`` (then a NaN/Inf loss raises
    :class:`NonFiniteError` before the optimiser step).
    """
    x1, p1 = aug(images, generator=generator)
    x2, p2 = aug(images, generator=generator)
    x0 = original_view(aug, images)
    out = model(x0, x1, x2, p1, p2)
    opt.zero_grad(set_to_none=True)
    (backward or torch.Tensor.backward)(out.loss)
    if check_finite and not all_finite(out.loss):
        raise NonFiniteError("non-finite loss; stopped before the optimiser step")
    opt.step()
    return out


def build_adapter(cfg: dict[str, Any], feat_dim: int, *, distributed: bool = False) -> nn.Module:
    """The ``star_heads.adapters`` adapter of ``cfg['method']`` with ``cfg['head']``."""
    from star_heads import adapters
    from star_heads.augment import PARAM_DIM

    cls = {"simclr": adapters.SimCLRAdapter, "vicreg": adapters.VICRegAdapter, "equimod": adapters.EquiModAdapter}
    # cca_every=0: the examples measure CCA(inv, eq) on a fixed held-out set every epoch instead of on
    # training batches (and a resumed run then logs exactly what an uninterrupted one does).
    kwargs: dict[str, Any] = dict(head=build_head_module(cfg, feat_dim), param_dim=PARAM_DIM,
                                  lam=cfg["lam"], gather=distributed, predictor=cfg.get("predictor", "star"),
                                  cca_every=cfg.get("cca_every", 0))
    if cfg["method"] != "vicreg":
        kwargs.update(temperature=cfg["temperature"], eq_temperature=cfg["temperature"])
    return cls[cfg["method"]](feat_dim, **kwargs)


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD with the run's learning rate (``lr_effective``: ``--lr``, or ``--lr × batch / 256`` with
    ``--lr-rule paper``) and weight-decay policy (``no-bias-norm``: :func:`star_heads.param_groups`, no
    decay on biases and norm layers; ``all``: decay on every parameter, as the STAR paper's runs)."""
    from star_heads import param_groups

    lr = cfg.get("lr_effective", cfg["lr"])
    if cfg.get("wd_policy", "no-bias-norm") == "all":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(param_groups(model, cfg["weight_decay"]), lr=lr, momentum=cfg["momentum"])


def build_head_module(cfg: dict[str, Any], feat_dim: int) -> nn.Module:
    """The projection head of ``cfg``: ``head``, ``num_experts``, ``hidden_dim``, ``embed_dim``, ``match_params``
    and ``router_init``.

    ``equimod`` is EquiMod's head shape (``SeparateHeads.equimod``, hidden ``cfg['hidden_dim']`` or 2048);
    ``match_params`` sizes a baseline kind to the STAR head with ``num_experts`` experts (``build_head``).
    A ``router_init`` other than ``default`` is passed to ``build_head`` as ``router_init=``. The hidden width is
    ``cfg['hidden_dim']`` or the backbone's feature width (the paper's expert shape).
    """
    from star_heads import SeparateHeads, build_head

    hidden, dim = cfg.get("hidden_dim"), cfg.get("embed_dim", 128)
    if cfg["head"] == "equimod":
        return SeparateHeads.equimod(feat_dim, hidden_dim=hidden or 2048, output_dim=dim)
    star_sized = cfg["head"] == "star" or cfg.get("match_params", False)
    options: dict[str, Any] = {}
    if cfg.get("router_init", "default") != "default":
        options["router_init"] = cfg["router_init"]
    # the paper's expert shape (d -> d -> d -> embed, arXiv 2510.27222, Sec. 4) unless --hidden-dim says otherwise
    return build_head(cfg["head"], feat_dim, output_dim=dim, hidden_dim=hidden or feat_dim,
                      num_experts=cfg["num_experts"] if star_sized else None,
                      match_params=cfg.get("match_params", False), **options)


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


def _autocast(device: torch.device, amp_enabled: bool, autocast: Callable[[], Any] | None) -> Any:
    if autocast is not None:
        return autocast()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, aug: nn.Module | None, device: torch.device,
                     *, amp_enabled: bool = False, batch_size: int = 512,
                     autocast: Callable[[], Any] | None = None) -> torch.Tensor:
    """Backbone features ``[n, d]`` (float32, on ``device``) of un-augmented images, in eval mode.

    ``autocast`` (e.g. ``fabric.autocast``) gives the precision context; else ``amp_enabled`` means bf16.
    """
    out = []
    with _eval_mode(backbone):
        for chunk in images.split(batch_size):
            x = to_float(chunk.to(device, non_blocking=True))
            if aug is not None:
                x = original_view(aug, x)
            with _autocast(device, amp_enabled, autocast):
                out.append(backbone(x).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate(backbone: nn.Module, adapter: nn.Module, data: PretrainData, aug: nn.Module, device: torch.device,
             *, amp_enabled: bool = False, batch_size: int = 512, cache: dict | None = None,
             autocast: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Held-out metrics of one epoch.

    Returns ``cca_mean``, ``cca_null`` (mean canonical correlation between the invariant and
    equivariant embeddings of the held-out images, and the same for shuffled pairs), ``cca_rank``,
    ``gate_mean`` ([T][N] mean gate per task and expert), ``gate_entropy``, ``effective_experts``
    (per task), ``task_overlap`` (per expert: min over tasks / max over tasks of its mean gate) and ``knn_acc`` (weighted 20-NN on backbone features, bank → held-out labels).
    Entries that do not apply (no equivariant embedding, no router) are None; non-finite held-out features
    raise :class:`NonFiniteError`. Pass the same
    ``cache`` dict every epoch: its ``CCAMeter`` (and the meter's cached null baseline) is reused.
    """
    from star_heads.metrics import CCAMeter

    row: dict[str, Any] = {"cca_mean": None, "cca_null": None, "cca_rank": None, "gate_mean": None,
                           "gate_entropy": None, "effective_experts": None, "task_overlap": None, "knn_acc": None}
    kw: dict[str, Any] = dict(amp_enabled=amp_enabled, batch_size=batch_size, autocast=autocast)
    h = extract_features(backbone, data.heldout.images, aug, device, **kw)
    if not bool(torch.isfinite(h).all()):  # once per epoch: the held-out features decide every metric below
        raise NonFiniteError("NaN/Inf in the backbone features of the held-out images (the weights diverged)")
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
        bank = extract_features(backbone, data.knn_bank.images, aug, device, **kw)
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

    def set_postfix(self, **kwargs: Any) -> None:
        print(" ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in kwargs.items()), flush=True)

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
