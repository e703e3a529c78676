"""CCAMonitor: results every `every` steps over the right window, detaching, logging, errors."""

import warnings

import pytest
import torch

from star_heads.metrics import CCAMonitor, CCAResult, CCASampleSizeWarning, canonical_correlations, svcca


def _steps(k, b=64, p=6, q=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randn(b, p, generator=g)
        y = torch.cat([x[:, :2] + 0.5 * torch.randn(b, 2, generator=g), torch.randn(b, q - 2, generator=g)], 1)
        out.append((x, y))
    return out


def _ref(batches):
    return canonical_correlations(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))


def test_disjoint_windows_every_k_steps():
    batches = _steps(9)
    logged = []
    monitor = CCAMonitor(every=3, log=lambda step, r: logged.append((step, r)))
    outs = [monitor.update(x, y) for x, y in batches]
    assert [o is not None for o in outs] == [False, False, True] * 3
    for i, o in enumerate(outs[2::3]):
        assert isinstance(o, CCAResult) and o.n == 3 * 64 and o.null_mean is not None
        torch.testing.assert_close(o.correlations, _ref(batches[3 * i:3 * i + 3]), atol=1e-10, rtol=0)
    assert monitor.last is outs[-1]
    assert [s for s, _ in logged] == [3, 6, 9] and logged[-1][1] is outs[-1]


def test_sliding_window_covers_the_last_window_steps():
    batches = _steps(8)
    monitor = CCAMonitor(every=2, window=6, null_baseline=False)
    outs = [monitor.update(x, y) for x, y in batches]
    assert outs[1].n == 128 and outs[3].n == 256 and outs[5].n == 384 and outs[7].n == 384
    torch.testing.assert_close(outs[7].correlations, _ref(batches[2:8]), atol=1e-10, rtol=0)
    torch.testing.assert_close(outs[3].correlations, _ref(batches[0:4]), atol=1e-10, rtol=0)
    assert outs[7].null_mean is None


def test_detaches_inputs_and_ignores_autocast():
    batches = _steps(2)
    w = torch.randn(6, 6, requires_grad=True)
    monitor = CCAMonitor(every=2)
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in batches:
            z = x @ w  # bf16, part of an autograd graph
            seen.append((z.detach(), y))
            out = monitor.update(z, y)
    assert z.dtype == torch.bfloat16 and z.requires_grad and not out.correlations.requires_grad
    ref = _ref(seen)
    torch.testing.assert_close(out.correlations, ref, atol=1e-10, rtol=0)


def test_reset_restarts_the_count():
    batches = _steps(4)
    monitor = CCAMonitor(every=2)
    assert monitor.update(*batches[0]) is None
    monitor.reset()
    assert monitor.update(*batches[1]) is None
    out = monitor.update(*batches[2])
    torch.testing.assert_close(out.correlations, _ref(batches[1:3]), atol=1e-10, rtol=0)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="multiple of every=4"):
        CCAMonitor(every=4, window=6)
    with pytest.raises(ValueError, match="every must be >= 1"):
        CCAMonitor(every=0)
    with pytest.raises(ValueError, match="ridge"):
        CCAMonitor(ridge=-0.1)
    monitor = CCAMonitor(every=2)
    with pytest.raises(ValueError, match="2 dimensions"):
        monitor.update(torch.randn(8), torch.randn(8, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        monitor.update([[1.0]], torch.randn(1, 2))
    monitor.update(torch.randn(64, 6), torch.randn(64, 4))
    with pytest.raises(ValueError, match=r"expected x \[n, 6\]"):
        monitor.update(torch.randn(64, 5), torch.randn(64, 4))
    monitor.update(torch.randn(64, 6), torch.randn(64, 4))  # a result: the next step starts a new chunk
    with pytest.raises(ValueError, match=r"expected x \[n, 6\] and y \[n, 4\]"):
        monitor.update(torch.randn(64, 6), torch.randn(64, 3))
    with pytest.raises(ValueError, match="same number of samples"):
        monitor.update(torch.randn(64, 6), torch.randn(63, 4))
    assert monitor.steps == 2  # rejected steps are not counted
    with pytest.raises(TypeError, match="log must be a callable"):
        CCAMonitor(log="print")
    with pytest.raises(TypeError, match="ridge must be a real number"):
        CCAMonitor(ridge="0.1")


def test_non_finite_embeddings_raise_at_the_reporting_step():
    monitor = CCAMonitor(every=2)
    assert monitor.update(torch.full((64, 3), float("nan")), torch.randn(64, 3)) is None  # no per-step sync
    with pytest.raises(ValueError, match="not finite"):
        monitor.update(torch.randn(64, 3), torch.randn(64, 3))


def test_short_window_accumulates_until_enough_samples_and_warns_once():
    batches = _steps(12, b=8, p=8, q=4)  # need 2(p + q) = 24 samples: 3 steps of 8 rows
    monitor = CCAMonitor(every=1)
    with pytest.warns(CCASampleSizeWarning, match=r"n=8 samples.*needs n >= 24.*said once") as record:
        outs = [monitor.update(x, y) for x, y in batches[:3]]
    assert len(record) == 1
    assert outs[:2] == [None, None] and outs[2].n == 24
    torch.testing.assert_close(outs[2].correlations, _ref(batches[:3]), atol=1e-10, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: no second warning, and 24 rows raise no bias warning either
        later = [monitor.update(x, y) for x, y in batches[3:]]
    # afterwards the window slides over the last steps that hold >= 24 samples: 3 steps
    assert all(o is not None and o.n == 24 for o in later)
    torch.testing.assert_close(later[-1].correlations, _ref(batches[-3:]), atol=1e-10, rtol=0)


def test_min_samples_and_a_window_shorter_than_needed():
    batches = _steps(6, b=10, p=6, q=4)
    monitor = CCAMonitor(every=2, min_samples=30, null_baseline=False)
    with pytest.warns(CCASampleSizeWarning, match="needs n >= 30"):
        outs = [monitor.update(x, y) for x, y in batches]
    assert [o is None for o in outs] == [True, True, True, False, True, False]
    assert outs[3].n == 40 and outs[5].n == 40  # whole `every` chunks: 4 steps
    torch.testing.assert_close(outs[5].correlations, _ref(batches[2:6]), atol=1e-10, rtol=0)
    assert CCAMonitor(min_samples=1).needed_samples(6, 4) == 8  # never below max(p, q) + 2
    with pytest.raises(ValueError, match="min_samples must be >= 1"):
        CCAMonitor(min_samples=0)


def test_readouts_as_flat_dict_of_floats():
    batches = _steps(2, b=128)
    out = None
    monitor = CCAMonitor(every=2, svcca_keep=0.99)
    for x, y in batches:
        out = monitor.update(x, y)
    d = out.as_dict("cca/")
    assert set(d) == {"cca/mean", "cca/null_mean", "cca/excess", "cca/rank_x", "cca/rank_y", "cca/n", "cca/svcca"}
    assert all(type(v) is float for v in d.values())
    assert d["cca/mean"] == out.mean and d["cca/excess"] == pytest.approx(out.mean - out.null_mean)
    assert (d["cca/rank_x"], d["cca/rank_y"], d["cca/n"]) == (6.0, 4.0, 256.0)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert d["cca/svcca"] == pytest.approx(float(svcca(x, y, keep=0.99)), abs=1e-10)
    bare = CCAMonitor(every=2, null_baseline=False)
    for x, y in batches:
        out = bare.update(x, y)
    assert set(out.as_dict()) == {"mean", "rank_x", "rank_y", "n"}  # absent readouts are left out, never NaN
    with pytest.raises(TypeError, match="prefix must be a str"):
        out.as_dict(1)


def test_as_dict_goes_into_tensorboard_unchanged(tmp_path):
    tb = pytest.importorskip("torch.utils.tensorboard")
    monitor = CCAMonitor(every=1)
    result = monitor.update(torch.randn(64, 4), torch.randn(64, 4))
    writer = tb.SummaryWriter(str(tmp_path))
    writer.add_scalars("cca", result.as_dict(), global_step=1)
    writer.close()
    assert any(tmp_path.rglob("events.out.tfevents.*"))


def test_update_does_not_sync_with_the_host(monkeypatch):
    monitor = CCAMonitor(every=3)
    x, y = torch.randn(64, 6), torch.randn(64, 4)
    calls = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: calls.append(_n) or _o(self, *a))
    monitor.update(x, y)
    monitor.update(x, y)
    monkeypatch.undo()
    assert calls == []


def test_lightning_fit_with_a_short_window_logs_the_readouts():
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 16)
            self.monitor = CCAMonitor(every=2)  # 8 rows per step, 2(p + q) = 32 rows needed: reports from step 4
            self.logged = []

        def training_step(self, batch, batch_idx):
            z = self.net(batch[0])
            result = self.monitor.update(z[:, :8], z[:, 8:])
            if result is not None:
                self.log_dict(result.as_dict("cca/"))
                self.logged.append(result.as_dict("cca/"))
            return z.pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(64, 8))
    module = Module()
    trainer = lightning.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert sum(issubclass(w.category, CCASampleSizeWarning) for w in record) == 1
    assert [d["cca/n"] for d in module.logged] == [32.0, 32.0, 32.0]  # steps 4, 6, 8
    assert trainer.callback_metrics["cca/mean"].item() == pytest.approx(module.logged[-1]["cca/mean"])
    assert {"cca/null_mean", "cca/excess", "cca/rank_x", "cca/rank_y"} <= set(trainer.callback_metrics)
