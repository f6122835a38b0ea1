"""``branchlens.Run``: the one object that knows a run folder, and the notebook API on it.

Layout (every stage reads and writes through the paths below; ``docs/CONTRACTS.md`` has each
artifact's schema)::

    RUN/run.json                         pipeline record: config, versions, stage status
    RUN/store/                           activation store (branchlens.store)
    RUN/sae/<layer>/weights.safetensors  trained SAE with its cfg (branchlens.sae)
    RUN/analysis/summary.json            every statistic, the claims table first
    RUN/analysis/latents.csv             one row per latent (branchlens.analysis.table)
    RUN/analysis/layers.csv              layer × branch table
    RUN/analysis/embedding_<layer>.npy   [n_latents, 2] map of the decoder (NaN: not tested)
    RUN/viz/featurevis/<layer>/          feature pictures + index_<objective>[_<branch>].json
    RUN/viz/examples/<layer>/            top.safetensors (top-k of every latent) + strips
    RUN/viz/circuits/<up>__<down>.json   upstream latents, branch flow, ablations
    RUN/replicates/seed<k>/              replicate SAEs of other seeds (a run folder whose
                                         store links to RUN/store) and their analysis
    RUN/analysis/stability.json          latents, labels and verdicts across the replicates
    RUN/effects/<layer>.json             ablations: the causal animal test (effects stage)
    RUN/effects/latents_<layer>.csv      per latent: classes it promotes / suppresses
    RUN/report/index.html                the report

In a notebook::

    run = branchlens.Run("runs/demo")
    lat = run.latent("mixed4c", 123)
    lat.ratios, lat.q_values, lat.dominant
    lat.top_images(9)                       # PIL crops with the receptive field (notebook.py)
    run.encode_images(["my.jpg"], "mixed4c")
    run.intervene(["my.jpg"], "mixed4c", [123], scale=0).summary()   # ablate, see the classes
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from branchlens.artifacts import read_json
from branchlens.variants import BLOCK_NAMES

if TYPE_CHECKING:  # heavy imports stay lazy: `import branchlens` must not load torch
    from PIL import Image
    from torch import Tensor, nn

    from branchlens.data import ImageSource
    from branchlens.sae import TopKSAE
    from branchlens.store import ActivationStore

FLIP_SUFFIX = "+flip"  # what FlipViews appends to its source's description


class ProvenanceError(ValueError):
    """A stage would combine artifacts of different networks, variants or sources."""


class RunError(FileNotFoundError):
    """An artifact the call needs is not in the run yet; the message says which stage makes it."""


RUN_PARTS = ("store/", "sae/", "analysis/", "run.json")  # what every stage writes first


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` holds anything a stage writes (so writing into it is no accident)."""
    return any((Path(path) / part).exists() for part in RUN_PARTS)


def check_run_folder(path: str | Path) -> Path:
    """``path``, refused unless it is a run folder: a report or lock file written into any
    folder named by mistake (a home folder, a photo folder) would be litter."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"no run folder {path}")
    if not is_run_folder(path):
        raise RunError(f"{path} is not a run folder: it has none of {', '.join(RUN_PARTS)}; "
                       "pass the folder `branchlens run --out` (or harvest/train) wrote")
    return path


def layer_order(name: str) -> tuple[int, str]:
    """Sort key: forward order of the network's blocks, unknown names last."""
    block = name.split("_")[0]
    return (BLOCK_NAMES.index(block) if block in BLOCK_NAMES else 99, name)


class Run:
    """A run folder: its paths, typed readers, and the notebook API (``latent``, ``encode_images``).

    Readers are lazy and cached: opening a ``Run`` reads nothing; the store, SAEs, network and
    latent tables are loaded on first use.
    """

    def __init__(self, path: str | Path, device: str = "cpu", weights: str | None = None):
        self.path = Path(path)
        self.device = device
        self.weights = weights  # None: the store's own weights (see :meth:`model`)
        self._saes: dict[str, TopKSAE] = {}
        self._store: ActivationStore | None = None
        self._model: nn.Module | None = None
        self._tables: dict[str, LatentTable] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- paths ------------------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.path / "run.json"

    @property
    def store_dir(self) -> Path:
        return self.path / "store"

    def sae_dir(self, layer: str) -> Path:
        return self.path / "sae" / layer

    @property
    def analysis_dir(self) -> Path:
        return self.path / "analysis"

    @property
    def summary_path(self) -> Path:
        return self.analysis_dir / "summary.json"

    @property
    def latent_table_path(self) -> Path:
        return self.analysis_dir / "latents.csv"

    @property
    def stability_path(self) -> Path:
        return self.analysis_dir / "stability.json"

    def replicate_dir(self, seed: int) -> Path:
        """A replicate (same settings, training seed ``seed``): a run folder of its own."""
        return self.path / "replicates" / f"seed{seed}"

    def embedding_path(self, layer: str) -> Path:
        return self.analysis_dir / f"embedding_{layer}.npy"

    def featurevis_dir(self, layer: str) -> Path:
        return self.path / "viz" / "featurevis" / layer

    def evidence_path(self, layer: str) -> Path:
        """Which latents of ``layer`` the claims rest on, and their pictures (visualize stage)."""
        return self.featurevis_dir(layer) / "evidence.json"

    def examples_dir(self, layer: str) -> Path:
        return self.path / "viz" / "examples" / layer

    def top_table_path(self, layer: str) -> Path:
        return self.examples_dir(layer) / "top.safetensors"

    @property
    def effects_dir(self) -> Path:
        return self.path / "effects"

    def effects_path(self, layer: str) -> Path:
        """What ablating latents does to the classes, and the causal animal test (effects)."""
        return self.effects_dir / f"{layer}.json"

    def effects_table_path(self, layer: str) -> Path:
        """Per latent: the classes it promotes and suppresses (effects stage)."""
        return self.effects_dir / f"latents_{layer}.csv"

    def circuits_path(self, up: str, down: str) -> Path:
        return self.path / "viz" / "circuits" / f"{up}__{down}.json"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def report_index(self) -> Path:
        return self.report_dir / "index.html"

    # -- readers ----------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """``run.json`` (empty when the run was made stage by stage without ``branchlens run``)."""
        return read_json(self.record_path) if self.record_path.is_file() else {}

    @property
    def layers(self) -> list[str]:
        """Layers with a trained SAE, in forward order."""
        root = self.path / "sae"
        if not root.is_dir():
            return []
        names = [p.name for p in root.iterdir() if (p / "weights.safetensors").is_file()]
        return sorted(names, key=layer_order)

    def store(self, verify: bool | str = False) -> ActivationStore:
        from branchlens.store import ActivationStore

        if self._store is None:
            if not self.store_dir.is_dir():
                raise RunError(f"no activation store in {self.store_dir}; run `branchlens "
                               f"harvest SOURCE --out {self.store_dir}` first")
            self._store = ActivationStore.open(self.store_dir, verify=verify)
        return self._store

    def store_manifest(self) -> dict[str, Any]:
        path = self.store_dir / "manifest.json"
        return read_json(path) if path.is_file() else {}

    def sae(self, layer: str) -> TopKSAE:
        """The trained SAE of ``layer`` (eval mode, on ``self.device``)."""
        from branchlens.sae import TopKSAE

        if layer not in self._saes:
            where = self.sae_dir(layer)
            if not (where / "weights.safetensors").is_file():
                have = ", ".join(self.layers) or "none"
                raise RunError(f"no trained SAE for {layer} in {where} (trained: {have}); run "
                               f"`branchlens train {self.path} --layers {layer}`")
            self._saes[layer] = TopKSAE.load(where, device=self.device).eval()
        return self._saes[layer]

    def summary(self) -> dict[str, Any]:
        if not self.summary_path.is_file():
            raise RunError(f"no analysis in {self.analysis_dir}; run `branchlens analyze "
                           f"{self.path}` first")
        return read_json(self.summary_path)

    def claims(self) -> list[dict[str, Any]]:
        """The paper's claims with their verdicts (first table of the analysis)."""
        return self.summary().get("claims", [])

    def latents(self, layer: str) -> LatentTable:
        """The latent table of ``layer``: typed rows (see :mod:`branchlens.analysis.table`)."""
        from branchlens.analysis.table import LatentTableError, branches_of, read_latent_table

        if layer not in self._tables:
            if not self.latent_table_path.is_file():
                raise RunError(f"no latent table in {self.analysis_dir}; run `branchlens "
                               f"analyze {self.path}` first")
            try:
                rows = read_latent_table(self.latent_table_path, layer)
            except LatentTableError as e:
                raise RunError(str(e)) from None
            if not rows:
                raise RunError(f"{layer} is not in {self.latent_table_path} (analysed: "
                               f"{self.summary().get('layers')}); re-run `branchlens analyze`")
            self._check_rows(layer, [r["latent"] for r in rows])
            self._tables[layer] = LatentTable(layer, rows, branches_of(rows[0]))
        return self._tables[layer]

    def _check_rows(self, layer: str, ids: list[int]) -> None:
        """The table must hold latents 0..n-1 of the layer, n from the summary: a table cut at
        a line end parses cleanly and would silently drop the last latents."""
        if not self.summary_path.is_file():
            return
        n = self.summary().get("per_layer", {}).get(layer, {}).get("latents")
        if n is not None and ids != list(range(n)):
            raise RunError(f"{self.latent_table_path} has {len(ids)} rows for {layer} but its "
                           f"analysis has {n} latents (truncated or edited); re-run "
                           f"`branchlens analyze {self.path}`")

    def latent(self, layer: str, index: int) -> Latent:
        table = self.latents(layer)
        if not 0 <= index < len(table):
            raise IndexError(f"{layer} has latents 0..{len(table) - 1}, not {index}")
        return Latent(self, layer, index, table[index], table.branches)

    def dominant(self, layer: str, robust: bool = True) -> tuple[np.ndarray, list[str]]:
        """Per latent the index of its dominant branch (−1: none) and the branch names: the
        scale-controlled ``robust_dominant`` label, or the raw rule's with ``robust=False``."""
        table = self.latents(layer)
        names = table.branches
        key = "robust_dominant" if robust else "dominant"
        dom = np.array([names.index(r[key]) if r[key] in names else -1
                        for r in table], np.int64)
        return dom, names

    def featurevis_file(self, layer: str, latent: int, objective: str = "latent",
                        branch: str | None = None) -> Path | None:
        """The feature picture the visualize stage rendered for this latent, if any."""
        suffix = f"_{branch}" if branch else ""
        path = self.featurevis_dir(layer) / f"{layer}_{latent:05d}_{objective}{suffix}.png"
        return path if path.is_file() else None

    # -- the network and the images it saw ------------------------------------------------------

    def store_provenance(self) -> dict[str, Any] | None:
        """Variant and weights (source, sha256, seed) the store was harvested with."""
        m = self.store_manifest()
        return {"variant": m.get("variant"), "weights": m.get("weights") or {}} if m else None

    @property
    def variant(self) -> str:
        prov = self.store_provenance() or {}
        if prov.get("variant"):
            return prov["variant"]
        for layer in self.layers:
            return self.sae(layer).cfg.variant or "bvlc_googlenet"
        return "bvlc_googlenet"

    def model(self, weights: str | None = None, variant: str | None = None) -> nn.Module:
        """The network the store was harvested with, or a :class:`ProvenanceError`.

        By default the store's weights (random ones with the store's seed); explicit weights
        must have the store's sha256."""
        if self._model is not None and weights is None and variant is None:
            return self._model
        from branchlens.devices import resolve_device
        from branchlens.weights import load_model

        weights = weights if weights is not None else self.weights
        variant = variant or self.variant
        prov = self.store_provenance()
        seed = 0
        if prov is not None:
            stored = prov["weights"]
            if prov["variant"] and prov["variant"] != variant:
                raise ProvenanceError(f"the SAE is for variant {variant!r} but the store of "
                                      f"{self.path} was harvested with {prov['variant']!r}")
            is_random = weights is not None and str(weights) == "random"
            if stored.get("source") == "random":
                if weights is not None and not is_random:
                    raise ProvenanceError(f"the store of {self.path} was harvested with RANDOM "
                                          f"weights; refusing to mix in {weights}")
                weights, seed = "random", int(stored.get("seed") or 0)
            elif is_random and stored.get("sha256"):
                raise ProvenanceError(f"the store of {self.path} was harvested with real "
                                      f"weights (sha256 {stored['sha256'][:12]}…); refusing "
                                      "random ones")
        model, info = load_model(variant, weights, resolve_device(self.device), seed=seed)
        want = (prov or {}).get("weights", {}).get("sha256")
        if want and info.sha256 != want:
            raise ProvenanceError(f"weights {info.path} have sha256 {info.sha256[:12]}… but "
                                  f"the store of {self.path} was harvested with {want[:12]}…; "
                                  "pass --weights with the file the store was harvested with")
        model.weights_info = info
        self._model = model
        return model

    def check_sae(self, sae: TopKSAE) -> None:
        """Refuse an SAE trained on another harvest than the run's current store."""
        want = (getattr(sae, "meta", {}) or {}).get("store_hash")
        if want and (self.store_dir / "manifest.json").is_file():
            if self.store().content_hash() != want:
                raise ProvenanceError(f"the SAE of {sae.cfg.layer} in {self.path} was trained "
                                      "on another store than the run's current one; train it "
                                      "again")

    def source(self, spec: str | None = None) -> tuple[ImageSource, int | None]:
        """The image source of the store (or ``spec``), and how many images the store used.

        The store's source is reopened exactly (``+flip`` views included); a ``spec`` that is
        not the store's is refused, since image indices would point at other pictures, unless
        it is a moved or copied folder with the same files (names and sizes). A source folder
        whose files changed since the harvest is refused too."""
        from branchlens.data import open_source

        doc = self.store_manifest()
        info, variant = doc.get("source", {}), doc.get("variant", "bvlc_googlenet")
        desc = info.get("description")
        if spec is not None:
            src = open_source(spec, variant)
            if desc and src.description != desc.removesuffix(FLIP_SUFFIX):
                self._check_copy(spec, src, info)
            else:
                self._check_unchanged(src, info)
            if desc and desc.endswith(FLIP_SUFFIX):
                src = open_source(spec, variant, flip=True)
            return src, None if not desc else info.get("n_images")
        if not desc:
            raise RunError(f"no store manifest with a source in {self.store_dir}; pass --source")
        if "pipe:" in desc:  # webdataset runs pipe: URLs through the shell
            raise ProvenanceError(f"the store's source {desc!r} runs a shell command; a run "
                                  "folder never runs one by itself: pass --source (source=) "
                                  "explicitly if you trust it")
        flip = desc.endswith(FLIP_SUFFIX)
        base = desc.removesuffix(FLIP_SUFFIX)
        kind, _, rest = base.partition(":")
        if kind in ("folder", "filelist"):
            src = open_source(rest, variant, flip=flip)
        elif kind == "embedded":
            n, _, seed = rest.partition(":")
            src = open_source(f"embedded:{n}", variant, seed=int(seed.removeprefix("seed") or 0),
                              flip=flip)
        else:
            src = open_source(base, variant, flip=flip)
        if src.description != desc:
            raise ProvenanceError(f"cannot reopen the store's source {desc} (got "
                                  f"{src.description})")
        self._check_unchanged(src, info)
        return src, info.get("n_images")

    def _check_unchanged(self, src: ImageSource, info: dict[str, Any]) -> None:
        """Refuse a source folder whose files changed since the harvest (a removed image
        shifts every later index: one image would be shown with another's numbers)."""
        from branchlens.harvest.fingerprint import describe_change, source_fingerprint

        change = describe_change(info.get("fingerprint"), source_fingerprint(src))
        if change:
            raise ProvenanceError(f"the image source {info.get('description')} changed since "
                                  f"the store of {self.path} was harvested ({change}); restore "
                                  "it, or harvest again (`branchlens run` starts a clean store)")

    def _check_copy(self, spec: str, src: ImageSource, info: dict[str, Any]) -> None:
        """Accept another path only as a moved or copied folder holding the same files."""
        from branchlens.harvest.fingerprint import describe_change, same_files, source_fingerprint

        then, now = info.get("fingerprint"), source_fingerprint(src)
        if same_files(then, now):
            return
        why = (f"and holds other files ({describe_change(then, now)})" if then and now else
               "and the store records no file list to recognise a copy by")
        raise ProvenanceError(f"--source {spec} ({src.description}) is not the source the "
                              f"store of {self.path} was harvested from ({info.get('description')})"
                              f" {why}")

    def encode_images(self, images: Sequence[str | Path | Image.Image], layer: str,
                      batch_size: int = 16) -> Tensor:
        """Images (paths or PIL) → SAE codes of every position, ``[N, n_latents, H, W]``,
        preprocessed exactly as the harvest did (:func:`branchlens.notebook.encode_images`)."""
        from branchlens.notebook import encode_images  # API here, code there

        return encode_images(self, images, layer, batch_size)

    def intervene(self, images: Sequence[str | Path | Image.Image] | None, layer: str,
                  latents: Sequence[int], scale: float | Sequence[float] = 0.0,
                  positions=None, n_images: int = 8, batch_size: int = 16):
        """Logits of ``images`` (``None``: the SAE's first ``n_images`` held-out images) before
        and after moving ``latents`` of ``layer`` by ``scale`` (α: 0 ablates, 2 doubles, 1 is
        the network unchanged), keeping the SAE's error term; an
        :class:`branchlens.interventions.Intervention` (``.summary()``, ``.delta_p``, ``.ids``)."""
        import torch

        from branchlens.data import decode_image, iter_batches, preprocess
        from branchlens.interventions import check_latents, intervene

        sae = self.sae(layer)
        alive = None
        if self.latent_table_path.is_file():
            table = self.latents(layer)
            alive = np.zeros(sae.cfg.n_latents, bool)
            alive[table.column("latent").astype(int)] = table.column("alive").astype(bool)
        check_latents(sae, latents, scale, alive)  # before any image is decoded
        model = self.model()
        if images is None:
            from branchlens.train.sampling import heldout_images

            held, _ = heldout_images(sae, self.store())
            source, _ = self.source()
            xs, ids = [], []
            for b in iter_batches(source, model.variant, batch_size, 0,
                                  indices=[int(i) for i in held[:n_images]]):
                xs.append(b.images)
                ids += [str(self.store().images[i].get("id", i)) for i in b.indices]
            x = torch.cat(xs) if xs else torch.zeros(0)
        else:
            x = torch.stack([preprocess(decode_image(im), model.variant) for im in images]) \
                if len(images) else torch.zeros(0)
            ids = [str(getattr(im, "filename", None) or im) for im in images]
        if not len(x):
            raise ValueError("no images to intervene on")
        sae = sae.to(next(model.parameters()).device)
        res = intervene(model, sae, layer, x, latents, scale, positions, batch_size, alive)
        res.ids = ids
        return res


class LatentTable(Sequence):
    """Typed rows of one layer's latent table; ``to_pandas()`` for a DataFrame."""

    def __init__(self, layer: str, rows: list[dict[str, Any]], branches: list[str]):
        self.layer, self.rows, self.branches = layer, rows, branches

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.rows[i]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"LatentTable({self.layer!r}, {len(self)} latents, branches {self.branches})"

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0]) if self.rows else []

    def column(self, name: str) -> np.ndarray:
        if name not in (self.rows[0] if self.rows else {}):
            raise KeyError(f"no column {name!r}; columns: {', '.join(self.columns)}")
        return np.array([r[name] for r in self.rows])

    def where(self, **equal: Any) -> LatentTable:
        """Rows whose columns equal the given values, e.g. ``where(dominant="5x5")``."""
        rows = [r for r in self.rows if all(r.get(k) == v for k, v in equal.items())]
        return LatentTable(self.layer, rows, self.branches)

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("LatentTable.to_pandas needs pandas (pip install pandas); the "
                              "rows are plain dicts in .rows") from e
        return pd.DataFrame(self.rows).set_index("latent", drop=False)


@dataclass
class Latent:
    """One latent of one layer: its statistics (from the analysis) and its pictures."""

    run: Run
    layer: str
    index: int
    row: dict[str, Any]
    branches: list[str]

    def __repr__(self) -> str:
        return (f"Latent({self.layer} #{self.index}: dominant {self.dominant}, "
                f"firing rate {self.row.get('firing_rate', math.nan):.3g})")

    def _per_branch(self, prefix: str) -> dict[str, float]:
        return {b: float(self.row.get(f"{prefix}{b}", math.nan)) for b in self.branches}

    @property
    def ratios(self) -> dict[str, float]:
        """The paper's ratio ‖relu(v_b)‖ / ‖relu(v)‖ of the decoder direction v, per branch."""
        return self._per_branch("paper_ratio_")

    @property
    def full_ratios(self) -> dict[str, float]:
        """‖v_b‖ / ‖v‖ (signed entries too): the energy share's square root."""
        return self._per_branch("full_ratio_")

    @property
    def std_ratios(self) -> dict[str, float]:
        """The paper's ratio after dividing each channel by its activation std."""
        return self._per_branch("paper_ratio_std_")

    @property
    def p_values(self) -> dict[str, dict[str, float]]:
        """Per branch the Monte-Carlo p on the raw rule and on the scale rule."""
        return {b: {"raw": float(self.row[f"p_raw_{b}"]),
                    "scale": float(self.row[f"p_scale_{b}"])} for b in self.branches}

    @property
    def q_values(self) -> dict[str, dict[str, float]]:
        """BH-adjusted p per branch (across the layer's tested latents), both rules."""
        return {b: {"raw": float(self.row[f"q_raw_{b}"]),
                    "scale": float(self.row[f"q_scale_{b}"])} for b in self.branches}

    @property
    def dominant(self) -> str | None:
        """The branch the latent lives in by the primary (raw) rule, or None."""
        d = self.row.get("dominant")
        return d if d in self.branches else None

    @property
    def robust_dominant(self) -> str | None:
        """The dominant branch when the scale rule agrees, or None."""
        d = self.row.get("robust_dominant")
        return d if d in self.branches else None

    @property
    def alive(self) -> bool:
        return bool(self.row.get("alive"))

    @property
    def firing_rate(self) -> float:
        return float(self.row.get("firing_rate", math.nan))

    @property
    def top_image_ids(self) -> list[str]:
        """The analysis' top held-out images (best first; a mirror pair counts once)."""
        return list(self.row.get("top_images", []))

    @property
    def direction(self) -> Tensor:
        """The unit decoder direction in activation units [d_in]."""
        return self.run.sae(self.layer).decoder_directions()[self.index].detach().cpu()

    def store_indices(self, ids: Sequence[str]) -> dict[str, int]:
        """Image id -> position in the run's store, for the analysis' top images ``ids``."""
        where = {str(r.get("id", i)): i for i, r in enumerate(self.run.store().images)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise ProvenanceError(f"top images {missing[:3]} of {self.layer} #{self.index} are "
                                  "not in the run's store; re-run `branchlens analyze`")
        return where

    def top_images(self, n: int = 9, tile: int = 128) -> list[Image.Image]:
        """Receptive-field crops of the top images, the latent's map overlaid in red
        (:func:`branchlens.notebook.top_images`)."""
        from branchlens.notebook import top_images  # API here, code there

        return top_images(self, n, tile)

    def visualize(self, steps: int = 256, size: int = 224, seed: int = 0) -> Image.Image:
        """The feature picture, cached or rendered now (:func:`branchlens.notebook.visualize`)."""
        from branchlens.notebook import visualize  # API here, code there

        return visualize(self, steps, size, seed)
