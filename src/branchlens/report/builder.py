"""Gather a run directory's artifacts into one :class:`ReportContext`, tolerating gaps.

The report is the last stage and is often built on a run that is only partly done, or whose
stages changed format. So every reader here returns ``None``/empty on a missing file and records
a note (shown in the report) on an unreadable one, instead of raising: a half-finished run
still gets a report that says what is missing and which command makes it.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchlens.layout import RunLayout
from branchlens.report.columns import LayerColumns, read_columns

BRANCH_ORDER = ("1x1", "3x3", "5x5", "pool")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")


def shell_command(*parts: Any) -> str:
    """A command line to paste into a POSIX shell: every part quoted where needed, so a run
    path with spaces or quotes stays one argument."""
    return " ".join(shlex.quote(str(p)) for p in parts)


@dataclass
class SaeInfo:
    """One trained layer: ``cfg.json`` (SAE config + train/eval metadata) and its curves."""

    layer: str
    cfg: dict[str, Any]
    metrics: list[dict[str, Any]]
    curves: Path | None

    @property
    def sae(self) -> dict[str, Any]:
        return self.cfg.get("sae", {}) if isinstance(self.cfg.get("sae"), dict) else {}

    @property
    def evals(self) -> dict[str, Any]:
        """Final evaluation: cfg.json ``eval``, else the ``final`` line of metrics.jsonl."""
        ev = self.cfg.get("eval")
        if isinstance(ev, dict):
            return ev
        finals = [m for m in self.metrics if m.get("final")]
        return finals[-1] if finals else {}


@dataclass
class LatentViz:
    """Images and links that viz/ and circuits produced for one latent."""

    featurevis: list[tuple[str, Path]] = field(default_factory=list)  # (caption, file)
    examples: list[tuple[str, Path]] = field(default_factory=list)  # (caption, file)
    upstream: list[dict[str, Any]] = field(default_factory=list)  # {layer, latent, score}


@dataclass
class ReportContext:
    """Everything the renderer needs; each part is empty when its stage has not run."""

    run_dir: Path
    run: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    saes: dict[str, SaeInfo] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    columns: dict[str, LayerColumns] = field(default_factory=dict)  # analysis/latents.csv
    viz: dict[tuple[str, int], LatentViz] = field(default_factory=dict)
    circuits: list[dict[str, Any]] = field(default_factory=list)  # viz/circuits/<up>__<down>
    circuits_found: bool = False
    notes: list[str] = field(default_factory=list)
    assets: Any = None  # browse.Assets of the report being written (figures are copied there)

    @property
    def layout(self) -> RunLayout:
        """The run folder's paths (the report spells none of them itself)."""
        return RunLayout(self.run_dir)

    @property
    def layers(self) -> list[str]:
        """Layers known to any stage, in the analysis order when there is one."""
        seen: list[str] = []
        for name in [*(self.summary or {}).get("layers", []), *self.saes,
                     *self.columns]:
            if name not in seen:
                seen.append(name)
        return seen

    @property
    def variant(self) -> str | None:
        for doc in (self.manifest, *(s.sae for s in self.saes.values()), self.run):
            v = find_key(doc, "variant", depth=2)  # run.json keeps it under "config"
            if isinstance(v, str):
                return v
        return None

    @property
    def weights(self) -> dict[str, Any] | None:
        """The weights record (``WeightsInfo.to_dict()``) of the first stage that wrote one."""
        for doc in (self.run, self.manifest, *(s.cfg for s in self.saes.values())):
            w = find_key(doc, "weights")
            if isinstance(w, dict):
                return w
        return None

    @property
    def random_weights(self) -> bool:
        """True when any stage recorded random weights (then nothing here means anything)."""
        docs = (self.run, self.manifest, *(s.cfg for s in self.saes.values()))
        return any(_has_random(find_key(d, "weights")) for d in docs)

    def slices(self, layer: str) -> dict[str, list[int]]:
        """Branch -> [start, stop] channels (analysis summary, else the SAE config)."""
        per = ((self.summary or {}).get("per_layer") or {}).get(layer) or {}
        slices = per.get("branch_slices") or (self.saes[layer].sae.get("branch_slices")
                                              if layer in self.saes else None)
        if isinstance(slices, dict) and all(isinstance(v, list | tuple) and len(v) == 2
                                            for v in slices.values()):
            return {str(b): [int(v[0]), int(v[1])] for b, v in slices.items()}
        return {}

    def branches(self, layer: str) -> list[str]:
        return list(self.slices(layer)) or list(BRANCH_ORDER)


def find_key(doc: Any, key: str, depth: int = 4) -> Any:
    """First value stored under ``key`` in nested dicts (breadth first, bounded depth)."""
    level = [doc]
    for _ in range(depth):
        nxt = []
        for d in level:
            if isinstance(d, dict):
                if key in d:
                    return d[key]
                nxt.extend(v for v in d.values() if isinstance(v, dict))
        level = nxt
    return None


def _has_random(w: Any) -> bool:
    if isinstance(w, dict):
        return w.get("random") is True or w.get("source") == "random"
    return w == "random"


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"could not read {path.name}: {type(e).__name__}: {e}")
        return None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            notes.append(f"{path.parent.name}/{path.name}: skipped unreadable line {i + 1}")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def find_run_image(base: Path, name: Any, root: Path) -> Path | None:
    """An image file named in an index, relative to the index's folder; only files inside the
    run directory are inlined (an index must not pull arbitrary files into a shared report)."""
    if not isinstance(name, str) or not name:
        return None
    p = Path(name)
    root = root.resolve()
    for cand in ((p,) if p.is_absolute() else (base / p, base.parent / p)):
        if cand.suffix.lower() in IMAGE_EXT and cand.is_file():
            if cand.resolve().is_relative_to(root):
                return cand
    return None


def _doc_layer(doc: dict, *keys: str) -> Any:
    return next((doc[k] for k in keys if isinstance(doc.get(k), str)), None)


def _entry_latent(e: dict, doc: dict) -> tuple[str, int] | None:
    """(layer, latent) of an index entry; circuits documents name the downstream layer."""
    layer = e.get("layer") or _doc_layer(doc, "layer", "down", "downstream", "downstream_layer",
                                         "dst")
    lat = e.get("latent", e.get("id", e.get("index")))
    if isinstance(layer, str) and isinstance(lat, int) and not isinstance(lat, bool):
        return layer, lat
    return None


def _entry_files(e: dict) -> list[Any]:
    files: list[Any] = []
    for key in ("file", "path", "png", "image", "strip"):
        if isinstance(e.get(key), str):
            files.append(e[key])
    for key in ("files", "crops", "examples", "images"):
        v = e.get(key)
        if isinstance(v, list):
            for x in v:
                if isinstance(x, str):
                    files.append(x)
                elif isinstance(x, dict):
                    files.extend(x.get(k) for k in ("file", "path", "crop") if x.get(k))
    return files


def _is_examples(path: Path, doc: dict) -> bool:
    """Dataset-example strips (viz/examples.py: ``receptive_field``, ``n_top``, per-latent
    ``examples``) rather than feature visualizations (``objective``, ``render``)."""
    if "receptive_field" in doc or "n_top" in doc:
        return True
    if "objective" in doc or "render" in doc:
        return False
    text = f"{path.parent.name} {path.name} {doc.get('kind', '')}".lower()
    return "example" in text or "crop" in text or "strip" in text


def _example_ids(e: dict) -> str:
    ex = e.get("examples")
    if not isinstance(ex, list):
        return ""
    ids = [str(x.get("image_id")) for x in ex if isinstance(x, dict) and x.get("image_id")]
    return ", ".join(ids[:8])


def _upstream(e: dict, doc: dict) -> list[dict[str, Any]]:
    """Top upstream latents of a circuits entry (``circuits.top_upstream`` rows)."""
    up_layer = _doc_layer(doc, "up", "upstream", "upstream_layer", "src")
    for key in ("upstream", "top_upstream", "inputs", "sources"):
        v = e.get(key)
        if isinstance(v, list):
            out = []
            for u in v:
                if isinstance(u, dict) and isinstance(u.get("latent"), int):
                    score = u.get("attribution", u.get("score", u.get("weight")))
                    out.append({"layer": u.get("layer") or up_layer, "latent": u["latent"],
                                "score": score if isinstance(score, int | float) else None,
                                "share": u.get("share"), "dominant": u.get("dominant"),
                                "error_share": e.get("error_share")})
            return out
    return []


def read_viz(viz_dir: Path, ctx: ReportContext) -> None:
    """Index every JSON under ``RUN/viz`` that lists per-latent images or upstream latents.

    The viz stage writes one index per (layer, objective) and separate example/circuit indices;
    reading any JSON with a ``latents`` list keeps the report working as those formats grow.
    """
    if not viz_dir.is_dir():
        return
    for path in sorted(viz_dir.rglob("*.json")):
        top = _read_json(path, ctx.notes)
        for doc in _subdocs(top):
            _read_index(path, doc, ctx)


def _subdocs(doc: Any) -> list[dict]:
    """The document, or its parts (e.g. one circuits block per layer pair) that list latents."""
    if isinstance(doc, dict) and "latents" in doc:
        return [doc]
    parts = doc if isinstance(doc, list) else (
        [x for v in doc.values() if isinstance(v, list | dict)
         for x in (v if isinstance(v, list) else v.values())] if isinstance(doc, dict) else [])
    return [d for d in parts if isinstance(d, dict) and "latents" in d]


def _read_index(path: Path, doc: dict, ctx: ReportContext) -> None:
    """Record the images (or upstream latents) that one index document lists per latent."""
    if isinstance(doc.get("up"), str) and isinstance(doc.get("down"), str):
        ctx.circuits.append(doc)
    entries = doc.get("latents")
    if isinstance(entries, dict):
        entries = [{"latent": int(k), **v} for k, v in entries.items()
                   if str(k).isdigit() and isinstance(v, dict)]
    if not isinstance(entries, list):
        return
    examples = _is_examples(path, doc)
    label = str(doc.get("objective") or ("examples" if examples else "featurevis"))
    if doc.get("branch"):
        label += f" ({doc['branch']})"
    for e in entries:
        key = _entry_latent(e, doc) if isinstance(e, dict) else None
        if key is None:
            continue
        lv = ctx.viz.setdefault(key, LatentViz())
        ups = _upstream(e, doc)
        if ups:
            lv.upstream = ups
            ctx.circuits_found = True
        ids = _example_ids(e) if examples else ""
        caption = f"{label}: {ids}" if ids else label
        for name in _entry_files(e):
            img = find_run_image(path.parent, name, ctx.run_dir)
            if img is not None:
                (lv.examples if examples else lv.featurevis).append((caption, img))
        if not (lv.featurevis or lv.examples or lv.upstream):
            del ctx.viz[key]


def gather(run_dir: str | Path) -> ReportContext:
    """Read every artifact of ``run_dir`` that exists; never raises for missing stages."""
    run = Path(run_dir)
    ctx = ReportContext(run_dir=run)
    lay = ctx.layout
    ctx.run = _read_json(lay.record_path, ctx.notes)
    ctx.manifest = _read_json(lay.store_dir / "manifest.json", ctx.notes)
    if lay.sae_root.is_dir():
        for d in sorted(p for p in lay.sae_root.iterdir() if p.is_dir()):
            cfg = _read_json(d / "cfg.json", ctx.notes)
            if not isinstance(cfg, dict):
                continue
            curves = next((p for p in (d / "metrics.png", d / "curves.png") if p.is_file()),
                          None) or next(iter(sorted(d.glob("*.png"))), None)
            ctx.saes[d.name] = SaeInfo(d.name, cfg, _read_jsonl(d / "metrics.jsonl", ctx.notes),
                                       curves)
    summary = _read_json(lay.summary_path, ctx.notes)
    ctx.summary = summary if isinstance(summary, dict) else None
    table = lay.latent_table_path
    if table.is_file():
        from branchlens.report.columns import numeric_columns

        names = {b for layer in ctx.layers for b in ctx.branches(layer)} | set(BRANCH_ORDER)
        try:
            ctx.columns = read_columns(table, numeric_columns(sorted(names)), ctx.notes)
        except (OSError, ValueError, csv.Error) as e:
            ctx.notes.append(f"could not read {table.name}: {type(e).__name__}: {e}")
        for layer, s in ((ctx.summary or {}).get("per_layer") or {}).items():
            have = ctx.columns.get(layer) if ctx.columns else None
            n = s.get("latents") if isinstance(s, dict) else None
            if isinstance(n, int) and (have is None or have.rows != n):
                ctx.notes.append(f"{table.name} holds {have.rows if have else 0} of {n} latents "
                                 f"of {layer} (truncated or edited): the browser shows only "
                                 f"those; re-run {shell_command('branchlens', 'analyze', run)}")
    read_viz(lay.viz_dir, ctx)
    for path in sorted(lay.analysis_dir.glob("circuits*.json")):  # circuits may live here
        for doc in _subdocs(_read_json(path, ctx.notes)):
            _read_index(path, doc, ctx)
    return ctx
