"""Moved: image records and decoding live in :mod:`branchlens.data` (``records``, ``decode``).

This module re-exports their public names, kept for one release. A test that patches a module
attribute patches it where it is looked up (``branchlens.data.decode.MAX_FILE_BYTES``).
"""

from __future__ import annotations

from branchlens.data.decode import (  # kept for one release
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
from branchlens.data.records import (  # kept for one release
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

__all__ = [
    "FLIP_VIEW", "IMAGE_SUFFIXES", "MAX_FILE_BYTES", "MAX_PIXELS", "VIEW_SEP", "BadImage",
    "ImageSource", "RawRecord", "SkipStats", "decode_image", "decode_one", "flipped",
    "normalize", "preprocess", "resize_center_crop", "text_id", "to_unit_tensor", "view_group",
]
