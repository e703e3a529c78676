"""lightly drop-ins: lightly's signature and defaults, and a default size a user can afford (<= 2x the lightly
head it replaces, the largest multiple-of-8 width within it), with the paper's per-expert shape one argument away."""

import inspect

import pytest
import torch

from star_heads import STARSimCLRProjectionHead, STARVICRegProjectionHead
from star_heads.heads import lightly_projection_mlp
from star_heads.sizing import count_parameters

SIMCLR_ARGS = [(), (512, 512, 128), (2048, 2048, 128, 3), (512, 512, 128, 2, False), (128, 256, 64, 4), (32, 16, 8)]
VICREG_ARGS = [(), (512, 2048, 2048), (512, 512, 256, 2), (64, 128, 32, 4)]


def _full(cls, args):
    """lightly_projection_mlp's arguments for the lightly head of ``cls(*args)``."""
    defaults = [p.default for p in inspect.signature(cls).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    full = list(args) + defaults[len(args):]
    if cls is STARVICRegProjectionHead:
        return full + [True, False]  # hidden BatchNorm always, plain last Linear
    return full + [full[4]]  # SimCLR: the last Linear is followed by a BatchNorm with batch_norm=True


def _mlp_count(d, h, o, layers, bn, last_bn):
    """Closed form of lightly's ProjectionHead MLP (independent of lightly_projection_mlp): a Linear has a
    bias exactly when no BatchNorm (2 affine vectors) follows it."""
    sizes = [d] + [h] * (layers - 1) + [o]
    norms = [bn] * (layers - 1) + [last_bn]
    return sum(sizes[i] * sizes[i + 1] + (2 if norms[i] else 1) * sizes[i + 1] for i in range(layers))


@pytest.mark.parametrize("n", [4, 8, 16])
@pytest.mark.parametrize("cls, args", [(STARSimCLRProjectionHead, a) for a in SIMCLR_ARGS]
                         + [(STARVICRegProjectionHead, a) for a in VICREG_ARGS])
def test_default_size_is_between_one_and_two_lightly_heads(cls, args, n):
    if args == (32, 16, 8) and n == 16:
        pytest.skip("no width fits: the 16-expert routers alone exceed the budget (tested below)")
    head = cls(*args, num_experts=n, device="meta")
    d, h, o, layers, bn, last_bn = _full(cls, args)
    lightly = count_parameters(lightly_projection_mlp(d, h, o, layers, bn, last_bn, device="meta"))
    assert lightly == _mlp_count(d, h, o, layers, bn, last_bn)
    params = count_parameters(head)
    assert params <= 2 * lightly
    step = 8 if head.hidden_dim >= 8 else 1
    assert head.hidden_dim % step == 0
    wider = cls(*args, num_experts=n, expert_hidden_dim=head.hidden_dim + step, device="meta")
    assert count_parameters(wider) > 2 * lightly  # the largest (multiple-of-8) width within the budget
    assert head.lightly_hidden_dim == h and head.output_dim == o and len(head.experts.linears) == layers


@pytest.mark.parametrize("args", [(8, 16, 32), (8, 32, 16), (16, 8, 32), (16, 32, 8), (32, 8, 16), (32, 16, 8)])
def test_small_widths_work_with_the_defaults(args):
    """lightly's own head tests use these (input, hidden, output) sizes: the defaults must build and run there,
    within the budget (fewer experts only where 8 experts of width 1 do not fit)."""
    for cls in (STARSimCLRProjectionHead, STARVICRegProjectionHead):
        head = cls(*args)
        d, h, o, layers, bn, last_bn = _full(cls, args)
        assert count_parameters(head) <= 2 * _mlp_count(d, h, o, layers, bn, last_bn)
        assert head.num_experts in (8, 4, 2)
        if head.num_experts < 8:  # 8 experts would not fit
            with pytest.raises(ValueError, match="pass expert_hidden_dim= explicitly"):
                cls(*args, num_experts=8)
        assert head(torch.randn(3, args[0])).shape == (3, args[2])


def test_paper_shape_is_one_argument_away():
    head = STARSimCLRProjectionHead(512, 512, 128, 3, expert_hidden_dim=512)
    assert [(l.in_features, l.out_features) for l in head.experts.linears] == [(512, 512), (512, 512), (512, 128)]
    assert [l.bias is not None for l in head.experts.linears] == [False, False, True]
    assert head.num_experts == 8 and head.router.linear.out_features == 16


def test_drop_in_default_runs_and_returns_the_invariant_tensor():
    torch.manual_seed(0)
    head = STARSimCLRProjectionHead(64, 64, 16).eval()
    x = torch.randn(6, 64)
    z = head(x)
    assert isinstance(z, torch.Tensor) and z.shape == (6, 16)
    torch.testing.assert_close(z, head(x, task=None)["inv"])
    assert "lightly_hidden_dim=64" in repr(head)


def test_budget_that_no_width_fits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"at most 2x the 688 parameters of the head it replaces.*expert_hidden_dim="):
        STARSimCLRProjectionHead(32, 16, 8, num_experts=64)
    assert STARSimCLRProjectionHead(32, 16, 8, num_experts=64, expert_hidden_dim=4).hidden_dim == 4


@pytest.mark.parametrize("cls, lightly_name", [(STARSimCLRProjectionHead, "SimCLRProjectionHead"),
                                               (STARVICRegProjectionHead, "VICRegProjectionHead")])
def test_signature_and_counts_match_real_lightly(cls, lightly_name):
    heads = pytest.importorskip("lightly.models.modules.heads")
    ref = getattr(heads, lightly_name)
    ours = [(p.name, p.default) for p in inspect.signature(cls).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    theirs = [(p.name, p.default) for p in inspect.signature(ref).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert ours == theirs
    arg_sets = SIMCLR_ARGS if cls is STARSimCLRProjectionHead else VICREG_ARGS
    for args in arg_sets:
        full = _full(cls, args)
        with torch.device("meta"):
            lightly = ref(*args)
        assert count_parameters(lightly) == count_parameters(lightly_projection_mlp(*full, device="meta")), args
        # same layer sequence as lightly's MLP
        mine = lightly_projection_mlp(*full, device="meta")
        assert [type(m) for m in lightly.layers] == [type(m) for m in mine]
        assert [getattr(m, "bias", None) is None for m in lightly.layers] == [getattr(m, "bias", None) is None for m in mine]
        star = cls(*args, device="meta")
        assert count_parameters(lightly) <= count_parameters(star) <= 2 * count_parameters(lightly)
