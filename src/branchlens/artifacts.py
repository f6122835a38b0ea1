"""Atomic artifact writes and the provenance every artifact carries.

A reader never sees a half-written file: we write a temp file in the same folder, fsync it,
then rename over the target (atomic on POSIX), and fsync the folder.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import branchlens


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path next to ``path``; on success fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """``writer(tmp_path)`` writes the content; the result appears at ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """safetensors file, atomically; metadata values are JSON-encoded strings."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()}
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt", device=device) as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out, meta


def provenance(**extra: Any) -> dict[str, Any]:
    """Versions that go into every artifact's metadata, plus the caller's config/seed/etc."""
    return {
        "branchlens_version": branchlens.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        **extra,
    }


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
