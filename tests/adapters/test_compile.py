"""``torch.compile(adapter)``: one graph, no graph break, no recompile over 21 steps that include CCA steps.

The CCA monitor's step counter and compute step run in the adapter's eager ``__call__`` after the compiled
forward, so the counter is never a guard. ``backend="eager"`` keeps the tests fast (dynamo's tracing and guards
are what is tested, not inductor's code).
"""

import copy
import subprocess
import sys

import pytest
import torch

from star_heads.adapters import EquiModAdapter, SimCLRAdapter, VICRegAdapter

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

B, D, STEPS, EVERY = 32, 16, 21, 5


def _no_recompile():
    # not torch.compiler.set_stance("fail_on_recompile"): that stance also refuses frames dynamo is told to skip
    # (the adapter's eager __call__), which are never compiled; error_on_recompile fails on real recompiles only
    return dynamo.config.patch(error_on_recompile=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _batches(seed=0, local=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        hs = [torch.randn(B, D, generator=g) for _ in range(3 + local)]
        yield hs[:3], [torch.rand(B, 11, generator=g) for _ in range(2)], hs[3:]


def _run(adapter, batches):
    losses, ccas = [], []
    for (h0, h1, h2), (p1, p2), local in batches:
        out = adapter(h1, h2, h0=h0, params1=p1, params2=p2, h_local=local or None)
        out.loss.backward()
        losses.append(out.loss.detach())
        ccas.append(None if out.cca is None else out.cca.mean)
    return losses, ccas


def _check(cls, head, local=0):
    torch.manual_seed(0)
    options = {"num_experts": 4} if head == "star" else {}
    adapter = cls(D, head=head, output_dim=8, cca_every=EVERY, **options)
    reference = copy.deepcopy(adapter)
    first = next(_batches(1, local))
    (h0, h1, h2), (p1, p2), h_local = first
    explained = dynamo.explain(copy.deepcopy(adapter))(h1, h2, h0=h0, params1=p1, params2=p2, h_local=h_local or None)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(adapter, backend="eager")
    batches = list(_batches(2, local))
    got = _run(compiled, batches[:1])  # first call compiles
    with _no_recompile():
        more = _run(compiled, batches[1:])
    got = (got[0] + more[0], got[1] + more[1])
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    want = _run(reference, batches)
    torch.testing.assert_close(torch.stack(got[0]), torch.stack(want[0]))
    steps_with_cca = [i + 1 for i, c in enumerate(got[1]) if c is not None]
    assert steps_with_cca == [5, 10, 15, 20] and adapter.monitor.steps == STEPS
    for mine, theirs in zip(got[1], want[1]):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert mine == pytest.approx(theirs, abs=1e-6)


def test_compiled_simclr_adapter_is_one_graph_over_cca_steps():
    _check(SimCLRAdapter, "star")


@pytest.mark.slow
@pytest.mark.parametrize("cls", [VICRegAdapter, EquiModAdapter])
@pytest.mark.parametrize("head", ["star", "separate"])
def test_compiled_adapters_are_one_graph_over_cca_steps(cls, head):
    _check(cls, head)


@pytest.mark.slow
def test_compiled_multi_crop_step_is_one_graph():
    _check(VICRegAdapter, "star", local=2)


def test_adapter_inside_a_compiled_model_runs_its_monitor_without_recompiling():
    """Compiled as part of a bigger module, the adapter's eager __call__ is one graph break, never a recompile."""
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(10, D)
            self.adapter = SimCLRAdapter(D, num_experts=2, output_dim=8, cca_every=3)

        def forward(self, x0, x1, x2, p1, p2):
            f = self.backbone
            return self.adapter(f(x1), f(x2), h0=f(x0), params1=p1, params2=p2)

    model = torch.compile(Model(), backend="eager")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(B, 10, generator=g) for _ in range(3)]
    ps = [torch.rand(B, 11, generator=g) for _ in range(2)]
    model(*xs, *ps).loss.backward()
    results = []
    with _no_recompile():
        for _ in range(6):
            out = model(*xs, *ps)
            out.loss.backward()
            results.append(out.cca is not None)
    assert results == [False, True, False, False, True, False]  # steps 2..7 of every=3
    assert counters["stats"]["unique_graphs"] <= 3


def test_import_does_not_load_the_compiler():
    code = "import sys, star_heads; assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
