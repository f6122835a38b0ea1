"""The data side of each latent: firing counts, activation sums and top rows, checked against a
brute-force reference on a planted code, for both the dense and the sparse encoder output."""

from __future__ import annotations

import numpy as np
import torch

from branchlens.analysis.activity import latent_activity


def _planted(n_rows: int = 300, n: int = 40, k: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(n_rows)])
    vals = rng.exponential(1.0, (n_rows, k)).astype(np.float32)
    vals[rng.random((n_rows, k)) < 0.2] = 0.0  # TopK picks that did not fire
    dense = np.zeros((n_rows, n), np.float32)
    np.put_along_axis(dense, idx, vals, 1)
    return dense, idx, vals


def _reference(dense: np.ndarray, image: np.ndarray, top: int):
    n = dense.shape[1]
    top_val = np.zeros((n, top), np.float32)
    top_row = np.full((n, top), -1)
    for j in range(n):
        rows = np.flatnonzero(dense[:, j] > 0)
        rows = rows[np.argsort(-dense[rows, j], kind="stable")][:top]
        top_val[j, :rows.size], top_row[j, :rows.size] = dense[rows, j], rows
    imgs = [np.unique(image[dense[:, j] > 0]).size for j in range(n)]
    return (dense > 0).sum(0), dense.astype(np.float64).sum(0), top_val, top_row, np.array(imgs)


def test_dense_and_sparse_codes_give_the_brute_force_activity():
    dense, idx, vals = _planted()
    image = np.arange(dense.shape[0]) // 3
    fire, total, top_val, top_row, n_img = _reference(dense, image, top=7)
    encoders = {
        "dense": lambda x: torch.from_numpy(dense[_rows(x)]),
        "sparse": lambda x: (torch.from_numpy(vals[_rows(x)]), torch.from_numpy(idx[_rows(x)])),
    }
    for name, encode in encoders.items():
        a = latent_activity(encode, np.arange(dense.shape[0], dtype=np.float32)[:, None], image,
                            dense.shape[1], top=7, batch_size=64)  # several batches
        assert (a.fire_count == fire).all(), name
        assert np.allclose(a.act_sum, total), name
        assert np.allclose(a.top_val, top_val), name
        assert (a.top_row == top_row).all(), name
        assert (a.n_images_fired == n_img).all(), name
        assert a.n_vectors == dense.shape[0]
        kept = latent_activity(encode, np.arange(dense.shape[0], dtype=np.float32)[:, None],
                               image, dense.shape[1], top=7, batch_size=64, keep_codes=True)
        assert np.array_equal(kept.codes.toarray(), dense), name  # every row's code, in order


def _rows(x: torch.Tensor) -> np.ndarray:
    """The test's array holds each row's own index, so the encoder can look its code up."""
    return x[:, 0].long().numpy()
