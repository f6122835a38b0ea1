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
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1000, raising=False)
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

def _tiny_sae(seed: int = 0):
    from branchlens.sae import SAEConfig, TopKSAE

    return TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2, layer="mixed4a"), seed=seed)


def _sae_run(tmp_path: Path) -> tuple[Path, Path]:
    """(run folder with a trained SAE of mixed4a, a paper-format SAE to import)."""
    from branchlens.interop import export_paper

    run = tmp_path / "run"
    _tiny_sae(0).save(run / "sae" / "mixed4a", {"train": {"step": 4}})
    return run, export_paper(_tiny_sae(1), tmp_path / "paper")


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
