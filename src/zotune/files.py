"""Atomic writes: a file appears under its final name complete or not at all.

Every file of a run directory that a reader may open while a run goes on or after it was
killed (best.safetensors, snapshot.safetensors, summary.json, the rewritten trajectory log,
predictions, plots) is written to NAME.tmp beside it and renamed over NAME, which is atomic
on POSIX file systems.
"""

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_atomic(path: str | Path, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call write(tmp) for a temporary path beside `path`, then rename it to `path`. With
    `fsync`, the bytes reach the disk before the rename (they then survive a power loss)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    tmp.replace(path)
    return path


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text), fsync)


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """A safetensors file of host copies of `tensors` (which may live on a GPU, or be views)."""
    host = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(host, tmp, metadata=metadata))
