"""Coarse categories of the 1000 ImageNet-1k classes (standard ILSVRC-2012 index order).

How the table was derived: the ILSVRC-2012 class list (src/branchlens/resources/
imagenet_classes.txt, WordNet id + names, in the usual index order 0–999) is sorted by WordNet
id, so WordNet's hierarchy shows up as contiguous index ranges. The ranges below were read
off that file by hand (first and last class of each run are quoted in the comments) and are
checked against the names in tests/test_analysis_categories.py. Indices 0–397 are animals:
dogs 151–268 (Chihuahua … Mexican hairless), birds 7–24, 80–100 and 127–146; everything else
in 0–397 is "other_animal" (fish, reptiles, amphibians, invertebrates, other mammals).
398–999 are artifacts except food, scenes/landscapes, people and plants/fungi below.

Labels are the *dataset's* ImageNet-1k indices (what the store records), whatever the model's
own class count (inception5h has 1008 outputs in a different order).
"""

from __future__ import annotations

import numpy as np

# (first, last) inclusive index ranges per category; the order of checks does not matter
# because the ranges do not overlap (a test checks that every index 0–999 has one category).
RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "dog": ((151, 268),),  # Chihuahua … Mexican hairless
    "bird": ((7, 24),  # cock … great grey owl
             (80, 100),  # black grouse … black swan
             (127, 146)),  # white stork … albatross
    "other_animal": ((0, 6),  # tench … stingray (fish)
                     (25, 79),  # European fire salamander … centipede (amphibians, reptiles,
                     #            trilobite, arachnids)
                     (101, 126),  # tusker … isopod (marsupials, invertebrates)
                     (147, 150),  # grey whale … sea lion
                     (269, 397)),  # timber wolf … puffer (wild canids, cats, bears, insects,
    #                                 mammals, primates, fish)
    "food": ((924, 969),  # guacamole … eggnog (dishes, vegetables, fruit, drinks)
             (987, 987),  # corn
             (998, 998)),  # ear (of corn)
    "scene": ((970, 980),),  # alp … volcano (landscapes)
    "person": ((981, 983),),  # ballplayer, groom, scuba diver
    "plant": ((984, 986),  # rapeseed, daisy, yellow lady's slipper
              (988, 997)),  # acorn … bolete (fruits of trees, fungi)
    "artifact": ((398, 923),  # abacus … plate
                 (999, 999)),  # toilet tissue
}
CATEGORIES: tuple[str, ...] = ("dog", "bird", "other_animal", "food", "scene", "person",
                               "plant", "artifact")
ANIMAL: frozenset[str] = frozenset({"dog", "bird", "other_animal"})
N_CLASSES = 1000


def _build_table() -> np.ndarray:
    table = np.full(N_CLASSES, -1, dtype=np.int64)
    for ci, name in enumerate(CATEGORIES):
        for lo, hi in RANGES[name]:
            if np.any(table[lo:hi + 1] != -1):
                raise AssertionError(f"overlapping category range {name} {lo}-{hi}")
            table[lo:hi + 1] = ci
    return table


CATEGORY_OF_CLASS: np.ndarray = _build_table()  # [1000] index into CATEGORIES


def category(label: int | None) -> str | None:
    """Coarse category of an ImageNet-1k class index (None for unknown/out-of-range labels)."""
    if label is None or not 0 <= int(label) < N_CLASSES:
        return None
    return CATEGORIES[CATEGORY_OF_CLASS[int(label)]]


def is_animal(label: int | None) -> bool | None:
    c = category(label)
    return None if c is None else c in ANIMAL


def category_fractions(labels) -> dict[str, float]:
    """Fraction of known labels in each category plus ``animal``; empty dict if none known."""
    labs = np.array([int(x) for x in labels if x is not None and 0 <= int(x) < N_CLASSES])
    if labs.size == 0:
        return {}
    counts = np.bincount(CATEGORY_OF_CLASS[labs], minlength=len(CATEGORIES)) / labs.size
    out = {c: float(counts[i]) for i, c in enumerate(CATEGORIES)}
    out["animal"] = out["dog"] + out["bird"] + out["other_animal"]
    return out


def top_category(labels) -> str | None:
    """Most frequent coarse category among the labels (ties: first in CATEGORIES order)."""
    fr = category_fractions(labels)
    if not fr:
        return None
    return max(CATEGORIES, key=lambda c: fr[c])


def category_test(animal_fraction: np.ndarray, dominant: np.ndarray,
                  branches: list[str]) -> dict[str, dict]:
    """The paper's "5x5 ⇒ animals", per branch: animal fraction of the top images of latents
    dominant in that branch vs all other latents (NaN fractions — no labelled top images — are
    left out). Mann–Whitney U, two-sided; ``effect`` is the rank-biserial correlation.
    Latents share images, so the p-value treats dependent latents as independent (optimistic).
    """
    from branchlens.analysis.stats import mann_whitney

    frac = np.asarray(animal_fraction, dtype=np.float64)
    out = {}
    for i, b in enumerate(branches):
        m = np.asarray(dominant) == i
        out[b] = mann_whitney(frac[m], frac[~m])
    return out


def category_bootstrap(tops: list[list[int]], image_animal: np.ndarray, image_group: np.ndarray,
                       dominant: np.ndarray, branches: list[str], *, images: np.ndarray,
                       n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per branch: animal fraction of the top images of its dominant latents vs the same
    statistic over every *other* latent (same top-image procedure, the decision contrast:
    ``difference``), with the images' base rate as a reference (``difference_vs_base``).

    Comparing with the base rate alone confounds "5x5 latents prefer animals" with "top images
    of any latent are animal-rich" (ImageNet's animal images are the textured, high-contrast
    ones that drive many units).

    The statistic is the mean over latents dominant in b of the animal fraction of their top
    images (labelled ones); the reference is the animal fraction of ``images`` (the images the
    top images were drawn from, e.g. held-out ones). Latents share images, so the interval is
    an image-cluster bootstrap: image groups (an image with its mirror) are resampled with
    replacement and both the statistic and the base rate are recomputed on the resample.
    Two-sided p from the bootstrap distribution of the difference (centred).
    """
    animal = np.asarray(image_animal, np.float64)  # [n_images], NaN = unlabelled
    groups = np.asarray(image_group)
    pool = np.asarray(images, np.int64)
    pool = pool[np.isfinite(animal[pool])]
    ug, ginv = np.unique(groups[pool], return_inverse=True)
    col = {int(im): k for k, im in enumerate(pool)}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(ug.size, np.full(ug.size, 1 / ug.size), size=n_boot) \
        if ug.size else np.zeros((n_boot, 0))
    kimg = counts[:, ginv].astype(np.float64)  # [n_boot, n_pool] image weights
    a = animal[pool]
    base = float(a.mean()) if a.size else float("nan")
    per_latent: dict[int, list[int]] = {}
    for lat, t in enumerate(tops):
        idx = [col[x] for x in t if x in col]
        if idx:
            per_latent[lat] = idx
    all_w = np.zeros(pool.size)
    for idx in per_latent.values():
        np.add.at(all_w, idx, 1.0 / len(idx))
    n_with_tops = len(per_latent)
    out = {}
    for i, b in enumerate(branches):
        w = np.zeros(pool.size)
        n_lat = 0
        for lat in np.flatnonzero(np.asarray(dominant) == i):
            idx = per_latent.get(int(lat))
            if idx:
                np.add.at(w, idx, 1.0 / len(idx))
                n_lat += 1
        wo = all_w - w  # every other latent with labelled top images, each weighted once
        n_other = n_with_tops - n_lat
        row = {"latents": n_lat, "other_latents": n_other, "base_rate": base}
        if n_lat == 0 or n_other == 0:
            out[b] = row | {"animal_fraction": None, "other_fraction": None,
                            "difference": None, "difference_vs_base": None, "ci_low": None,
                            "ci_high": None, "p_value": None}
            continue
        stat, other = float(w @ a / w.sum()), float(wo @ a / wo.sum())
        num, den = kimg @ (w * a), kimg @ w
        onum, oden = kimg @ (wo * a), kimg @ wo
        ok = (den > 0) & (oden > 0)
        diff_b = num[ok] / den[ok] - onum[ok] / oden[ok]
        diff = stat - other
        p = float((1 + np.sum(np.abs(diff_b - diff) >= abs(diff))) / (1 + diff_b.size))
        lo, hi = np.quantile(diff_b, [0.025, 0.975]) if diff_b.size else (np.nan, np.nan)
        out[b] = row | {"animal_fraction": stat, "other_fraction": other, "difference": diff,
                        "difference_vs_base": stat - base, "ci_low": float(lo),
                        "ci_high": float(hi), "p_value": min(p, 1.0)}
    return out
