"""lightly's SimCLR / VICReg examples (plain loop and LightningModule) train STAR's joint objective (client tier).

Each example runs for a few steps on its embedded default (shapes, CPU); the test checks that the loss holds both
terms (L = L_inv + λ·L_eq), that the equivariant router rows and every predictor weight received non-zero
gradients at every step, and that the parameters moved.
"""

import pytest
import torch

pytest.importorskip("lightly")
pytest.importorskip("torchvision")
pytest.importorskip("kornia")

STEPS = 2


def _check(model, rec):
    adapter = model.adapter
    assert len(rec.outputs) == STEPS and len(rec.grads) == STEPS
    for out in rec.outputs:  # both terms, combined as the paper's objective
        assert {"inv", "eq"} <= set(out.losses)
        assert out.losses["eq"] > 0 and out.losses["inv"] > 0
        torch.testing.assert_close(out.loss.detach(), out.losses["inv"] + adapter.lam * out.losses["eq"])
        assert set(out.embeddings) == {"inv1", "inv2", "eq0", "eq1", "eq2", "pred1", "pred2"}
    n = adapter.head.num_experts
    eq = adapter.head.tasks.index("eq")
    router = adapter.head.router.linear.weight
    predictor = [p for p in adapter.predictor.parameters() if p.requires_grad]
    assert predictor
    for grads in rec.grads:
        assert grads[id(router)][eq * n : (eq + 1) * n].abs().sum() > 0  # the equivariant router rows
        assert all(grads[id(p)].abs().sum() > 0 for p in predictor)  # every predictor weight
        assert grads[id(model.backbone.conv1.weight)].abs().sum() > 0  # and the backbone


@pytest.mark.parametrize("name", ["lightly_simclr", "lightly_vicreg"])
def test_plain_loop_example_trains_both_tasks(name, recorder, load_example, capsys):
    example = load_example(name)
    torch.manual_seed(0)
    model = example.main(["--steps", str(STEPS), "--batch-size", "8"])
    _check(model, recorder)
    printed = capsys.readouterr().out
    assert f"step {STEPS}: loss" in printed and "eq " in printed


@pytest.mark.parametrize("name", ["lightly_simclr_lightning", "lightly_vicreg_lightning"])
def test_lightning_example_trains_both_tasks(name, recorder, load_example):
    pytest.importorskip("pytorch_lightning")
    example = load_example(name)
    torch.manual_seed(0)
    model, trainer = example.main(["--steps", str(STEPS), "--batch-size", "8"])
    assert trainer.global_step == STEPS
    _check(model, recorder)
    logged = trainer.callback_metrics  # self.log_dict(out.as_dict(...)) and the callback's routing readouts
    assert {"train/loss", "train/inv", "train/eq"} <= set(logged)
    assert {"star/routing/inv/entropy", "star/routing/eq/effective_experts", "star/routing/expert_0/task_overlap"} <= set(logged)
