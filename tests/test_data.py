import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from branchlens.data import (
    BadImage,
    EmbeddedSource,
    FileListSource,
    FolderSource,
    SkipStats,
    decode_image,
    iter_batches,
    normalize,
    open_source,
)


def _jpeg_bytes(w=64, h=48, color=(200, 30, 30), exif=None) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), color)
    if exif is not None:
        img.save(buf, "JPEG", exif=exif)
    else:
        img.save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG" if img.mode != "CMYK" else "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "I;16", "RGBA", "1", "RGB"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new(mode, (32, 24))
    out = decode_image(_png_bytes(img))
    assert out.mode == "RGB" and out.size == (32, 24)


def test_sixteen_bit_is_rescaled_not_clipped():
    a = (np.arange(32 * 24).reshape(24, 32) * 80).astype(np.uint16)  # up to ~61k
    out = np.asarray(decode_image(_png_bytes(Image.fromarray(a))))
    assert out.max() == 255 and out.min() == 0


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW
    out = decode_image(_jpeg_bytes(64, 48, exif=exif.tobytes()))
    assert out.size == (48, 64)


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(_png_bytes(img))).min() == 255


def _bad_corpus(root):
    """3 good images and one of every kind of bad input, flat in one folder."""
    root.mkdir()
    for i in range(3):
        (root / f"good{i}.jpg").write_bytes(_jpeg_bytes(40 + i, 30))
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image")
    good = _jpeg_bytes(300, 200)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, "PNG")
    (root / "bomb.png").write_bytes(bomb.getvalue())
    (root / "dangling.jpg").symlink_to(root / "does-not-exist.jpg")
    return root


def test_bad_corpus_gives_exact_skip_counts(tmp_path):
    root = _bad_corpus(tmp_path / "imgs")
    src = FolderSource(root)
    assert len(src) == 8
    skips = SkipStats()
    batches = list(iter_batches(src, "bvlc_googlenet", batch_size=3, workers=2, skips=skips,
                                max_pixels=10_000_000))
    n_good = sum(len(b.image_ids) for b in batches)
    assert n_good == 3
    assert dict(skips.counts) == {"empty": 1, "not_image": 1, "truncated": 1, "too_large": 1,
                                  "missing": 1}
    assert "skipped 5 images" in skips.summary()
    for b in batches:
        assert torch.isfinite(b.images).all() and b.images.shape[1:] == (3, 224, 224)
        assert all(i.startswith("imgs/good") for i in b.image_ids)


def test_decode_reasons():
    with pytest.raises(BadImage) as e:
        decode_image(b"")
    assert e.value.reason == "empty"


def test_folder_labels_from_imagenet_names(tmp_path):
    (tmp_path / "n01443537").mkdir()
    (tmp_path / "n01443537" / "a.jpg").write_bytes(_jpeg_bytes())
    (tmp_path / "n01440764_tench.JPEG").write_bytes(_jpeg_bytes())
    (tmp_path / "other.png").write_bytes(_png_bytes(Image.new("RGB", (9, 9))))
    src = open_source(str(tmp_path))
    labels = {src[i].image_id.split("/", 1)[1]: src[i].label for i in range(len(src))}
    assert labels == {"n01443537/a.jpg": 1, "n01440764_tench.JPEG": 0, "other.png": None}
    # ILSVRC indices whatever the model's head (inception5h has 1008 outputs in its own
    # order): the category tests of the paper preset need them
    src5 = open_source(str(tmp_path), "inception5h")
    assert [src5[i].label for i in range(len(src5))] == [src[i].label for i in range(len(src))]


def test_classify_scores_only_a_head_in_label_order(tmp_path):
    import warnings

    from branchlens.classify import classify
    from branchlens.weights import load_model

    (tmp_path / "n01440764_tench.JPEG").write_bytes(_jpeg_bytes())
    for variant, scored in (("bvlc_googlenet", 1), ("inception5h", 0)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = load_model(variant, "random")
        res = classify(model, str(tmp_path), workers=0, show_progress=False)
        assert res.summary()["labelled"] == scored, variant


def test_file_list_source(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg_bytes())
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\na.jpg 7\nmissing.jpg\n")
    src = FileListSource(lst)
    assert [src[i].label for i in range(2)] == [7, None]
    skips = SkipStats()
    got = list(iter_batches(src, "inception5h", 4, skips=skips))
    assert sum(len(b.image_ids) for b in got) == 1 and skips.counts["missing"] == 1


def test_webdataset_tar(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHLENS_CACHE", str(tmp_path / "cache"))  # shard-count cache
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as tf:
        for key, label in (("s0", 3), ("s1", 5)):
            for name, data in ((f"{key}.jpg", _jpeg_bytes()), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    src = open_source(f"wds:{tmp_path}/shard-*.tar")
    assert len(src) == 2 and [src[i].label for i in range(2)] == [3, 5]
    b = next(iter_batches(src, "bvlc_googlenet", 2))
    assert b.images.shape == (2, 3, 224, 224)


def test_embedded_default_is_real_and_seeded():
    a, b = EmbeddedSource(40, seed=1), EmbeddedSource(40, seed=1)
    assert len(a) == 40 and len({a[i].image_id for i in range(40)}) == 40
    x1 = next(iter_batches(a, "bvlc_googlenet", 40)).images
    x2 = next(iter_batches(b, "bvlc_googlenet", 40)).images
    assert torch.equal(x1, x2)
    assert x1.std() > 10  # real photos, not a constant
    c = next(iter_batches(EmbeddedSource(40, seed=2), "bvlc_googlenet", 40)).images
    assert not torch.equal(x1, c)


def test_normalize_per_variant():
    x = torch.zeros(1, 3, 2, 2)
    x[:, 0] = 1.0  # pure red
    bgr = normalize(x, "bvlc_googlenet")
    assert bgr[0, 2, 0, 0] == 255 - 123 and bgr[0, 0, 0, 0] == -104
    rgb = normalize(x, "inception5h")
    assert rgb[0, 0, 0, 0] == 255 - 117
    assert torch.equal(normalize(x, "inception5h", paper_compat=True), x)


def test_unknown_source_spec():
    with pytest.raises(FileNotFoundError, match="not a folder"):
        open_source("/nonexistent/place")
