"""Loaders of chapter 01 (ldm_course.data): real formats read from tiny fixtures written here, the Kaggle catalogue's
faults counted by reason, both Kaggle archives letterboxed to the profile's square size (the 60x80 one refused above
80 px unless upscaling is asked), pattern labels read from product names, clear errors, and deterministic synthetic
fallbacks (drawn by ldm_course.synthetic, natively at the size asked) written in the real formats."""
import gzip
import pickle
import re
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10

from ldm_course import data as D
from ldm_course import fashion as C   # the clothing catalogue
from ldm_course import garments as G
from ldm_course import synthetic as S

COLUMNS = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    "No test waits for a network check: the machines running them have no internet."
    monkeypatch.setenv("LDM_COURSE_OFFLINE", "1")


# ---------------------------------------------------------------- fixtures in the real formats, written by hand
def idx_bytes(array: np.ndarray) -> bytes:
    "MNIST's IDX layout: magic 0x0000080N big-endian, N uint32 dimensions, uint8 data."
    return bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def write_mnist_fixture(root: Path, compress: bool = False):
    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), "t10k": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)}
    splits["train"][0, 0, :2] = [0, 255]
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = {"train": np.array([3, 1, 4, 1, 5, 9], np.uint8), "t10k": np.array([2, 6, 5], np.uint8)}
    for split in splits:
        for kind, array in (("images-idx3", splits[split]), ("labels-idx1", labels[split])):
            name = f"{split}-{kind}-ubyte"
            if compress: (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
            else: (raw / name).write_bytes(idx_bytes(array))
    return splits, labels


def write_cifar_fixture(root: Path, n_train: int = 10, n_test: int = 4):
    "CIFAR10's python pickles: rows of 3072 bytes (R plane, G plane, B plane), 5 training batches, batches.meta."
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n_train + n_test, 32, 32, 3), dtype=np.uint8)
    labels = [i % 10 for i in range(n_train + n_test)]
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    def dump(name, idx):
        rows = np.stack([np.concatenate([images[i][:, :, c].ravel() for c in range(3)]) for i in idx])
        (folder / name).write_bytes(pickle.dumps({"data": rows, "labels": [labels[i] for i in idx]}, protocol=2))
    for k, part in enumerate(np.array_split(np.arange(n_train), 5), start=1): dump(f"data_batch_{k}", part)
    dump("test_batch", np.arange(n_train, n_train + n_test))
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    return images, labels, names


def write_kaggle_fixture(root: Path) -> Path:
    "A catalogue with every fault of the real styles.csv; returns its folder."
    images = root / "images"
    images.mkdir(parents=True)
    lines = [COLUMNS]
    for i in range(1, 5):
        lines.append(f"{i},Women,Apparel,Dress,Dresses,Red,Summer,2012,Casual,Women Red Dress {i}")
        Image.new("RGB", (60, 80), (200, 30, 40)).save(images / f"{i}.jpg")
    lines += [
        "5,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Roadster Men, Blue, Tshirt",   # malformed (commas)
        "6,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Nike Blue Tshirt, Pack of 2",  # malformed (commas)
        "7,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,No Image Tshirt",              # missing image
        "8,Men,Apparel,Topwear,Tshirts,Pink,,2012,,",                                         # no name -> fallback caption
        "9,Men,Apparel,Topwear,Tshirts,,Summer,2012,Casual,Colourless Tshirt",                # missing baseColour: kept
        ",Men,Apparel,Topwear,Tshirts,Pink,Summer,2012,Casual,No Id Tshirt",                  # missing id
        "x10,Men,Apparel,Topwear,Tshirts,Pink,Summer,2012,Casual,Bad Id Tshirt",              # bad id
        "1,Men,Apparel,Topwear,Tshirts,Pink,Summer,2012,Casual,Duplicate Tshirt",             # duplicate id
        "11,Men,Apparel,Topwear,,,Summer,2012,Casual,",                                       # nothing to caption
        "12,Women,Apparel,Topwear,Tops,Grey,Summer,2012,Casual,Grey Top",                     # grayscale
        "13,Women,Apparel,Topwear,Tops,White,Summer,2012,Casual,White Top",                   # RGBA
        "14,Women,Apparel,Topwear,Tops,Black,Summer,2012,Casual,Black Top",                   # CMYK
        "15,Women,Apparel,Topwear,Tops,Green,Summer,2012,Casual,Green Top",                   # palette
        "16,Women,Apparel,Topwear,Tops,Blue,Summer,2012,Casual,Truncated Top",                # truncated JPEG
        "17,Women,Apparel,Topwear,Tops,Blue,Summer,2012,Casual,Empty File Top",               # zero-byte file
        "18,Women,Apparel,Topwear,Tops,Blue,Summer,2012,Casual,Not An Image Top",             # garbage bytes
        "",                                                                                   # blank line: ignored
    ]
    for i in (8, 9, 11): Image.new("RGB", (60, 80), "white").save(images / f"{i}.jpg")
    Image.new("L", (60, 80), 128).save(images / "12.jpg")
    Image.new("RGBA", (60, 80), (0, 0, 0, 0)).save(images / "13.jpg", format="PNG")
    Image.new("CMYK", (60, 80), (0, 0, 0, 255)).save(images / "14.jpg")
    Image.new("RGB", (60, 80), (0, 160, 0)).convert("P").save(images / "15.jpg", format="PNG")
    Image.effect_noise((60, 80), 60).convert("RGB").save(images / "16.jpg", quality=95)
    full = (images / "16.jpg").read_bytes()
    (images / "16.jpg").write_bytes(full[: len(full) // 2])
    (images / "17.jpg").write_bytes(b"")
    (images / "18.jpg").write_bytes(b"this is not a jpeg")
    (root / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


EXPECTED_SKIPS = {"malformed_line": 2, "bad_id": 2, "duplicate_id": 1, "missing_caption": 1,
                  "missing_image": 1, "empty_image": 1, "unreadable_image": 2}


# ---------------------------------------------------------------- MNIST
def test_mnist_reads_real_idx_files(tmp_path):
    images, labels = write_mnist_fixture(tmp_path)
    ds, src = D.load_mnist(tmp_path, train=True, source="real", verbose=False)
    assert (len(ds), src.source, src.root) == (6, "real", str(tmp_path))
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    assert x[0, 0, 0] == -1 and x[0, 0, 1] == 1                      # 0 -> -1, 255 -> +1
    torch.testing.assert_close(x[0], torch.from_numpy(images["train"][0]).float() / 127.5 - 1)
    test, _ = D.load_mnist(tmp_path, train=False, source="real", verbose=False)
    assert len(test) == 3 and test[2][1] == 5
    # our writer produces the same bytes as the format written by hand above
    assert D.write_idx(tmp_path / "copy", images["train"]).read_bytes() == idx_bytes(images["train"])


def test_mnist_gz_files_are_decompressed(tmp_path):
    write_mnist_fixture(tmp_path, compress=True)
    ds, src = D.load_mnist(tmp_path, source="real", verbose=False)
    assert len(ds) == 6 and src.source == "real"


def test_mnist_real_without_files_says_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e: D.load_mnist(tmp_path, source="real")
    message = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message and "download=True" in message


# ---------------------------------------------------------------- CIFAR10
def test_cifar10_fixture_read_despite_md5(tmp_path):
    images, labels, names = write_cifar_fixture(tmp_path)
    with pytest.raises(RuntimeError): CIFAR10(str(tmp_path), train=True)       # torchvision: md5 of the original files
    with pytest.raises(RuntimeError, match="md5 mismatch"): D.LocalCIFAR10(tmp_path)
    ds, src = D.load_cifar10(tmp_path, source="real", verify_md5=False, verbose=False)
    assert (len(ds), ds.classes, src.source) == (10, names, "real")
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and y == labels[7]
    torch.testing.assert_close(x, torch.from_numpy(images[7]).permute(2, 0, 1).float() / 127.5 - 1)
    test = D.LocalCIFAR10(tmp_path, train=False, verify_md5=False)
    assert len(test) == 4 and test[0][1] == labels[10]


def test_cifar10_missing_file_is_named(tmp_path):
    write_cifar_fixture(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['data_batch_3'\]"): D.LocalCIFAR10(tmp_path, verify_md5=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"): D.load_cifar10(tmp_path / "empty", source="real")


# ---------------------------------------------------------------- Kaggle catalogue
def test_kaggle_faults_counted_by_reason(tmp_path, capsys):
    root = write_kaggle_fixture(tmp_path / "shop")
    ds = C.FashionProducts(root, image_size=32, verify_images=True)
    assert ds.skipped == EXPECTED_SKIPS
    assert ds.num_rows == 20 and len(ds) == 20 - sum(EXPECTED_SKIPS.values())
    assert ds.converted == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "skipped 10" in line and "malformed_line 2" in line and "unreadable_image 2" in line
    ids = ds.records["id"].tolist()
    assert ids == [1, 2, 3, 4, 8, 9, 12, 13, 14, 15]
    info = ds.item_info(ids.index(8))
    assert (info["caption"], info["caption_from"], info["season"], info["articleType"]) == ("Pink Tshirts", "fallback", None, "Tshirts")
    assert ds.item_info(ids.index(9))["baseColour"] is None         # missing value kept (not needed for a caption)
    codes, classes = ds.labels("baseColour")
    assert classes == ["Black", "Green", "Grey", "Pink", "Red", "White"] and codes[ids.index(9)] == -1


def test_kaggle_images_converted_and_padded(tmp_path):
    ds = C.FashionProducts(write_kaggle_fixture(tmp_path / "shop"), image_size=40, verbose=False, verify_images=True)
    ids = ds.records["id"].tolist()
    for item_id in (12, 13, 14, 15):
        x, caption = ds[ids.index(item_id)]
        assert x.shape == (3, 40, 40) and x.min() >= -1 and x.max() <= 1
    white = ds[ids.index(13)][0]                                      # transparent RGBA -> white
    torch.testing.assert_close(white, torch.ones_like(white))
    red = ds[0][0]                                                    # 60x80 padded with white left and right
    assert torch.allclose(red[:, 20, 0], torch.ones(3)) and red[0, 20, 20] > 0.4 and red[1, 20, 20] < -0.5


def test_kaggle_lazy_decoding_never_crashes_a_training_loop(tmp_path):
    ds = C.FashionProducts(write_kaggle_fixture(tmp_path / "shop"), image_size=16, verbose=False)
    assert len(ds) == 12 and ds.skipped["unreadable_image"] == 0      # truncated and garbage files pass the cheap checks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(DataLoader(ds, batch_size=5, shuffle=False))
        list(DataLoader(ds, batch_size=5))                           # a second epoch counts nothing twice
    assert sum(len(b[1]) for b in batches) == 12 and all(b[0].shape[1:] == (3, 16, 16) for b in batches)
    assert ds.skipped["unreadable_image"] == 2 and sum("unreadable image" in str(w.message) for w in caught) == 2
    assert list(batches[-1][1][-2:]) == ["Women Red Dress 1", "Women Red Dress 1"]  # ids 16, 18 replaced by the next readable (wraps)
    ds.verify(verbose=False)
    assert len(ds) == 10 and ds.skipped == EXPECTED_SKIPS


def test_kaggle_required_columns(tmp_path):
    ds = C.FashionProducts(write_kaggle_fixture(tmp_path / "shop"), require=("baseColour",), verbose=False, verify_images=True)
    assert (ds.skipped["missing_baseColour"], ds.skipped["missing_caption"], len(ds)) == (2, 0, 9)  # first failing check wins
    with pytest.raises(ValueError, match="unknown column"): C.FashionProducts(tmp_path / "shop", require=("colour",))


def test_kaggle_wrong_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e: C.FashionProducts(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "styles.csv" in str(e.value) and "images/<id>.jpg" in str(e.value)
    (tmp_path / "half").mkdir(); (tmp_path / "half" / "styles.csv").write_text(COLUMNS + "\n")
    with pytest.raises(FileNotFoundError, match="images/ folder not found"): C.FashionProducts(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="fashion-product-images") as e: C.load_fashion(tmp_path, source="real")
    assert "kaggle.com" in str(e.value)
    (tmp_path / "bad").mkdir(); (tmp_path / "bad" / "images").mkdir(); (tmp_path / "bad" / "styles.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\)"): C.FashionProducts(tmp_path / "bad")


def test_kaggle_zero_usable_rows_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "styles.csv").write_text(COLUMNS + "\n1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Blue Tshirt\n"
                                         "2,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Blue, Tshirt\n")
    with pytest.raises(ValueError, match="No usable items") as e: C.FashionProducts(tmp_path)
    assert "missing_image 1" in str(e.value) and "malformed_line 1" in str(e.value)


def test_kaggle_layout_found_nested_under_data_root(tmp_path):
    write_kaggle_fixture(tmp_path / "fashion-product-images-small" / "myntradataset")
    ds, src = C.load_fashion(tmp_path, source="auto", image_size=64, verbose=False)   # 60x80 photos serve 64 px images
    assert src.source == "real" and src.root.endswith("myntradataset") and src.skipped["malformed_line"] == 2


# ---------------------------------------------------------------- synthetic fallbacks
def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


@pytest.mark.parametrize("make, size", [(D.make_synthetic_mnist, 60), (D.make_synthetic_cifar10, 50), (C.make_synthetic_fashion, 24)],
                         ids=["mnist", "cifar10", "fashion"])
def test_synthetic_data_is_deterministic(tmp_path, make, size):
    a, _ = make(tmp_path / "a", size, seed=1)
    b, _ = make(tmp_path / "b", size, seed=1)
    c, _ = make(tmp_path / "c", size, seed=2)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) > 0 and fa == fb
    assert fa.keys() != fc.keys() or any(fa[k] != fc[k] for k in fa)


def test_synthetic_catalogue_drawn_in_parallel_is_the_same(tmp_path):
    one, _ = C.make_synthetic_fashion(tmp_path / "one", 30, seed=4, image_size=64, workers=1)
    two, _ = C.make_synthetic_fashion(tmp_path / "two", 30, seed=4, image_size=64, workers=2)   # forked processes
    assert _files(one) == _files(two) and len(_files(one)) == 31


def test_synthetic_mnist_in_real_format_and_learnable(tmp_path):
    folder, manifest = D.make_synthetic_mnist(tmp_path, 600, seed=0)
    raw = folder / "MNIST" / "raw"
    assert raw.joinpath("train-images-idx3-ubyte").read_bytes()[:16] == bytes([0, 0, 8, 3]) + struct.pack(">III", 600, 28, 28)
    assert (manifest["num_train"], manifest["num_test"], manifest["reused"]) == (600, 100, False)
    ds, _ = D.load_mnist(folder, source="real", verbose=False)     # torchvision reads it as real MNIST
    x, y = D.to_tensors(ds)
    assert x.shape == (600, 1, 28, 28) and x.min() == -1 and x.max() <= 1 and torch.bincount(y).tolist() == [60] * 10
    assert (x[:, :, :2] > -0.5).float().mean() < 0.01                # white digits on a black background
    flat = (x.view(600, -1) + 1) / 2                                  # classes are distinct: nearest centroid works
    centroids = torch.stack([flat[:300][y[:300] == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(flat[300:], centroids).argmin(1) == y[300:]).float().mean()
    assert accuracy > 0.75, f"nearest-centroid accuracy {accuracy:.2f} on generated digits"


def test_synthetic_cifar10_in_real_format(tmp_path):
    folder, _ = D.make_synthetic_cifar10(tmp_path, 100, seed=0)
    with pytest.raises(RuntimeError): CIFAR10(str(folder))             # not the original files...
    ds = D.LocalCIFAR10(folder, verify_md5=False)                     # ...but the original format
    assert len(ds) == 100 and ds.classes == list(D.SCENE_CLASSES) and ds[0][0].shape == (3, 32, 32)
    assert sorted(set(ds.targets)) == list(range(10))
    meta = pickle.loads((folder / "cifar-10-batches-py" / "batches.meta").read_bytes(), encoding="latin1")
    assert meta["label_names"] == list(D.SCENE_CLASSES)


def _mentions(caption: str, article_type: str, colour: str) -> bool:
    nouns = {"Tshirts": r"t-?shirt|tee", "Dresses": r"dress", "Jeans": r"jeans?"}[article_type]
    return colour.lower() in caption.lower() and re.search(nouns, caption, re.I) is not None


def test_synthetic_catalogue_covers_the_seed_prompts(tmp_path):
    folder, _ = C.make_synthetic_fashion(tmp_path, 200, seed=0, image_size=128)
    assert (folder / "styles.csv").read_text().splitlines()[0] == COLUMNS and folder.name == "fashion-seed0-n200-s128"
    ds = C.FashionProducts(folder, image_size=128, verbose=False, verify_images=True)
    assert len(ds) == 200 and sum(ds.skipped.values()) == 0
    with Image.open(ds.records.path[0]) as im: assert (im.format, im.size, im.mode) == ("JPEG", (128, 128), "RGB")
    rec = ds.records
    assert rec.articleType.nunique() >= 8 and rec.baseColour.nunique() >= 10
    for prompt, (kind, colour) in D.SEED_PROMPTS.items():
        hits = rec[(rec.articleType == kind) & (rec.baseColour == colour)]
        assert len(hits) >= 1, prompt
        assert all(_mentions(c, kind, colour) for c in hits.caption), (prompt, hits.caption.tolist())
    assert rec.caption.nunique() > 100                               # varied wording


def test_synthetic_garments_show_their_colour():
    "The baseColour label is faithful: the garment's median colour is nearest to its own palette entry."
    names, palette = list(D.GARMENT_COLOURS), np.array(list(D.GARMENT_COLOURS.values()), float)
    hits = total = 0
    for k, kind in enumerate(D.GARMENT_TYPES):
        for c, colour in enumerate(names):
            a = np.asarray(G.draw_garment(kind, colour, "solid", np.random.default_rng([k, c]), 64), float)
            cloth = a[np.abs(a - 255).max(-1) > 40] if colour != "White" else a[(a.min(-1) > 200) & (a.min(-1) < 253)]
            median = np.median(cloth, 0)
            hits += names[np.abs(palette - median).sum(1).argmin()] == colour; total += 1
    assert hits / total > 0.9


def test_auto_falls_back_to_synthetic_loudly_and_reuses_it(tmp_path, capsys):
    t0 = time.time()
    with pytest.warns(D.SyntheticDataWarning, match="SYNTHETIC"):
        ds, src = C.load_fashion(tmp_path, source="auto", size=30, seed=3, image_size=32)
    assert (src.source, src.seed, src.num_items, src.split) == ("synthetic", 3, 30, "all")
    drawn = C.catalogue_image_size()                                 # drawn at the profile's size, read at 32
    assert Path(src.root) == tmp_path / "synthetic" / f"fashion-seed3-n30-s{drawn}" and "fashion-product-images" in src.note
    assert ds.photo_size == (drawn, drawn) and ds[0][0].shape == (3, 32, 32)
    assert "SYNTHETIC data" in capsys.readouterr().out
    manifest = D.read_manifest(src.root)
    assert (manifest["dataset"], manifest["seed"], manifest["num_items"]) == ("fashion", 3, 30)
    with pytest.warns(D.SyntheticDataWarning, match="re-used"):
        C.load_fashion(tmp_path, size=30, seed=3, verbose=False)
    with pytest.warns(D.SyntheticDataWarning):
        mnist, msrc = D.load_mnist(tmp_path, train=False, size=60, seed=3, verbose=False)
        cifar, csrc = D.load_cifar10(tmp_path, size=50, seed=3, verbose=False)
    assert (msrc.source, len(mnist), mnist[0][0].shape) == ("synthetic", 10, (1, 28, 28))
    assert (csrc.source, len(cifar), cifar[0][0].shape) == ("synthetic", 50, (3, 32, 32))
    assert "unreachable" in msrc.note or "OFFLINE" in msrc.note or "no MNIST files" in msrc.note
    assert time.time() - t0 < 30


def test_real_data_preferred_over_synthetic_and_source_checked(tmp_path):
    write_mnist_fixture(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", D.SyntheticDataWarning)       # real data: no synthetic warning
        ds, src = D.load_mnist(tmp_path, verbose=False)
    assert src.source == "real" and len(ds) == 6
    with pytest.warns(D.SyntheticDataWarning):
        _, src = D.load_mnist(tmp_path, source="synthetic", size=30, verbose=False)
    assert src.source == "synthetic"
    with pytest.raises(ValueError, match="Unknown source"): D.load_mnist(tmp_path, source="download")


def test_network_check_fails_fast(monkeypatch):
    monkeypatch.delenv("LDM_COURSE_OFFLINE")
    D._REACHABILITY.clear()
    t0 = time.time()
    D.network_available("10.255.255.1", 443, timeout=0.5)             # non-routable: never answers
    assert time.time() - t0 < 1.5
    monkeypatch.setenv("LDM_COURSE_OFFLINE", "1")
    assert D.network_available("localhost", 1) is False


def test_image_sizes_and_value_range(tmp_path):
    folder, _ = C.make_synthetic_fashion(tmp_path, 12, seed=0, image_size=128)
    for size in (32, 64, 128):                                        # read at the drawn size or smaller
        x, caption = C.FashionProducts(folder, image_size=size, verbose=False)[0]
        assert x.shape == (3, size, size) and x.min() >= -1 and x.max() <= 1 and isinstance(caption, str)
    with pytest.raises(ValueError, match="image_size"): C.FashionProducts(folder, image_size=4)
    with pytest.raises(ValueError, match="allow_upscale"): C.FashionProducts(folder, image_size=512)   # never upscaled silently
    with pytest.raises(ValueError, match="image_size"): C.make_synthetic_fashion(tmp_path, 12, image_size=8)


# ---------------------------------------------------------------- high resolution: both Kaggle archives, patterns, native drawing
ARCHIVE_NAMES = ["Turtle Check Men Red Shirt", "Peter England Men Red Striped Shirt", "Roadster Men Red Shirt", "Arrow Men Red Solid Shirt"]


def write_archive(root: Path, size: tuple[int, int], names=ARCHIVE_NAMES) -> Path:
    "Kaggle's layout (styles.csv + images/<id>.jpg) with photos of `size`: a red garment on white, 1-px white stripes on the striped one."
    (root / "images").mkdir(parents=True)
    w, h = size
    for i, name in enumerate(names, start=1):
        photo = np.full((h, w, 3), 255, np.uint8)
        photo[h // 8: -h // 8, w // 6: -w // 6] = (200, 30, 40)
        if "Striped" in name: photo[h // 8: -h // 8, w // 6: -w // 6: 4] = 255
        Image.fromarray(photo).save(root / "images" / f"{i}.jpg", quality=95)
    rows = [f"{i},Men,Apparel,Topwear,Shirts,Red,Summer,2012,Casual,{n}" for i, n in enumerate(names, start=1)]
    (root / "styles.csv").write_text("\n".join([COLUMNS] + rows) + "\n", encoding="utf-8")
    return root


def test_catalogue_image_size_comes_from_the_profile(tmp_path):
    assert {p: C.catalogue_image_size(p) for p in ("smoke", "cpu", "gpu")} == {"smoke": 64, "cpu": 256, "gpu": 512}
    with pytest.warns(D.SyntheticDataWarning):
        ds, src = C.load_fashion(tmp_path, source="synthetic", size=20, profile="smoke", verbose=False)
    assert ds[0][0].shape == (3, 64, 64) and ds.photo_size == (64, 64) and src.root.endswith("fashion-seed0-n20-s64")


def test_full_archive_letterboxed_to_the_profile_size(tmp_path):
    write_archive(tmp_path / "fashion-product-images", (180, 240))
    write_archive(tmp_path / "fashion-product-images-small", (60, 80))       # both present: the full-size one is read
    ds, src = C.load_fashion(tmp_path, image_size=120, verbose=False)
    assert (src.source, Path(src.root).name, ds.photo_size, ds.upscaled_from, src.note) == ("real", "fashion-product-images", (180, 240), None, "")
    x, caption = ds[0]
    assert x.shape == (3, 120, 120) and caption == ARCHIVE_NAMES[0]
    torch.testing.assert_close(x[:, :, :14], torch.ones(3, 120, 14), atol=0.03, rtol=0)   # (240 - 180) / 2 = 30 px of white = 15 at 120
    torch.testing.assert_close(x[:, :, -14:], torch.ones(3, 120, 14), atol=0.03, rtol=0)
    garment = (x[0] > 0.3) & (x[1] < -0.5)                            # red pixels: the garment keeps its 2:3 aspect
    rows, cols = garment.any(1).nonzero(), garment.any(0).nonzero()
    assert abs(len(cols) / len(rows) - (180 - 60) / (240 - 60)) < 0.05
    assert "180x240 photos -> 120x120" in ds.summary()


def test_big_photos_decode_at_a_reduced_scale_without_changing_the_image(tmp_path):
    "A 1800x2400 photo is decoded at 1/8 scale (225x300 still covers 256 once squared) and looks like a full decode."
    root = write_archive(tmp_path / "shop", (1800, 2400), names=ARCHIVE_NAMES[2:3])
    assert C._draft_size((1800, 2400), 256) == (192, 256)
    with Image.open(root / "images" / "1.jpg") as im:
        im.draft("RGB", C._draft_size(im.size, 256))
        assert im.size == (225, 300)
    x = C.FashionProducts(root, image_size=256, verbose=False)[0][0]
    with Image.open(root / "images" / "1.jpg") as im: reference = D.pil_to_signed(C.pad_to_square(im.convert("RGB")).resize((256, 256), Image.LANCZOS))
    assert (x - reference).abs().mean() < 0.01


def test_small_archive_refuses_to_upscale_unless_asked_loudly(tmp_path):
    write_archive(tmp_path / "fashion-product-images-small", (60, 80))
    ds, _ = C.load_fashion(tmp_path, image_size=64, verbose=False)                          # 80 px photos: 64 is fine
    assert ds[0][0].shape == (3, 64, 64) and ds.upscaled_from is None
    with pytest.raises(ValueError) as e: C.load_fashion(tmp_path, image_size=256, verbose=False)
    message = str(e.value)
    assert all(w in message for w in ("60x80", "fashion-product-images'", "paramaggarwal", "kaggle.com", "allow_upscale=True", "image_size <= 80"))
    with pytest.raises(ValueError, match="allow_upscale"): C.load_fashion(tmp_path, profile="cpu", verbose=False)  # the cpu default is 256
    with pytest.warns(D.UpscaledImagesWarning, match="UPSCALING 60x80"):
        ds, src = C.load_fashion(tmp_path, image_size=256, allow_upscale=True, verbose=False)
    assert ds[0][0].shape == (3, 256, 256) and ds.upscaled_from == 80
    assert "UPSCALED from 80 px to 256 px" in src.note and "UPSCALED" in src.summary() and "UPSCALED from 80 px" in ds.summary()


@pytest.mark.parametrize("name, pattern", [
    ("Turtle Check Men Navy Blue Shirt", "checked"), ("Peter England Men Navy Blue Striped Shirt", "striped"),
    ("Arrow Men Checked Red Shirt", "checked"), ("Jealous 21 Women Stripes Blue Top", "striped"), ("Wrangler Men Plaid Shirt", "checked"),
    ("Van Heusen Men Pinstripe Trousers", "striped"), ("United Colors of Benetton Men Checks Blue Shirt", "checked"),
    ("Nike Men Solid Black Tshirt", "solid"), ("Roadster Men Blue Tshirt", "solid"), ("Puma Men Strip Sports Shorts", "solid"),
    ("Checkmate Watch", "solid"), (None, "solid")])
def test_pattern_read_from_product_names(name, pattern):
    assert C.pattern_of(name) == pattern


def test_pattern_column_and_labels_from_the_names(tmp_path):
    ds = C.FashionProducts(write_archive(tmp_path / "shop", (60, 80)), image_size=32, verbose=False)
    assert ds.records["pattern"].tolist() == ["checked", "striped", "solid", "solid"]
    codes, classes = ds.labels("pattern")
    assert classes == ["checked", "solid", "striped"] and codes.tolist() == [0, 2, 1, 1]
    assert ds.item_info(1)["pattern"] == "striped" and "patterns: solid 2" in ds.summary()
    fallback = C.FashionProducts(write_kaggle_fixture(tmp_path / "faulty"), verbose=False, image_size=32)
    assert fallback.item_info(fallback.records["id"].tolist().index(8))["pattern"] == "solid"   # no name: nothing says a pattern


def _drawn_patterns(size: int, seed: int = 0) -> list[str]:
    "The pattern drawn for each item of a synthetic catalogue, recomputed as make_synthetic_fashion draws them."
    return [G.product_row(np.random.default_rng([seed, n]), i, k, c)[1] for n, (i, k, c) in enumerate(G.catalogue_plan(size, seed))]


def test_synthetic_catalogue_names_and_labels_its_patterns(tmp_path):
    folder, _ = C.make_synthetic_fashion(tmp_path, 300, seed=0, image_size=64)
    ds = C.FashionProducts(folder, image_size=64, verbose=False)
    assert ds.records["pattern"].tolist() == _drawn_patterns(300)      # the loader's label is the drawn pattern, for every item
    assert set(ds.records["pattern"]) == set(G.PATTERNS)
    words = {"striped": r"\bstripe[sd]?\b", "checked": r"\bchecks?\b|\bchecked\b"}
    for caption, pattern in zip(ds.captions, ds.records["pattern"]):
        if pattern != "solid": assert re.search(words[pattern], caption, re.I), (caption, pattern)   # captions name the pattern
    shirts = ds.records[ds.records.articleType == "Shirts"]
    assert shirts.pattern.nunique() == 3 and (ds.records[ds.records.articleType == "Jeans"].pattern == "solid").all()


def _high_frequency_energy(photo: Image.Image, cutoff: int = 32) -> float:
    "Mean spectral power beyond `cutoff` cycles per image: what a 2·cutoff-pixel image cannot hold."
    a = np.asarray(photo.convert("L"), np.float64) / 255
    power = np.abs(np.fft.fft2(a - a.mean())) ** 2
    f = np.abs(np.fft.fftfreq(a.shape[0]) * a.shape[0])
    return float(power[np.maximum(f[:, None], f[None, :]) > cutoff].mean())


def test_synthetic_garments_are_drawn_natively_not_upsampled():
    for i, (kind, pattern) in enumerate([("Shirts", "striped"), ("Shirts", "checked"), ("Sweaters", "solid"), ("Jackets", "solid")]):
        native, thumb = (G.draw_garment(kind, "Navy Blue", pattern, np.random.default_rng([1, i]), s) for s in (256, 64))
        assert native.size == (256, 256) and thumb.size == (64, 64)
        ratio = _high_frequency_energy(native) / _high_frequency_energy(thumb.resize((256, 256), Image.BICUBIC))
        assert ratio > 5, f"{kind} {pattern}: {ratio:.1f}x the high-frequency energy of a 64 px drawing upsampled"
        reduced = np.asarray(native.resize((64, 64), Image.BOX), float)    # same seed, same garment at every size
        assert np.abs(reduced - np.asarray(thumb, float)).mean() < 12


def test_fine_stripes_survive_the_jpeg(tmp_path):
    folder, _ = C.make_synthetic_fashion(tmp_path, 40, seed=0, image_size=256)
    plan, checked = G.catalogue_plan(40, 0), 0
    for n, (item_id, kind, colour) in enumerate(plan):
        rng = np.random.default_rng([0, n])
        row, pattern = G.product_row(rng, item_id, kind, colour)
        if pattern == "solid": continue
        drawn = G.draw_garment(kind, colour, pattern, rng, 256)
        with Image.open(folder / "images" / f"{item_id}.jpg") as im: saved = im.convert("RGB")
        assert np.abs(np.asarray(saved, float) - np.asarray(drawn, float)).mean() < 1.5, item_id
        assert _high_frequency_energy(saved) > 0.9 * _high_frequency_energy(drawn), item_id
        checked += 1
    assert checked >= 5, "a few patterned garments were compared"
    assert sum(p.stat().st_size for p in (folder / "images").iterdir()) / 40 < 40_000   # about 15 KB a photo at 256


@pytest.mark.parametrize("module", [S, G], ids=["synthetic", "garments"])
def test_drawing_modules_draw_and_never_touch_files(module):
    "Dependencies run data -> synthetic and fashion -> garments: the drawing modules import no loader and do no file I/O."
    source = Path(module.__file__).read_text(encoding="utf-8")
    assert not re.search(r"^\s*(from|import)\s+(\.|ldm_course\.)(data|fashion)\b", source, re.M)
    assert not re.search(r"\bopen\(|\.save\(|write_text|write_bytes|Path\(", source)


def test_the_catalogue_vocabulary_is_re_exported_by_data():
    assert D.GARMENT_COLOURS is G.GARMENT_COLOURS and D.GENERATOR_VERSION == S.GENERATOR_VERSION   # for chapters 07-11


# ---------------------------------------------------------------- damaged files: skipped and counted, or named in the error
def write_catalogue_with_open_quote(root: Path, n: int, bad: int) -> Path:
    "n valid rows (ids 1..n), row `bad` whose productDisplayName opens a quote it never closes; every id has an image."
    (root / "images").mkdir(parents=True)
    lines = [COLUMNS]
    for i in range(1, n + 1):
        name = '"Nike' if i == bad else f"Roadster Men Blue Tshirt {i}"
        lines.append(f"{i},Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,{name}")
    Image.new("RGB", (6, 8), "white").save(root / "images" / "1.jpg")
    data = (root / "images" / "1.jpg").read_bytes()
    for i in range(2, n + 1): (root / "images" / f"{i}.jpg").write_bytes(data)
    (root / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("n", [1_000, 3_000], ids=["under-128KiB", "over-128KiB"])
def test_kaggle_unclosed_quote_loses_one_row_not_the_rest(tmp_path, n):
    root = write_catalogue_with_open_quote(tmp_path / "shop", n, bad=10)
    assert (n > 2_000) == ((root / "styles.csv").stat().st_size > 128 * 1024)   # the csv module's field limit
    ds = C.FashionProducts(root, image_size=8, verbose=False)                    # 6x8 photos: no upscaling
    assert (len(ds), ds.skipped["malformed_line"], sum(ds.skipped.values()), ds.num_rows) == (n - 1, 1, 1, n)
    ids = ds.records["id"].tolist()
    assert ids == [i for i in range(1, n + 1) if i != 10]                      # the rows after the broken one are read
    assert ds.item_info(ids.index(11))["caption"] == "Roadster Men Blue Tshirt 11"
    assert max(map(len, ds.captions)) < 40                                       # no caption swallowed the next lines
    assert ds.malformed_lines == [11]                                            # line 11 of the file (line 1 is the header)


def test_read_styles_keeps_legitimate_quotes_and_names_bad_lines(tmp_path):
    p = tmp_path / "styles.csv"
    rows = ['1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,"Men ""Cool"" Tee"',     # quoted field, escaped quotes
            '2,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Men "Cool Tee',           # stray quote inside a field
            '3,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,"Nike Tshirt, Pack of 2"',  # quoted comma
            '4,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,"Nike',                     # quote never closed
            '5,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Roadster, Blue, Tshirt',    # unquoted commas
            '6,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,' + "x" * 200_000,          # beyond csv's field limit
            '7,Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Last Tee']
    p.write_text(COLUMNS + "\r\n" + "\r\n".join(rows) + "\r\n", encoding="utf-8")      # Windows line ends
    table, malformed = C.read_styles(p)
    assert table["id"].tolist() == ["1", "2", "3", "7"] and malformed == [5, 6, 7]
    assert table["productDisplayName"].tolist() == ['Men "Cool" Tee', 'Men "Cool Tee', "Nike Tshirt, Pack of 2", "Last Tee"]


def test_read_styles_header_error_is_a_data_format_error(tmp_path):
    (tmp_path / "styles.csv").write_text("a,b\n1,2\n")
    with pytest.raises(D.DataFormatError, match=r"styles.csv lacks column\(s\)"): C.read_styles(tmp_path / "styles.csv")
    assert issubclass(D.DataFormatError, ValueError)


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[:-100], r"train-images-idx3-ubyte.*expected 4,720 bytes.*found 4,620"),              # truncated download
    (lambda b: bytes([0, 0, 8, 1]) + b[4:], r"train-images-idx3-ubyte.*magic 0x00000801.*expected 0x00000803"),  # labels' magic
    (lambda b: b"<html>not found</html>", r"train-images-idx3-ubyte.*magic"),                           # an error page saved as the file
    (lambda b: b[:10], r"train-images-idx3-ubyte.*header"),                                           # shorter than its header
], ids=["truncated", "wrong-magic", "html", "short-header"])
def test_mnist_damaged_idx_names_file_and_expectation(tmp_path, damage, expected):
    write_mnist_fixture(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    for source in ("real", "auto"):                                              # never a silent fallback to synthetic digits
        with pytest.raises(D.DataFormatError, match=expected) as e: D.load_mnist(tmp_path, source=source, verbose=False)
        assert str(path) in str(e.value)


def test_mnist_labels_must_match_images(tmp_path):
    write_mnist_fixture(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([2, 6], np.uint8)))                    # 3 test images, 2 labels
    with pytest.raises(D.DataFormatError, match=r"t10k-labels-idx1-ubyte.*2 labels.*3 images"): D.load_mnist(tmp_path, train=False, source="real", verbose=False)
    labels.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    with pytest.raises(D.DataFormatError, match=r"t10k-labels-idx1-ubyte.*0x00000801"): D.load_mnist(tmp_path, train=False, source="real", verbose=False)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:20] + bytes(64) + b[84:], lambda b: b"not gzip at all"],
                         ids=["truncated", "corrupt", "not-gzip"])
def test_mnist_corrupt_gz_names_file_and_leaves_nothing_half_written(tmp_path, damage):
    write_mnist_fixture(tmp_path, compress=True)
    raw = tmp_path / "MNIST" / "raw"
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(damage(gz.read_bytes()))
    with pytest.raises(D.DataFormatError, match="gzip") as e: D.load_mnist(tmp_path, source="real", verbose=False)
    assert str(gz) in str(e.value)
    assert not (raw / "train-images-idx3-ubyte").exists() and not list(raw.glob(".*"))   # no half-written file, no temp file


def test_read_idx_checks_the_size_against_the_header(tmp_path):
    p = D.write_idx(tmp_path / "x", np.zeros((4, 5), np.uint8))
    assert D.read_idx(p, ndim=2).shape == (4, 5)
    with pytest.raises(D.DataFormatError, match="expected 0x00000803"): D.read_idx(p, ndim=3)
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(D.DataFormatError, match=r"expected 32 bytes.*found 33"): D.read_idx(p)


@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: pickle.dumps({"labels": [1, 2]}, protocol=2), "'data'"),
    (lambda b: pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, protocol=2), "3072"),
], ids=["truncated", "no-data-key", "wrong-row-size"])
def test_cifar10_damaged_batch_is_named(tmp_path, damage, expected):
    write_cifar_fixture(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(D.DataFormatError, match=expected) as e: D.LocalCIFAR10(tmp_path, verify_md5=False)
    assert str(bad) in str(e.value)
    with pytest.raises(D.DataFormatError, match="data_batch_2"): D.load_cifar10(tmp_path, source="real", verify_md5=False, verbose=False)
    assert len(D.LocalCIFAR10(tmp_path, train=False, verify_md5=False)) == 4   # the test split does not read data_batch_2
