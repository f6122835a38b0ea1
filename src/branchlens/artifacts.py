"""Atomic artifact writes and the provenance every artifact carries.

A reader never sees a half-written file: we write a temp file in the same folder, fsync it,
then rename over the target (atomic on POSIX), and fsync the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
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


# -- what a stage wrote into its folders ----------------------------------------------------------
#
# A stage folder (``analysis/``, ``report/`` ...) can hold files branchlens never wrote: a
# researcher's notes, a colleague's run unpacked into it. A stage therefore deletes only its own
# outputs: either the names it is known to write (``owned``: the store, an SAE folder), or what the
# folder's ``OUTPUTS_FILE`` records: the files that were there before the stage first wrote into
# it ("foreign", with size and mtime) and, once the stage finished, the files it left ("outputs").

OUTPUTS_FILE = ".branchlens-outputs.json"
_SHOWN = 3  # file names a message lists before "…"


def _listing(folder: Path) -> dict[str, list[int]]:
    """relative path -> [size, mtime_ns] of every file (symlinks unfollowed) below ``folder``."""
    out: dict[str, list[int]] = {}
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            p = base / name
            if p == folder / OUTPUTS_FILE:
                continue
            st = p.lstat()
            out[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _read_outputs(folder: Path) -> dict[str, Any] | None:
    path = folder / OUTPUTS_FILE
    if not path.is_file():
        return None
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("foreign", {}), dict):
        raise ArtifactError(f"{path} is not a record of a stage's outputs; delete it (the files "
                            "of that folder are then kept as not branchlens's)")
    return doc


def _ours(doc: dict[str, Any] | None, listing: dict[str, list[int]]) -> set[str]:
    """Files of ``listing`` the stage wrote: those it recorded when it finished; while it runs
    (or after it was killed) everything but the unchanged foreign files."""
    if doc is None:
        return set()  # no record: nothing is provably ours
    if doc.get("outputs") is None:
        foreign = doc.get("foreign", {})
        return {p for p, st in listing.items() if foreign.get(p) != st}
    return set(doc["outputs"]) & set(listing)


def begin_outputs(folder: Path) -> None:
    """Before a stage writes into ``folder``: remember which files in it are not its own."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = _listing(folder)
    ours = _ours(_read_outputs(folder), listing)
    write_json(folder / OUTPUTS_FILE, {"foreign": {p: st for p, st in listing.items()
                                                   if p not in ours}, "outputs": None})


def finish_outputs(folder: Path) -> None:
    """After a stage finished: every file it created or rewrote in ``folder`` is an output."""
    doc = _read_outputs(folder) or {}
    foreign, listing = doc.get("foreign", {}), _listing(folder)
    kept = {p: st for p, st in listing.items() if foreign.get(p) == st}
    write_json(folder / OUTPUTS_FILE, {"foreign": kept,
                                       "outputs": sorted(p for p in listing if p not in kept)})


def _names(paths: list[str]) -> str:
    return ", ".join(paths[:_SHOWN]) + (", …" if len(paths) > _SHOWN else "")


def discard_outputs(path: Path, log: Callable[[str], None], why: str,
                    owned: tuple[str, ...] | None = None, keep: tuple[str, ...] = (),
                    refuse_foreign: bool = False) -> None:
    """Delete what a stage wrote into ``path`` (made under other settings), keeping every file
    it did not write. ``owned``: patterns (``fnmatch`` on the relative path) of the files the
    stage writes, deleted in pattern order; ``None``: the folder's record of its outputs.
    ``keep``: the stage's own files that stay (a lock). ``refuse_foreign``: a folder holding
    foreign files is refused before anything is deleted (the store will not be re-created
    beside them)."""
    import fnmatch

    if not path.exists():
        return
    listing = _listing(path)
    if owned is None:
        ours = sorted(_ours(_read_outputs(path), listing))
    else:
        ours = [p for pat in owned for p in sorted(listing) if fnmatch.fnmatchcase(p, pat)]
        ours = list(dict.fromkeys(ours))
    foreign = sorted(p for p in listing if p not in set(ours) and p not in keep)
    if foreign and refuse_foreign:
        raise ArtifactError(f"{path} holds {len(foreign)} file(s) branchlens did not write "
                            f"({_names(foreign)}); {why}: move them out of {path} so that it "
                            "can start clean")
    emptied: set[Path] = set()
    for rel in ours:
        (path / rel).unlink(missing_ok=True)
        emptied.update(p for p in (path / rel).parents if path in p.parents)
    for folder in sorted(emptied, key=lambda p: -len(p.parts)):  # deepest first
        if not any(folder.iterdir()):
            folder.rmdir()  # a folder of its outputs only; a foreign file keeps its folder
    if owned is None and (path / OUTPUTS_FILE).exists():
        if foreign:
            write_json(path / OUTPUTS_FILE, {"foreign": {p: listing[p] for p in foreign},
                                             "outputs": []})
        else:
            (path / OUTPUTS_FILE).unlink()
    if not any(path.iterdir()):
        path.rmdir()
    kept = f"; kept {len(foreign)} file(s) branchlens has no record of writing ({_names(foreign)})"
    log(f"[discard] {why}: discarded {len(ours)} file(s) of {path} and starting clean"
        f"{kept if foreign else ''}")


def content_digest(path: Path) -> str:
    """What identifies a file's content: the sha256 that :func:`save_tensors` put into a
    safetensors header (read without the tensors, so a large SAE costs nothing), else the
    sha256 of its bytes."""
    if path.suffix == ".safetensors":
        stored = _header_checksum(path)
        if stored is not None:
            return f"st:{stored}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _header_checksum(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= _MAX_HEADER:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        value = json.loads(meta[CHECKSUM_KEY])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) else None
