"""One options convention for every head and build_head (flat timm-style keywords), and the shared checks."""

from functools import partial
from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn

from star_heads import (
    MMoEHead,
    SeparateHeads,
    SharedSpecificHead,
    STARHead,
    STARSimCLRProjectionHead,
    STARVICRegProjectionHead,
    build_head,
)
from star_heads._checks import (
    check_bool,
    check_choice,
    check_int,
    check_layer,
    check_names,
    check_positive_float,
    check_positive_int,
    check_probability,
    choices,
)

OPTIONS = dict(
    norm_layer=nn.LayerNorm,
    act_layer=partial(nn.LeakyReLU, 0.3),
    last_norm_layer=partial(nn.BatchNorm1d, affine=False),
    last_bias=False,
)
CONSTRUCTORS = {
    "MMoEHead": lambda **o: MMoEHead(8, 12, 6, num_experts=3, **o),
    "STARHead": lambda **o: STARHead(8, 6, num_experts=3, hidden_dim=12, **o),
    "STARSimCLRProjectionHead": lambda **o: STARSimCLRProjectionHead(8, 12, 6, 3, num_experts=3, expert_hidden_dim=12, **o),
    "STARVICRegProjectionHead": lambda **o: STARVICRegProjectionHead(8, 12, 6, num_experts=3, expert_hidden_dim=12, **o),
    "SeparateHeads": lambda **o: SeparateHeads(8, 12, 6, **o),
    "SharedSpecificHead": lambda **o: SharedSpecificHead(8, 12, 6, **o),
    "build_head star": lambda **o: build_head("star", 8, num_experts=3, hidden_dim=12, output_dim=6, **o),
    "build_head separate": lambda **o: build_head("separate", 8, hidden_dim=12, output_dim=6, **o),
    "build_head shared": lambda **o: build_head("shared", 8, hidden_dim=12, output_dim=6, **o),
    "build_head single": lambda **o: build_head("single", 8, hidden_dim=12, output_dim=6, **o),
}


def _banks(head):
    return list(head.heads.values()) if isinstance(head, SeparateHeads) else [head.experts]


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_every_head_takes_the_same_flat_layer_options(name):
    head = CONSTRUCTORS[name](**OPTIONS)
    for bank in _banks(head):
        expert = bank.to_modules()[0]
        kinds = [type(m) for m in expert]
        assert kinds == [nn.Linear, nn.LayerNorm, nn.LeakyReLU, nn.Linear, nn.LayerNorm, nn.LeakyReLU, nn.Linear, nn.BatchNorm1d]
        assert bank.acts[0].negative_slope == 0.3 and not expert[-1].affine and expert[-2].bias is None
    head(torch.randn(5, 8))  # runs


@pytest.mark.parametrize("name", [n for n in CONSTRUCTORS if "star" in n.lower() or "MMoE" in n])
def test_routed_heads_take_flat_router_options(name):
    head = CONSTRUCTORS[name](temperature=0.5, learn_temperature=True, top_k=2, norm_layer=None)
    assert isinstance(head.router.log_temperature, nn.Parameter)
    assert head.router.temperature.item() == pytest.approx(0.5) and head.router.top_k == 2
    assert ((head.gates(torch.randn(4, 8)) > 0).sum(-1) == 2).all()


@pytest.mark.parametrize("name", CONSTRUCTORS)
def test_dict_options_are_gone(name):
    with pytest.raises(TypeError, match="expert_kwargs"):
        CONSTRUCTORS[name](expert_kwargs={"norm_layer": None})


@pytest.mark.parametrize("name", ["SeparateHeads", "SharedSpecificHead", "build_head separate"])
def test_router_options_are_not_silently_dropped_by_unrouted_heads(name):
    with pytest.raises((TypeError, ValueError), match="temperature"):
        CONSTRUCTORS[name](temperature=0.5)


@pytest.mark.parametrize("name", CONSTRUCTORS)
@pytest.mark.parametrize(
    "option, value, error, match",
    [
        ("act_layer", nn.ReLU(), TypeError, r"act_layer must be an nn.Module class.*the instance ReLU\(\) \(pass its class\)"),
        ("norm_layer", "batchnorm", TypeError, "norm_layer must be an nn.Module class"),
        ("last_bias", 1, TypeError, "last_bias must be a bool, got int"),
        ("check_finite", "yes", TypeError, "check_finite must be a bool"),
        ("tasks", "inv", TypeError, r"tasks must be a sequence of strings, got str 'inv' \(did you mean \('inv',\)\?\)"),
        ("tasks", ("inv", 3), TypeError, "tasks must contain only strings"),
        ("tasks", (), ValueError, "non-empty"),
    ],
)
def test_bad_options_raise_the_documented_type(name, option, value, error, match):
    if option == "tasks" and name.startswith("build_head"):
        error, match = TypeError, "build_head fixes the tasks"
    with pytest.raises(error, match=match):
        CONSTRUCTORS[name](**{option: value})


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: STARHead(16, hidden_dim=0), ValueError, "hidden_dim must be >= 1, got 0"),
        (lambda: STARHead(16, hidden_dim=16.0), TypeError, "hidden_dim must be an int, got float"),
        (lambda: STARHead(16, num_experts=True), TypeError, "num_experts must be an int, got bool"),
        (lambda: STARHead(16, output_dim=0), ValueError, "output_dim must be >= 1, got 0"),
        (lambda: STARHead("16"), TypeError, "input_dim must be an int, got str"),
        (lambda: SeparateHeads(16, -3, 8), ValueError, "hidden_dim must be >= 1, got -3"),
        (lambda: STARSimCLRProjectionHead(16, 16, 8, 1), ValueError, "num_layers must be >= 2, got 1"),
        (lambda: STARSimCLRProjectionHead(16, 16, 8, 2, "no"), TypeError, "batch_norm must be a bool"),
        (lambda: STARSimCLRProjectionHead(16, 16, 8, 2, False, norm_layer=nn.LayerNorm), ValueError, "contradicts"),
        (lambda: STARHead(16, top_k=9), ValueError, r"top_k must be in \[1, num_experts=8\], got 9"),
    ],
)
def test_constructor_arguments_are_validated_not_reinterpreted(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------------------- the shared checks
def test_int_checks():
    assert check_positive_int(3, "n") == 3 and check_int(np.int64(4), "n") == 4 and type(check_int(np.int64(4), "n")) is int
    for bad in (True, 2.0, "2", None, torch.tensor(2)):
        with pytest.raises(TypeError, match="n must be an int"):
            check_positive_int(bad, "n")
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_positive_int(0, "n")
    with pytest.raises(ValueError, match="n must be <= 3, got 4"):
        check_int(4, "n", maximum=3)


def test_float_checks():
    assert check_positive_float(2, "t") == 2.0 and check_probability(0.0, "p") == 0.0
    for bad in (True, "0.5", None, [0.5]):
        with pytest.raises(TypeError, match="t must be a real number"):
            check_positive_float(bad, "t")
    for bad, match in ((0.0, r"t must be > 0.0, got 0.0"), (-1, "t must be > 0.0"), (float("nan"), "finite"),
                       (float("inf"), "finite")):
        with pytest.raises(ValueError, match=match):
            check_positive_float(bad, "t")
    assert check_positive_float(0.0, "t", allow_zero=True) == 0.0
    assert check_positive_float(float("inf"), "t", allow_inf=True) == float("inf")
    with pytest.raises(ValueError, match=r"p must be <= 1.0, got 1.5"):
        check_probability(1.5, "p")
    with pytest.raises(ValueError, match=r"p must be < 1.0, got 1.0"):
        check_probability(1.0, "p", allow_one=False)


def test_choice_bool_names_layer_checks():
    Mode = Literal["a", "b"]
    assert choices(Mode) == ("a", "b") and check_choice("a", "mode", Mode) == "a"
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        check_choice("c", "mode", Mode)
    with pytest.raises(TypeError, match="mode must be one of"):
        check_choice(1, "mode", Mode)
    with pytest.raises(TypeError, match="k must be one of"):
        check_choice(True, "k", (0, 1))
    assert check_bool(np.bool_(True), "f") is True
    with pytest.raises(TypeError, match="f must be a bool, got int 1"):
        check_bool(1, "f")
    assert check_names(["x", "y"], "tasks") == ("x", "y")
    with pytest.raises(ValueError, match="distinct"):
        check_names(("x", "x"), "tasks")
    assert check_layer(partial(nn.BatchNorm1d, eps=1e-3), "norm_layer") is not None
    with pytest.raises(TypeError, match="or None"):
        check_layer(len, "norm_layer")
    with pytest.raises(TypeError, match=r"act_layer must be an nn.Module class or a functools.partial of one, got None"):
        check_layer(None, "act_layer", optional=False)
