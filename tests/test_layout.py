"""The run layout lives in one module: ``branchlens/layout.py`` names every path of a run
folder, ``Run`` is that layout with readers, and an AST scan of the package fails on a
run-folder name spelled anywhere else (a path part, a file name, an f-string path)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from branchlens import layout
from branchlens.layout import ProvenanceError, RunError, RunLayout, check_run_folder

SRC = Path(__file__).resolve().parents[1] / "src" / "branchlens"
HOME = "layout.py"
NAMES = set(layout.FOLDERS) | set(layout.FILES)
# File names RunLayout builds from a layer, seed or layer pair ("{}": the variable part).
TEMPLATES = {"embedding_{}.npy": lambda r: r.embedding_path("L").name,
             "embedding_{}": lambda r: r.embedding_path("L").stem,
             "latents_{}.csv": lambda r: r.effects_table_path("L").name,
             "seed{}": lambda r: r.replicate_dir("L").name,
             "{}__{}.json": lambda r: r.circuits_path("L", "L").name}

# Sites allowed to spell a run-folder name (file -> the literals as the scan shows them): none
# now. An entry is a site still to route through RunLayout; a stale entry fails the test too.
NOT_YET_ROUTED: dict[str, set[str]] = {}


def _template(node: ast.JoinedStr) -> str:
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def _path_part(node: ast.AST) -> str | None:
    """The run-folder name ``node`` spells when it is joined into a path, else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        head = node.value.split("/")[0]
        return node.value if node.value in NAMES or head in NAMES else None
    if isinstance(node, ast.JoinedStr):
        t = _template(node)
        return t if t in TEMPLATES else None
    return None


def spelled(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every run-folder name in ``source`` outside docstrings: a part of a
    ``/`` path or a ``joinpath``, a layout file name anywhere, ``"viz/featurevis"``-like
    strings and ``f"{run}/analysis"``-like f-strings."""
    tree = ast.parse(source)
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    hits = []
    for node in ast.walk(tree):
        parts: list[ast.AST] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.left, node.right]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "joinpath"):
            parts = list(node.args)
        hits += [(node.lineno, p) for p in map(_path_part, parts) if p]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            head, _, rest = node.value.partition("/")
            if node.value in layout.FILES or (head in layout.FOLDERS and rest.split("/")[0]
                                              in NAMES):
                hits.append((node.lineno, node.value))
        if isinstance(node, ast.JoinedStr):
            for v in node.values:
                if isinstance(v, ast.Constant) and v.value.startswith("/") \
                        and v.value[1:].split("/")[0].split(" ")[0] in layout.FOLDERS:
                    hits.append((node.lineno, v.value))
    return sorted(set(hits))


def test_no_run_folder_name_is_spelled_outside_the_layout_module():
    found: dict[str, set[str]] = {}
    where: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == HOME:
            continue
        for line, lit in spelled(path.read_text()):
            found.setdefault(rel, set()).add(lit)
            if lit not in NOT_YET_ROUTED.get(rel, set()):
                where.append(f"{rel}:{line} spells {lit!r}")
    assert not where, ("take these paths from branchlens.layout.RunLayout (or Run): "
                       + "; ".join(where))
    stale = {f: lits - found.get(f, set()) for f, lits in NOT_YET_ROUTED.items()}
    assert not any(stale.values()), f"routed now, delete from NOT_YET_ROUTED: {stale}"


def test_the_scan_finds_each_kind_of_spelling():
    planted = '''"""Docstrings may say RUN/analysis/summary.json and latents.csv."""
a = run / "sae" / layer
b = run.joinpath("viz", "x")
c = "analysis/summary.json"
d = out / f"embedding_{layer}.npy"
e = f"{run}/effects/"
f = ("x", "run.json")
g = {"sae": 1, "report": 2}
h = run / "export" / f"{layer}.json"
'''
    assert [lit for _, lit in spelled(planted)] == [
        "sae", "viz", "analysis/summary.json", "embedding_{}.npy", "/effects/", "run.json"]


def test_templates_are_the_ones_the_layout_builds(tmp_path):
    lay = RunLayout(tmp_path)
    for template, build in TEMPLATES.items():
        assert build(lay) == template.format("L", "L"), template


def test_layout_paths(tmp_path):
    lay = RunLayout(tmp_path)
    rel = {name: getattr(lay, name).relative_to(tmp_path).as_posix() for name in (
        "record_path", "store_dir", "sae_root", "analysis_dir", "summary_path",
        "latent_table_path", "layer_table_path", "stability_path", "viz_dir", "circuits_dir",
        "effects_dir", "report_dir", "report_index")}
    assert rel == {"record_path": "run.json", "store_dir": "store", "sae_root": "sae",
                   "analysis_dir": "analysis", "summary_path": "analysis/summary.json",
                   "latent_table_path": "analysis/latents.csv",
                   "layer_table_path": "analysis/layers.csv",
                   "stability_path": "analysis/stability.json", "viz_dir": "viz",
                   "circuits_dir": "viz/circuits", "effects_dir": "effects",
                   "report_dir": "report", "report_index": "report/index.html"}
    per_layer = {lay.sae_dir("mixed4c"): "sae/mixed4c",
                 lay.embedding_path("mixed4c"): "analysis/embedding_mixed4c.npy",
                 lay.featurevis_dir("mixed4c"): "viz/featurevis/mixed4c",
                 lay.featurevis_path("mixed4c", 7, branch="5x5"):
                     "viz/featurevis/mixed4c/mixed4c_00007_latent_5x5.png",
                 lay.evidence_path("mixed4c"): "viz/featurevis/mixed4c/evidence.json",
                 lay.examples_dir("mixed4c"): "viz/examples/mixed4c",
                 lay.top_table_path("mixed4c"): "viz/examples/mixed4c/top.safetensors",
                 lay.circuits_path("mixed4b", "mixed4c"): "viz/circuits/mixed4b__mixed4c.json",
                 lay.replicate_dir(3): "replicates/seed3",
                 lay.effects_path("mixed4c"): "effects/mixed4c.json",
                 lay.effects_table_path("mixed4c"): "effects/latents_mixed4c.csv"}
    assert [p.relative_to(tmp_path).as_posix() for p in per_layer] == list(per_layer.values())
    assert not any(tmp_path.iterdir())  # computing paths touches nothing


def test_run_is_the_layout_with_readers(tmp_path):
    from branchlens import run as run_module
    from branchlens.run import Run

    r = Run(tmp_path)
    assert isinstance(r, RunLayout) and r.path == tmp_path and repr(r) == f"Run({str(tmp_path)!r})"
    assert r.effects_table_path("x") == RunLayout(tmp_path).effects_table_path("x")
    assert run_module.RunError is RunError and run_module.ProvenanceError is ProvenanceError
    assert run_module.check_run_folder is check_run_folder
    with pytest.raises(RunError, match="no trained SAE for mixed4c"):
        r.sae("mixed4c")


def test_check_run_folder(tmp_path):
    with pytest.raises(RunError, match="no run folder"):
        check_run_folder(tmp_path / "missing")
    with pytest.raises(RunError, match=r"is not a run folder: it has none of store/, sae/, "
                                       r"analysis/, run\.json"):
        check_run_folder(tmp_path)
    (tmp_path / "sae").mkdir()
    assert check_run_folder(tmp_path) == tmp_path and layout.is_run_folder(str(tmp_path))
