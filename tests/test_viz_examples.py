"""Top dataset examples: streaming merge == brute force, real pass, crops, galleries, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import _vizkit as K
from _report_run import smooth_image
from branchlens.viz.examples import (
    TopExamples,
    crop_with_overlay,
    example_maps,
    heatmap,
    load_top_table,
    save_examples,
    save_top_table,
    top_examples,
)
from branchlens.viz.receptive import receptive_field
from branchlens.viz.sprites import (
    GALLERY,
    Gallery,
    GalleryWriter,
    choose_gallery,
    entry_map,
    load_gallery,
    save_gallery,
    sweep_leftovers,
)


def test_streaming_topk_equals_brute_force_with_bounded_state():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(37, 20, 5, 6, generator=g)
    maps[maps < 0.7] = 0
    top = TopExamples.empty("mixed4a", 20, 4)
    for s in range(0, 37, 8):  # uneven last batch
        top.update(maps[s:s + 8], range(s, min(s + 8, 37)))
        assert top.values.shape == (20, 4)  # memory does not grow with the stream
    best = maps.flatten(2).max(2).values  # [images, latents]
    ref = best.t().topk(4, dim=1)
    assert torch.allclose(top.values, ref.values)
    assert torch.equal(top.images, ref.indices)
    for j in range(20):
        for k in range(4):
            i, y, x = top.images[j, k], top.ys[j, k], top.xs[j, k]
            assert maps[i, j, y, x] == top.values[j, k]
    assert top.n_images == 37 and top.grid == (5, 6)


def test_heatmap_peak_sits_at_receptive_field_centre():
    rf = receptive_field("bvlc_googlenet", "mixed4c")
    m = torch.zeros(14, 14)
    m[3, 9] = 1.0
    h = heatmap(m, rf, 224)
    py, px = divmod(int(h.argmax()), 224)
    assert (py, px) == rf.center(3, 9)


def test_crop_is_centred_on_the_unit_and_grey_outside_the_image():
    rf = receptive_field("bvlc_googlenet", "mixed4a")  # size 171 > distance to the border
    img = torch.zeros(3, 224, 224)
    cy, cx = (int(c) for c in rf.center(2, 11))
    img[:, cy, cx] = 1.0
    tile = crop_with_overlay(img, rf, 2, 11, tile=rf.size)
    a = torch.from_numpy(np.array(tile)).float()
    assert tuple(a[rf.size // 2, rf.size // 2]) == (255.0, 255.0, 255.0)  # the marked pixel
    assert tuple(a[0, 0]) == (128.0, 128.0, 128.0)  # above the image: padding, not pixels


def test_real_pass_maps_strips_and_index(tmp_path):
    K.need_shared()
    model, sae, src = K.model(), K.trained_sae("mixed4a"), K.source()
    idx = K.image_indices()[:12]
    top = top_examples(model, sae, "mixed4a", src, n_top=3, batch_size=5, indices=idx,
                       show_progress=False)
    assert top.grid == (14, 14) and top.n_images == 12
    latents = [j for j in range(top.values.shape[0]) if top.values[j, 0] > 0][:3]
    maps = example_maps(model, sae, top, latents, src, batch_size=4)
    for j in latents:
        for k, e in enumerate(top.entries(j)):  # recomputed full maps agree with the pass
            m = maps[j][k]
            assert float(m[e["y"], e["x"]]) == pytest.approx(e["value"], rel=1e-4)
            assert float(m.max()) == pytest.approx(e["value"], rel=1e-4)
    index = save_examples(top, latents, src, tmp_path, model.variant, maps, tile=64)
    doc = json.loads((tmp_path / "index.json").read_text())
    assert doc["receptive_field"] == {"size": 171, "stride": 16, "offset": 14.0}
    assert [e["latent"] for e in doc["latents"]] == latents == [e["latent"] for e in
                                                               index["latents"]]
    for e in doc["latents"]:
        strip = Image.open(tmp_path / e["file"])
        assert strip.size[1] == 64 and strip.size[0] >= 64 * len(e["examples"])
        for ex in e["examples"]:
            t, l_, b, r = ex["box"]
            assert 0 <= t < b <= 224 and 0 <= l_ < r <= 224
            assert src[ex["image_index"]].image_id == ex["image_id"]
    save_top_table(top, tmp_path / "top.safetensors")
    back = load_top_table(tmp_path / "top.safetensors")
    assert torch.equal(back.values, top.values) and back.image_ids == top.image_ids


def _top(ids: dict[int, str], rows: list[list[tuple[int, float]]]) -> TopExamples:
    """A top table from rows of (image, value), best first (y = x = image % 5)."""
    n_top = max(len(r) for r in rows)
    top = TopExamples.empty("mixed4a", len(rows), n_top)
    for j, r in enumerate(rows):
        for k, (i, v) in enumerate(r):
            top.values[j, k], top.images[j, k] = v, i
            top.ys[j, k] = top.xs[j, k] = i % 5
    top.image_ids, top.grid = ids, (5, 5)
    return top


def test_gallery_shows_each_image_once_best_view_first():
    """An image and its mirror are one example (the better view is kept); silent or empty
    slots end the list; the order of the top table is kept."""
    ids = {0: "a.jpg", 1: "a.jpg#flip", 2: "b.jpg", 3: "b.jpg#flip", 4: "c.jpg", 5: "d.jpg"}
    top = _top(ids, [[(1, 9.0), (0, 8.0), (3, 7.0), (4, 6.0), (2, 5.0), (5, 4.0)],
                     [(5, 2.0), (4, 0.0), (2, -1.0)],
                     [(0, 0.0)]])
    g = choose_gallery(top, size=3)
    assert g.images.tolist() == [[1, 3, 4], [5, -1, -1], [-1, -1, -1]]
    assert g.values[0].tolist() == [9.0, 7.0, 6.0]
    assert g.ys[0].tolist() == [1, 3, 4] and g.xs[1, 0] == 0
    assert choose_gallery(top, size=12).images[0].tolist()[:5] == [1, 3, 4, 5, -1]


def _peak_map(n: int, grid: tuple[int, int], j: int, y: int, x: int, v: float) -> torch.Tensor:
    m = torch.zeros(n, *grid)
    m[j, y, x] = v
    m[j, y, x + 1] = v / 2
    m[n - 1, 0, 0] = 5.0  # a latent without examples fires on this image too: not stored
    return m


def test_gallery_writer_stores_each_image_once_and_the_maps_sparsely(tmp_path):
    rf = receptive_field("bvlc_googlenet", "mixed4a")
    g = Gallery("mixed4a", torch.tensor([[3, 7], [7, -1], [9, 3]]),
                torch.tensor([[1, 2], [4, -1], [0, 3]]), torch.tensor([[0, 3], [2, -1], [1, 1]]),
                torch.tensor([[2.0, 1.0], [3.0, 0.0], [1.5, 1.25]]))
    out = tmp_path / "ex"
    (out / "images").mkdir(parents=True)
    (out / "images" / "000042.jpg").write_bytes(b"a previous gallery's image")
    (out / "images" / "notes.txt").write_text("not ours")
    w = GalleryWriter(out, g, rf, (5, 5), 224)
    assert w.wanted == [3, 7, 9]
    pics = {i: smooth_image(np.random.default_rng(i)) for i in (3, 7)}
    # image 3 owes (0, 0) and (2, 1); image 7 owes (0, 1) and (1, 0); image 9 never comes
    # (unreadable): latent 2 then shows image 3 first
    maps3 = _peak_map(4, (5, 5), 0, 1, 0, 2.0) + _peak_map(4, (5, 5), 2, 3, 1, 1.25)
    maps7 = _peak_map(4, (5, 5), 0, 2, 3, 1.0) + _peak_map(4, (5, 5), 1, 4, 2, 3.0)
    w.add(3, pics[3], "n01440764_3.JPEG", 0, maps3)
    w.add(7, pics[7], "x.png#flip", None, maps7)
    assert not (out / GALLERY).exists()  # written last
    doc = w.finish(n_images=10)
    assert doc["missing_images"] == 1 and doc["with_examples"] == 3
    back, t = load_gallery(out)
    assert back["image_files"] == [
        {"index": 3, "file": "images/000003.jpg", "id": "n01440764_3.JPEG", "label": 0},
        {"index": 7, "file": "images/000007.jpg", "id": "x.png#flip", "label": None}]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000003.jpg", "000007.jpg",
                                                                 "notes.txt"]
    for i in (3, 7):  # the crop the network saw, once
        a = torch.from_numpy(np.array(Image.open(out / f"images/{i:06d}.jpg"))).float() / 255
        assert a.shape == (224, 224, 3)
        assert (a.permute(2, 0, 1) - pics[i]).abs().max() < 0.05
    assert t["images"].tolist() == [[3, 7], [7, -1], [3, -1]]  # image 9: left out
    assert t["ys"][2].tolist() == [3, -1] and t["values"][2].tolist() == [1.25, 0]
    assert torch.equal(entry_map(t, (5, 5), 0, 0), maps3[0])
    assert torch.equal(entry_map(t, (5, 5), 0, 1), maps7[0])
    assert torch.equal(entry_map(t, (5, 5), 1, 0), maps7[1])
    assert torch.equal(entry_map(t, (5, 5), 2, 0), maps3[2])
    assert not entry_map(t, (5, 5), 2, 1).any()
    assert t["pos"].numel() == 8  # two nonzero units per entry, nothing else stored


def test_sweep_removes_what_a_killed_stage_left_and_nothing_else(tmp_path):
    out = tmp_path / "ex"
    (out / "images").mkdir(parents=True)
    left = [out / ".top.safetensors.k2x_9a.tmp", out / "images" / ".000003.jpg.abc123.tmp",
            out / GALLERY, out / "sprites.json", out / "sprites_000.jpg"]
    for p in left:
        p.write_bytes(b"x")
    (out / "tmpq1w2e3").mkdir()
    (out / "tmpq1w2e3" / "tiles.npy").write_bytes(b"x")  # the old tile buffer
    keep = [out / "NOTES.txt", out / "mixed4a_00001.png", out / "tmpmine" / "data.csv",
            out / ".hidden.tmp.keep"]
    for p in keep:
        p.parent.mkdir(exist_ok=True)
        p.write_text("mine")
    gone = sweep_leftovers(out)
    assert len(gone) == len(left) + 1 and not (out / "tmpq1w2e3").exists()
    assert not any(p.exists() for p in left) and all(p.exists() for p in keep)
    assert sweep_leftovers(tmp_path / "absent") == []


def test_real_gallery_pass_maps_agree_with_the_top_table(tmp_path):
    K.need_shared()
    model, sae, src = K.model(), K.trained_sae("mixed4a"), K.source()
    idx = K.image_indices()[:12]
    top = top_examples(model, sae, "mixed4a", src, n_top=6, batch_size=5, indices=idx,
                       show_progress=False)
    doc = save_gallery(model, sae, top, src, tmp_path, model.variant, size=3, batch_size=4,
                       show_progress=False)
    doc2, t = load_gallery(tmp_path)
    assert doc2["size"] == doc["size"] == 3 and doc2["grid"] == [14, 14]
    assert doc2["receptive_field"] == {"size": 171, "stride": 16, "offset": 14.0}
    labels = {i: src[i].label for i in idx}
    assert {r["index"]: r["label"] for r in doc2["image_files"]} == {
        i: labels[i] for i in {r["index"] for r in doc2["image_files"]}}
    firing = [j for j in range(top.values.shape[0]) if top.values[j, 0] > 0]
    assert doc2["with_examples"] == len(firing) > 0
    for j in firing[:40]:
        for s in range(3):
            i = int(t["images"][j, s])
            if i < 0:
                break
            m = entry_map(t, doc2["grid"], j, s)  # the latent's map on that image
            y, x, v = int(t["ys"][j, s]), int(t["xs"][j, s]), float(t["values"][j, s])
            assert float(m[y, x]) == pytest.approx(v, rel=2e-3)  # float16 storage
            assert float(m.max()) == pytest.approx(v, rel=2e-3)
            assert (tmp_path / f"images/{i:06d}.jpg").is_file()


def test_one_forward_per_image_gives_the_same_tables_gallery_and_maps(tmp_path):
    """The examples stage's three passes share one code cache: each image goes through the
    network once, and every table, gallery map and strip map equals the uncached passes'."""
    from branchlens.viz.examples import CodeCache

    K.need_shared()
    model, sae, src = K.model(), K.trained_sae("mixed4a"), K.source()
    idx = K.image_indices()[:10]
    plain = top_examples(model, sae, "mixed4a", src, n_top=4, batch_size=3, indices=idx,
                         show_progress=False)
    codes = CodeCache(model, sae, "mixed4a", src, batch_size=3)
    cached = top_examples(model, sae, "mixed4a", src, n_top=4, batch_size=3, indices=idx,
                          show_progress=False, codes=codes)
    assert codes.forwards == len(idx)
    for name in ("values", "images", "ys", "xs"):
        assert torch.equal(getattr(plain, name), getattr(cached, name)), name
    assert plain.image_ids == cached.image_ids and plain.grid == cached.grid
    latents = [j for j in range(plain.values.shape[0]) if plain.values[j, 0] > 0][:5]
    a = example_maps(model, sae, plain, latents, src, batch_size=3)
    b = example_maps(model, sae, cached, latents, src, batch_size=3, codes=codes)
    assert all(torch.equal(a[j], b[j]) for j in latents)
    save_gallery(model, sae, plain, src, tmp_path / "a", model.variant, size=2, batch_size=3,
                 show_progress=False)
    save_gallery(model, sae, cached, src, tmp_path / "b", model.variant, size=2, batch_size=3,
                 show_progress=False, codes=codes)
    (_, ta), (_, tb) = load_gallery(tmp_path / "a"), load_gallery(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert codes.forwards == len(idx)  # the later passes ran no network
    tiny = CodeCache(model, sae, "mixed4a", src, batch_size=3, max_bytes=1)  # over budget:
    list(tiny.batches(idx[:4]))
    list(tiny.batches(idx[:4]))  # encoded again, nothing lost
    assert tiny.forwards == 4 + 3 and len([e for e in tiny.entries.values() if e]) == 1
