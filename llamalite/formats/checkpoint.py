"""llamalite's run directory: numbered checkpoints (`ckpt-<step>.pt`) and `best.pt`, written atomically,
read back newest first. A checkpoint is a plain dict (the model's and optimizer's state, the config as
a dict, the RNG states), so no saved file names a Python module path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


CHECKPOINT_VERSION = 1


def checkpoints_in(out: Path) -> list[Path]:
    """The numbered checkpoints of a run directory, newest first."""
    return sorted(out.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, synced, then renamed over it: a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_checkpoint(out: Path, obj: dict, keep: int, best: bool) -> Path:
    path = out / f"ckpt-{obj['step']:07d}.pt"
    atomic_write(path, lambda p: torch.save(obj, p))
    if best:
        best_path = out / "best.pt"
        tmp = out / ".best.pt.link"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)  # a second name for the same file, swapped in atomically
        os.replace(tmp, best_path)
    for old in checkpoints_in(out)[keep:]:
        old.unlink()
    return path


def load_latest_checkpoint(out: Path) -> dict | None:
    """The newest readable checkpoint in out (None if there is none); unreadable ones are reported."""
    for path in checkpoints_in(out):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"checkpoint version {ckpt.get('version')}, expected {CHECKPOINT_VERSION}")
            ckpt["path"] = str(path)
            return ckpt
        except Exception as e:  # noqa: BLE001 (any failure to read means: fall back to the previous one)
            print(f"llamalite: checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); it may have "
                  f"been cut off mid-write: trying the one before it", file=sys.stderr)
    return None
