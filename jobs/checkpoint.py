"""Training checkpoints that survive a crash at any instant, and one resume decision for all ranks.

Why so careful: a trainer killed while writing (SIGKILL, a full disk, a node lost) must never
leave the only checkpoint truncated. :func:`save_checkpoint` writes a temporary file, fsyncs it,
keeps the previous checkpoint as ``<path>.prev`` (a hard link, so there is no instant without a
complete checkpoint), renames the new one into place and fsyncs the folder. :func:`load_checkpoint`
falls back to ``<path>.prev`` with a warning when the newest one is missing, truncated or corrupt.

Under torchrun only rank 0 reads the files; :func:`resume_for_all_ranks` broadcasts what it found
(the checkpoint itself, not a path), so ranks on nodes that do not share rank 0's filesystem
resume from exactly the same state and never diverge.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from sparkbridge.errors import CheckpointError

__all__ = ["CheckpointError", "CHECKPOINT_FORMAT", "previous_path", "save_checkpoint", "load_checkpoint",
           "resume_for_all_ranks"]

log = logging.getLogger(__name__)

#: Written into every checkpoint; a file without it is not one of ours.
CHECKPOINT_FORMAT = "sparkbridge.train/1"
_REQUIRED = ("format", "model", "optimizer", "loader", "step")

PathLike = Union[str, "os.PathLike[str]"]


def previous_path(path: PathLike) -> Path:
    """Where the checkpoint before the newest is kept: ``<path>.prev``."""
    p = Path(path)
    return p.with_name(p.name + ".prev")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory descriptors
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: PathLike) -> None:
    """Write ``state`` (a dict with at least model, optimizer, loader and step) to ``path`` atomically.

    The previous checkpoint stays available as ``<path>.prev``. ``state`` is not modified.
    """
    import torch

    missing = [k for k in _REQUIRED if k != "format" and k not in state]
    if missing:
        raise ValueError(f"a checkpoint needs {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({**state, "format": CHECKPOINT_FORMAT}, f)
        f.flush()
        os.fsync(f.fileno())
    prev = previous_path(path)
    if path.exists():
        # Link, then rename over .prev: both names always point at a complete file.
        link = path.with_name(path.name + ".prev.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        try:
            os.link(path, link)
            os.replace(link, prev)
        except OSError:  # no hard links here: a rename (load_checkpoint covers the gap with .prev)
            os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read(path: Path, validate: Optional[Callable[[dict], None]]) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        detail = (str(exc).strip().splitlines() or ["empty or truncated file"])[0][:200]
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {detail})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a sparkbridge training checkpoint (format {found!r}, "
                              f"expected {CHECKPOINT_FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    if validate is not None:
        validate(state)
    return state


def load_checkpoint(
    path: PathLike, *, validate: Optional[Callable[[dict], None]] = None
) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """The newest readable checkpoint: ``(state, file it came from)``, or ``(None, None)`` when
    neither ``path`` nor ``<path>.prev`` exists (a fresh start).

    ``validate(state)`` may raise :class:`CheckpointError` to reject a checkpoint (e.g. written for
    other features); a rejected or unreadable newest file falls back to ``.prev`` with a warning.
    Raises CheckpointError when files exist but none is usable: resuming from nothing would
    silently start over, so the message says which files to delete to do that on purpose.
    """
    path = Path(path)
    candidates = [p for p in (path, previous_path(path)) if p.exists()]
    if not candidates:
        return None, None
    if candidates[0] != path:
        log.warning("checkpoint %s is missing but %s exists (a save was interrupted): resuming from it",
                    path, candidates[0])
    problems = []
    for candidate in candidates:
        try:
            state = _read(candidate, validate)
        except CheckpointError as exc:
            problems.append(str(exc))
            if candidate == path and len(candidates) > 1:
                log.warning("%s; falling back to the previous checkpoint %s", exc, candidates[1])
            continue
        return state, candidate
    names = " and ".join(str(c) for c in candidates)
    raise CheckpointError(f"no usable checkpoint: {'; '.join(problems)}. Delete {names} to start training over")


def resume_for_all_ranks(
    path: Optional[PathLike], *, validate: Optional[Callable[[dict], None]] = None, device: Any = None
) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """:func:`load_checkpoint` on rank 0, the result broadcast to every rank.

    Without a process group this is :func:`load_checkpoint`. With one, every rank returns rank 0's
    checkpoint (or raises rank 0's error), whatever its own filesystem holds.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        return load_checkpoint(path, validate=validate) if path is not None else (None, None)
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            state, source = load_checkpoint(path, validate=validate) if path is not None else (None, None)
            payload = [{"state": state, "source": str(source) if source else None}]
        except CheckpointError as exc:
            payload = [{"error": str(exc)}]
    dist.broadcast_object_list(payload, src=0, device=device)
    decision = payload[0]
    if "error" in decision:
        raise CheckpointError(decision["error"])
    return decision["state"], (Path(decision["source"]) if decision["source"] else None)
