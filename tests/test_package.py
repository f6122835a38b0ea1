"""The package root is lazy: `branchlens --help` must not pay for torch, scipy and the analysis."""

from __future__ import annotations

import subprocess
import sys


def test_import_branchlens_does_not_import_torch_or_scipy():
    code = ("import sys, branchlens; print('torch' in sys.modules, 'scipy' in sys.modules); "
            "branchlens.TopKSAE; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False", "True"]


def test_every_public_name_resolves():
    import branchlens

    for name in branchlens.__all__:
        assert getattr(branchlens, name) is not None, name
    assert branchlens.harvest_activations.__name__ == "harvest"


def test_one_version_everywhere():
    from importlib.metadata import version

    import branchlens
    from branchlens.artifacts import provenance

    assert version("branchlens") == branchlens.__version__
    assert provenance()["branchlens_version"] == branchlens.__version__


def test_cli_help_imports_no_heavy_library():
    code = ("import sys; sys.argv = ['branchlens', '--help']\n"
            "from branchlens.cli import app\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'scipy', 'numpy', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    assert out[-1] == "[]"
