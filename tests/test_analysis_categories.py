"""The ImageNet-1k category table against the class names it was derived from."""

from __future__ import annotations

import numpy as np

from branchlens.analysis import categories as cat
from branchlens.analysis.branches import NONE
from branchlens.variants import class_names


def test_every_class_has_exactly_one_category():
    assert cat.CATEGORY_OF_CLASS.shape == (1000,)
    assert np.all(cat.CATEGORY_OF_CLASS >= 0)
    assert cat.category(None) is None and cat.category(1000) is None


def test_ranges_agree_with_class_names():
    names = class_names("bvlc_googlenet")
    by = {c: [names[i].lower() for i in range(1000) if cat.category(i) == c]
          for c in cat.CATEGORIES}
    assert len(by["dog"]) == 118
    assert names[151] == "Chihuahua" and names[268] == "Mexican hairless"
    assert any("terrier" in n for n in by["dog"]) and not any("terrier" in n
                                                              for n in by["artifact"])
    for bird in ("ostrich", "great grey owl", "black swan", "flamingo", "king penguin"):
        assert bird in by["bird"], bird
    for animal in ("tench", "tabby", "tiger", "zebra", "tarantula", "puffer"):
        assert animal in by["other_animal"], animal
    for food in ("pizza", "banana", "cheeseburger", "espresso"):
        assert food in by["food"]
    assert "volcano" in by["scene"] and "daisy" in by["plant"]
    for art in ("abacus", "plate", "toilet tissue", "street sign"):
        assert art in by["artifact"]
    assert sum(cat.is_animal(i) for i in range(1000)) == 398


def test_fractions_and_category_test():
    fr = cat.category_fractions([151, 200, 10, 500, None, 5000])
    assert fr["dog"] == 0.5 and fr["bird"] == 0.25 and fr["animal"] == 0.75
    assert cat.top_category([151, 200, 10]) == "dog" and cat.category_fractions([]) == {}
    rng = np.random.default_rng(0)
    dom = np.repeat([0, 1, 2, 3, NONE], 60)
    frac = np.clip(rng.normal(0.3, 0.15, dom.size), 0, 1)
    frac[dom == 2] += 0.3  # "5x5 ⇒ animals"
    res = cat.category_test(frac, dom, ["1x1", "3x3", "5x5", "pool"])
    assert res["5x5"]["p_value"] < 1e-6 and res["5x5"]["effect"] > 0.5
    assert res["1x1"]["effect"] < 0


def _planted_tops(rng, animal, five_share: float, other_share: float, dom):
    animals, others = np.flatnonzero(animal == 1), np.flatnonzero(animal == 0)
    tops = []
    for lat in range(dom.size):
        share = five_share if dom[lat] == 2 else other_share
        n_an = int(round(10 * share))
        pick = np.concatenate([rng.choice(animals, n_an), rng.choice(others, 10 - n_an)])
        tops.append([int(i) for i in pick])
    return tops


def test_category_bootstrap_contrasts_5x5_latents_with_the_other_latents():
    """The decision contrast is other latents' top images under the same procedure; the images'
    base rate is only a reference. When every latent's top images are animal-rich, 5x5 latents
    are not "animal features" although they beat the base rate."""
    rng = np.random.default_rng(1)
    n_img = 400
    animal = (rng.random(n_img) < 0.4).astype(float)  # base rate 0.4
    animal[:20] = np.nan  # unlabelled images are ignored
    groups = np.arange(n_img) // 2  # an image and its mirror
    imgs = np.arange(n_img)
    dom = np.repeat([0, 1, 2, 3, NONE], 40)
    names = ["1x1", "3x3", "5x5", "pool"]

    tops = _planted_tops(rng, animal, 0.8, 0.4, dom)  # 5x5 latents prefer animals
    res = cat.category_bootstrap(tops, animal, groups, dom, names, images=imgs, n_boot=1000)
    five = res["5x5"]
    assert five["latents"] == 40 and five["other_latents"] == 160
    assert abs(five["base_rate"] - 0.4) < 0.05 and abs(five["other_fraction"] - 0.4) < 0.03
    assert five["animal_fraction"] > 0.75 and five["ci_low"] > 0.2 and five["p_value"] < 0.01
    # 1x1 latents sit at the images' rate, below the others (which hold the 5x5 ones)
    assert res["1x1"]["difference"] < 0 and abs(res["1x1"]["difference_vs_base"]) < 0.05

    tops = _planted_tops(rng, animal, 0.8, 0.8, dom)  # every latent's top images animal-rich
    res = cat.category_bootstrap(tops, animal, groups, dom, names, images=imgs, n_boot=1000)
    five = res["5x5"]
    assert five["difference_vs_base"] > 0.3  # what the base-rate contrast would call a finding
    assert five["ci_low"] < 0 < five["ci_high"] and five["p_value"] > 0.05
    assert abs(five["difference"]) < 0.05
