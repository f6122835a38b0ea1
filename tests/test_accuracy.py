"""The end-to-end check that weights, model and preprocessing are right."""

import pytest

from branchlens.classify import classify


@pytest.mark.slow
def test_bvlc_accuracy_on_the_shared_sample(bvlc_model, imagenet_sample):
    res = classify(bvlc_model, str(imagenet_sample), batch_size=50, workers=2,
                   show_progress=False)
    s = res.summary()
    assert s["n"] == 1000 and s["labelled"] == 1000 and s["skipped"] == 0
    assert abs(s["top1"] - 749) <= 5, s
    assert abs(s["top5"] - 926) <= 5, s
