"""Run directories: atomic artefacts, a checksummed checkpoint, tolerant metrics, resume.

Layout of a run directory::

    config.json            the resolved options of the run (written once)
    metrics.jsonl          one JSON object per finished epoch
    checkpoint.pt          the last finished epoch: backbone, adapter (head, predictor, normaliser),
                           optimiser, scheduler, RNG states (torch, CUDA, numpy, python, augmentation
                           generator of every rank), epoch and step
    checkpoint.pt.sha256   its SHA-256 (``sha256sum -c`` format, either case), checked before every load
    *.png                  plots written at the end
    results.json           written by transfer.py

Every file is written atomically (a temporary file in the same directory, flushed, then
``os.replace``): an interrupted write leaves the previous version or nothing, never half a file.
``checkpoint.pt`` stays a plain ``torch.save`` file; its digest lives beside it. The digest file
is updated in three steps (accept old + new digest, replace the checkpoint, accept only the new
one), so a crash at any point leaves a checkpoint that verifies. A checksum proves a file intact, not that it
belongs to the run: ``pretrain.py`` also stores the run id and config in every checkpoint and compares them
with ``config.json`` on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "PLOT_FILES", "RUN_FILES", "RunDir", "RunError", "atomic_write_bytes", "atomic_write_text", "capture_rng",
    "check_writable_dir", "restore_rng",
]

PLOT_FILES = ("cca.png", "gates.png", "losses.png")
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.sha256", "results.json", *PLOT_FILES)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RunError(Exception):
    """A problem with a run directory, reported to the user as one line."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a flushed temporary file and ``os.replace``."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> None:
    """Raises :class:`RunError` unless ``path`` is (or can be created as) a writable directory.

    Nothing is created: the nearest existing ancestor must be a writable directory.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise RunError(f"{what} {p} exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise RunError(f"{what} {p} is not writable")
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunError(f"{what} {p} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"{what} {p} cannot be created: {parent} is not writable")


class RunDir:
    """A run directory (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._created: Path | None = None  # top directory made by create(), removed by discard()

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    checkpoint_path = property(lambda self: self.path / "checkpoint.pt")
    digest_path = property(lambda self: self.path / "checkpoint.pt.sha256")

    def holds_run(self) -> bool:
        """True when the directory already holds any file of a run."""
        return any((self.path / f).exists() for f in RUN_FILES)

    @classmethod
    def create(cls, path: str | os.PathLike, *, overwrite: bool = False) -> RunDir:
        """Prepares a fresh run directory; refuses one that holds another run unless ``overwrite``.

        With ``overwrite`` only the run's own files (``RUN_FILES``) are removed.
        """
        run = cls(path)
        check_writable_dir(run.path)
        if run.holds_run():
            if not overwrite:
                raise RunError(
                    f"--out {run.path} already holds a run (config.json/checkpoint.pt); "
                    "pass --resume to continue it or --overwrite to replace it"
                )
            for f in RUN_FILES:
                if (run.path / f).is_dir():
                    raise RunError(f"--out {run.path / f} is a directory; remove it by hand to overwrite the run")
            for f in RUN_FILES:
                (run.path / f).unlink(missing_ok=True)
        if not run.path.exists():
            top = run.path.absolute()
            while not top.parent.exists():
                top = top.parent
            try:
                run.path.mkdir(parents=True)
            except OSError as exc:
                raise RunError(f"--out {run.path} cannot be created: {exc.strerror or exc}") from None
            run._created = top
        return run

    def remove_stale_temporaries(self) -> list[str]:
        """Removes the temporary files an interrupted atomic write left behind; returns their names."""
        stale = [p for f in RUN_FILES for p in (self.path / f"{f}.tmp", *self.path.glob(f".{f}.*.tmp"))
                 if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return [p.name for p in stale]

    def discard(self) -> None:
        """Removes what :meth:`create` made (for a run that failed before its first epoch)."""
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
            self._created = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, need_checkpoint: bool = True) -> RunDir:
        """Opens an existing run directory (for --resume or transfer)."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunError(f"run directory {run.path} does not exist")
        if not run.config_path.exists():
            raise RunError(f"{run.path} is not a run directory (no config.json)")
        if need_checkpoint and not run.checkpoint_path.exists():
            raise RunError(f"{run.path} has no checkpoint.pt (the run finished no epoch yet)")
        return run

    # ------------------------------------------------------------------ config
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self, required: Iterable[str] = ()) -> dict[str, Any]:
        """The run's config; :class:`RunError` when it is missing, empty, not a JSON object or lacks ``required`` keys."""
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            raise RunError(f"{self.path} is not a run directory (no config.json)") from None
        if not text.strip():
            raise RunError(f"{self.config_path} is empty; the run cannot be read (start again with --overwrite)")
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunError(f"{self.config_path} is not valid JSON ({exc}); the run cannot be read") from None
        if not isinstance(cfg, dict):
            raise RunError(f"{self.config_path} must hold a JSON object, got {type(cfg).__name__}")
        missing = sorted(set(required) - set(cfg))
        if missing:
            raise RunError(f"{self.config_path} lacks the keys {missing}; it was not written by this pretrain.py")
        return cfg

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        """The metric rows. A partial last line (a write cut short) is dropped with a warning; a damaged
        line before it raises :class:`RunError`."""
        if not self.metrics_path.exists():
            return []
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"cannot read {self.metrics_path}: {getattr(exc, 'strerror', None) or exc}") from None
        rows: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if i == len(lines) - 1:
                    warnings.warn(f"{self.metrics_path}: dropped a partial last line ({exc})", stacklevel=2)
                    break
                raise RunError(f"{self.metrics_path} line {i + 1} is damaged ({exc})") from None
            rows.append(row)
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Adds one row (the file is rewritten atomically, so a partial line never stays)."""
        self.write_metrics([*self.read_metrics(), row])

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drops metric rows after ``last_epoch`` (written by an interrupted epoch before its checkpoint)."""
        self.write_metrics([r for r in self.read_metrics() if r.get("epoch", -1) <= last_epoch])

    # ------------------------------------------------------------------ checkpoint
    def _accepted_digests(self) -> list[str]:
        """The lower-case digests of ``checkpoint.pt.sha256`` (``[]`` when it does not exist); RunError when it
        is unreadable or holds anything but SHA-256 lines."""
        fix = f"recreate it with `sha256sum checkpoint.pt > {self.digest_path.name}` in {self.path} if you trust the file"
        try:
            raw = self.digest_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RunError(f"cannot read {self.digest_path}: {exc.strerror or exc} ({fix})") from None
        try:
            lines = [line for line in raw.decode("ascii").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise RunError(f"{self.digest_path} is not a SHA-256 checksum file (not text); {fix}") from None
        digests = [line.split()[0].lower() for line in lines]
        bad = next((d for d in digests if not _SHA256.fullmatch(d)), None)
        if bad is not None or not digests:
            what = "is empty" if bad is None else f"holds {bad[:20]!r}, not a SHA-256 digest"
            raise RunError(f"{self.digest_path} {what}; {fix}")
        return digests

    def _write_digests(self, digests: list[str]) -> None:
        atomic_write_text(self.digest_path, "".join(f"{d}  checkpoint.pt\n" for d in digests))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Writes ``checkpoint.pt`` atomically and records its SHA-256 in ``checkpoint.pt.sha256``."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        try:
            old = self._accepted_digests()[:1] if self.checkpoint_path.is_file() else []
        except RunError:  # a damaged checksum file: the old checkpoint could not be verified anyway
            old = []
        self._write_digests([digest, *old])  # both accepted while the checkpoint is replaced
        atomic_write_bytes(self.checkpoint_path, data)
        self._write_digests([digest])

    def load_checkpoint(self, map_location: str | torch.device = "cpu", required: Iterable[str] = ()) -> dict[str, Any]:
        """Verifies ``checkpoint.pt`` against its SHA-256 and loads it.

        Raises:
            RunError: No checkpoint, no digest file, a digest mismatch (damaged file), an unreadable
                file, or missing ``required`` keys.
        """
        try:
            data = self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            raise RunError(f"{self.path} has no checkpoint.pt") from None
        except IsADirectoryError:
            raise RunError(f"{self.checkpoint_path} is a directory, not a checkpoint file") from None
        except OSError as exc:
            raise RunError(f"cannot read {self.checkpoint_path}: {exc.strerror or exc}") from None
        if not self.digest_path.exists():
            raise RunError(f"{self.checkpoint_path} has no checksum file {self.digest_path.name}, so it cannot be "
                           "verified; refusing to load it (a run written before checksums: if you trust the file, "
                           f"run `sha256sum checkpoint.pt > {self.digest_path.name}` in {self.path})")
        accepted = self._accepted_digests()
        digest = hashlib.sha256(data).hexdigest()
        if digest not in accepted:
            raise RunError(f"{self.checkpoint_path} is damaged: its SHA-256 {digest[:16]}… does not match "
                           f"{self.digest_path.name} ({accepted[0][:16]}…); refusing to load it")
        try:
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
        except Exception as exc:  # a foreign file that happens to carry a matching digest
            raise RunError(f"cannot read {self.checkpoint_path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(state, dict):
            raise RunError(f"{self.checkpoint_path} must hold a dict, got {type(state).__name__}")
        missing = sorted(set(required) - set(state))
        if missing:
            raise RunError(f"{self.checkpoint_path} lacks the keys {missing}")
        return state

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
