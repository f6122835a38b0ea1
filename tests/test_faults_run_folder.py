"""Fault injection, second round: bad values and damaged files around a run folder.

Each section reproduces one measured defect of the reliability issue: every bad input must end
in a one-line error (the CLI exits 2 with ``error: ...``) or a counted skip, never a traceback,
a hang or a silently wrong result. Everything here is tiny and synthetic (no model runs).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from branchlens import data
from branchlens.analysis.driver import AnalysisConfig
from branchlens.analysis.table import read_latent_table, write_latent_table
from branchlens.cli import app
from branchlens.config import ConfigError, check_block
from branchlens.data import FolderSource, SkipStats, decode_image, iter_batches
from branchlens.pipeline import make_config
from branchlens.run import Run, RunError
from branchlens.store import ActivationStore, StoreError

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic import write_synthetic  # noqa: E402

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, list(args))


def _one_line_error(r, *words: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "error:" in r.output, r.output
    assert all(w in r.output for w in words), r.output


# -- 1. the false discovery rate ------------------------------------------------------------------

@pytest.mark.parametrize("q", [1e-300, 1e-7, 0.0, 1.0])
def test_q_outside_its_range_is_refused_naming_the_range(q):
    with pytest.raises(ValueError, match=r"1e-06"):
        AnalysisConfig(q=q)
    with pytest.raises(ConfigError, match=r"analyze.q must be in \[1e-06, 1\)"):
        check_block("analyze", {"q": q})


def test_cli_analyze_tiny_q_is_refused_before_any_work(tmp_path):
    _one_line_error(_cli("analyze", str(tmp_path), "--q", "1e-300"), "analyze.q", "1e-06")


# -- 2. seeds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_config_seed_outside_32_bits_is_refused(seed):
    with pytest.raises(ConfigError, match=r"seed must be in 0\.\.4294967295"):
        make_config("demo", source="embedded:2", seed=seed)
    with pytest.raises(ValueError, match="seed"):
        AnalysisConfig(seed=seed)


@pytest.mark.parametrize("args", [
    ["analyze", "RUN"], ["harvest", "embedded:2", "--out", "RUN/store", "--weights", "random"],
    ["train", "RUN", "--layers", "mixed4a"],
    ["run", "embedded:2", "--out", "RUN", "--weights", "random"],
    ["visualize", "RUN", "--layer", "mixed4a"],
])
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_cli_seed_outside_32_bits_is_refused_up_front(tmp_path, args, seed):
    r = _cli(*[a.replace("RUN", str(tmp_path / "r")) for a in args], f"--seed={seed}")
    _one_line_error(r, "--seed must be in 0..4294967295")
    assert not (tmp_path / "r").exists()  # nothing was harvested or written


# -- 3. devices -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cli_cuda_without_cuda_says_so_before_any_work(tmp_path, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["analyze", str(tmp_path)],
                 ["harvest", "embedded:2", "--out", str(tmp_path / "s"), "--weights", "random"]):
        r = _cli(*args, "--device", device)
        _one_line_error(r, "CUDA is not available on this machine", "--device cpu")
    assert not (tmp_path / "s").exists()


def test_api_analyze_on_cuda_without_cuda_says_so_before_any_work(tmp_path, monkeypatch):
    from branchlens.analysis.driver import AnalysisConfig, AnalysisError, analyze

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AnalysisError, match="CUDA is not available on this machine"):
        analyze(tmp_path, config=AnalysisConfig(device="cuda"))


def test_resolve_device_refuses_unknown_devices():
    from branchlens.devices import resolve_device

    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("cpu").type == "cpu"


# -- 4. a truncated latents.csv -------------------------------------------------------------------

def _analysed_run(tmp_path: Path, n: int = 6) -> Run:
    """A run folder with only the analysis: latents.csv and summary.json (two layers)."""
    out = tmp_path / "run"
    (out / "analysis").mkdir(parents=True)
    rows = [{"layer": layer, "latent": i, "alive": True, "dominant": "none",
             "firing_rate": 0.5 + i, "top_images": ["a/x.jpg", "a/y.jpg"], "top_labels": [1, 2]}
            for layer in ("mixed4a", "mixed4b") for i in range(n)]
    write_latent_table(out / "analysis" / "latents.csv", rows)
    summary = {"layers": ["mixed4a", "mixed4b"],
               "per_layer": {la: {"latents": n} for la in ("mixed4a", "mixed4b")}}
    (out / "analysis" / "summary.json").write_text(json.dumps(summary))
    return Run(out)


def test_latents_of_a_complete_table_read_back(tmp_path):
    run = _analysed_run(tmp_path)
    assert len(run.latents("mixed4b")) == 6
    assert run.latents("mixed4a")[2]["top_images"] == ["a/x.jpg", "a/y.jpg"]


def test_table_cut_at_a_line_end_is_refused_by_row_count(tmp_path):
    run = _analysed_run(tmp_path)
    path = run.latent_table_path
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))  # mixed4b lost its last two latents
    assert len(run.latents("mixed4a")) == 6
    with pytest.raises(RunError, match=r"4 rows for mixed4b.*6 latents.*branchlens analyze"):
        Run(run.path).latents("mixed4b")


def test_table_cut_mid_line_is_refused_not_parsed(tmp_path):
    run = _analysed_run(tmp_path)
    path = run.latent_table_path
    text = path.read_bytes()
    path.write_bytes(text[:-12])  # inside the last row's top_images / top_labels
    with pytest.raises(ValueError, match=r"cut off.*branchlens analyze"):
        read_latent_table(path, "mixed4b")
    with pytest.raises(RunError, match="branchlens analyze"):
        Run(run.path).latents("mixed4b")


# -- 5. FIFOs, devices and huge files in an image folder ------------------------------------------

def _png(path: Path) -> None:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)


def _decode_in_time(payload: str, seconds: float = 5.0) -> str:
    """The skip reason of decoding ``payload``; a read that hangs is unblocked and fails."""
    result: dict[str, str] = {}

    def work() -> None:
        try:
            decode_image(payload)
            result["reason"] = "decoded"
        except data.BadImage as e:
            result["reason"] = e.reason

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():  # blocked opening a FIFO: give it a writer so the test can end
        with open(payload, "wb"):
            pass
        t.join(seconds)
        pytest.fail(f"decoding {payload} hung")
    return result["reason"]


def test_symlink_to_a_fifo_is_skipped_without_hanging(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "imgs" / "fifo.jpg"
    link.parent.mkdir()
    link.symlink_to(fifo)
    assert _decode_in_time(str(link)) == "not_regular_file"


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_symlink_to_dev_zero_is_skipped_unread(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    assert _decode_in_time(str(link)) == "not_regular_file"


def test_file_above_the_size_cap_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr("branchlens.data.decode.MAX_FILE_BYTES", 1000)  # the cap lives there
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big, compress_level=0)  # ~12 kB
    assert big.stat().st_size > 1000
    assert _decode_in_time(str(big)) == "too_large"


def test_folder_with_a_fifo_link_harvests_the_rest_and_counts_the_skip(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "good.png")
    os.mkfifo(tmp_path / "pipe")
    (folder / "pipe.jpg").symlink_to(tmp_path / "pipe")
    skips = SkipStats()
    src = FolderSource(folder)
    got = threading.Event()
    ids: list[str] = []

    def work() -> None:
        for b in iter_batches(src, "bvlc_googlenet", batch_size=4, skips=skips):
            ids.extend(b.image_ids)
        got.set()

    threading.Thread(target=work, daemon=True).start()
    if not got.wait(10):
        with open(tmp_path / "pipe", "wb"):
            pass
        pytest.fail("iter_batches hung on a FIFO")
    assert ids == ["imgs/good.png"]
    assert dict(skips.counts) == {"not_regular_file": 1}


# -- 6. file names that are not UTF-8 -------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="Linux file names are bytes")
def test_non_utf8_file_names_get_text_ids_that_survive_the_latent_table(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/\xff\xfe.png"
    _png(Path(os.fsdecode(raw)))
    _png(folder / "ok.png")
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        src = FolderSource(folder)
    ids = [src[i].image_id for i in range(len(src))]
    assert "imgs/\\xff\\xfe.png" in ids
    for i in ids:
        i.encode("utf-8")  # valid text: JSON, CSV and HTML can carry it
    for i in range(len(src)):  # the file itself is still read through its real name
        decode_image(src[i].payload)
    path = tmp_path / "latents.csv"
    write_latent_table(path, [{"layer": "mixed4a", "latent": 0, "top_images": ids}])
    assert read_latent_table(path)[0]["top_images"] == ids


def test_latent_table_with_a_legacy_surrogate_id_is_written_not_crashed(tmp_path):
    path = tmp_path / "latents.csv"
    write_latent_table(path, [{"layer": "mixed4a", "latent": 0, "top_images": ["a/\udcff.jpg"]}])
    [row] = read_latent_table(path)
    assert row["latent"] == 0 and len(row["top_images"]) == 1


# -- 7. stats.json and images.json are checked --------------------------------------------------

def _store(tmp_path: Path) -> Path:
    write_synthetic(tmp_path / "s", layer="mixed4a", n_images=4, per_image=3, d=8,
                    images_per_shard=2)
    return tmp_path / "s"


def test_manifest_holds_checksums_of_stats_and_images(tmp_path):
    s = ActivationStore.open(_store(tmp_path), verify=True)
    assert set(s.manifest["files"]) == {"images.json", "stats.json"}
    assert len(s.layer_stats("mixed4a")["std"]) == 8 and len(s.images) == 4


@pytest.mark.parametrize("name", ["stats.json", "images.json"])
def test_edited_stats_or_images_are_detected_on_a_verified_open(tmp_path, name):
    path = _store(tmp_path)
    doc = json.loads((path / name).read_text())
    if name == "stats.json":
        doc["mixed4a"]["std"][0] *= 2  # still a valid std: only the checksum can tell
    else:
        doc[0]["label"] = 7
    (path / name).write_text(json.dumps(doc))
    s = ActivationStore.open(path, verify=True)
    with pytest.raises(StoreError, match=f"{name}.*sha256"):
        s.layer_stats("mixed4a") if name == "stats.json" else s.images  # noqa: B018
    s = ActivationStore.open(path, verify=False)  # explicitly trusted
    assert s.layer_stats("mixed4a") if name == "stats.json" else s.images


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_std_is_refused_naming_the_file(tmp_path, bad):
    path = _store(tmp_path)
    doc = json.loads((path / "stats.json").read_text())
    doc["mixed4a"]["std"][3] = bad
    (path / "stats.json").write_text(json.dumps(doc))
    s = ActivationStore.open(path, verify=False)
    with pytest.raises(StoreError, match=r"stats.json.*mixed4a.*std"):
        s.layer_stats("mixed4a")


def test_old_store_without_file_checksums_opens_with_a_warning(tmp_path):
    path = _store(tmp_path)
    mf = json.loads((path / "manifest.json").read_text())
    del mf["files"]
    (path / "manifest.json").write_text(json.dumps(mf))
    s = ActivationStore.open(path, verify=True)
    with pytest.warns(UserWarning, match="no checksums"):
        std = np.asarray(s.layer_stats("mixed4a")["std"])
    assert std.shape == (8,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per store, not once per read
        assert len(s.images) == 4


# -- 8. the report never overwrites an html file or folder it did not write ----------------------

def test_report_refuses_to_overwrite_a_foreign_index_html(tmp_path):
    run = _analysed_run(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>my own page</html>")
    _one_line_error(_cli("report", str(run.path), "--out", str(site)), "index.html", "--out")
    assert (site / "index.html").read_text() == "<html>my own page</html>"
    assert sorted(p.name for p in site.iterdir()) == ["index.html"]


def test_report_refuses_to_overwrite_a_foreign_html_file(tmp_path):
    run = _analysed_run(tmp_path)
    notes = tmp_path / "notes.html"
    notes.write_text("<html>notes</html>")
    _one_line_error(_cli("report", str(run.path), "--out", str(notes)), "notes.html", "delete")
    assert notes.read_text() == "<html>notes</html>"


def test_report_replaces_its_own_previous_report(tmp_path):
    run = _analysed_run(tmp_path)
    for out in (tmp_path / "r" / "page.html", run.report_dir):
        for _ in range(2):
            r = _cli("report", str(run.path), "--out", str(out))
            assert r.exit_code == 0, r.output
    assert run.report_index.is_file()


# -- 9. the report of a folder that is no run ----------------------------------------------------

def test_report_of_a_folder_that_is_no_run_is_refused(tmp_path):
    plain = tmp_path / "Documents"
    plain.mkdir()
    (plain / "letter.txt").write_text("hello")
    _one_line_error(_cli("report", str(plain)), "not a run folder", "store/", "sae/",
                    "analysis/")
    assert sorted(p.name for p in plain.iterdir()) == ["letter.txt"]


# -- 10. import-sae / export-sae never replace an SAE silently ------------------------------------

def _tiny_sae(seed: int = 0, decoder: str = "untied"):
    from branchlens.sae import SAEConfig, TopKSAE

    return TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, layer="mixed4a", decoder=decoder),
                   seed=seed)


def _sae_run(tmp_path: Path) -> tuple[Path, Path]:
    """(run folder with a trained SAE of mixed4a, a paper-format SAE to import)."""
    from branchlens.interop import export_paper

    run = tmp_path / "run"
    _tiny_sae(0).save(run / "sae" / "mixed4a", {"train": {"step": 4}})
    return run, export_paper(_tiny_sae(1, "tied"), tmp_path / "paper")


def test_import_sae_refuses_a_folder_holding_an_sae_unless_forced(tmp_path):
    run, paper = _sae_run(tmp_path)
    weights = run / "sae" / "mixed4a" / "weights.safetensors"
    before = weights.read_bytes()
    r = _cli("import-sae", str(paper), str(run / "sae" / "mixed4a"))
    _one_line_error(r, "already holds an SAE", "--force")
    assert weights.read_bytes() == before
    r = _cli("import-sae", str(paper), str(run / "sae" / "mixed4a"), "--force")
    assert r.exit_code == 0, r.output
    assert weights.read_bytes() != before


def test_import_sae_takes_the_sae_folder_lock_of_training(tmp_path):
    from branchlens.store import RunLock

    run, paper = _sae_run(tmp_path)
    lock = RunLock(run / "sae", "SAE folder", ".mixed4b.lock").acquire()  # a training of mixed4b
    try:
        r = _cli("import-sae", str(paper), str(run / "sae" / "mixed4b"))
    finally:
        lock.release()
    _one_line_error(r, "SAE folder", "another process")
    assert not (run / "sae" / "mixed4b" / "weights.safetensors").exists()
    r = _cli("import-sae", str(paper), str(run / "sae" / "mixed4b"))  # released: it imports
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fmt", ["saelens", "paper"])
def test_export_sae_refuses_to_write_into_a_branchlens_sae_folder(tmp_path, fmt):
    run, _ = _sae_run(tmp_path)
    folder = run / "sae" / "mixed4a"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    r = _cli("export-sae", str(run), "--layer", "mixed4a", "--format", fmt, "--out", str(folder))
    _one_line_error(r, "branchlens SAE", "--out")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# -- 11. the stage commands take the run folder's lock --------------------------------------------

@pytest.mark.parametrize("args", [["analyze", "RUN", "--n-perm", "10"], ["report", "RUN"],
                                  ["examples", "RUN", "--layer", "mixed4a"],
                                  ["visualize", "RUN", "--layer", "mixed4a"],
                                  ["circuits", "RUN", "--up", "mixed4a", "--down", "mixed4b"]])
def test_stage_commands_refuse_a_run_folder_another_process_writes(tmp_path, args):
    from branchlens.store import RunLock

    run = _analysed_run(tmp_path)
    before = run.summary_path.read_bytes()
    lock = RunLock(run.path, "run folder").acquire()  # e.g. a `branchlens run` in progress
    try:
        r = _cli(*[str(run.path) if a == "RUN" else a for a in args])
    finally:
        lock.release()
    _one_line_error(r, "run folder", "another process")
    assert run.summary_path.read_bytes() == before
    assert not run.report_dir.exists() and not (run.path / "viz").exists()


def test_report_releases_the_run_lock(tmp_path):
    from branchlens.store import RunLock

    run = _analysed_run(tmp_path)
    assert _cli("report", str(run.path)).exit_code == 0
    RunLock(run.path, "run folder").acquire().release()


# -- 12. image ids with ';' and '#' -------------------------------------------------------------

def test_ids_with_semicolons_and_backslashes_round_trip_the_latent_table(tmp_path):
    ids = ["a/x;y.jpg", "a/plain.jpg", "b\\;c.png", "d\\", "e;"]
    path = tmp_path / "latents.csv"
    write_latent_table(path, [{"layer": "mixed4a", "latent": 0, "top_images": ids,
                               "top_labels": [1, 2, 3, 4, 5]},
                              {"layer": "mixed4a", "latent": 1, "top_images": [],
                               "top_labels": []}])
    rows = read_latent_table(path)
    assert rows[0]["top_images"] == ids and rows[0]["top_labels"] == [1, 2, 3, 4, 5]
    assert rows[1]["top_images"] == []


def test_latent_table_of_plain_semicolon_joins_still_reads(tmp_path):
    path = tmp_path / "latents.csv"
    path.write_text("layer,latent,top_images,top_labels\n"
                    "mixed4a,0,a/x.jpg;imgs/\\xff.png,1;2\n")
    [row] = read_latent_table(path)
    assert row["top_images"] == ["a/x.jpg", "imgs/\\xff.png"] and row["top_labels"] == [1, 2]


def test_file_names_with_a_hash_stay_distinct_images():
    from types import SimpleNamespace

    from branchlens.data import view_group

    assert view_group("imgs/x#1.jpg") != view_group("imgs/x#2.jpg")
    assert view_group("imgs/x#1.jpg") == "imgs/x#1.jpg"
    assert view_group("imgs/x#1.jpg#flip") == "imgs/x#1.jpg"  # branchlens's own mirror view
    assert view_group("embedded:astronaut#view3#flip") == "embedded:astronaut"
    fake = SimpleNamespace(images=[{"id": f"x#{i}.jpg"} for i in range(10)])
    train, held = ActivationStore.split_images(fake, 0.5, 0)
    assert len(train) == len(held) == 5  # ten images, not one


# -- 13. a held-out fraction that rounds to zero images -----------------------------------------

def test_heldout_fraction_rounding_to_zero_says_so(tmp_path):
    from types import SimpleNamespace

    from branchlens.train.sampling import heldout_images

    write_synthetic(tmp_path / "s", layer="mixed4a", n_images=3, per_image=2, d=4)
    store = ActivationStore.open(tmp_path / "s")
    sae = SimpleNamespace(meta={"train": {"config": {"heldout_fraction": 0.1, "seed": 0}}})
    held, note = heldout_images(sae, store)
    assert held.size == 3
    assert "held-out fraction 0.1 of 3 images rounds to 0 held-out images" in note
    assert "ALL stored images" in note and "without a held-out split" not in note
    _, note = heldout_images(SimpleNamespace(meta={}), store)
    assert "without a held-out split" in note


# -- 14. --debug shows the traceback of analyze and harvest too ---------------------------------

@pytest.mark.parametrize("args", [
    ["analyze", "RUN", "--n-perm", "10"],
    ["harvest", "embedded:2", "--out", "RUN/store", "--weights", "random", "--sampling", "bad"],
])
def test_debug_shows_the_traceback_of_analyze_and_harvest(tmp_path, monkeypatch, args):
    from branchlens.cli import DEBUG_ENV

    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test (--debug sets it)
    argv = [a.replace("RUN", str(tmp_path / "r")) for a in args]
    _one_line_error(_cli(*argv))
    r = _cli("--debug", *argv)
    assert r.exception is not None and not isinstance(r.exception, SystemExit), r.output
    assert r.exc_info[2] is not None  # the traceback, printed by Python outside the test runner


# -- 15. a code-executing pickle is refused without torch's advice to run it --------------------

class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("save", ["pickle", "torch"])
def test_import_of_a_code_executing_pickle_never_suggests_weights_only_false(tmp_path, save):
    import pickle

    target = tmp_path / "pwned"
    evil = tmp_path / "sae.pt"
    state = {"W_enc.weight": _Evil(str(target))}
    if save == "torch":
        torch.save(state, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(state, f)
    r = _cli("import-sae", str(evil), str(tmp_path / "out"), "--k", "2")
    _one_line_error(r, "refused")
    assert "False" not in r.output and "weights_only" not in r.output.replace(
        "weights_only=True", ""), r.output
    assert not target.exists() and not (tmp_path / "out").exists()


# -- 16-21. shared run folders: deletion, hashes, outputs, the source folder ---------------------
#
# Tiny real runs (random weights, one layer, a few steps); tests copy a finished one before they
# change anything in it.

RUN_SETS: dict = {
    "harvest": {"layers": ["mixed4a"], "sampling": "uniform", "samples_per_image": 20,
                "batch_size": 4},
    "sae": {"expansion": 1, "k": 8},
    "train": {"batch_size": 32, "steps": 4, "warmup_steps": 1, "log_every": 2, "ckpt_every": 2,
              "progress": False},
    "analyze": {"n_perm": 20, "curve_reps": 10, "bootstrap": 20, "embed": "pca"},
}
ANALYZE_FAST = ["--n-perm", "20", "--curve-reps", "10", "--embed", "pca"]


def _sets(block: str | None = None, **kv) -> dict:
    return RUN_SETS if block is None else {**RUN_SETS, block: {**RUN_SETS[block], **kv}}


def _pipeline(out: Path, source: str = "embedded:4", stages: tuple = ("harvest", "train"),
              overrides: dict | None = None, **kw) -> list[str]:
    """``branchlens run`` on ``out``; returns its log lines."""
    from branchlens.pipeline import run

    logs: list[str] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "RANDOM WEIGHTS")
        run(out, overrides=overrides or RUN_SETS, source=source, weights="random",
            device="cpu", stages=list(stages), log=logs.append, **kw)
    return logs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    _pipeline(out)
    return out


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysed") / "run"
    _pipeline(out, stages=("harvest", "train", "analyze", "report"))
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _image_folder(folder: Path, n: int = 6, seed: int = 0) -> Path:
    """``n`` distinct BMP files (uncompressed: every file has the same size)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"img{i}.bmp")
    return folder


def _folder_run(tmp_path: Path, stages: tuple = ("harvest",), n: int = 6) -> tuple[Path, Path]:
    """(run folder harvested from a folder of image files, that folder)."""
    folder = _image_folder(tmp_path / "imgs", n)
    out = tmp_path / "run"
    _pipeline(out, str(folder), stages)
    return out, folder


# -- 16. a stage deletes only what it wrote --------------------------------------------------

def test_a_stage_folder_records_its_outputs_and_discards_only_those(tmp_path):
    from branchlens.artifacts import begin_outputs, discard_outputs, finish_outputs

    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "NOTES.txt").write_text("mine")  # there before the stage first ran
    begin_outputs(folder)
    (folder / "index.html").write_text("page")
    (folder / "assets").mkdir()
    (folder / "assets" / "a.js").write_text("js")
    finish_outputs(folder)
    (folder / "later.txt").write_text("added after the stage finished")
    (folder / "nested" / "store").mkdir(parents=True)  # a colleague's run unpacked into it
    (folder / "nested" / "run.json").write_text("{}")
    (folder / "nested" / "store" / "manifest.json").write_text("{}")
    logs: list[str] = []
    discard_outputs(folder, logs.append, "report settings changed")
    left = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                  and not p.name.startswith("."))
    assert left == ["NOTES.txt", "later.txt", "nested/run.json", "nested/store/manifest.json"]
    assert not (folder / "assets").exists()
    assert "kept 4 file(s) branchlens has no record of writing" in logs[0], logs


def test_a_killed_stage_s_files_are_its_own_and_foreign_ones_stay(tmp_path):
    from branchlens.artifacts import begin_outputs, discard_outputs

    folder = tmp_path / "analysis"
    folder.mkdir()
    (folder / "NOTES.txt").write_text("mine")
    begin_outputs(folder)
    (folder / "summary.json").write_text("{}")  # then killed: no finish_outputs
    begin_outputs(folder)  # the resumed stage: the half-written summary is still its own
    discard_outputs(folder, lambda m: None, "analyze settings changed")
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == ["NOTES.txt"]


def test_changed_settings_keep_notes_and_a_nested_run_in_analysis_and_report(analysed_run,
                                                                             tmp_path):
    out = _copy(analysed_run, tmp_path)
    mine = {"analysis/NOTES.txt": "my reading of the claims", "report/NOTES.txt": "sent to Ann",
            "report/colleague/run.json": "{}", "report/colleague/store/manifest.json": "{}"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    logs = _pipeline(out, stages=("harvest", "train", "analyze", "report"),
                     overrides=_sets("analyze", n_perm=30))
    assert "[analyze] running" in logs and "[report] running" in logs
    assert {rel: (out / rel).read_text() for rel in mine} == mine
    kept = [m for m in logs if m.startswith("[discard]")]
    assert len(kept) == 2 and "kept 1 file(s)" in kept[0] and "kept 3 file(s)" in kept[1], kept
    assert (out / "report" / "index.html").is_file()
    assert (out / "analysis" / "latents.csv").is_file()


def test_retraining_keeps_a_foreign_file_in_the_sae_folder(trained_run, tmp_path):
    out = _copy(trained_run, tmp_path)
    notes = out / "sae" / "mixed4a" / "NOTES.txt"
    notes.write_text("lr 4e-4 looked better")
    logs = _pipeline(out, overrides=_sets("train", lr=0.01))
    assert "[train] running" in logs and notes.read_text() == "lr 4e-4 looked better"
    assert any("settings changed (train.lr)" in m and "kept 1 file(s)" in m for m in logs), logs
    assert _sae_step(out) == 4


def _sae_step(out: Path) -> int:
    from branchlens.sae import load_meta

    return load_meta(out / "sae" / "mixed4a")["train"]["step"]


def test_reharvest_refuses_a_store_holding_a_foreign_file_and_deletes_nothing(trained_run,
                                                                             tmp_path):
    from branchlens.artifacts import ArtifactError

    out = _copy(trained_run, tmp_path)
    (out / "store" / "NOTES.txt").write_text("harvested on the lab machine")
    before = sorted(p.name for p in (out / "store").rglob("*"))
    with pytest.raises(ArtifactError, match=r"store holds 1 file\(s\) branchlens did not write "
                                            r"\(NOTES.txt\)"):
        _pipeline(out, overrides=_sets("harvest", samples_per_image=16))
    assert sorted(p.name for p in (out / "store").rglob("*")) == before


# -- 17. settings that change no artifact stay out of the hash -------------------------------

def test_one_list_of_settings_that_change_no_artifact():
    from branchlens.config import NON_ARTIFACT
    from branchlens.pipeline import stage_hash
    from branchlens.train.config import NON_ARTIFACT_KEYS

    assert NON_ARTIFACT_KEYS == NON_ARTIFACT["train"] and "plot" in NON_ARTIFACT_KEYS
    base = make_config("demo")
    for block, key, value in [("report", "cards_per_layer", 3), ("train", "plot", False),
                              ("train", "progress", False), ("train", "keep_optimizer", True)]:
        cfg = make_config("demo", overrides={block: {key: value}})
        assert all(stage_hash(base, s, None) == stage_hash(cfg, s, None)
                   for s in ("train", "analyze", "report")), (block, key)


def test_report_cards_per_layer_rebuilds_and_deletes_nothing(analysed_run, tmp_path):
    out = _copy(analysed_run, tmp_path)
    notes = out / "report" / "NOTES.txt"
    notes.write_text("mine")
    page = (out / "report" / "index.html").read_bytes()
    logs = _pipeline(out, stages=("harvest", "train", "analyze", "report"),
                     overrides={**RUN_SETS, "report": {"cards_per_layer": 99}})
    assert "[report] up to date, skipped" in logs, logs
    assert notes.read_text() == "mine" and (out / "report" / "index.html").read_bytes() == page


def test_train_plot_does_not_retrain(trained_run, tmp_path):
    out = _copy(trained_run, tmp_path)
    logs = _pipeline(out, overrides=_sets("train", plot=False))
    assert logs == ["[harvest] up to date, skipped", "[train] up to date, skipped"], logs


# -- 18. "up to date" means the outputs are still the ones the stage wrote ---------------------

def test_a_swapped_in_sae_of_another_run_is_noticed_and_trained_again(trained_run, tmp_path):
    import shutil

    other = tmp_path / "other"
    _pipeline(other, overrides=_sets("sae", k=4))
    out = _copy(trained_run, tmp_path)
    mine = _sae_weights(out)
    for f in (other / "sae" / "mixed4a").iterdir():
        shutil.copy(f, out / "sae" / "mixed4a" / f.name)
    assert _sae_weights(out)["W_enc"].shape == mine["W_enc"].shape  # same shape, other weights
    logs = _pipeline(out)
    assert "[train] up to date, skipped" not in logs and "[train] running" in logs
    assert any("sae/mixed4a/weights.safetensors is not what this stage wrote" in m
               for m in logs), logs
    assert all(torch.equal(v, mine[k]) for k, v in _sae_weights(out).items())  # its own SAE again
    assert _pipeline(out)[-1] == "[train] up to date, skipped"


def _sae_weights(out: Path) -> dict:
    from branchlens.artifacts import load_tensors

    tensors = load_tensors(out / "sae" / "mixed4a" / "weights.safetensors")[0]
    return {k: t.clone() for k, t in tensors.items()}  # not views of a file about to be replaced


def test_a_standalone_analyze_is_noticed_and_the_run_s_analysis_restored(analysed_run,
                                                                        tmp_path):
    out = _copy(analysed_run, tmp_path)
    r = _cli("analyze", str(out), "--q", "0.5", *ANALYZE_FAST)
    assert r.exit_code == 0, r.output
    assert json.loads(_summary(out))["config"]["q"] == 0.5
    logs = _pipeline(out, stages=("harvest", "train", "analyze", "report"))
    assert "[analyze] up to date, skipped" not in logs and "[analyze] running" in logs
    assert any(m.startswith("[analyze] analysis/") and "and 1 more) is not what this stage "
               "wrote" in m for m in logs), logs
    assert any("[report] the analyze outputs it read have changed" in m for m in logs), logs
    assert json.loads(_summary(out))["config"]["q"] == 0.05


def _summary(out: Path) -> str:
    return (out / "analysis" / "summary.json").read_text()


# -- 19. a changed source folder is noticed --------------------------------------------------

def _change(folder: Path, how: str) -> None:
    if how == "replace":  # same name, same size, other pixels
        path = folder / "img2.bmp"
        size, mtime = path.stat().st_size, path.stat().st_mtime_ns
        Image.new("RGB", (40, 40), (0, 120, 0)).save(path)
        assert path.stat().st_size == size
        os.utime(path, ns=(mtime + 5 * 10**9, mtime + 5 * 10**9))  # a later write
    elif how == "add":
        Image.new("RGB", (40, 40), (0, 0, 200)).save(folder / "img9.bmp")
    else:
        (folder / "img1.bmp").unlink()


@pytest.mark.parametrize("how", ["replace", "add", "remove"])
def test_a_rerun_on_a_changed_source_folder_says_so_and_starts_clean(tmp_path, how):
    out, folder = _folder_run(tmp_path)
    _change(folder, how)
    logs = _pipeline(out, str(folder), ("harvest",))
    said = [m for m in logs if "the image source changed" in m]
    assert said and said[0].startswith("[harvest] the image source changed since the harvest")
    assert any(m.startswith("[discard] the image source changed") for m in logs), logs
    n = len(list(folder.iterdir()))
    assert ActivationStore.open(out / "store").manifest["counts"]["images"] == n
    assert _pipeline(out, str(folder), ("harvest",)) == ["[harvest] up to date, skipped"]


@pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")
def test_standalone_harvest_refuses_to_reuse_a_store_of_a_replaced_file(tmp_path):
    out, folder = _folder_run(tmp_path)
    args = ["harvest", str(folder), "--out", str(out / "store"), "--weights", "random",
            "--layers", "mixed4a", "--sampling", "uniform", "--samples-per-image", "20",
            "--aligned", "--no-progress"]
    assert _cli(*args).exit_code == 0  # the same harvest: the complete store is kept
    _change(folder, "replace")
    _one_line_error(_cli(*args), "changed since store", "same 6 file names and sizes",
                    "rewritten")


@pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")
def test_reading_images_from_a_changed_source_is_refused_not_mislabelled(tmp_path):
    from branchlens.run import Latent, ProvenanceError

    out, folder = _folder_run(tmp_path, ("harvest", "train"))
    run = Run(out)
    assert len(run.source()[0]) == 6
    _change(folder, "remove")
    with pytest.raises(ProvenanceError, match="changed since the store .* was harvested"):
        Run(out).source()
    with pytest.raises(ProvenanceError, match="changed since"):
        Latent(Run(out), "mixed4a", 0, {"top_images": ["imgs/img3.bmp"]}, []).top_images(1)
    r = _cli("examples", str(out), "--layer", "mixed4a", "--n-top", "2", "--n-strips", "1",
             "--no-progress")
    _one_line_error(r, "changed since", "5 files")
    assert not (out / "viz").exists()


# -- 20. identical images under different names ----------------------------------------------

def test_identical_files_are_reported_and_kept_on_one_side_of_the_split(tmp_path, caplog):
    import logging
    import shutil

    folder = _image_folder(tmp_path / "imgs", 8)
    shutil.copy(folder / "img0.bmp", folder / "copy.bmp")
    with caplog.at_level(logging.WARNING, logger="branchlens.harvest"):
        _pipeline(tmp_path / "run", str(folder), ("harvest",))
    store = ActivationStore.open(tmp_path / "run" / "store")
    assert store.manifest["duplicates"] == {"sets": 1, "images": 2,
                                            "examples": [["imgs/copy.bmp", "imgs/img0.bmp"]]}
    assert "2 images are byte-identical" in caplog.text and "imgs/copy.bmp = imgs/img0.bmp" \
        in caplog.text
    by_id = {r["id"]: r for r in store.images}
    assert by_id["imgs/copy.bmp"]["content"] == by_id["imgs/img0.bmp"]["content"]
    assert len({r["content"] for r in store.images}) == 8
    a, b = (int(i) for i in np.flatnonzero([r["id"] in ("imgs/copy.bmp", "imgs/img0.bmp")
                                             for r in store.images]))
    for seed in range(20):
        for frac in (0.3, 0.5):
            train, held = store.split_images(frac, seed)
            assert (a in held) == (b in held), (seed, frac)
            assert len(train) + len(held) == 9


def test_split_groups_join_views_and_copies():
    from branchlens.store.reader import split_groups

    images = [{"id": "a.jpg", "content": "1"}, {"id": "a.jpg#flip"},
              {"id": "b.jpg", "content": "1"}, {"id": "b.jpg#flip"},
              {"id": "c.jpg", "content": "2"}, {"id": "d.jpg", "skipped": "truncated"},
              {"id": "e.jpg"}]
    stored, groups = split_groups(images)
    assert stored == [0, 1, 2, 3, 4, 6]
    assert groups == ["a.jpg", "a.jpg", "a.jpg", "a.jpg", "c.jpg", "e.jpg"]


# -- 21. a moved copy of the image folder as --source -----------------------------------------

@pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")
def test_a_moved_copy_of_the_source_is_accepted_and_another_folder_refused(tmp_path):
    import shutil

    from branchlens.run import ProvenanceError

    out, folder = _folder_run(tmp_path, ("harvest", "train"))
    moved = tmp_path / "elsewhere" / "photos"
    shutil.copytree(folder, moved, copy_function=shutil.copyfile)  # new mtimes
    src, n = Run(out).source(str(moved))
    assert len(src) == n == 6
    r = _cli("examples", str(out), "--layer", "mixed4a", "--n-top", "2", "--n-strips", "1",
             "--source", str(moved), "--no-progress")
    assert r.exit_code == 0, r.output
    (moved / "img4.bmp").unlink()
    with pytest.raises(ProvenanceError, match="is not the source .* holds other files"):
        Run(out).source(str(moved))
    other = _image_folder(tmp_path / "other", 6, seed=1)
    (other / "img0.bmp").write_bytes(b"x" * 10)  # another size: not a copy
    r = _cli("examples", str(out), "--layer", "mixed4a", "--source", str(other))
    _one_line_error(r, "is not the source", "holds other files")
