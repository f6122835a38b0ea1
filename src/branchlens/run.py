"""``branchlens.Run``: a run folder's typed readers and provenance checks, and the notebook API.

``Run`` is a :class:`branchlens.layout.RunLayout` (every path of the folder; the layout is
listed there) with readers on top: lazy and cached, each raising :class:`RunError` with the
command that makes a missing artifact, and checks that refuse to combine artifacts of different
networks, variants or sources (:class:`ProvenanceError`). In a notebook::

    run = branchlens.Run("runs/demo")
    lat = run.latent("mixed4c", 123)
    lat.ratios, lat.q_values, lat.dominant
    lat.top_images(9)                       # PIL crops with the receptive field (notebook.py)
    run.encode_images(["my.jpg"], "mixed4c")
    run.intervene(["my.jpg"], "mixed4c", [123], scale=0).summary()   # ablate, see the classes
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from branchlens.artifacts import read_json
from branchlens.latent import Latent, LatentTable
from branchlens.layout import (  # re-exported: callers find the errors and checks here too
    RUN_PARTS,
    ProvenanceError,
    RunError,
    RunLayout,
    check_run_folder,
    is_run_folder,
)
from branchlens.variants import BLOCK_NAMES

if TYPE_CHECKING:  # heavy imports stay lazy: `import branchlens` must not load torch
    from PIL import Image
    from torch import Tensor, nn

    from branchlens.data import ImageSource
    from branchlens.sae import TopKSAE
    from branchlens.store import ActivationStore

__all__ = ["RUN_PARTS", "Latent", "LatentTable", "ProvenanceError", "Run", "RunError",
           "check_run_folder", "is_run_folder", "layer_order"]

FLIP_SUFFIX = "+flip"  # what FlipViews appends to its source's description


def layer_order(name: str) -> tuple[int, str]:
    """Sort key: forward order of the network's blocks, unknown names last."""
    block = name.split("_")[0]
    return (BLOCK_NAMES.index(block) if block in BLOCK_NAMES else 99, name)


class Run(RunLayout):
    """A run folder: its paths (:class:`RunLayout`), typed readers, and the notebook API
    (``latent``, ``encode_images``).

    Readers are lazy and cached: opening a ``Run`` reads nothing; the store, SAEs, network and
    latent tables are loaded on first use.
    """

    def __init__(self, path: str | Path, device: str = "cpu", weights: str | None = None):
        super().__init__(path)
        self.device = device
        self.weights = weights  # None: the store's own weights (see :meth:`model`)
        self._saes: dict[str, TopKSAE] = {}
        self._store: ActivationStore | None = None
        self._model: nn.Module | None = None
        self._tables: dict[str, LatentTable] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- readers ----------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """``run.json`` (empty when the run was made stage by stage without ``branchlens run``)."""
        return read_json(self.record_path) if self.record_path.is_file() else {}

    @property
    def layers(self) -> list[str]:
        """Layers with a trained SAE, in forward order."""
        root = self.sae_root
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
        path = self.featurevis_path(layer, latent, objective, branch)
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
