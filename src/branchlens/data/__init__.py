"""Image sources, robust decoding and per-variant preprocessing.

A source is a sequence of raw records ``(image_id, label, payload)``; the payload (a path, bytes
or a PIL image) is decoded in worker processes. Any file that cannot become an RGB image is
skipped and counted by reason, never raised and never turned into NaNs. Image ids are stable
(``source:relative/path`` or ``source:index``) so every stored activation can be traced back.

Source specs accepted by :func:`open_source`:
``embedded[:N]`` (photos shipped in scikit-image, expanded to N seeded views), a folder
(recursive; ImageNet ``<wnid>/`` subfolders or ``<wnid>_name.JPEG`` files give labels), a ``.txt``
file list (``path [label]`` per line), ``hf:NAME[:SPLIT][?image=KEY&label=KEY]`` (a hub
dataset, streamed under a limit, or a local ``save_to_disk``/imagefolder/parquet folder) and
``wds:SHARDS`` (WebDataset shards as ``webdataset`` expands them: braces, ``::``, URLs,
``pipe:``).

One idea per module, each importing only those above it in this list: ``records`` (records,
view ids, skip counts, the source type), ``decode`` (decoding and preprocessing), ``sources``
(folders, file lists, embedded photos, flipped views), ``streams`` (sources read unit by unit),
``wds`` and ``hf`` (the two streamed kinds), ``spec`` (the spec parser), ``batching`` (batches
and the share of each rank). Every public name is re-exported here, where callers find it.
"""

from __future__ import annotations

from branchlens.data.batching import Batch, iter_batches, split_for_rank
from branchlens.data.decode import (
    MAX_FILE_BYTES,
    MAX_PIXELS,
    decode_image,
    decode_one,
    flipped,
    normalize,
    preprocess,
    resize_center_crop,
    to_unit_tensor,
)
from branchlens.data.hf import (
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
from branchlens.data.records import (
    FLIP_VIEW,
    IMAGE_SUFFIXES,
    VIEW_SEP,
    BadImage,
    ImageSource,
    RawRecord,
    SkipStats,
    text_id,
    view_group,
)
from branchlens.data.sources import (
    EMBEDDED_PHOTOS,
    EmbeddedSource,
    FileListSource,
    FlipViews,
    FolderSource,
    Truncated,
)
from branchlens.data.spec import open_source
from branchlens.data.streams import (
    FlipStream,
    StreamedDecode,
    StreamError,
    StreamSource,
    is_stream,
    missing_extra,
    unit_share,
)
from branchlens.data.wds import (
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
    "COMPRESSED", "CURL_EXITS", "EMBEDDED_PHOTOS", "FLIP_VIEW", "HF_UNIT_ROWS", "IMAGE_SUFFIXES",
    "MAX_FILE_BYTES", "MAX_PIXELS", "NO_END_MARKER", "PIPE_WAIT_S", "TAR_BLOCK", "VIEW_SEP",
    "BadImage", "Batch", "ClassNameMap", "EmbeddedSource", "FileListSource", "FlipStream",
    "FlipViews", "FolderSource", "HFSource", "HFStreamSource", "ImageSource", "RawRecord",
    "SkipStats", "StreamError", "StreamSource", "StreamedDecode", "Truncated",
    "WebDatasetSource", "count_shard", "decode_image", "decode_one", "flipped", "hf_spec",
    "is_stream", "iter_batches", "label_mapping", "map_class_names", "missing_extra",
    "normalize", "open_hf", "open_source", "parse_hf_spec", "preprocess", "resize_center_crop",
    "shard_names", "split_for_rank", "text_id", "to_unit_tensor", "unit_share", "view_group",
    "with_columns",
]
