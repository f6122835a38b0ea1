"""WebDataset shards as a streamed source, read by the ``webdataset`` library (``wds:SHARDS``).

Shards are expanded and opened as ``webdataset`` does (braces, ``::``, URLs, ``pipe:``); each
is a unit counted once (headers only, cached per local file). A shard that cannot be read
becomes one :class:`~branchlens.data.streams.StreamError` line naming it and the cause.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchlens.data.records import IMAGE_SUFFIXES, BadImage, RawRecord
from branchlens.data.streams import StreamError, StreamSource, missing_extra

_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # pipe:, http(s):, s3:, gs:, hf: ...


@dataclass
class _NoImage:
    key: str

    def __call__(self) -> Any:
        raise BadImage("no_image", f"sample {self.key} has no image member")


def _is_local(url: str) -> bool:
    return not _REMOTE.match(url) or url.startswith("file:")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file:")).expanduser()


class WebDatasetSource(StreamSource):
    """WebDataset shards, as ``webdataset`` expands and opens them (braces, ``::``, URLs,
    ``pipe:``). Samples are webdataset's key groups; the first image member is the image, a
    ``cls`` member the label. A sample without an image is a counted skip, not a shift of ids.
    """

    def __init__(self, spec: str, limit: int | None = None):
        try:
            from webdataset.shardlists import expand_urls
        except ImportError:
            raise missing_extra("webdataset", "webdataset") from None
        urls: list[str] = []
        for url in expand_urls(spec):
            if _is_local(url) and not _local_path(url).exists() and glob.has_magic(url):
                urls += sorted(glob.glob(str(_local_path(url))))  # a shell-style pattern
            else:
                urls.append(url)
        if not urls:
            raise FileNotFoundError(f"wds:{spec} names no shard")
        missing = [u for u in urls if _is_local(u) and not _local_path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"wds:{spec}: {len(missing)} of {len(urls)} shards not found "
                                    f"(first: {missing[0]})")
        twice = next((u for u, n in Counter(urls).items() if n > 1), None)
        if twice is not None:
            raise ValueError(f"wds:{spec} names shard {twice} twice; its images would be "
                             "stored twice under the same ids")
        self.urls, self.limit = urls, limit
        self.names = shard_names(urls)
        self.description = f"wds:{spec}"

    @property
    def n_units(self) -> int:
        return len(self.urls)

    def count_units(self) -> list[int]:
        sizes, total = [], 0
        for url in self.urls:
            if self.limit is not None and total >= self.limit:
                break
            try:
                n = count_shard(url)
            except StreamError as e:
                raise StreamError(f"{self.description}: {e}") from None
            if self.limit is not None:
                n = min(n, self.limit - total)
            sizes.append(n)
            total += n
        return sizes

    def unit_records(self, u: int) -> Iterator[RawRecord]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        url, size, name = self.urls[u], self.unit_sizes[u], self.names[u]
        try:
            with _open_shard(url) as stream:
                samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
                for pos, sample in enumerate(samples):
                    if pos >= size:
                        return
                    key = sample["__key__"]
                    image = next((v for k, v in sample.items() if not k.startswith("__")
                                  and f".{k.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES), None)
                    yield RawRecord(f"wds:{name}:{key}", _cls_label(sample.get("cls")),
                                    _NoImage(key) if image is None else image)
        except StreamError as e:
            raise StreamError(f"{self.description}: {e}") from None


def shard_names(urls: Sequence[str]) -> list[str]:
    """Each shard as the spec names it, less the folder all of them share: the part of its
    image ids that tells shards apart. One folder's shards keep short ids (``wds:000.tar:KEY``);
    same-named shards of two folders stay apart (``wds:a/000.tar:KEY``, ``wds:b/000.tar:KEY``)."""
    cut = os.path.commonprefix(list(urls)).rfind("/") + 1
    return [u[cut:] or u for u in urls]


class _Counted:
    """A shard's byte stream that counts what it delivered (for "truncated at byte N") and
    keeps its last block (a whole tar ends in zero blocks)."""

    def __init__(self, raw: Any):
        self.raw, self.pos, self.head, self.tail = raw, 0, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if self.pos < len(COMPRESSED[-1]):
            self.head = (self.head + data)[:len(COMPRESSED[-1])]
        self.pos += len(data)
        self.tail = (self.tail + data)[-TAR_BLOCK:]
        return data

    def check_complete(self) -> None:
        """Read to the end and refuse a plain tar without its end-of-archive blocks: cut at or
        inside a member header, a shard looks to ``tarfile`` like a shorter whole one. (In a
        compressed shard the decompressor notices a cut.)"""
        while self.read(1 << 16):
            pass
        if self.head.startswith(COMPRESSED):
            return
        if self.pos % TAR_BLOCK or self.tail.count(0) != TAR_BLOCK:
            raise tarfile.ReadError(NO_END_MARKER)


PIPE_WAIT_S = 5.0  # how long a shard's command may take to exit once its output is closed
TAR_BLOCK = 512
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic (longest last)
NO_END_MARKER = "no end-of-archive blocks"
_TRUNCATED = ("unexpected end of data", "empty header", "truncated header", NO_END_MARKER)
CURL_EXITS = {6: "could not resolve the host", 7: "could not connect",
              22: "the server answered with an HTTP error", 28: "timed out",
              35: "the TLS handshake failed", 56: "the connection broke while receiving"}
_URL_HOST = re.compile(r"(https?)://([^/:\s'\"]+)(?::(\d+))?")


@contextlib.contextmanager
def _open_shard(url: str) -> Iterator[_Counted]:
    """The shard's bytes as webdataset's ``gopen`` opens them (files, URLs, ``pipe:``); any
    failure while they are read becomes a :class:`StreamError` naming the shard and its cause."""
    from webdataset.gopen import gopen

    stream = None
    try:
        stream = _Counted(gopen(url))
        yield stream
    except StreamError:
        raise
    except Exception as e:
        raise StreamError(f"shard {url}: {_cause(e, stream, url)}") from None
    finally:
        if stream is not None:
            _close(stream.raw)


def _close(raw: Any) -> None:
    """Close a shard read to its end or left early; a command still running after
    :data:`PIPE_WAIT_S` is killed instead of waited for."""
    proc = getattr(raw, "proc", None)
    try:
        if proc is None:
            raw.close()
            return
        raw.stream.close()
        try:
            proc.wait(timeout=PIPE_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    except Exception:  # closing never hides the shard's own error, nor raises one of its own
        pass


def _cause(e: Exception, stream: _Counted | None, url: str) -> str:
    """What went wrong, in words: a command's exit status, a truncation point, an OS error."""
    raw = stream.raw if stream is not None else None
    proc = getattr(raw, "proc", None)
    if proc is not None:
        try:
            status = proc.wait(timeout=PIPE_WAIT_S)
        except subprocess.TimeoutExpired:
            status = None
        if status not in (None, 0, 141, -signal.SIGPIPE):  # 141: a shell's SIGPIPE
            return _exit_cause(raw, status, url)
    msg = (str(e.args[0]) if e.args else str(e)).split(" @ ")[0]  # webdataset adds " @ <obj>"
    n = stream.pos if stream is not None else 0
    if isinstance(e, tarfile.TarError):
        if n == 0:
            return "the command wrote no bytes" if proc is not None else "empty (0 bytes)"
        if msg in _TRUNCATED:
            return f"truncated at byte {n} ({msg})"
        return f"not a tar archive ({msg}; {n} bytes read)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _exit_cause(raw: Any, status: int, url: str) -> str:
    argv = raw.args[0][0] if getattr(raw, "args", None) and raw.args[0] else ""
    cmd = argv if isinstance(argv, str) else " ".join(map(str, argv))
    prog = cmd.split()[0] if cmd.split() else "the command"
    who = f"command `{cmd[:200]}`" if url.startswith("pipe:") else prog
    if status < 0:
        return f"{who} was killed by signal {-status}"
    why = ""
    if Path(prog).name == "curl" and status in CURL_EXITS:
        why = f" ({CURL_EXITS[status]}{_connect_error(url) if status == 7 else ''})"
    return f"{who} exited with status {status}{why}"


def _connect_error(text: str) -> str:
    """Why the first http(s) host in ``text`` refuses a connection, asked of the OS once."""
    m = _URL_HOST.search(text)
    if m is None:
        return ""
    host, port = m.group(2), int(m.group(3) or (443 if m.group(1) == "https" else 80))
    try:
        socket.create_connection((host, port), timeout=PIPE_WAIT_S).close()
    except OSError as e:
        return f" to {host}:{port}: {(e.strerror or str(e) or type(e).__name__).lower()}"
    return f" to {host}:{port}, which accepts connections now"


def _cls_label(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None


_COUNT_CACHE: dict[str, int] = {}


def _cache_file() -> Path:
    root = os.environ.get("BRANCHLENS_CACHE") or Path.home() / ".cache" / "branchlens"
    return Path(root) / "wds-counts.json"


def count_shard(url: str) -> int:
    """Samples in one shard, grouped exactly as webdataset groups them (headers only: member
    data is skipped, not decoded). Local shards are cached by path, size and mtime."""
    key = url
    if _is_local(url):
        st = _local_path(url).stat()
        key = f"{_local_path(url).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in _COUNT_CACHE:
        return _COUNT_CACHE[key]
    disk: dict[str, int] = {}
    if _is_local(url):
        try:
            disk = json.loads(_cache_file().read_text())
        except (OSError, ValueError):
            disk = {}
        if isinstance(disk.get(key), int):
            _COUNT_CACHE[key] = disk[key]
            return disk[key]
    n = _count_keys(url)
    _COUNT_CACHE[key] = n
    if _is_local(url):
        disk[key] = n
        try:
            from branchlens.artifacts import write_json

            write_json(_cache_file(), disk)
        except OSError:
            pass  # a read-only home only costs a recount
    return n


def _count_keys(url: str) -> int:
    from webdataset.tariterators import base_plus_ext, tar_file_expander

    state: dict[str, Any] = {"key": None, "n": 0}

    def select(fname: str) -> bool:  # sees every member name; reads no member data
        prefix, _ = base_plus_ext(fname)
        if prefix is not None and prefix != state["key"]:
            state["key"] = prefix
            state["n"] += 1
        return False

    with _open_shard(url) as stream:
        for _ in tar_file_expander([{"url": url, "stream": stream}], select_files=select):
            state["key"] = None  # end of shard: webdataset never groups across shards
        stream.check_complete()
    return state["n"]
