"""The run folder's layout: every path and file name of a run folder, in this one module.

Stages, the report and the CLI take their paths from :class:`RunLayout` (or from
:class:`branchlens.run.Run`, which is a ``RunLayout`` with typed readers on top) instead of
spelling a run folder's names (``tests/test_layout.py`` fails on a new one spelled elsewhere).
What is inside a store or an SAE folder is that format's own (``branchlens.store``, ``sae``).
Its two errors are a run folder's: :class:`RunError` (an artifact is missing) and
:class:`ProvenanceError` (artifacts that do not belong together). This module imports nothing,
so a library below ``run.py`` (``viz/``) may use it too::

    RUN/run.json                         pipeline record: config, versions, stage status
    RUN/store/                           activation store (branchlens.store)
    RUN/sae/<layer>/weights.safetensors  trained SAE with its cfg (branchlens.sae)
    RUN/analysis/summary.json            every statistic, the claims table first
    RUN/analysis/latents.csv             one row per latent (branchlens.analysis.table)
    RUN/analysis/layers.csv              layer × branch table
    RUN/analysis/embedding_<layer>.npy   [n_latents, 2] map of the decoder (NaN: not tested)
    RUN/analysis/stability.json          latents, labels and verdicts across the replicates
    RUN/viz/featurevis/<layer>/          feature pictures + index_<objective>[_<branch>].json
                                         and evidence.json (the latents the claims rest on)
    RUN/viz/examples/<layer>/            top.safetensors (top-k of every latent) + strips
    RUN/viz/circuits/<up>__<down>.json   upstream latents, branch flow, ablations
    RUN/replicates/seed<k>/              replicate SAEs of other seeds (a run folder whose
                                         store links to RUN/store) and their analysis
    RUN/effects/<layer>.json             ablations: the causal animal test (effects stage)
    RUN/effects/latents_<layer>.csv      per latent: classes it promotes / suppresses
    RUN/report/index.html                the report
"""

from __future__ import annotations

from pathlib import Path

RECORD = "run.json"
STORE = "store"
SAE = "sae"
ANALYSIS = "analysis"
SUMMARY = "summary.json"
LATENT_TABLE = "latents.csv"
LAYER_TABLE = "layers.csv"
STABILITY = "stability.json"
VIZ = "viz"
FEATUREVIS = "featurevis"
EVIDENCE = "evidence.json"
EXAMPLES = "examples"
TOP_TABLE = "top.safetensors"
CIRCUITS = "circuits"
REPLICATES = "replicates"
EFFECTS = "effects"
REPORT = "report"
REPORT_INDEX = "index.html"

FOLDERS = (STORE, SAE, ANALYSIS, VIZ, FEATUREVIS, EXAMPLES, CIRCUITS, REPLICATES, EFFECTS,
           REPORT)
FILES = (RECORD, SUMMARY, LATENT_TABLE, LAYER_TABLE, STABILITY, EVIDENCE, TOP_TABLE,
         REPORT_INDEX)
RUN_PARTS = (f"{STORE}/", f"{SAE}/", f"{ANALYSIS}/", RECORD)  # what every stage writes first


class RunError(FileNotFoundError):
    """An artifact the call needs is not in the run yet; the message says which stage makes it."""


class ProvenanceError(ValueError):
    """A stage would combine artifacts of different networks, variants or sources."""


def embedding_file(layer: str) -> str:
    """The latent embedding's file name in ``analysis/`` (the figure shares its stem)."""
    return f"embedding_{layer}.npy"


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


class RunLayout:
    """The paths of the run folder at ``path``; computing one touches no file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    @property
    def store_dir(self) -> Path:
        return self.path / STORE

    @property
    def sae_root(self) -> Path:
        """The folder holding one SAE folder per trained layer."""
        return self.path / SAE

    def sae_dir(self, layer: str) -> Path:
        return self.sae_root / layer

    @property
    def analysis_dir(self) -> Path:
        return self.path / ANALYSIS

    @property
    def summary_path(self) -> Path:
        return self.analysis_dir / SUMMARY

    @property
    def latent_table_path(self) -> Path:
        return self.analysis_dir / LATENT_TABLE

    @property
    def layer_table_path(self) -> Path:
        return self.analysis_dir / LAYER_TABLE

    @property
    def stability_path(self) -> Path:
        return self.analysis_dir / STABILITY

    def embedding_path(self, layer: str) -> Path:
        return self.analysis_dir / embedding_file(layer)

    def replicate_dir(self, seed: int) -> Path:
        """A replicate (same settings, training seed ``seed``): a run folder of its own."""
        return self.path / REPLICATES / f"seed{seed}"

    @property
    def viz_dir(self) -> Path:
        """Where the visualize, examples and circuits stages write."""
        return self.path / VIZ

    def featurevis_dir(self, layer: str) -> Path:
        return self.viz_dir / FEATUREVIS / layer

    def featurevis_path(self, layer: str, latent: int, objective: str = "latent",
                        branch: str | None = None) -> Path:
        """The file the visualize stage renders one latent's picture to."""
        suffix = f"_{branch}" if branch else ""
        return self.featurevis_dir(layer) / f"{layer}_{latent:05d}_{objective}{suffix}.png"

    def evidence_path(self, layer: str) -> Path:
        """Which latents of ``layer`` the claims rest on, and their pictures (visualize stage)."""
        return self.featurevis_dir(layer) / EVIDENCE

    def examples_dir(self, layer: str) -> Path:
        return self.viz_dir / EXAMPLES / layer

    def top_table_path(self, layer: str) -> Path:
        return self.examples_dir(layer) / TOP_TABLE

    @property
    def circuits_dir(self) -> Path:
        return self.viz_dir / CIRCUITS

    def circuits_path(self, up: str, down: str) -> Path:
        return self.circuits_dir / f"{up}__{down}.json"

    @property
    def effects_dir(self) -> Path:
        return self.path / EFFECTS

    def effects_path(self, layer: str) -> Path:
        """What ablating latents does to the classes, and the causal animal test (effects)."""
        return self.effects_dir / f"{layer}.json"

    def effects_table_path(self, layer: str) -> Path:
        """Per latent: the classes it promotes and suppresses (effects stage)."""
        return self.effects_dir / f"latents_{layer}.csv"

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT

    @property
    def report_index(self) -> Path:
        return self.report_dir / REPORT_INDEX
