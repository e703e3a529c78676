"""Baseline heads behind the same interface as :class:`~star_heads.MMoEHead`, for ablations.

Axis legend:
    b: batch    t: tasks    n: experts    o: output features

* :class:`SeparateHeads` — one independent MLP per task (EquiMod's invariant and equivariant heads).
* :class:`SharedSpecificHead` — STAR-SS: ``z_t = E_t(x) + E_shared(x)``, no router.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from einops import rearrange
from torch import nn

from star_heads._checks import check_positive_int
from star_heads.experts import ExpertBank
from star_heads.heads import TaskHead, _layer_options, bank_forward
from star_heads.sizing import FLOP_RTOL, PARAM_RTOL, count_parameters, fit_width, linear_macs, on_meta

__all__ = ["SeparateHeads", "SharedSpecificHead"]


class SeparateHeads(TaskHead):
    """One independent MLP per task (the separate-heads baseline of EquiMod, ICLR 2023, arXiv 2211.01244).

    Each task owns a single-expert :class:`ExpertBank`, so ``head(x, task=...)`` computes only that task's MLP.

    Args:
        input_dim: Backbone feature size d.
        hidden_dim: Hidden width of each MLP (default ``input_dim``, as :class:`~star_heads.STARHead`).
        output_dim: Embedding size.
        num_layers: Linear layers per MLP.
        tasks: Task names, one MLP each.
        norm_layer, act_layer, last_norm_layer, last_bias, hidden_bias: Layer options, as :class:`~star_heads.MMoEHead`.
        check_finite: See :class:`~star_heads.TaskHead` (one host sync per call).
        device: Factory kwarg.
        dtype: Factory kwarg.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int | None = None,
        output_dim: int = 128,
        num_layers: int = 3,
        *,
        tasks: Sequence[str] = ("inv", "eq"),
        norm_layer: type[nn.Module] | None = nn.BatchNorm1d,
        act_layer: type[nn.Module] | None = nn.ReLU,
        last_norm_layer: type[nn.Module] | None = None,
        last_bias: bool = True,
        hidden_bias: bool = False,
        check_finite: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_dim, output_dim, tasks, check_finite=check_finite)
        hidden_dim = input_dim if hidden_dim is None else hidden_dim
        options = {
            **_layer_options(norm_layer, act_layer, last_norm_layer, last_bias, hidden_bias),
            "device": device,
            "dtype": dtype,
        }
        self.heads = nn.ModuleDict(
            {t: ExpertBank(1, input_dim, hidden_dim, output_dim, num_layers, **options) for t in self.tasks}
        )
        self.hidden_dim = hidden_dim

    @classmethod
    def param_matched(
        cls,
        reference: nn.Module | int,
        input_dim: int,
        output_dim: int = 128,
        num_layers: int = 3,
        *,
        tasks: Sequence[str] = ("inv", "eq"),
        multiple_of: int = 1,
        **options: Any,
    ) -> SeparateHeads:
        """Separate heads whose hidden width makes them as large as ``reference`` (a fair STAR baseline).

        STAR's gains are reported against EquiMod's separate heads at roughly matched size (STAR experiments,
        arXiv 2510.27222); this picks the hidden width so that the parameter count is within 5 % of the
        reference's and the FLOPs within 10 % (counts defined in :mod:`star_heads.sizing`: all parameters;
        multiply-adds per sample of the Linear layers, routers included).

        Args:
            reference: The head to match (e.g. a :class:`~star_heads.STARHead`), or a parameter count. With
                an int only the parameter count is matched (there are no FLOPs to compare with).
            input_dim: Backbone feature size d.
            output_dim: Embedding size.
            num_layers: Linear layers per MLP (>= 2: a single Linear has no width to choose).
            tasks: Task names, one MLP each.
            multiple_of: Only consider hidden widths that are multiples of this.
            **options: Other constructor options (``norm_layer``, ``act_layer``, ...).

        Returns:
            The sized heads; ``head.hidden_dim`` is the chosen width.

        Raises:
            ValueError: no width meets both tolerances (e.g. ``num_layers=1``, or a reference smaller
                than the narrowest heads).
        """
        return _param_matched(cls, reference, input_dim, output_dim, num_layers, tasks, multiple_of, options)

    @classmethod
    def equimod(cls, input_dim: int, hidden_dim: int = 2048, output_dim: int = 128, **kwargs: Any) -> SeparateHeads:
        """EquiMod's heads: ``d → 2048 → 2048 → 128`` with BN+ReLU between, ending in ``BN(affine=False)``."""
        kwargs.setdefault("last_norm_layer", partial(nn.BatchNorm1d, affine=False))
        kwargs.setdefault("last_bias", False)
        return cls(input_dim, hidden_dim, output_dim, 3, **kwargs)

    def _embed(self, x, task_indices, need_gates, need_experts):
        outs = [bank_forward(self.heads[self.tasks[i]], x) for i in task_indices]  # each [b, 1, o]
        z = rearrange(torch.cat(outs, dim=1), "b t o -> t b o")
        return z, None, (rearrange(z, "t b o -> b t o") if need_experts else None)


class SharedSpecificHead(TaskHead):
    """STAR-SS ("shared + specific"): ``z_t(x) = E_t(x) + E_shared(x)`` with no router.

    The T task experts and the shared expert live in one fused :class:`ExpertBank` of ``T + 1`` experts
    (the shared one last); the sums are a fixed 0/1 mixing matrix, so ``gates`` are returned as that matrix.

    Args:
        input_dim: Backbone feature size d.
        hidden_dim: Expert hidden width (default ``input_dim``, as :class:`~star_heads.STARHead`).
        output_dim: Embedding size.
        num_layers: Linear layers per expert.
        tasks: Task names.
        norm_layer, act_layer, last_norm_layer, last_bias, hidden_bias: Layer options, as :class:`~star_heads.MMoEHead`.
        check_finite: See :class:`~star_heads.TaskHead` (one host sync per call).
        device: Factory kwarg.
        dtype: Factory kwarg.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int | None = None,
        output_dim: int = 128,
        num_layers: int = 3,
        *,
        tasks: Sequence[str] = ("inv", "eq"),
        norm_layer: type[nn.Module] | None = nn.BatchNorm1d,
        act_layer: type[nn.Module] | None = nn.ReLU,
        last_norm_layer: type[nn.Module] | None = None,
        last_bias: bool = True,
        hidden_bias: bool = False,
        check_finite: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_dim, output_dim, tasks, check_finite=check_finite)
        hidden_dim = input_dim if hidden_dim is None else hidden_dim
        t = self.num_tasks
        self.experts = ExpertBank(
            t + 1,
            input_dim,
            hidden_dim,
            output_dim,
            num_layers,
            **_layer_options(norm_layer, act_layer, last_norm_layer, last_bias, hidden_bias),
            device=device,
            dtype=dtype,
        )
        self.hidden_dim = hidden_dim
        mixing = torch.cat([torch.eye(t, device=device), torch.ones(t, 1, device=device)], dim=1)  # [t, t+1]
        self.register_buffer("mixing", mixing, persistent=False)

    @classmethod
    def param_matched(
        cls,
        reference: nn.Module | int,
        input_dim: int,
        output_dim: int = 128,
        num_layers: int = 3,
        *,
        tasks: Sequence[str] = ("inv", "eq"),
        multiple_of: int = 1,
        **options: Any,
    ) -> SharedSpecificHead:
        """STAR-SS sized like ``reference``: see :meth:`SeparateHeads.param_matched` (same tolerances)."""
        return _param_matched(cls, reference, input_dim, output_dim, num_layers, tasks, multiple_of, options)

    def _embed(self, x, task_indices, need_gates, need_experts):
        gates = self.mixing[task_indices].to(x.dtype).expand(x.shape[0], -1, -1)  # [b, t, n]
        if need_experts:
            z, experts = bank_forward(self.experts, x, gates, return_expert_outputs=True)
            return z, gates, experts
        return bank_forward(self.experts, x, gates), gates, None


def _param_matched(cls, reference, input_dim, output_dim, num_layers, tasks, multiple_of, options):
    """Builds ``cls`` with the hidden width whose parameter count is nearest the reference's, then checks
    both tolerances (:data:`~star_heads.sizing.PARAM_RTOL`, :data:`~star_heads.sizing.FLOP_RTOL`)."""
    if isinstance(reference, nn.Module):
        target, target_macs = count_parameters(reference), linear_macs(reference)
        what = type(reference).__name__
    else:
        target, target_macs, what = check_positive_int(reference, "reference"), None, "the reference"

    def build(width: int) -> TaskHead:
        return cls(input_dim, width, output_dim, num_layers, tasks=tasks, **on_meta(options))

    try:
        width = fit_width(build, target, multiple_of=multiple_of)
    except ValueError as err:
        raise ValueError(f"cannot size {cls.__name__} to {what} ({target:,} parameters): {err}") from None
    candidate = build(width)
    params, macs = count_parameters(candidate), linear_macs(candidate)
    if abs(params - target) > PARAM_RTOL * target or (
        target_macs is not None and abs(macs - target_macs) > FLOP_RTOL * target_macs
    ):
        flops = "" if target_macs is None else f" and {macs:,} FLOPs vs {target_macs:,}"
        raise ValueError(
            f"cannot size {cls.__name__} to {what} within {PARAM_RTOL:.0%} of its parameters and "
            f"{FLOP_RTOL:.0%} of its FLOPs: the nearest hidden_dim={width} gives {params:,} parameters vs "
            f"{target:,}{flops} (input_dim={input_dim}, output_dim={output_dim}, num_layers={num_layers}, "
            f"tasks={tuple(tasks)})"
        )
    return cls(input_dim, width, output_dim, num_layers, tasks=tasks, **options)
