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


def test_category_bootstrap_against_the_images_base_rate():
    rng = np.random.default_rng(1)
    n_img = 400
    animal = (rng.random(n_img) < 0.4).astype(float)  # base rate 0.4
    animal[:20] = np.nan  # unlabelled images are ignored
    groups = np.arange(n_img) // 2  # an image and its mirror
    imgs = np.arange(n_img)
    animals = np.flatnonzero(animal == 1)
    others = np.flatnonzero(animal == 0)
    dom = np.repeat([0, 1, 2, 3, NONE], 40)
    tops = []
    for lat in range(dom.size):
        if dom[lat] == 2:  # 5x5 latents: 80 % animal top images
            pick = np.concatenate([rng.choice(animals, 8), rng.choice(others, 2)])
        else:  # the others: top images drawn like the images themselves
            pick = rng.choice(imgs[20:], 10)
        tops.append([int(i) for i in pick])
    res = cat.category_bootstrap(tops, animal, groups, dom, ["1x1", "3x3", "5x5", "pool"],
                                 images=imgs, n_boot=1000)
    five = res["5x5"]
    assert five["latents"] == 40 and abs(five["base_rate"] - 0.4) < 0.05
    assert five["animal_fraction"] > 0.75 and five["ci_low"] > 0.2 and five["p_value"] < 0.01
    for b in ("1x1", "3x3", "pool"):
        assert res[b]["ci_low"] < 0 < res[b]["ci_high"], (b, res[b])
