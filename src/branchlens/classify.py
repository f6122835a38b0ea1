"""Top-5 classification over an image source: the end-to-end check that weights and
preprocessing are right (BVLC on the shared sample: top-1 749, top-5 926 of 1000)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from branchlens.data import SkipStats, iter_batches, open_source
from branchlens.model import InceptionV1
from branchlens.progress import progress
from branchlens.variants import class_names, head_is_ilsvrc


@dataclass
class Prediction:
    image_id: str
    label: int | None
    top5: list[int]
    probs: list[float]


@dataclass
class ClassifyResult:
    predictions: list[Prediction] = field(default_factory=list)
    skips: SkipStats = field(default_factory=SkipStats)

    @property
    def labelled(self) -> list[Prediction]:
        return [p for p in self.predictions if p.label is not None]

    def summary(self) -> dict:
        lab = self.labelled
        out = {"n": len(self.predictions), "labelled": len(lab), "skipped": self.skips.total}
        if lab:
            out["top1"] = sum(p.top5[0] == p.label for p in lab)
            out["top5"] = sum(p.label in p.top5 for p in lab)
        else:
            out["top1"] = out["top5"] = None
        return out


def iter_predictions(model: InceptionV1, source, batch_size: int = 32, workers: int = 2,
                     paper_compat: bool = False, skips: SkipStats | None = None,
                     show_progress: bool = True) -> Iterator[Prediction]:
    src = open_source(source, model.variant)
    device = next(model.parameters()).device
    batches = iter_batches(src, model.variant, batch_size, workers, paper_compat=paper_compat,
                           skips=skips)
    # labels are ILSVRC indices; a head in another order cannot be scored against them
    scored = head_is_ilsvrc(model.variant)
    with torch.inference_mode(), progress(total=len(src), desc="classify", unit="img",
                                          disable=not show_progress) as bar:
        for b in batches:
            probs = torch.softmax(model(b.images.to(device)).float(), dim=1)
            p5, i5 = probs.topk(5, dim=1)
            for k in range(len(b.image_ids)):
                yield Prediction(b.image_ids[k], b.labels[k] if scored else None,
                                 i5[k].tolist(), p5[k].tolist())
            bar.update(len(b.image_ids), skipped=skips.total if skips else 0)


def classify(model: InceptionV1, source, **kw) -> ClassifyResult:
    res = ClassifyResult()
    res.predictions = list(iter_predictions(model, source, skips=res.skips, **kw))
    return res


def format_prediction(p: Prediction, variant) -> str:
    names = class_names(variant)
    tops = ", ".join(f"{names[c]} {q:.2f}" for c, q in zip(p.top5, p.probs, strict=True))
    mark = "" if p.label is None else (" ✓" if p.top5[0] == p.label else " ✗")
    return f"{p.image_id}{mark}: {tops}"
