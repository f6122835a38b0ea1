"""Moved: streamed sources live in :mod:`branchlens.data` (``streams``, ``wds``, ``hf``).

This module re-exports their public names, kept for one release. A test that patches a module
attribute patches it where it is looked up (``branchlens.data.wds``, ``branchlens.data.hf``).
"""

from __future__ import annotations

from branchlens.data.hf import (  # kept for one release
    HF_UNIT_ROWS,
    ClassNameMap,
    HFSource,
    HFStreamSource,
    hf_spec,
    label_mapping,
    map_class_names,
    open_hf,
    parse_hf_spec,
    with_columns,
)
from branchlens.data.streams import (  # kept for one release
    FlipStream,
    StreamedDecode,
    StreamError,
    StreamSource,
    log,
    missing_extra,
    unit_share,
)
from branchlens.data.wds import (  # kept for one release
    COMPRESSED,
    CURL_EXITS,
    NO_END_MARKER,
    PIPE_WAIT_S,
    TAR_BLOCK,
    WebDatasetSource,
    count_shard,
    shard_names,
)

__all__ = [
    "COMPRESSED", "CURL_EXITS", "HF_UNIT_ROWS", "NO_END_MARKER", "PIPE_WAIT_S", "TAR_BLOCK",
    "ClassNameMap", "FlipStream", "HFSource", "HFStreamSource", "StreamError", "StreamSource",
    "StreamedDecode", "WebDatasetSource", "count_shard", "hf_spec", "label_mapping", "log",
    "map_class_names", "missing_extra", "open_hf", "parse_hf_spec", "shard_names", "unit_share",
    "with_columns",
]
