"""pretrain.py on a GPU without one: a sync-free step (meta device), one compiled graph, precision, rank-zero data."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
pytest.importorskip("kornia")

from common.training import build_augment, train_step  # noqa: E402
from sync_guard import HostSyncGuard  # noqa: E402

CFG = {"method": "equimod", "head": "star", "num_experts": 2, "lam": 1.0, "temperature": 0.2, "backbone": "convnet",
       "width": 4, "cifar_stem": False, "invariant_only": False, "check_finite": False, "compile": False,
       "momentum": 0.9, "weight_decay": 5e-4, "lr": 0.03, "image_size": 32, "embed_dim": 16}


def _fabric_or_skip() -> None:
    try:
        import lightning_fabric  # noqa: F401
    except ImportError:
        pytest.importorskip("lightning.fabric")


class _FixedViews(nn.Module):
    """Stands in for STARAugment: the batch itself as a view, zero parameters (on the batch's device)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"size": (32, 32)})()

    def forward(self, x, generator=None):
        return x * 1.0, x.new_zeros(x.shape[0], 11)


class _StandInAdapter(nn.Module):
    """Stands in for a star_heads adapter: a linear map and a squared loss (no library code)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, 4)

    def forward(self, h1, h2, h0=None, params1=None, params2=None):
        loss = (self.lin(h1) - self.lin(h2)).square().mean() + self.lin(h0).square().mean() + params1.sum() * 0
        return type("Out", (), {"loss": loss, "losses": {"inv": loss}})()


def _meta_step(cfg: dict, part: str):
    import pretrain
    from common.training import build_optimizer

    model, dim = pretrain.build_model(cfg, torch.device("meta"))
    if part == "stand-in adapter":
        model.adapter = _StandInAdapter(dim)
    model.to("meta")
    opt = build_optimizer(model, cfg)
    aug = build_augment(cfg, torch.device("meta")) if part == "adapter + STARAugment" else _FixedViews()
    x = torch.empty(8, 3, 32, 32, device="meta")
    return model, opt, aug, x


_CASES = [("equimod", "star", "stand-in adapter")] + [
    (method, head, part)
    for method, head in (("equimod", "star"), ("simclr", "star"), ("vicreg", "star"), ("equimod", "separate"),
                         ("simclr", "single"))
    for part in ("adapter", "adapter + STARAugment")
]


@pytest.mark.parametrize("method, head, part", _CASES)
def test_the_default_step_makes_no_host_sync(method, head, part):
    """pretrain.py's train_step (views, forward, backward, SGD step) on meta under HostSyncGuard: nothing read back."""
    cfg = {**CFG, "method": method, "head": head, "invariant_only": head == "single"}
    model, opt, aug, x = _meta_step(cfg, part)
    with HostSyncGuard("meta"):
        out = train_step(model, aug, opt, x)
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    assert all(p.grad is not None for p in model.backbone.parameters())  # the step did run backward
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {"meta"}


def test_the_finite_checks_are_the_only_syncs_and_are_opt_in():
    model, opt, aug, x = _meta_step({**CFG, "check_finite": True}, "stand-in adapter")
    with HostSyncGuard("meta", strict=False) as guard:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # meta cannot answer the read itself
            train_step(model, aug, opt, x, check_finite=True)
    assert guard.events and all("_local_scalar_dense" in e or "item" in e or "is_nonzero" in e for e in guard.events)


def test_build_model_places_every_parameter_and_buffer_on_the_device():
    import pretrain

    for head in ("star", "shared", "separate"):
        model, _ = pretrain.build_model({**CFG, "head": head}, torch.device("cpu"))
        model.to("meta")
        devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
        assert devices == {"meta"}, (head, devices)


def _compile_counts(cfg: dict, steps: int) -> tuple[int, int, int, int]:
    """(unique graphs after the first step, after all steps, recompiles, graph breaks) of pretrain's model."""
    import pretrain
    import torch._dynamo as dynamo
    from common.training import build_optimizer
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, _ = pretrain.build_model({**cfg, "compile": True, "compile_backend": "eager"}, torch.device("cpu"))
    opt = build_optimizer(model, cfg)
    aug = build_augment(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=gen)
    graphs = []
    for _ in range(steps):
        train_step(model, aug, opt, x, generator=gen)
        graphs.append(counters["stats"]["unique_graphs"])
        if sum(counters["recompiles"].values()):
            break  # the answer is known: stop before dynamo's recompile limit makes each step slow
    out = graphs[0], graphs[-1], sum(counters["recompiles"].values()), sum(counters["graph_break"].values())
    dynamo.reset()
    return out


@pytest.fixture(scope="module")
def compiled_20_steps():
    return _compile_counts(CFG, 20)


@pytest.mark.slow
def test_compile_builds_its_graphs_once_over_20_steps(compiled_20_steps):
    first, last, recompiles, _ = compiled_20_steps
    assert first >= 1 and last == first and recompiles == 0, compiled_20_steps


@pytest.mark.slow
def test_compile_makes_one_graph_per_compiled_module_and_no_graph_break(compiled_20_steps):
    first, last, _, breaks = compiled_20_steps
    assert first == last == 2 and breaks == 0, compiled_20_steps  # the backbone's graph and the adapter's


@pytest.mark.slow
def test_compile_builds_its_graphs_once_with_cca_steps():
    first, last, recompiles, breaks = _compile_counts({**CFG, "cca_every": 5}, 20)
    assert last == first and recompiles == 0 and breaks == 0, (first, last, recompiles, breaks)


@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")  # Fabric: 16-mixed → bf16-mixed
def test_precision_16_mixed_runs_on_a_cpu_and_fp16_with_a_gradient_scaler(tmp_path):
    _fabric_or_skip()
    import pretrain
    from common.fabric import fabric_module, make_fabric
    from common.training import build_optimizer

    run = pretrain.main(["--out", str(tmp_path / "r"), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8",
                         "--num-train", "16", "--num-heldout", "160", "--width", "4", "--num-experts", "2",
                         "--no-progress", "--precision", "16-mixed"])
    import json

    assert json.loads((run / "config.json").read_text())["precision"] == "16-mixed"
    # fp16 autocast with a gradient scaler, on the CPU: Fabric's own 16-mixed path, given the plugin directly.
    mp = fabric_module().plugins.precision.MixedPrecision
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fabric = make_fabric(torch.device("cpu"), plugins=mp("16-mixed", "cpu", scaler))
    torch.manual_seed(0)
    model, _ = pretrain.build_model(CFG, torch.device("cpu"))
    opt = build_optimizer(model, CFG)
    before = [p.detach().clone() for p in model.parameters()]
    fmodel, fopt = fabric.setup(model, opt)
    aug = build_augment(CFG, torch.device("cpu"))
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = train_step(fmodel, aug, fopt, torch.rand(8, 3, 32, 32), backward=fabric.backward)
    assert seen and set(seen) == {torch.float16}  # the backbone ran under fp16 autocast
    assert torch.isfinite(out.loss) and scaler.get_scale() in (2.0**8, 2.0**7)  # the scaler stepped (or backed off)
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())]
    assert any(changed) == (scaler.get_scale() == 2.0**8)  # an unscaled, finite step updated the weights


def _data_worker(rank: int, world_size: int, root: str) -> dict:
    import os
    import time

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    sys.path.insert(0, os.path.join(root, "examples"))
    import pretrain
    from common.fabric import make_fabric

    fabric = make_fabric(torch.device("cpu"))
    span = {}

    def prepare(*args, **kwargs):  # stands in for a download: slow, and recorded
        span["start"] = time.monotonic()
        time.sleep(0.5)
        span["end"] = time.monotonic()
        return "data"

    pretrain.pretrain_data = prepare
    cfg = {k: None for k in ("dataset", "image_size", "num_train", "num_heldout", "seed", "data_dir", "download")}
    assert pretrain._load_data(cfg, fabric) == "data"
    return {"rank": fabric.global_rank, "world": fabric.world_size, **span}


@pytest.mark.distributed
def test_one_process_per_node_prepares_the_data_while_the_others_wait():
    _fabric_or_skip()
    from dist_utils import run_distributed

    r0, r1 = run_distributed(_data_worker, world_size=2, args=(str(ROOT),))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r1["start"] >= r0["end"]  # rank 1 read the data only after rank 0 had prepared it
