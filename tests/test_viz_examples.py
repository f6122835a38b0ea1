"""Top dataset examples: streaming merge == brute force, real pass, crops and outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import _vizkit as K
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
from branchlens.viz.sprites import save_sprites, sprite_tile, tiles_for_image


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


def test_sprite_tiles_are_the_full_size_crops_sampled_small():
    """At tile = receptive-field size the batched sampler reproduces crop_with_overlay, border
    (grey padding) and heatmap included; smaller tiles are its downsampling."""
    rf = receptive_field("bvlc_googlenet", "mixed4a")
    g = torch.Generator().manual_seed(1)
    img = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(224, 224), mode="bilinear",
                        align_corners=False)[0]  # smooth: point samples ≈ area averages
    maps = torch.rand(3, 14, 14, generator=g)
    ys, xs = torch.tensor([0, 7, 13]), torch.tensor([2, 7, 13])  # two at the border
    vmax = maps.flatten(1).max(1).values
    tiles = tiles_for_image(img, maps, rf, ys, xs, vmax, rf.size)
    for s in range(3):
        ref = torch.from_numpy(np.array(crop_with_overlay(
            img, rf, int(ys[s]), int(xs[s]), maps[s], float(vmax[s]), tile=rf.size))).float()
        got = (tiles[s].clamp(0, 1) * 255).permute(1, 2, 0)
        assert (got - ref).abs().max() <= 2.0  # uint8 rounding only
    small = tiles_for_image(img, maps, rf, ys, xs, vmax, 19)
    assert small.shape == (3, 3, 19, 19)
    down = F.interpolate(tiles, size=(19, 19), mode="area")
    assert (small - down).abs().mean() < 0.02


def test_sprites_hold_every_firing_latent_in_order(tmp_path):
    K.need_shared()
    model, sae, src = K.model(), K.trained_sae("mixed4a"), K.source()
    idx = K.image_indices()[:10]
    top = top_examples(model, sae, "mixed4a", src, n_top=4, batch_size=5, indices=idx,
                       show_progress=False)
    doc = save_sprites(model, sae, top, src, tmp_path, model.variant, n_tiles=3, tile=24,
                       per_sheet=100, batch_size=4, show_progress=False)
    n = top.values.shape[0]
    assert doc["sheets"] == [f"sprites_{s:03d}.jpg" for s in range((n + 99) // 100)]
    assert json.loads((tmp_path / "sprites.json").read_text())["with_examples"] == int(
        (top.values[:, 0] > 0).sum()) > 0
    assert not list(tmp_path.glob("tmp*"))  # the tile buffer is gone
    rf = receptive_field(model.variant, "mixed4a")
    firing = [j for j in range(n) if top.values[j, 0] > 0]
    silent = [j for j in range(n) if top.values[j, 0] <= 0]
    for j in firing[:5] + firing[-3:]:
        entries = top.entries(j)
        for k, e in enumerate(entries[:3]):
            ref = crop_with_overlay(K_unit(src, e["image_index"], model.variant), rf, e["y"],
                                    e["x"], None, None, tile=24)
            got = np.asarray(sprite_tile(tmp_path, j, k)).astype(float)
            # the overlay only reddens: green/blue of the crop never exceed the plain crop's
            assert np.mean(got[..., 1:] - np.asarray(ref)[..., 1:]) < 6
            assert np.abs(got - np.asarray(ref)).mean() < 60
        for k in range(len(entries), 3):  # fewer examples than tiles: white
            assert np.asarray(sprite_tile(tmp_path, j, k)).min() > 240
    for j in silent[:3]:
        assert np.asarray(sprite_tile(tmp_path, j, 0)).min() > 240


def K_unit(src, i, variant):
    from branchlens.viz.examples import unit_image

    return unit_image(src, i, variant)
