"""solo-learn for real (client tier): replace_projector on every method with a projector, momentum methods
included, and the equivariant mixin. Needs the solo-learn source on PYTHONPATH (commit 9187ea3, setup.py version 1.0.6) and its tests/ helpers."""

import copy

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("lightning")
solo_methods = pytest.importorskip("solo.methods")
solo_utils = pytest.importorskip("tests.methods.utils", reason="solo-learn's tests/ helpers (its checkout on PYTHONPATH)")

from star_heads.heads import STARSimCLRProjectionHead  # noqa: E402
from star_heads.integrations.solo_learn import STAREquivariantMixin, replace_projector  # noqa: E402
from star_heads.integrations.swap import projector_spec  # noqa: E402

SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32, "queue_size": 64, "temperature": 0.2}
KWARGS = {
    "simclr": {"supervised": False},
    "supcon": {"supervised": True},
    "vicreg": {"sim_loss_weight": 25.0, "var_loss_weight": 25.0, "cov_loss_weight": 1.0},
    "vibcreg": {"sim_loss_weight": 25.0, "var_loss_weight": 25.0, "cov_loss_weight": 200.0, "iternorm": False},
    "barlow_twins": {"lamb": 5e-3, "scale_loss": 0.025},
    "byol": {"momentum_classifier": False},
    "mocov2plus": {},
    "mocov3": {},
    "nnbyol": {},
    "nnclr": {},
    "nnsiam": {},
    "ressl": {"temperature_q": 0.1, "temperature_k": 0.04},
    "all4one": {},
    "simsiam": {},
    "wmse": {"proj_output_dim": 4, "whitening_size": 8, "whitening_iters": 1, "whitening_eps": 1e-2},
}
# SwAV and DeepCluster v2 set up their Sinkhorn / k-means state in on_train_start: run them under a Trainer
NEEDS_TRAINER = {
    "swav": {"queue_size": 0, "num_prototypes": 10, "sk_iters": 3, "sk_epsilon": 0.05, "epoch_queue_starts": 0,
             "freeze_prototypes_epochs": 1},
    "deepclusterv2": {"num_prototypes": [10, 10], "kmeans_iters": 3},
}
MOMENTUM = {"byol", "mocov2plus", "mocov3", "nnbyol", "ressl", "all4one"}
BATCH = 8


def _cfg(name, backbone="resnet18"):
    cfg = solo_utils.gen_base_cfg(name, batch_size=BATCH, num_classes=10, momentum=True)
    cfg.data.dataset = "cifar10"  # 32-pixel images
    cfg.backbone.name = backbone
    cfg.method_kwargs = {**SMALL, **KWARGS.get(name, {})}
    return cfg


def _method(name, backbone="resnet18"):
    torch.manual_seed(0)
    return solo_methods.METHODS[name](_cfg(name, backbone))


def test_every_solo_method_with_a_projector_is_covered():
    with_projector = {n for n, cls in solo_methods.METHODS.items() if "self.projector" in _source(cls)}
    assert with_projector == set(KWARGS) | set(NEEDS_TRAINER)
    assert MOMENTUM == {n for n in KWARGS if "momentum_projector" in _source(solo_methods.METHODS[n])}


def _source(cls):
    import inspect

    return inspect.getsource(cls)


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_replace_projector_then_a_training_step_and_the_momentum_update(name):
    model = _method(name, "wide_resnet28w2")  # the smallest solo backbone: 16 methods stay fast
    old = model.projector
    head = replace_projector(model, num_experts=2)
    # the experts keep every Linear's bias (or its absence) exactly as solo built the projector
    old_biases = [m.bias is not None for m in old.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.bias is not None for m in head.experts.to_modules()[0] if isinstance(m, torch.nn.Linear)] == old_biases
    # the swap keeps the projector's hidden norm: BatchNorm where solo has it, none where it has none
    has_bn = any(isinstance(m, torch.nn.BatchNorm1d) for m in old.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == has_bn
    assert model.projector is head and isinstance(head, STARSimCLRProjectionHead)
    spec = projector_spec(old)
    assert (head.input_dim, head.output_dim) == (spec.input_dim, spec.output_dim)
    assert [p.shape[-2:] for p in head.experts.parameters() if p.ndim >= 2][:1]  # experts exist
    ids = {id(p) for g in model.learnable_params for p in g["params"]}
    assert all(id(p) in ids for p in head.parameters())  # the optimiser will see the new head
    if name in MOMENTUM:
        teacher = model.momentum_projector
        assert teacher is not head and type(teacher) is type(head)
        assert [p.shape for p in teacher.parameters()] == [p.shape for p in head.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), head.parameters()))
        assert not any(p.requires_grad for p in teacher.parameters())
        assert any(a is head and b is teacher for a, b in model.momentum_pairs)
    batch, idx = solo_utils.gen_batch(BATCH, 10, "cifar10")
    loss = model.training_step(batch, idx)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)
    loss.backward()
    assert head.router.linear.weight.grad is not None  # the STAR head is in the graph
    if name in MOMENTUM:  # what on_train_batch_end does; crashed before with the old momentum projector
        before = [p.clone() for p in model.momentum_projector.parameters()]
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.1)
        model.momentum_updater.cur_tau = 0.5
        for online, momentum in model.momentum_pairs:
            model.momentum_updater.update(online, momentum)
        for b, m, o in zip(before, model.momentum_projector.parameters(), head.parameters()):
            torch.testing.assert_close(m, 0.5 * b + 0.5 * o)  # the EMA, parameter by parameter


@pytest.mark.parametrize("name", sorted(NEEDS_TRAINER))
def test_methods_that_need_the_trainer_fit_after_the_swap(name):
    cfg = _cfg(name, "wide_resnet28w2")
    cfg.method_kwargs = {**SMALL, **NEEDS_TRAINER[name]}
    torch.manual_seed(0)
    model = solo_methods.METHODS[name](cfg)
    head = replace_projector(model, num_experts=2)
    grads = []
    train_dl, val_dl = solo_utils.prepare_dummy_dataloaders("cifar10", num_large_crops=2, num_classes=10, batch_size=BATCH)
    solo_utils.gen_trainer(cfg, callbacks=[_grad_recorder(grads)]).fit(model, train_dl, val_dl)
    assert model.projector is head and len(grads) == 1
    if name == "deepclusterv2":  # epoch 0 has no k-means assignments yet (zero loss): the bank holds our embeddings
        assert model.local_memory_embeddings[0][:BATCH].abs().sum() > 0
    else:
        assert grads[0]["router"] > 0 and grads[0]["experts"] > 0  # the method's loss trains the STAR head


def _grad_recorder(out, extra=None):
    """A Lightning callback appending the STAR head's gradient sums at each optimiser step."""

    def hook(self, trainer, module, optimizer):
        head = module.projector
        g = {
            "router": head.router.linear.weight.grad.abs().sum().item(),
            "experts": sum(p.grad.abs().sum().item() for p in head.experts.parameters() if p.grad is not None),
        }
        if extra is not None:
            g.update(extra(module))
        out.append(g)

    base = __import__("lightning.pytorch", fromlist=["Callback"]).Callback
    return type("GradRecorder", (base,), {"on_before_optimizer_step": hook})()


@pytest.mark.parametrize("name", ["simclr", "vicreg", "byol", "mocov3"])
def test_fast_dev_run_after_the_swap(name):
    model = _method(name)
    replace_projector(model, num_experts=2)
    start = copy.deepcopy(model.projector.state_dict())
    grads = []
    trainer = solo_utils.gen_trainer(_cfg(name), callbacks=[_grad_recorder(grads)])
    train_dl, val_dl = solo_utils.prepare_dummy_dataloaders("cifar10", num_large_crops=2, num_classes=10, batch_size=BATCH)
    trainer.fit(model, train_dl, val_dl)  # training_step, on_train_batch_end (momentum update), validation
    assert trainer.global_step == 1 and len(grads) == 1
    assert grads[0]["router"] > 0 and grads[0]["experts"] > 0
    if name in MOMENTUM:  # the momentum updater ran on the (online STAR head, momentum STAR head) pair
        teacher = dict(model.momentum_projector.named_parameters())
        assert any(not torch.equal(teacher[k], start[k]) for k in teacher)


def test_hidden_biases_are_kept_exactly_or_dropped_on_request():
    model = _method("simclr", "wide_resnet28w2")  # Linear(bias) -> ReLU -> Linear: no BatchNorm after the bias
    old = copy.deepcopy(model.projector)
    head = replace_projector(model, num_experts=2)
    # an expert loaded with the old projector's weights computes exactly what solo's projector computed
    bank = type(head.experts).from_modules([old, old])
    x = torch.randn(6, old[0].in_features)
    torch.testing.assert_close(bank(x)[:, 0], old(x))
    dropped = replace_projector(_method("simclr", "wide_resnet28w2"), num_experts=2, drop_hidden_bias=True)
    assert dropped.experts.linears[0].bias is None


def test_a_projector_the_experts_cannot_represent_is_refused_by_name():
    cfg = _cfg("vibcreg", "wide_resnet28w2")
    cfg.method_kwargs.iternorm = True  # VIbCReg's optional IterNorm whitening after the last Linear
    model = solo_methods.METHODS["vibcreg"](cfg)
    old = model.projector
    with pytest.raises(ValueError, match="IterNorm"):
        replace_projector(model, num_experts=2)
    assert model.projector is old  # nothing replaced


def test_errors_without_a_projector_or_a_solo_method():
    with pytest.raises(TypeError, match="solo-learn BaseMethod"):
        replace_projector(torch.nn.Linear(2, 2))


class _Images(torch.utils.data.Dataset):
    """solo's batch layout [index, image, target] with un-augmented images in [0, 1]."""

    def __init__(self, n=2 * BATCH):
        from star_heads.data import make_shapes

        self.data = make_shapes(n, image_size=32)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return i, self.data.images[i], int(self.data.factors["shape"][i])


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_equivariant_mixin_trains_both_tasks_in_a_solo_method(name):
    cls = type(f"STAR{name}", (STAREquivariantMixin, solo_methods.METHODS[name]), {})
    torch.manual_seed(0)
    model = cls(_cfg(name), image_size=32, num_experts=2)
    n = model.projector.num_experts
    grads = []

    def extra(module):
        return {
            "eq_router": module.projector.router.linear.weight.grad[n : 2 * n].abs().sum().item(),
            "predictor": [p.grad.abs().sum().item() for p in module.star_predictor.parameters()],
        }

    trainer = solo_utils.gen_trainer(_cfg(name), callbacks=[_grad_recorder(grads, extra)])
    loader = torch.utils.data.DataLoader(_Images(), batch_size=BATCH, drop_last=True)
    trainer.fit(model, loader)
    assert trainer.global_step == 1
    assert grads[0]["eq_router"] > 0 and all(g > 0 for g in grads[0]["predictor"])
    assert "train_star_eq_loss" in trainer.callback_metrics and trainer.callback_metrics["train_star_eq_loss"] > 0


def _star(name):
    return type(f"STAR{name}", (STAREquivariantMixin, solo_methods.METHODS[name]), {})


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"lam": float("inf")}, ValueError, "lam must be a finite float >= 0"),
        ({"lam": float("nan")}, ValueError, "lam must be a finite float >= 0"),
        ({"lam": -1.0}, ValueError, "lam must be a finite float >= 0"),
        ({"std": (0.2, 0.0, 0.2)}, ValueError, r"std must be > 0 per channel"),
        ({"std": (0.2, float("nan"), 0.2)}, ValueError, "std must hold finite floats"),
        ({"mean": (0.5, 0.5)}, ValueError, r"mean must hold 3 values .* got 2"),
        ({"mean": 0.5}, TypeError, "mean must be a sequence of 3 floats"),
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"image_size": None}, ValueError, "pass image_size="),
    ],
)
def test_mixin_refuses_bad_options_before_building_anything(kwargs, err, match):
    built = []
    base = solo_methods.METHODS["simclr"]
    cls = type("Probe", (STAREquivariantMixin, base), {})
    original = base.__init__
    base.__init__ = lambda self, cfg: (built.append(1), original(self, cfg))[1]
    try:
        with pytest.raises(err, match=match):
            cls(_cfg("simclr", "wide_resnet28w2"), **{"image_size": 32, **kwargs})
    finally:
        base.__init__ = original
    assert built == []  # refused before solo built the method


def test_mixin_refuses_a_crop_count_its_augmentations_do_not_draw():
    cfg = _cfg("simclr", "wide_resnet28w2")
    cfg.data.num_small_crops = 2  # solo's multi-crop count without small crops in the recipe
    with pytest.raises(ValueError, match=r"cfg.data asks for 2 large \+ 2 small crops, the augmentations draw 2 \+ 0"):
        _star("simclr")(cfg, image_size=32)


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_the_expert_bank_runs_once_per_view_and_matches_two_single_task_calls(name):
    torch.manual_seed(0)
    model = _star(name)(_cfg(name, "wide_resnet28w2"), image_size=32, num_experts=2)
    head = model.projector
    calls = []
    run_experts = head.experts._run_experts  # the bank's computation (heads call its unchecked path, no hooks)

    def counted(x):
        calls.append(x.shape)
        return run_experts(x)

    head.experts._run_experts = counted
    seen = []
    hook = head.register_forward_hook(lambda m, a, k, o: seen.append((a[0].detach(), k.get("task"), o)), with_kwargs=True)
    try:
        images = torch.rand(BATCH, 3, 32, 32)
        loss = model.training_step([torch.arange(BATCH), images, torch.zeros(BATCH, dtype=torch.long)], 0)
    finally:
        del head.experts._run_experts
        hook.remove()
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)
    assert len(calls) == 3  # two views (both tasks in one call each) and the original (eq only): was 5
    # the method's two calls ran both tasks at once (task=None); each task equals a single-task call on the same
    # features (BatchNorm in training mode normalises with the batch's own statistics, so repeated calls agree)
    assert [task for _, task, _ in seen] == [None, None, "eq"]
    with torch.no_grad():
        for feats, _, out in seen[:2]:
            torch.testing.assert_close(out["inv"], head(feats))
            torch.testing.assert_close(out["eq"], head(feats, task="eq"))
