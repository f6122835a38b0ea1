"""What the analysis reads from an activation store besides the vectors' statistics.

Any object with the store API will do (:class:`branchlens.store.ActivationStore`, a test's
in-memory one): the held-out rows of a layer as an array, which images are views of one
underlying image (a photo and its mirror share a group), and the images' class labels.
"""

from __future__ import annotations

import numpy as np


class RowView:
    """Rows ``rows`` of a store array as an array-like (slices and index arrays)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, np.int64)
        self.shape = (self.rows.size, int(array.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.array[self.rows[key]])


def heldout_rows(store, layer: str, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The store rows of ``layer`` that come from the images ``held``, and each row's image."""
    img_all = np.asarray(store.provenance(layer))[:, 0].astype(np.int64)
    rows = np.flatnonzero(np.isin(img_all, held))
    return rows, img_all[rows]


def image_groups(store) -> np.ndarray:
    """[n_images] group index: an image and its mirror/crop views share one."""
    from branchlens.data import view_group

    names = [view_group(str(r.get("id", i))) for i, r in enumerate(store.images)]
    _, inv = np.unique(names, return_inverse=True)
    return inv.astype(np.int64)


def image_labels(store) -> np.ndarray:
    """[n_images] class index of each image, −1 where it has none."""
    return np.array([(-1 if im.get("label") is None else int(im["label"]))
                     for im in store.images], dtype=np.int64)
