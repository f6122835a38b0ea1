"""``scripts/import_graph.py``: the package's import graph has no cycle, no import against the
layer list of docs/ARCHITECTURE.md and no private name crossing modules; the scan itself is
checked on a planted package that has each of them."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts/import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_branchlens_has_no_cycle_upward_import_or_private_name():
    ig = _script()
    res = ig.measure(ROOT / "src" / "branchlens")
    assert {k: res[k] for k in ig.FAILING} == {k: [] for k in ig.FAILING}
    assert not res["imports_through_shims"]


def test_layer_list_is_the_one_in_architecture_md():
    """The diagram names every unit of the script's rows, top row first."""
    ig = _script()
    diagram = (ROOT / "docs" / "ARCHITECTURE.md").read_text().split("```")[1]
    named = [m.group(1) for m in re.finditer(r"\b([a-z_]+)(?:\.py|/)", diagram)
             if m.group(1) in ig.ROW]
    assert set(named) == set(ig.ROW) - {"branchlens"}
    rows = [ig.ROW[u] for u in named]
    assert rows == sorted(rows), named


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, body in files.items():
        path = root / "branchlens" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root / "branchlens"


def test_scan_finds_cycles_upward_private_and_shims(tmp_path):
    ig = _script()
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "config.py": "def f():\n    from branchlens.run import Run\n\n_secret = 1\n",
        "run.py": "from branchlens.config import _secret\nfrom branchlens import config\n"
                  "x = config._other\nclass Run: ...\n",
        "report/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from branchlens.cli import app\n",
        "report/a.py": "kept = 1\n\ndef __getattr__(name):\n"
                       "    from branchlens.stages import moved\n    return moved\n",
        "viz.py": "from branchlens.report.a import kept, moved\n",
    })
    res = ig.measure(pkg)
    assert res["unit_cycle_groups"] == [["config", "run"]]
    assert res["module_cycle_groups"] == [["branchlens.config", "branchlens.run"]]
    assert res["upward"] == ["branchlens.config:2 -> branchlens.run Run (lazy)",
                             "branchlens.viz:1 -> branchlens.report.a kept, moved"]
    assert res["private_across_modules"] == [
        "branchlens.run:1 <- branchlens.config._secret",
        "branchlens.run:3 <- branchlens.config._other (attribute)"]
    assert res["shims"] == ["branchlens.report.a:4 -> branchlens.stages moved (lazy)"]
    assert res["imports_through_shims"] == ["branchlens.viz:1 <- branchlens.report.a.moved"]
    assert not any("cli" in u for u in res["upward"])  # TYPE_CHECKING imports do not count
    assert ig.main([str(pkg), "--check"]) == 1


def test_moved_modules_are_shims_of_the_data_package():
    """``streaming.py`` and ``decode.py`` define nothing: each import is a marked shim of the
    ``data/`` package, and each old name is the very object its new home defines."""
    import importlib
    import pkgutil

    import branchlens.data

    ig = _script()
    g = ig.scan(ROOT / "src" / "branchlens")
    homes = {}
    for info in pkgutil.iter_modules(branchlens.data.__path__, "branchlens.data."):
        homes |= vars(importlib.import_module(info.name))
    for old in ("branchlens.streaming", "branchlens.decode"):
        assert not [i for i in g.imports if i.source == old]
        assert {i.target.rsplit(".", 1)[0] for i in g.shims if i.source == old} \
            == {"branchlens.data"}
        mod = importlib.import_module(old)
        assert mod.__all__ and all(getattr(mod, n) is homes[n] for n in mod.__all__)
