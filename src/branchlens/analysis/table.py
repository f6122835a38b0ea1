"""The latent table ``analysis/latents.csv``: one row per latent of every analysed layer.

The analyze stage writes it and everything else (``Run``, viz, circuits, the report) reads it
through :func:`read_latent_table`, so a column is parsed the same way everywhere: lists are
``;``-joined (a ``;`` or ``\\`` inside an item is escaped by a backslash, see
:func:`join_list`), booleans ``True``/``False``, a missing number is empty (read as NaN).

The columns (:data:`LATENT_COLUMNS`, :data:`BRANCH_COLUMNS`, :data:`IMAGE_COLUMNS`, built into
rows by :func:`latent_rows`) and the ones that carry a *decision* are defined once, here:

- ``dominant``: the branch a latent lives in by the primary rule (raw decoder against the
  channel-permutation null, BH at q per branch): among its significant branches the one with
  the largest enrichment (energy share over channel share), or ``none``.
- ``robust_dominant``: the same, counting only branches also significant on the scale rule.
- ``top_images``: the latent's top held-out images (ids, best first; an image and its mirror
  count once), ranked by the latent's largest activation over the image's stored positions.
- ``specialization_<b>``: ``1 − q_raw_<b>`` where significant, else 0 — a sort key for
  browsing, not a statistic.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from branchlens.artifacts import atomic_path

# The columns of one row, in file order; a per-branch column is ``<name>_<branch>``, branch by
# branch (the layer's branches in order), and ``specialization_<branch>`` ends the row.
LATENT_COLUMNS = ("layer", "latent", "alive", "dead_in_training", "firing_rate",
                  "mean_activation", "mean_when_active", "n_images_fired", "dominant",
                  "robust_dominant", "d_eff")
BRANCH_COLUMNS = ("paper_ratio", "full_ratio", "paper_ratio_std", "full_ratio_std", "enrichment",
                  "enrichment_dict", "p_raw", "q_raw", "p_scale", "q_scale", "p_paper", "p_beta",
                  "p_isotropic", "attribution")
IMAGE_COLUMNS = ("top_category", "animal_fraction", "dog_fraction", "top_images", "top_labels")

INT_COLUMNS = frozenset({"latent", "n_images_fired"})
BOOL_COLUMNS = frozenset({"alive", "dead_in_training"})
STR_COLUMNS = frozenset({"layer", "dominant", "robust_dominant", "top_category"})
LIST_COLUMNS = {"top_images": str, "top_labels": int}
NO_BRANCH = "none"  # value of dominant / robust_dominant when no branch is significant


_TOKEN = re.compile(r"\\[\\;]|;|\\|[^;\\]+")  # an escape, the separator, a lone \, text


def join_list(items: Iterable[Any]) -> str:
    r"""Items ``;``-joined, each ``\`` and ``;`` in an item escaped by a backslash (an image file
    may be called ``a;b.jpg``); a list without either is the plain join it always was."""
    return ";".join(str(v).replace("\\", "\\\\").replace(";", "\\;") for v in items)


def split_list(cell: str) -> list[str]:
    r"""The items of :func:`join_list`. Only ``\\`` and ``\;`` are escapes, so a backslash in a
    table written before the escaping (``imgs/\xff.png``) reads unchanged."""
    if not cell:
        return []
    items: list[str] = []
    item = ""
    for tok in _TOKEN.findall(cell):
        if tok == ";":
            items.append(item)
            item = ""
        else:
            item += tok[1] if tok in ("\\\\", "\\;") else tok
    return [*items, item]


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return join_list(value)
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else f"{float(value):.6g}"
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def _typed(column: str, values: Any) -> list[Any]:
    """One column's values as the plain Python type :func:`parse_row` reads it back as."""
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if column in STR_COLUMNS or column in LIST_COLUMNS:
        return values
    kind = int if column in INT_COLUMNS else bool if column in BOOL_COLUMNS else float
    return [kind(v) for v in values]


def latent_rows(layer: str, branches: Sequence[str], q: float, columns: dict[str, Any],
                per_branch: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``latents.csv`` for one layer, in file order.

    ``columns``: every column of :data:`LATENT_COLUMNS` (but ``layer`` and ``latent``) and of
    :data:`IMAGE_COLUMNS`, one value per latent; ``per_branch``: every column of
    :data:`BRANCH_COLUMNS`, ``[n_latents, n_branches]`` in the order of ``branches``.
    """
    lead, tail = LATENT_COLUMNS[2:], IMAGE_COLUMNS
    missing = ({*lead, *tail} ^ set(columns)) | (set(BRANCH_COLUMNS) ^ set(per_branch))
    if missing:
        raise ValueError(f"latent table columns missing or unknown: {sorted(missing)}")
    col = {c: _typed(c, v) for c, v in columns.items()}
    per = {c: [_typed(c, r) for r in np.asarray(v).tolist()] for c, v in per_branch.items()}
    rows = []
    for i in range(len(col["alive"])):
        r: dict[str, Any] = {"layer": layer, "latent": i, **{c: col[c][i] for c in lead}}
        for j, b in enumerate(branches):
            r |= {f"{c}_{b}": per[c][i][j] for c in BRANCH_COLUMNS}
        r |= {c: col[c][i] for c in tail}
        r |= {f"specialization_{b}": specialization(r, b, q) for b in branches}
        rows.append(r)
    return rows


class LatentTableError(ValueError):
    """``latents.csv`` is cut short or damaged: only re-running the analysis repairs it."""


def write_latent_table(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows (all with the same keys, in order) atomically.

    Image ids are valid text since :class:`branchlens.data.RawRecord`; a store harvested
    before that may still hold surrogate-escaped file names, written as ``\\udcff`` escapes
    rather than failing after the whole analysis."""
    if not rows:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="", errors="backslashreplace") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})


def parse_row(raw: dict[str, str]) -> dict[str, Any]:
    """One CSV row with every column in its type (see the module docstring)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in STR_COLUMNS:
            out[k] = v
        elif k in INT_COLUMNS:
            out[k] = int(v)
        elif k in BOOL_COLUMNS:
            out[k] = v == "True"
        elif k in LIST_COLUMNS:
            out[k] = [LIST_COLUMNS[k](x) for x in split_list(v)]
        else:
            out[k] = float(v) if v not in ("", None) else math.nan
    return out


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def _damaged(path: Path, what: str) -> LatentTableError:
    return LatentTableError(f"{path}: {what} (truncated or damaged); re-run `branchlens analyze "
                            f"{path.parent.parent}` to write it again")


def iter_latent_table(path: str | Path, layer: str | None = None) -> Iterator[dict[str, Any]]:
    """Typed rows; a half-written last line or a row of the wrong width is an error, never a
    row (the writer ends every line, so a file without a final newline was cut off)."""
    path = Path(path)
    if not _ends_with_newline(path):
        raise _damaged(path, "the last line is cut off")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        head = next(reader, [])
        for cells in reader:
            if len(cells) != len(head):
                raise _damaged(path, f"line {reader.line_num} has {len(cells)} of {len(head)} "
                                     "fields")
            raw = dict(zip(head, cells, strict=True))
            if layer is not None and raw.get("layer") != layer:
                continue
            try:
                row = parse_row(raw)
            except ValueError as e:
                raise _damaged(path, f"line {reader.line_num}: {e}") from None
            yield row


def read_latent_table(path: str | Path, layer: str | None = None) -> list[dict[str, Any]]:
    """Typed rows of ``latents.csv`` (of one layer if given), in latent order."""
    return list(iter_latent_table(path, layer))


def branches_of(columns: Iterable[str]) -> list[str]:
    """Branch names in column order, from the ``q_raw_<branch>`` columns."""
    return [c.removeprefix("q_raw_") for c in columns if c.startswith("q_raw_")]


def specialization(row: dict[str, Any], branch: str, q: float) -> float:
    """``1 − q_raw`` where the latent is significant in ``branch`` at level q, else 0."""
    qv = float(row.get(f"q_raw_{branch}", math.nan))
    return 1.0 - qv if qv <= q else 0.0
