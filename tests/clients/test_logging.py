"""Readouts log into the hosts unchanged (client tier): Lightning's log_dict, TensorBoard's add_scalars, and a
Lightning fit with a tiny CCA window."""

import pytest
import torch
from torch import nn

from star_heads import SimCLRAdapter, STARHead

L = pytest.importorskip("lightning.pytorch")

from star_heads.integrations.lightning import STARLoggingCallback  # noqa: E402

BATCH = 16


def _loader(steps, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * BATCH, d, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=BATCH)


class JointModule(L.LightningModule):
    """Features + two noisy 'views' with random 11-D parameters: enough to drive the adapter."""

    def __init__(self, output_dim=128, cca_every=2):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 32), nn.ReLU())
        self.adapter = SimCLRAdapter(32, num_experts=4, output_dim=output_dim, cca_every=cca_every)
        self.logged = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h0, h1, h2 = self.backbone(x), self.backbone(x + 0.1 * torch.randn_like(x)), self.backbone(x - 0.1)
        out = self.adapter(h1, h2, h0=h0, params1=torch.rand(len(x), 11), params2=torch.rand(len(x), 11))
        values = out.as_dict("train/")
        assert all(type(v) is float for v in values.values())  # nothing Lightning would refuse
        self.log_dict(values)
        self.logged.append(values)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _sync_guard():
    """tests/sync_guard.py, loaded by path: in the client tier the name `tests` is solo-learn's tests/ package."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_sync_guard", Path(__file__).resolve().parents[1] / "sync_guard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(steps, callbacks=()):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


def test_fit_with_a_tiny_cca_window_completes_and_logs_cca_once_enough_rows():
    torch.manual_seed(0)
    model = JointModule(output_dim=128, cca_every=2)  # 2 steps x 2 views x 16 rows = 64 rows, far below 2(p + q) = 512
    trainer = _trainer(20, [STARLoggingCallback(every=1)])
    trainer.fit(model, _loader(20))
    assert trainer.global_step == 20
    with_cca = [i for i, v in enumerate(model.logged) if "train/cca/mean" in v]
    assert with_cca and with_cca[0] >= 3  # the monitor waited for enough samples instead of raising
    first = model.logged[with_cca[0]]
    assert 0.0 <= first["train/cca/mean"] <= 1.0 and first["train/cca/n"] >= 2 * 128
    assert "train/cca/null_mean" in first
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/inv", "train/eq", "train/routing/eq/entropy"} <= set(metrics)
    assert {"star/cca/mean", "star/cca/null_mean", "star/routing/inv/effective_experts"} <= set(metrics)
    assert float(metrics["star/cca/mean"]) == pytest.approx(model.logged[with_cca[-1]]["train/cca/mean"])


def test_callback_on_a_bare_head_logs_routing_and_its_own_cca():
    class HeadModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = STARHead(10, 8, num_experts=3)

        def training_step(self, batch, batch_idx):
            out = self.head(batch[0])  # both tasks (HeadOutput)
            return out["inv"].pow(2).mean() + out["eq"].pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = HeadModule()
    trainer = _trainer(6, [STARLoggingCallback(every=1, cca_every=2)])
    trainer.fit(model, _loader(6))
    metrics = trainer.callback_metrics
    assert {"star/routing/inv/entropy", "star/routing/eq/expert_2/load", "star/cca/mean"} <= set(metrics)
    loads = [float(metrics[f"star/routing/eq/expert_{k}/load"]) for k in range(3)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)


def test_callback_finds_nothing_to_log_says_so():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(10, 2)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    with pytest.raises(ValueError, match="holds no STAR adapter"):
        _trainer(1, [STARLoggingCallback()]).fit(Plain(), _loader(1))


def test_readouts_go_into_tensorboard_add_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    adapter = SimCLRAdapter(16, num_experts=2, output_dim=4, cca_every=1)
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(64, 16, generator=g) for _ in range(3)]
    out = adapter(h[1], h[2], h0=h[0], params1=torch.rand(64, 11, generator=g), params2=torch.rand(64, 11, generator=g))
    values = out.as_dict()
    assert out.cca is not None and "cca/mean" in values
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalars("star", values, global_step=3)
    writer.close()
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    runs.Reload()
    read = {}
    for run in runs.Runs():
        for tag in runs.Runs()[run]["scalars"]:
            (event,) = runs.Scalars(run, tag)
            read[run] = (event.step, event.value)
    assert len(read) == len(values)
    by_key = {run.split("star_", 1)[1]: v for run, v in read.items()}  # one run per key: <main tag>_<key>
    for key, value in values.items():
        step, got = by_key[key]
        assert step == 3 and got == pytest.approx(value, rel=1e-6)


class RecordingJoint(JointModule):
    """Records every CCA result with the trainer's global_step while its batch ran (the step it was computed)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cca_at: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h0, h1, h2 = self.backbone(x), self.backbone(x + 0.1 * torch.randn_like(x)), self.backbone(x - 0.1)
        out = self.adapter(h1, h2, h0=h0, params1=torch.rand(len(x), 11), params2=torch.rand(len(x), 11))
        if out.cca is not None:
            self.cca_at.append((self.trainer.global_step, out.cca.mean))
        return out.loss


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events += [(e.step, e.value) for e in acc.Scalars(tag)]
    return events


@pytest.mark.parametrize("log_every_n_steps", [1, 5])
def test_every_cca_result_reaches_tensorboard_once_at_its_step(tmp_path, log_every_n_steps):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    model = RecordingJoint(output_dim=4, cca_every=2)  # a result every 2 steps once enough rows: steps 1, 3, 5, ...
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="run"),
                        log_every_n_steps=log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[STARLoggingCallback(every=3)])
    trainer.fit(model, _loader(12))
    assert len(model.cca_at) >= 4
    read = _scalars(tmp_path, "star/cca/mean")
    assert [s for s, _ in read] == [s for s, _ in model.cca_at]  # each once, at its step, nothing stale in between
    for (_, got), (_, want) in zip(read, model.cca_at):
        assert got == pytest.approx(want, rel=1e-6)
    # routing and collapse readouts: once per `every` optimiser steps, at those steps
    assert [s for s, _ in _scalars(tmp_path, "star/routing/inv/entropy")] == [0, 3, 6, 9]
    ranks = _scalars(tmp_path, "star/collapse/eq/rank")
    assert [s for s, _ in ranks] == [0, 3, 6, 9] and all(1.0 <= v <= 4.0 + 1e-4 for _, v in ranks)


def test_the_callback_logs_once_per_optimiser_step_under_gradient_accumulation():
    torch.manual_seed(0)
    model = JointModule(output_dim=4, cca_every=1000)
    logged = []

    class Counting(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            logged.append(dict(trainer.callback_metrics))

    callback = STARLoggingCallback(every=1)
    emitted = []
    original = callback._emit
    callback._emit = lambda trainer, module, values, step: (emitted.append((step, sorted(values))), original(trainer, module, values, step))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, accumulate_grad_batches=2,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback, Counting()])
    trainer.fit(model, _loader(6))
    assert trainer.global_step == 3 and len(logged) == 6  # 6 micro-batches
    assert [s for s, _ in emitted] == [0, 1, 2]  # one emission per optimiser step, at its step
    assert all("star/routing/inv/entropy" in keys and "star/collapse/inv/std" in keys for _, keys in emitted)


def test_capture_and_non_logging_steps_are_sync_free():
    """Between logging steps the callback only keeps references: no host read (meta stands in for CUDA)."""
    from types import SimpleNamespace

    HostSyncGuard = _sync_guard().HostSyncGuard

    head = STARHead(10, 8, num_experts=3, device="meta")
    trainer = SimpleNamespace(global_step=1, loggers=[])
    callback = STARLoggingCallback(every=50, cca_every=1000)
    callback.on_fit_start(trainer, head)
    x = torch.empty(16, 10, device="meta")
    with HostSyncGuard("meta"):
        z_inv, z_eq = head(x, task="inv"), head(x, task="eq")  # the hook keeps gates and each task's embedding
        trainer.global_step = 2  # an optimiser step happened; step 1 is not a logging step for every=50
        callback.on_train_batch_end(trainer, head, None, None, 0)
    assert z_inv.shape == z_eq.shape == (16, 8)
    assert callback._last_gates is not None and callback._last_gates.device.type == "meta"
    assert set(callback._last_embeddings) == {"inv", "eq"}  # the task of each single-task call
    callback.on_fit_end(trainer, head)


class ParamsJoint(JointModule):
    """Views whose features depend on known parameters; records each step's embeddings and parameters."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps: dict[int, dict] = {}

    def training_step(self, batch, batch_idx):
        (x,) = batch
        p1, p2 = torch.rand(len(x), 11), torch.rand(len(x), 11)
        h0 = self.backbone(x)
        h1, h2 = self.backbone(x + p1[:, :10]), self.backbone(x + p2[:, :10])
        out = self.adapter(h1, h2, h0=h0, params1=p1, params2=p2)
        self.steps[self.trainer.global_step] = {**{k: out.embeddings[k].detach().clone() for k in
                                                   ("inv1", "inv2", "eq1", "eq2")}, "params1": p1, "params2": p2}
        return out.loss


def test_equivariance_readout_logs_each_embeddings_r2_at_its_steps():
    from star_heads.augment import PARAM_NAMES
    from star_heads.metrics import augmentation_r2, parameter_groups

    torch.manual_seed(0)
    model = ParamsJoint(output_dim=8, cca_every=1000)
    callback = STARLoggingCallback(every=5, equivariance_every=2)
    emitted = []
    original = callback._emit
    callback._emit = lambda trainer, module, values, step: (emitted.append((step, dict(values))), original(trainer, module, values, step))
    trainer = _trainer(7, [callback])
    trainer.fit(model, _loader(7))
    assert [s for s, _ in emitted] == [0, 2, 4, 5, 6]
    groups = set(parameter_groups(PARAM_NAMES))
    for step, values in emitted:
        eq_keys = {k for k in values if k.startswith("star/equivariance/")}
        routing = any(k.startswith("star/routing/") for k in values)
        assert routing == (step % 5 == 0)  # the routine readouts keep their own period
        if step % 2:
            assert not eq_keys
            continue
        assert eq_keys == {f"star/equivariance/{t}/r2/{g}" for t in ("inv", "eq") for g in groups}
        rec = model.steps[step]  # the same step's pairs of views and parameters, scored independently
        for task in ("inv", "eq"):
            want = augmentation_r2(rec[f"{task}1"], rec[f"{task}2"], rec["params1"], rec["params2"])
            for g, r2 in want.groups.items():
                assert values[f"star/equivariance/{task}/r2/{g}"] == pytest.approx(r2, rel=1e-4, abs=1e-6)


def test_equivariance_readout_needs_a_joint_adapter_and_names_for_other_parameter_vectors():
    with pytest.raises(ValueError, match="needs a STAR adapter"):
        STARLoggingCallback(equivariance_every=1).on_fit_start(None, STARHead(10, 8, num_experts=3))
    adapter = SimCLRAdapter(16, num_experts=2, output_dim=4, param_dim=12)
    trainer = type("T", (), {"global_step": 0})()
    with pytest.raises(ValueError, match="param_names= for the adapter's 12"):
        STARLoggingCallback(equivariance_every=1).on_fit_start(trainer, adapter)
    with pytest.raises(ValueError, match="param_names has 11 names, the adapter takes 12"):
        from star_heads.augment import PARAM_NAMES

        STARLoggingCallback(equivariance_every=1, param_names=PARAM_NAMES).on_fit_start(trainer, adapter)
    with pytest.raises(ValueError, match="equivariance_every must be >= 0"):
        STARLoggingCallback(equivariance_every=-1)
    callback = STARLoggingCallback(equivariance_every=1, param_names=[f"p{i}" for i in range(12)])
    callback.on_fit_start(trainer, adapter)  # accepted; nothing else is logged before a step
    callback.on_fit_end(trainer, adapter)


def test_equivariance_capture_between_its_steps_is_sync_free():
    """With the readout on, a joint call between its steps only keeps references (meta stands in for CUDA)."""
    from types import SimpleNamespace

    sync_guard = _sync_guard()
    adapter = SimCLRAdapter(16, num_experts=2, output_dim=4, cca_every=0, device="meta")
    trainer = SimpleNamespace(global_step=1, loggers=[])
    callback = STARLoggingCallback(every=50, equivariance_every=50)
    callback.on_fit_start(trainer, adapter)
    h = [torch.empty(8, 16, device="meta") for _ in range(3)]
    p = [torch.empty(8, 11, device="meta") for _ in range(2)]
    with sync_guard.HostSyncGuard("meta"):
        adapter(h[1], h[2], h0=h[0], params1=p[0], params2=p[1])
        trainer.global_step = 2
        callback.on_train_batch_end(trainer, adapter, None, None, 0)
    assert set(callback._last_pairs) == {"inv1", "inv2", "eq1", "eq2", "params1", "params2"}
    assert all(t.device.type == "meta" for t in callback._last_pairs.values())
    callback.on_fit_end(trainer, adapter)
