"""Atomic artifact writes and the provenance every artifact carries.

A reader never sees a half-written file: we write a temp file in the same folder, fsync it,
then rename over the target (atomic on POSIX), and fsync the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from branchlens._version import __version__

CHECKSUM_KEY = "sha256"  # safetensors metadata key of the digest over metadata and tensors


class ArtifactError(RuntimeError):
    """An artifact is unreadable, corrupt or from another configuration; the message names it."""


def _current_umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give: shared lab folders need it


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
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; artifacts follow the user's umask
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
    """Parsed JSON; a truncated or corrupt file raises :class:`ArtifactError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """safetensors file, atomically; metadata values are JSON-encoded strings."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()}
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    meta[CHECKSUM_KEY] = json.dumps(_digest(meta, tensors))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the encoded metadata (minus the digest) and every tensor's name and bytes."""
    h = hashlib.sha256()
    for k in sorted(meta):
        if k != CHECKSUM_KEY:
            h.update(json.dumps([k, meta[k]]).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def load_tensors(path: str | Path, device: str = "cpu", require_checksum: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and decoded metadata, verified against the stored sha256 (when the file has one,
    which every file written by :func:`save_tensors` does). Corruption raises
    :class:`ArtifactError` naming the file, never returns silently different numbers."""
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
            for k in f.keys():
                out[k] = f.get_tensor(k)
        meta = {k: json.loads(v) for k, v in raw.items()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ArtifactError(f"{path} is unreadable (truncated or corrupt?): {e}") from e
    stored = meta.pop(CHECKSUM_KEY, None)
    if stored is None and require_checksum:
        raise ArtifactError(f"{path} has no checksum (written by an older branchlens?)")
    if stored is not None and stored != _digest(raw, out):
        raise ArtifactError(f"{path} fails its sha256 check: the file is corrupt")
    return {k: t.to(device) for k, t in out.items()}, meta


def provenance(**extra: Any) -> dict[str, Any]:
    """Versions that go into every artifact's metadata, plus the caller's config/seed/etc."""
    return {
        "branchlens_version": __version__,
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


def discard_dir(path: Path, log: Callable[[str], None], why: str) -> None:
    """Remove an artifact folder made under other settings: renamed first (atomic), so a kill
    midway never leaves a half-deleted folder that looks resumable."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.discarded")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    log(f"[discard] {why}: discarded {path} and starting clean")
