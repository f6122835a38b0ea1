"""WebDataset and Hugging Face sources on small shards / datasets built in the test."""

import gzip
import io
import logging

import pytest
import torch
from PIL import Image

from branchlens.data import iter_batches, open_source, split_for_rank
from branchlens.streaming import HFStreamSource, WebDatasetSource

wds = pytest.importorskip("webdataset", reason="the webdataset extra is not installed")
datasets = pytest.importorskip("datasets", reason="the hf extra is not installed")


def _jpeg(color=(200, 30, 30), w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG")
    return buf.getvalue()


SIZES = (4, 3, 5)


@pytest.fixture(autouse=True)
def _count_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("branchlens.data.wds._COUNT_CACHE", {})


def _shards(root, sizes=SIZES):
    """shard-00000{0,1,2}.tar; sample s0_1 has no image, s2_0 a corrupt one; cls = running no."""
    n = 0
    for s, size in enumerate(sizes):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as w:
            for j in range(size):
                sample = {"__key__": f"s{s}_{j}", "cls": n}
                if (s, j) == (2, 0):
                    sample["jpg"] = b"not a jpeg"
                elif (s, j) != (0, 1):
                    sample["jpg"] = _jpeg((10 * n, 0, 0))
                else:
                    sample["txt"] = "caption only"
                w.write(sample)
                n += 1
    return f"{root}/shard-{{000000..{len(sizes) - 1:06d}}}.tar"


def test_wds_brace_spec_matches_webdataset_order_and_labels(tmp_path):
    spec = _shards(tmp_path)
    src = open_source(f"wds:{spec}")
    assert isinstance(src, WebDatasetSource) and src.unit_sizes == list(SIZES)
    assert len(src) == 12 and src.description == f"wds:{spec}"
    keys = [s["__key__"] for s in wds.WebDataset(spec, shardshuffle=False)]
    got = [r for u in range(3) for r in src.unit_records(u)]
    assert [r.image_id.rsplit(":", 1)[1] for r in got] == keys
    assert [r.label for r in got] == list(range(12))
    assert src[6].image_id == "wds:shard-000001.tar:s1_2" and src[6].label == 6


def test_wds_counts_are_cached_per_local_file(tmp_path, monkeypatch):
    import branchlens.data.wds as st  # where count_shard looks them up

    spec = _shards(tmp_path)
    assert open_source(f"wds:{spec}").unit_sizes == list(SIZES)
    monkeypatch.setattr(st, "_COUNT_CACHE", {})  # a new process: only the disk cache is left

    def no_rescan(url):
        raise AssertionError(f"rescanned {url}")
    monkeypatch.setattr(st, "_count_keys", no_rescan)
    assert open_source(f"wds:{spec}").unit_sizes == list(SIZES)
    with wds.TarWriter(str(tmp_path / "shard-000001.tar")) as w:  # rewritten: counted again
        w.write({"__key__": "x", "cls": 0, "jpg": _jpeg()})
    with pytest.raises(AssertionError, match="rescanned"):
        _ = open_source(f"wds:{spec}").unit_sizes


def test_wds_pipe_and_concatenated_specs(tmp_path):
    _shards(tmp_path)
    src = open_source(f"wds:pipe:cat {tmp_path}/shard-000001.tar::{tmp_path}/shard-000000.tar")
    assert src.unit_sizes == [3, 4]
    assert [src[i].label for i in (0, 3)] == [4, 0]


def test_wds_limit_stops_counting_and_reading(tmp_path):
    _shards(tmp_path)
    # the second shard is a command that fails: a limit inside shard 0 must never touch it
    src = open_source(f"wds:{tmp_path}/shard-000000.tar::pipe:exit 3", limit=3)
    assert len(src) == 3 and src.unit_sizes == [3]
    b = list(iter_batches(src, "bvlc_googlenet", 8, with_skips=True))
    assert sorted(b[0].indices + [s[0] for s in b[0].skipped]) == [0, 1, 2]


def test_wds_missing_shards_fail_in_one_line(tmp_path):
    _shards(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"3 of 6 shards not found") as e:
        open_source(f"wds:{tmp_path}/shard-{{000000..000005}}.tar")
    assert "\n" not in str(e.value)


def test_wds_workers_and_ranks_split_without_overlap(tmp_path):
    src = open_source(f"wds:{_shards(tmp_path)}")
    mine = [split_for_rank(src, range(12), 2, r) for r in (0, 1)]
    assert sorted(mine[0] + mine[1]) == list(range(12)) and not set(mine[0]) & set(mine[1])
    for part in mine:  # whole shards per rank
        assert all(src.unit_of(i) not in {src.unit_of(j) for j in part}
                   for i in set(range(12)) - set(part))
    seen, reasons = [], {}
    for b in iter_batches(src, "bvlc_googlenet", 2, workers=2, with_skips=True):
        seen += b.indices
        reasons.update({i: r for i, _, r in b.skipped})
        seen += [i for i, _, _ in b.skipped]
        assert all(lbl == i for i, lbl in zip(b.indices, b.labels, strict=True))
        if b.indices:
            assert b.images.shape[1:] == (3, 224, 224)
    assert sorted(seen) == list(range(12))
    assert reasons == {1: "no_image", 7: "not_image"}


def test_wds_broken_shard_is_a_counted_skip(tmp_path, caplog):
    _shards(tmp_path)
    good = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2])
    src = open_source(f"wds:{tmp_path}/shard-000001.tar")
    src.urls.append(str(tmp_path / "cut.tar"))
    src.names.append("cut.tar")
    src._sizes = [3, 4]  # the count of the intact shard: the tail has gone missing since
    with caplog.at_level(logging.WARNING, logger="branchlens.data"):
        skipped = [s for b in iter_batches(src, "bvlc_googlenet", 4, with_skips=True)
                   for s in b.skipped]
    assert len(skipped) >= 1 and all(s[0] >= 3 for s in skipped)
    assert all(s[2] in ("missing", "truncated", "unit_error") for s in skipped)
    warning = next(r.getMessage() for r in caplog.records if "cut.tar" in r.getMessage())
    assert warning.startswith(f"wds:{tmp_path}/shard-000001.tar: shard {tmp_path}/cut.tar: "
                              f"truncated at byte {len(good) // 2}")
    assert "\n" not in warning and "_io." not in warning


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream_error(spec: str) -> str:
    from branchlens.streaming import StreamError

    with pytest.raises(StreamError) as e:
        len(open_source(spec))
    msg = str(e.value)
    assert "\n" not in msg and " object at 0x" not in msg and "_io." not in msg, msg
    return msg


def test_wds_stream_errors_are_one_english_line_naming_spec_shard_and_cause(tmp_path):
    import shutil

    _shards(tmp_path)
    good = (tmp_path / "shard-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    spec = f"wds:{tmp_path}/shard-000000.tar::{cut}"
    # inside a member's data, and at a member boundary (which tarfile alone takes for the end)
    for n, why in ((3700, "unexpected end of data"), (2048, "no end-of-archive blocks")):
        cut.write_bytes(good[:n])
        assert _stream_error(spec) == f"{spec}: shard {cut}: truncated at byte {n} ({why})"
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(good))  # whole, though not 512-aligned
    assert len(open_source(f"wds:{tmp_path}/z.tar.gz")) == SIZES[0]
    assert _stream_error("wds:pipe:false") == \
        "wds:pipe:false: shard pipe:false: command `false` exited with status 1"
    (tmp_path / "notes.tar").write_text("not a tar at all\n" * 40)
    assert "not a tar archive (invalid header" in _stream_error(f"wds:{tmp_path}/notes.tar")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: webdataset opens http URLs with it")
    url = f"http://127.0.0.1:{_closed_port()}/x.tar"
    msg = _stream_error(f"wds:{url}")
    assert msg.startswith(f"wds:{url}: shard {url}: curl exited with status 7 (could not "
                          f"connect to 127.0.0.1:") and msg.endswith("connection refused)")
    msg = _stream_error(f"wds:pipe:curl -s -f {url}")
    assert msg.startswith(f"wds:pipe:curl -s -f {url}: shard pipe:curl -s -f {url}: command "
                          f"`curl -s -f {url}` exited with status 7 (could not connect")
    assert msg.endswith("connection refused)")


def test_wds_stream_error_at_the_cli_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from branchlens.cli import app

    r = CliRunner().invoke(app, ["classify", "wds:pipe:exit 3", "--weights", "random",
                                 "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines()[-1] == \
        "error: wds:pipe:exit 3: shard pipe:exit 3: command `exit 3` exited with status 3"


def test_wds_ids_carry_the_shards_path_so_same_named_shards_do_not_collide(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        with wds.TarWriter(str(tmp_path / folder / "000.tar")) as w:
            for j in range(5):
                w.write({"__key__": f"img{j}", "cls": j, "jpg": _jpeg()})
    for spec in (f"wds:{tmp_path}/a/000.tar::{tmp_path}/b/000.tar",
                 f"wds:{tmp_path}/{{a,b}}/000.tar"):
        src = open_source(spec)
        ids = [src[i].image_id for i in range(len(src))]
        assert len(ids) == 10 and len(set(ids)) == 10, ids
        assert ids[0] == "wds:a/000.tar:img0" and ids[5] == "wds:b/000.tar:img0"
    assert open_source(f"wds:{tmp_path}/a/000.tar")[0].image_id == "wds:000.tar:img0"
    with pytest.raises(ValueError, match="names shard .*000.tar twice"):
        open_source(f"wds:{tmp_path}/a/000.tar::{tmp_path}/a/000.tar")


# -- Hugging Face -------------------------------------------------------------------------------

@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


def _imagefolder(root, classes):
    for k, name in enumerate(classes):
        d = root / "train" / name
        d.mkdir(parents=True)
        for j in range(2):
            (d / f"{j}.jpg").write_bytes(_jpeg((50 * k, 20 * j, 0)))
    return root


@pytest.mark.parametrize("classes", [["n01443537", "n01440764"], ["goldfish", "tench"]])
def test_hf_imagefolder_class_names_map_to_variant_classes(hf_cache, classes):
    """By wnid or by ImageNet name, never by ClassLabel id (goldfish is class 1, tench 0)."""
    root = _imagefolder(hf_cache / "imf", classes)
    src = open_source(f"hf:{root}")
    assert len(src) == 4
    for i in range(4):
        rec = src[i]
        folder = str(rec.payload).rsplit("/", 2)[-2]
        assert rec.label == {"n01440764": 0, "tench": 0, "n01443537": 1, "goldfish": 1}[folder]


def test_hf_class_names_that_cannot_be_trusted_leave_only_their_class_unlabelled(hf_cache,
                                                                                  caplog):
    root = _imagefolder(hf_cache / "imf", ["alpha", "crane", "tench"])
    with caplog.at_level(logging.WARNING, logger="branchlens.data"):
        src = open_source(f"hf:{root}")
    by_class = {str(src[i].payload).rsplit("/", 2)[-2]: src[i].label for i in range(len(src))}
    assert by_class == {"alpha": None, "crane": None, "tench": 0}
    assert "2 of 3 classes left unlabelled: 1 ambiguous: crane (class 134 or 517); " \
           "1 not ImageNet names (e.g. alpha)" in caplog.text
    caplog.clear()
    root = _imagefolder(hf_cache / "none", ["alpha", "beta"])
    with caplog.at_level(logging.WARNING, logger="branchlens.data"):
        src = open_source(f"hf:{root}")
    assert [src[i].label for i in range(len(src))] == [None] * 4
    assert "none of its 2 class names is an ImageNet class" in caplog.text
    assert "labels left off" in caplog.text


def test_class_names_crane_cardigan_maillot_crayfish_tench():
    from branchlens.streaming import map_class_names

    names = ["crane", "Cardigan", "maillot", "crayfish", "tench"]
    m = map_class_names(names)
    assert m.classes == [None, 264, None, 124, 0]
    assert m.ambiguous == {"crane": [134, 517], "maillot": [638, 639]} and m.unknown == []
    # the same names cased otherwise than ImageNet's: case no longer tells the corgi (264)
    # from the sweater (474), so Cardigan is left out too rather than guessed
    m = map_class_names(["Crane", "Cardigan", "Maillot", "Crayfish", "Tench"])
    assert m.classes == [None, None, None, 124, 0] and m.ambiguous["Cardigan"] == [264, 474]
    assert map_class_names(["cardigan", "tench"]).classes == [474, 0]
    # wnids first; whole synonym lists; any synonym; folder-style underscores
    assert map_class_names(["n02012849", "n03126707_crane", "maillot, tank suit", "tank suit",
                            "great_white_shark", "Tinca tinca"]).classes == \
        [134, 517, 639, 639, 2, 0]


def test_no_imagenet_name_or_synonym_is_ever_mislabelled():
    """All 1000 first names: only the two truly shared ones (crane, maillot) stay unlabelled;
    and no synonym of any class ever maps to a class whose list lacks it."""
    from branchlens.streaming import map_class_names
    from branchlens.variants import label_synonyms

    syns = label_synonyms()
    m = map_class_names([s[0] for s in syns])
    assert [i for i, c in enumerate(m.classes) if c != i] == [134, 517, 638, 639]
    assert all(c is None for c in (m.classes[i] for i in (134, 517, 638, 639)))
    every = [n for s in syns for n in s]
    got = map_class_names(every).classes
    assert all(c is None or n in syns[c] for n, c in zip(every, got, strict=True))
    assert sum(c is not None for c in got) > 0.98 * len(every)


def test_classify_scores_only_the_classes_whose_names_can_be_trusted(hf_cache, bvlc_model,
                                                                     imagenet_sample):
    """The issue's dataset (real ImageNet images under torchvision-style names): crane and
    maillot are left unlabelled instead of being scored against the wrong class."""
    from branchlens.classify import classify

    files = {"crane": "n02012849_crane.JPEG", "Cardigan": "n02113186_Cardigan.JPEG",
             "maillot": "n03710721_maillot.JPEG", "crayfish": "n01985128_crayfish.JPEG",
             "tench": "n01440764_tench.JPEG"}
    for name, file in files.items():
        (hf_cache / "imf" / "train" / name).mkdir(parents=True)
        (hf_cache / "imf" / "train" / name / file).write_bytes((imagenet_sample / file)
                                                                .read_bytes())
    res = classify(bvlc_model, open_source(f"hf:{hf_cache / 'imf'}"), workers=0,
                   show_progress=False)
    # imagefolder's class order: Cardigan, crane, crayfish, maillot, tench
    assert [p.label for p in res.predictions] == [264, None, 124, None, 0]
    assert res.summary()["labelled"] == 3


def test_hf_save_to_disk_with_custom_keys_and_splits(hf_cache):
    feats = datasets.Features({"img": datasets.Image(),
                               "y": datasets.ClassLabel(names=["n01440764", "n01443537"])})
    ds = datasets.Dataset.from_dict({"img": [{"bytes": _jpeg(), "path": None}] * 3,
                                     "y": [1, 0, 1]}, features=feats)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(hf_cache / "dd")
    src = open_source(f"hf:{hf_cache / 'dd'}", image_key="img", label_key="y")
    assert len(src) == 3 and [src[i].label for i in range(3)] == [1, 0, 1]
    assert "?image=img&label=y" in src.description
    again = open_source(src.description)  # the description reopens the same rows
    assert again.description == src.description and again[2].label == 1
    assert len(open_source(f"hf:{hf_cache / 'dd'}:test?image=img&label=y")) == 1
    b = next(iter_batches(src, "bvlc_googlenet", 3))
    assert b.images.shape == (3, 3, 224, 224) and torch.isfinite(b.images).all()
    with pytest.raises(ValueError, match=r"no column 'image'; columns: img, y") as e:
        open_source(f"hf:{hf_cache / 'dd'}")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no split 'valid'; splits: train, test"):
        open_source(f"hf:{hf_cache / 'dd'}:valid?image=img&label=y")


def test_hf_parquet_folder_limit_and_streaming_units(hf_cache, monkeypatch):
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _jpeg((i, 0, 0)), "path": None}
                                               for i in range(5)], "label": [0, 1, 2, 3, 4]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    (hf_cache / "pq").mkdir()
    ds.to_parquet(str(hf_cache / "pq" / "data.parquet"))
    src = open_source(f"hf:{hf_cache / 'pq'}", limit=4)
    assert len(src) == 4 and [src[i].label for i in range(4)] == [0, 1, 2, 3]
    monkeypatch.setattr("branchlens.data.hf.HF_UNIT_ROWS", 2)
    stream = datasets.load_dataset(str(hf_cache / "pq"), split="train", streaming=True)
    s = HFStreamSource(stream, "hf:test", 3, "image", "label", {})
    assert s.unit_sizes == [2, 1] and [s[i].label for i in range(3)] == [0, 1, 2]
    mine = [split_for_rank(s, range(3), 2, r) for r in (0, 1)]
    assert mine == [[0, 1], [2]]
    got = sorted(i for b in iter_batches(s, "bvlc_googlenet", 2, workers=2) for i in b.indices)
    assert got == [0, 1, 2]


def test_hf_unknown_hub_name_offline_is_one_line(hf_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"hf:nobody-xyz/nothing:train: cannot load") as e:
        open_source("hf:nobody-xyz/nothing:train", limit=5)
    assert "\n" not in str(e.value)


# -- harvest on a streamed source ---------------------------------------------------------------

def test_harvest_wds_with_two_workers_stores_every_sample_once(tmp_path):
    """Workers read whole shards and their batches interleave; the store is still exact."""
    from branchlens.harvest import harvest
    from branchlens.model import InceptionV1
    from branchlens.store import ActivationStore
    from branchlens.viz.stages import run_source

    torch.manual_seed(0)
    model = InceptionV1("bvlc_googlenet").eval()
    spec = f"wds:{_shards(tmp_path)}"
    res = harvest(spec, tmp_path / "run" / "store", ["mixed3a"], model=model, device="cpu",
                  workers=2,
                  batch_size=2, sampling="uniform", samples_per_image=2, shard_size=3,
                  show_progress=False)
    m = res.manifest
    assert m["counts"]["images"] == 12 and m["counts"]["images_skipped"] == 2
    assert m["skips"]["counts"] == {"no_image": 1, "not_image": 1}
    s = ActivationStore.open(tmp_path / "run" / "store")
    src, n = run_source(tmp_path / "run")  # what examples/circuits reopen
    assert src.description == spec and n == 12
    for i in range(12):
        assert s.images[i]["id"] == src[i].image_id
        if i not in (1, 7):
            assert s.images[i]["label"] == i
    assert s.count("mixed3a") == 10 * 2


def test_torchrun_two_ranks_split_wds_shards_and_equal_one_rank(tmp_path):
    """Each rank reads whole shards of its own; the merged store equals a one-process one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from branchlens.harvest import harvest
    from branchlens.store import ActivationStore

    spec = f"wds:{_shards(tmp_path)}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    common = ["--layers", "mixed3a", "--weights", "random", "--batch-size", "3", "--workers",
              "2", "--dtype", "fp32", "--sampling", "uniform", "--samples-per-image", "3",
              "--no-progress"]
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone",
                        "--nproc-per-node", "2", "-m", "branchlens", "harvest", spec, "--out",
                        str(tmp_path / "s2"), "--json", *common], env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == 1  # only rank 0 prints
    m = ActivationStore.open(tmp_path / "s2").manifest
    by_rank = {s["rank"]: s["images"] + s["skipped"] for s in m["shards"]}
    assert m["harvest"]["world_size"] == 2 and by_rank == {0: 7, 1: 5}  # shards {0, 1} | {2}
    harvest(spec, tmp_path / "s1", ["mixed3a"], weights="random", batch_size=12,
            dtype="fp32", sampling="uniform", samples_per_image=3, workers=0,
            show_progress=False)
    a, b = ActivationStore.open(tmp_path / "s2"), ActivationStore.open(tmp_path / "s1")
    def strip(images):
        return [{k: v for k, v in im.items() if k != "shard"} for im in images]
    assert strip(a.images) == strip(b.images)

    def rows(s):
        return sorted(zip(map(tuple, s.provenance("mixed3a").tolist()),
                          np.asarray(s.array("mixed3a", np.float32)).tolist(), strict=True))
    for (pa, va), (pb, vb) in zip(rows(a), rows(b), strict=True):
        assert pa == pb
        np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-3)
