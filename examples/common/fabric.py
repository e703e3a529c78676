"""Device, precision, DDP and rank-zero plumbing of the examples, on Lightning Fabric.

Fabric (``lightning_fabric``, or ``lightning.fabric`` inside a full Lightning install) is the small part of
Lightning that many GPU users run every day: it reads the ``torchrun`` environment, starts the process group
(NCCL on GPUs, gloo on CPUs), wraps the model in ``DistributedDataParallel``, runs the forward under the
autocast of ``--precision`` and scales the loss for ``16-mixed``. The training loop itself stays in
``pretrain.py``, in plain sight; the data loader, the seeding, the checkpoints and the RNG states stay ours
(Fabric's would reshuffle the data and lose the bit-identical resume).

:func:`make_fabric` builds the Fabric of a run; :func:`configure_cuda` sets the GPU switches.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["PRECISIONS", "configure_cuda", "fabric_module", "make_fabric", "torchrun_world"]

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def fabric_module() -> Any:
    """The installed Fabric package (``lightning_fabric`` or ``lightning.fabric``); ImportError with the fix."""
    try:
        import lightning_fabric as fabric
    except ImportError:
        try:
            import lightning.fabric as fabric  # type: ignore[no-redef]
        except ImportError:
            raise ImportError('the examples need Lightning Fabric: pip install "star-heads[examples]" '
                              "(or pip install lightning-fabric)") from None
    return fabric


def torchrun_world() -> tuple[int, int]:
    """``(world_size, local_world_size)`` from the torchrun environment (``(1, 1)`` for a plain process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def make_fabric(device: torch.device, precision: str = "32-true", *, find_unused_parameters: bool = False,
                plugins: Any = None) -> Any:
    """A launched Fabric for ``device`` (CPU or CUDA) and ``precision`` in this process.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group with one device per local process
    (``LOCAL_RANK`` picks the GPU) and wraps models in DDP; otherwise it runs on ``device`` alone.
    ``plugins`` passes a precision plugin instead of ``precision`` (the tests use it for fp16 on a CPU).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    fabric = fabric_module()
    world, local = torchrun_world()
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    if world > 1:
        if world % local:
            raise ValueError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local}")
        strategy: Any = fabric.strategies.DDPStrategy(find_unused_parameters=find_unused_parameters)
        devices: Any = local
        nodes = world // local
    else:
        strategy, nodes = "auto", 1
        devices = [device.index if device.index is not None else 0] if device.type == "cuda" else 1
    kwargs: dict[str, Any] = {"plugins": plugins} if plugins is not None else {"precision": precision}
    f = fabric.Fabric(accelerator=accelerator, devices=devices, num_nodes=nodes, strategy=strategy, **kwargs)
    f.launch()
    return f


def configure_cuda(*, tf32: bool = True, cudnn_benchmark: bool = True) -> None:
    """TF32 matmuls / convolutions and cuDNN autotuning (CUDA only; both change results in the last bits)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
