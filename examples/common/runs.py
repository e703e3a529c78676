"""Run directories: config.json, metrics.jsonl, an atomically written checkpoint, resume.

Layout of a run directory::

    config.json      the resolved options of the run (written once)
    metrics.jsonl    one JSON object per finished epoch
    checkpoint.pt    the last finished epoch: backbone, adapter (head, predictor, normaliser),
                     optimiser, scheduler, RNG states (torch, CUDA, numpy, python, augmentation
                     generator), epoch and step
    *.png            plots written at the end
    results.json     written by transfer.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["RUN_FILES", "RunDir", "RunError", "capture_rng", "restore_rng"]

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "results.json", "cca.png", "gates.png", "losses.png")


class RunError(Exception):
    """A problem with a run directory, reported to the user as one line."""


class RunDir:
    """A run directory (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")

    def holds_run(self) -> bool:
        """True when the directory already holds any file of a run."""
        return any((self.path / f).exists() for f in RUN_FILES)

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False) -> "RunDir":
        """Prepares a fresh run directory; refuses one that holds another run unless ``overwrite``.

        With ``overwrite`` only the run's own files (``RUN_FILES``) are removed.
        """
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise RunError(f"--out {run.path} exists and is not a directory")
        if run.holds_run():
            if not overwrite:
                raise RunError(
                    f"--out {run.path} already holds a run (config.json/checkpoint.pt); "
                    "pass --resume to continue it or --overwrite to replace it"
                )
            for f in RUN_FILES:
                (run.path / f).unlink(missing_ok=True)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike, *, need_checkpoint: bool = True) -> "RunDir":
        """Opens an existing run directory (for --resume or transfer)."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunError(f"run directory {run.path} does not exist")
        if not run.config_path.exists():
            raise RunError(f"{run.path} is not a run directory (no config.json)")
        if need_checkpoint and not run.checkpoint_path.exists():
            raise RunError(f"{run.path} has no checkpoint.pt (the run finished no epoch yet)")
        return run

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drops metric rows after ``last_epoch`` (written by an interrupted epoch before its checkpoint)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", -1) <= last_epoch]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Writes ``checkpoint.pt`` atomically (temporary file, then rename)."""
        tmp = self.checkpoint_path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        try:
            return torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise RunError(f"{self.path} has no checkpoint.pt") from None
        except Exception as exc:  # corrupt or foreign file
            raise RunError(f"cannot read {self.checkpoint_path}: {type(exc).__name__}: {exc}") from None

    def copy_to(self, dest: str | os.PathLike) -> None:
        shutil.copytree(self.path, dest, dirs_exist_ok=False)


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """All random states a resumed run needs to continue exactly."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state() if generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
