"""swap_projector keeps what it replaces: norm (with options), depth, widths, activation (with options),
last-layer norm and bias, device/dtype; momentum projectors replaced consistently; the rest refused."""

import copy

import pytest
import torch
from torch import nn

from star_heads.expert_layers import ExpertLayerNorm
from star_heads.integrations.swap import projector_spec, swap_projector


class _Method(nn.Module):
    def __init__(self, projector, momentum=False):
        super().__init__()
        first = next(m for m in projector.modules() if isinstance(m, nn.Linear))
        self.backbone = nn.Linear(10, first.in_features)
        self.projector = projector
        if momentum:  # solo-learn: a frozen copy updated by EMA
            self.momentum_projector = copy.deepcopy(projector).requires_grad_(False)


def _structure(seq):
    """Layer types and every option that defines them (not the weights)."""
    out = []
    for m in seq:
        if isinstance(m, nn.Linear):
            out.append(("Linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("BatchNorm1d", m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats))
        elif isinstance(m, nn.LayerNorm):
            out.append(("LayerNorm", m.normalized_shape, m.eps, m.elementwise_affine))
        else:
            out.append((type(m).__name__, repr(m).replace("inplace=True", "").replace(", )", ")").replace("()", "")))
    return out


def _expert_structure(head):
    """Expert 0 of the fused bank, with the bank's own activation modules (they carry the options)."""
    expert = list(head.experts.to_modules()[0])
    acts = iter(head.experts.acts)
    return _structure([next(acts) if not isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.LayerNorm)) else m for m in expert])


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(12, 20, bias=False), nn.BatchNorm1d(20, eps=1e-3, momentum=0.01), nn.ReLU(),
                              nn.Linear(20, 6)),
        lambda: nn.Sequential(nn.Linear(12, 20, bias=False), nn.BatchNorm1d(20, affine=False), nn.LeakyReLU(0.3),
                              nn.Linear(20, 20, bias=False), nn.BatchNorm1d(20, affine=False), nn.LeakyReLU(0.3),
                              nn.Linear(20, 6, bias=False), nn.BatchNorm1d(6, affine=False)),  # EquiMod-like ending
        lambda: nn.Sequential(nn.Linear(12, 20, bias=False), nn.LayerNorm(20, eps=1e-6), nn.GELU(approximate="tanh"),
                              nn.Linear(20, 6)),
        lambda: nn.Sequential(nn.Sequential(nn.Linear(12, 20, bias=False), nn.ReLU()), nn.Identity(), nn.Linear(20, 6)),
    ],
)
def test_swap_keeps_the_architecture(make):
    old = make()
    model = _Method(old)
    hidden = next(m for m in old.modules() if isinstance(m, nn.Linear)).out_features
    head = swap_projector(model, num_experts=3, expert_hidden_dim=hidden)  # the paper's per-expert shape
    assert model.projector is head and head.num_experts == 3
    flat = [m for m in old.modules() if not isinstance(m, (nn.Sequential, nn.Identity))]
    assert _expert_structure(head) == _structure(flat)
    z = model.projector(model.backbone(torch.randn(5, 10)))
    assert isinstance(z, torch.Tensor) and z.shape == (5, 6)
    assert head(torch.randn(5, 12), task="eq").shape == (5, 6)


def test_layer_norm_and_activation_options_reach_the_bank():
    old = nn.Sequential(nn.Linear(8, 16, bias=False), nn.LayerNorm(16, eps=1e-6), nn.GELU(approximate="tanh"), nn.Linear(16, 4))
    head = swap_projector(_Method(old), num_experts=2)
    assert isinstance(head.experts.norms[0], ExpertLayerNorm) and head.experts.norms[0].eps == 1e-6
    assert head.experts.acts[0].approximate == "tanh"


def test_hidden_biases_are_kept_unless_dropped():
    solo_simclr = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))  # solo-learn's SimCLR projector
    head = swap_projector(_Method(solo_simclr), num_experts=2)
    assert all(isinstance(m, nn.Identity) for m in head.experts.norms)  # no BatchNorm added
    expert = head.experts.to_modules()[0]
    assert [type(m) for m in expert] == [type(m) for m in solo_simclr]
    assert all(m.bias is not None for m in expert if isinstance(m, nn.Linear))
    # with the old projector's weights loaded into an expert, the expert computes exactly the old projector
    bank = type(head.experts).from_modules([solo_simclr, solo_simclr])
    x = torch.randn(5, 12)
    torch.testing.assert_close(bank(x)[:, 0], solo_simclr(x))
    dropped = swap_projector(_Method(solo_simclr), drop_hidden_bias=True, num_experts=2)
    assert dropped.experts.linears[0].bias is None and dropped.experts.linears[-1].bias is not None
    spec = projector_spec(nn.Sequential(nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 6)))
    assert spec.hidden_bias and not spec.notes


@pytest.mark.parametrize(
    "layers, match",
    [
        ([nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)], "cannot represent Dropout"),
        ([nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2), nn.ReLU()], "activation after the last Linear"),
        ([nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 2)], "hidden blocks differ"),
        ([nn.Linear(4, 8, bias=False), nn.PReLU(), nn.Linear(8, 2)], "cannot represent PReLU"),
        ([nn.Linear(4, 8, bias=False), nn.Softmax(dim=0), nn.Linear(8, 2)], "cannot represent Softmax"),
        ([nn.ReLU(), nn.Linear(4, 2)], "expected a Linear first"),
        ([nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(7, 2)], "widths do not chain"),
        ([nn.Linear(4, 2)], "single Linear"),
    ],
)
def test_what_cannot_be_represented_is_refused(layers, match):
    m = nn.Module()
    m.projector = nn.Sequential(*layers)
    with pytest.raises(ValueError, match=match):
        swap_projector(m)
    assert isinstance(m.projector, nn.Sequential)  # nothing changed


def test_custom_modules_and_missing_attributes():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) * 2

    m = nn.Module()
    m.projector = Custom()
    with pytest.raises(TypeError, match="its forward is its own"):
        swap_projector(m)
    with pytest.raises(AttributeError, match="no projector module at attribute 'head'"):
        swap_projector(m, "head")


def test_new_head_keeps_device_dtype_and_mode():
    old = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    head = swap_projector(_Method(old), num_experts=2)
    assert all(p.dtype == torch.float64 for p in head.parameters()) and not head.training
    assert head(torch.randn(4, 6, dtype=torch.float64)).dtype == torch.float64


def test_user_options_override_what_was_read():
    old = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    head = swap_projector(_Method(old), num_experts=2, norm_layer=nn.LayerNorm, tasks=("inv", "eq", "aux"))
    assert isinstance(head.experts.norms[0], ExpertLayerNorm) and head.tasks == ("inv", "eq", "aux")


def test_momentum_projector_is_replaced_consistently():
    old = nn.Sequential(nn.Linear(12, 20, bias=False), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 6))
    model = _Method(old, momentum=True)
    head = swap_projector(model, momentum_attr="momentum_projector", num_experts=3)
    target = model.momentum_projector
    assert target is not head and type(target) is type(head)
    online, ema = list(head.named_parameters()), list(target.named_parameters())
    assert [(n, p.shape) for n, p in online] == [(n, p.shape) for n, p in ema]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(online, ema))
    assert all(p.requires_grad for p in head.parameters()) and not any(p.requires_grad for p in target.parameters())
    # solo-learn's MomentumUpdater.update zips the pair's parameters
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
        for op, mp in zip(head.parameters(), target.parameters()):
            mp.data = 0.99 * mp.data + 0.01 * op.data
    x = torch.randn(4, 12)
    assert target(x).shape == head(x).shape == (4, 6)


def test_momentum_projector_of_another_architecture_is_refused():
    model = _Method(nn.Sequential(nn.Linear(12, 20, bias=False), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 6)))
    model.momentum_projector = nn.Sequential(nn.Linear(12, 20, bias=False), nn.ReLU(), nn.Linear(20, 6))
    with pytest.raises(ValueError, match="'momentum_projector' has another architecture than 'projector'"):
        swap_projector(model, momentum_attr="momentum_projector")
    assert isinstance(model.projector, nn.Sequential)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_lightly_simclr_head_is_kept(batch_norm):
    heads = pytest.importorskip("lightly.models.modules.heads")
    old = heads.SimCLRProjectionHead(16, 24, 8, num_layers=3, batch_norm=batch_norm)
    model = nn.Module()
    model.projection_head = old
    head = swap_projector(model, "projection_head", num_experts=2, expert_hidden_dim=24)
    # incl. the last BatchNorm, and the hidden biases lightly adds without BatchNorm
    assert _expert_structure(head) == _structure(list(old.layers))
    assert head(torch.randn(3, 16)).shape == (3, 8)


def test_lightly_vicreg_head_is_kept():
    heads = pytest.importorskip("lightly.models.modules.heads")
    old = heads.VICRegProjectionHead(16, 32, 32, num_layers=3)
    model = nn.Module()
    model.projection_head = old
    head = swap_projector(model, "projection_head", num_experts=2, expert_hidden_dim=32)
    assert _expert_structure(head) == _structure(list(old.layers))


def test_swap_after_the_optimiser_was_built_is_refused_or_moves_the_parameters():
    """A swap after training started would leave the new head out of the optimiser (never trained): refused, or,
    with ``optimizer=``, the old projector's parameters and state leave it and the head's join their group."""
    from star_heads.integrations import swap_projector

    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Linear(6, 8)
    model.projector = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD([{"params": model.backbone.parameters(), "lr": 0.1},
                           {"params": model.projector.parameters(), "lr": 0.5, "momentum": 0.9}])
    model.projector(model.backbone(torch.randn(5, 6))).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="already has gradients.*optimizer="):
        swap_projector(model, "projector", num_experts=2)
    old = list(model.projector.parameters())
    head = swap_projector(model, "projector", num_experts=2, optimizer=opt)
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert all(not any(p is q for q in in_opt) for p in old) and all(p not in opt.state for p in old)
    assert opt.param_groups[1]["lr"] == 0.5 and [id(p) for p in opt.param_groups[1]["params"]] == [
        id(p) for p in head.parameters()]
    before = [p.detach().clone() for p in head.parameters()]
    opt.zero_grad()
    model.projector(model.backbone(torch.randn(5, 6)), task=None)["eq"].sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))  # the new head trains
    with pytest.raises(TypeError, match="optimizer must be"):
        swap_projector(model, "projector", optimizer="sgd")
