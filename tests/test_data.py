"""Tests of the data half of common.py: synthetic benchmarks, official layouts, batches, augmentation.

Official layouts are built as small trees in a temporary folder, with the pitfalls users meet
(doubled top folder, __MACOSX debris, upper-case names, superpixel files, CR-only line ends,
spaces in CSV cells); every assertion is on what `load_dataset` returns.
"""

import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

SYNTHETIC = ["synthetic-fundus", "synthetic-breast", "synthetic-lesions", "synthetic-glands"]


# ---------------------------------------------------------------------------------------------
# Synthetic benchmarks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_split_format_and_determinism(name):
    a = common.load_dataset(name, size=40, seed=3, n_train=5, n_val=3, n_test=4)
    b = common.load_dataset(name, size=40, seed=3, n_train=5, n_val=3, n_test=4)
    c = common.load_dataset(name, size=40, seed=4, n_train=5, n_val=3, n_test=4)
    assert list(a) == ["train", "val", "test"]
    for split, n in (("train", 5), ("val", 3), ("test", 4)):
        s = a[split]
        assert s["images"].shape == (n, 3, 40, 40) and s["images"].dtype == torch.uint8
        assert s["masks"].shape == (n, 40, 40) and s["masks"].dtype == torch.uint8
        assert s["labels"].shape == (n,) and s["labels"].dtype == torch.int64
        assert len(s["names"]) == n and int(s["masks"].max()) < len(s["mask_names"])
        assert int(s["labels"].max()) < len(s["class_names"])
        for key in ("images", "masks", "labels"):
            assert torch.equal(s[key], b[split][key])
    assert not torch.equal(a["train"]["images"], c["train"]["images"])
    # a split does not depend on the size of another split
    d = common.load_dataset(name, size=40, seed=3, n_train=2, n_val=3, n_test=4)
    assert torch.equal(d["test"]["images"], a["test"]["images"])


@pytest.mark.parametrize("name, option, share, expected", [
    ("synthetic-fundus", "glaucoma_share", 0.35, [130, 70]),
    ("synthetic-breast", "pcr_share", 0.27, [146, 54]),
    ("synthetic-glands", "malignant_share", 0.55, [90, 110]),
])
def test_synthetic_binary_class_shares(name, option, share, expected):
    labels = common.load_dataset(name, size=16, n_train=200, n_val=1, n_test=1, **{option: share})["train"]["labels"]
    assert labels.bincount().tolist() == expected


def test_lesion_class_shares_follow_isic_2017():
    # 68.6 / 18.7 / 12.7 % of 400 = 274.4 / 74.8 / 50.8 -> largest remainders 274 / 75 / 51
    labels = common.load_dataset("synthetic-lesions", size=16, n_train=400, n_val=1, n_test=1)["train"]["labels"]
    assert labels.bincount().tolist() == [274, 75, 51]


def _vertical_extent(mask):
    return mask.any(2).sum(1).float()


def test_fundus_label_follows_cup_to_disc_ratio_but_overlaps():
    s = common.load_dataset("synthetic-fundus", size=96, n_train=300, n_val=1, n_test=1)["train"]
    vcdr = _vertical_extent(s["masks"] == 2) / _vertical_extent(s["masks"] >= 1)
    normal, glaucoma = vcdr[s["labels"] == 0].mean(), vcdr[s["labels"] == 1].mean()
    assert 0.36 < normal < 0.48 and 0.56 < glaucoma < 0.68  # drawn around 0.42 and 0.62
    best = max(((vcdr > t).long() == s["labels"]).float().mean() for t in torch.linspace(0.3, 0.8, 101))
    assert 0.75 < best < 0.97  # informative, not separable


def _irregularity(mask):
    """perimeter^2 / (4 pi area): 1 for a disc, larger for ragged outlines."""
    m = mask.float()[:, None]
    edge = m + F.max_pool2d(-m, 3, 1, 1)  # mask minus its erosion
    return edge.sum((1, 2, 3)) ** 2 / (4 * torch.pi * m.sum((1, 2, 3)))


def test_lesion_melanoma_borders_are_more_irregular():
    s = common.load_dataset("synthetic-lesions", size=96, n_train=300, n_val=1, n_test=1)["train"]
    irregular = _irregularity(s["masks"])
    assert irregular[s["labels"] == 1].mean() > irregular[s["labels"] == 0].mean() + 0.08


def test_breast_pcr_tumours_are_smaller():
    s = common.load_dataset("synthetic-breast", size=64, n_train=300, n_val=1, n_test=1)["train"]
    area = s["masks"].flatten(1).sum(1).float()
    assert area[s["labels"] == 1].mean() < 0.7 * area[s["labels"] == 0].mean()


def test_glands_instances_regions_and_grade():
    s = common.load_dataset("synthetic-glands", size=96, n_train=120, n_val=1, n_test=1)["train"]
    inst, masks, labels = s["instances"], s["masks"], s["labels"]
    assert inst.dtype == torch.int32 and torch.equal(inst > 0, masks > 0)
    for i in range(0, 120, 17):  # objects are numbered 1..k without gaps
        ids = inst[i].unique()
        assert ids.tolist() == list(range(int(ids.max()) + 1))
    lumen_share = (masks == 2).flatten(1).sum(1) / (masks > 0).flatten(1).sum(1)
    assert lumen_share[labels == 0].mean() > lumen_share[labels == 1].mean() + 0.1  # thick borders
    ragged = torch.stack([_irregularity(inst[i:i + 1] == inst[i].max()).squeeze() for i in range(120)])
    assert ragged[labels == 1].mean() > ragged[labels == 0].mean()


def test_lesion_annotators_disagree_by_the_documented_amount():
    d = common.load_dataset("synthetic-lesions", size=64, annotators=True, n_train=200, n_val=2, n_test=2)
    plain = common.load_dataset("synthetic-lesions", size=64, n_train=200, n_val=2, n_test=2)
    s = d["train"]
    masks, n, truth = s["masks"].bool(), s["n_annotations"], s["truth"]
    assert masks.shape == (200, 5, 64, 64) and n.dtype == torch.int64
    assert torch.equal(s["images"], plain["train"]["images"]) and torch.equal(truth, plain["train"]["masks"])
    assert n.min() >= 2 and n.max() <= 5 and (n == 2).float().mean() > 0.8
    slot = torch.arange(5)[None]
    assert not masks[slot.expand(200, 5) >= n[:, None]].any()  # unused slots are empty
    assert masks.flatten(2).any(2)[slot.expand(200, 5) < n[:, None]].all()
    pairwise = []
    for i in range(200):
        m = masks[i, : n[i]].flatten(1).float()
        inter, union = m @ m.T, m.sum(1)[:, None] + m.sum(1)[None] - m @ m.T
        iu = torch.triu_indices(len(m), len(m), 1)
        pairwise.append((inter / union)[iu[0], iu[1]].mean())
    mean_jaccard = torch.stack(pairwise).mean()
    assert 0.74 < mean_jaccard < 0.88  # documented: 0.81
    shifted = common.load_dataset("synthetic-lesions", size=64, domain_shift=True, n_train=2, n_val=2, n_test=40)
    assert set(shifted) == {"train", "val", "test", "test_shift"}
    blue = lambda s: s["images"][:, 2].float().mean() / s["images"][:, 0].float().mean()  # noqa: E731
    assert blue(shifted["test_shift"]) > blue(shifted["test"]) + 0.03


# ---------------------------------------------------------------------------------------------
# Batches and augmentation
# ---------------------------------------------------------------------------------------------


def _tiny_split():
    return common.load_dataset("synthetic-glands", size=48, n_train=10, n_val=1, n_test=1)["train"]


def test_iterate_batches_covers_each_sample_once_and_repeats():
    s = common.to_device(_tiny_split(), "cpu")
    seen = [b["index"] for b in common.iterate_batches(s, 4, generator=torch.Generator().manual_seed(0))]
    assert [len(i) for i in seen] == [4, 4, 2] and sorted(torch.cat(seen).tolist()) == list(range(10))
    again = [b["index"] for b in common.iterate_batches(s, 4, generator=torch.Generator().manual_seed(0))]
    assert all(torch.equal(x, y) for x, y in zip(seen, again))
    first = next(common.iterate_batches(s, 4, shuffle=False))
    assert torch.equal(first["images"], s["images"][:4]) and torch.equal(first["instances"], s["instances"][:4])
    assert "names" not in first and [len(b["index"]) for b in common.iterate_batches(s, 4, drop_last=True)] == [4, 4]


def test_augment_moves_image_and_every_label_map_together():
    s = _tiny_split()
    masks = (s["masks"] > 0).to(torch.uint8)
    images = torch.zeros_like(s["images"])
    images[:, 0] = masks * 255  # the image shows its own mask
    images[:, 1] = (s["instances"] * 20).clamp(max=255).to(torch.uint8)
    two = torch.stack([masks, 1 - masks], 1)  # two annotators: the mask and its complement
    batch = {"images": images, "masks": two, "instances": s["instances"], "truth": masks}
    out = common.augment(batch, torch.Generator().manual_seed(5), rotate=30, scale=0.2, elastic=3.0, color=0.0)
    assert out["images"].dtype == torch.uint8 and out["masks"].shape == (10, 2, 48, 48)
    warped = out["truth"].float()
    inner = F.avg_pool2d(warped[:, None], 3, 1, 1)[:, 0]
    away = (inner == 0) | (inner == 1)  # pixels away from the warped mask's edges
    agree = ((out["images"][:, 0] > 127).float() == warped)[away].float().mean()
    assert agree > 0.995
    assert torch.equal(out["masks"][:, 0], out["truth"]) and torch.equal(out["masks"][:, 1], 1 - out["truth"])
    assert torch.equal(out["instances"] > 0, out["truth"] > 0)
    assert not torch.equal(out["truth"], masks)  # something moved


def test_augment_identity_flips_and_colour():
    s = _tiny_split()
    batch = {"images": s["images"], "masks": s["masks"]}
    same = common.augment(batch, torch.Generator().manual_seed(0), flip=False, rotate=0, scale=0, color=0)
    assert torch.equal(same["images"], s["images"]) and torch.equal(same["masks"], s["masks"])
    flipped = common.augment(batch, torch.Generator().manual_seed(1), rotate=0, scale=0, color=0)
    for i in range(10):  # each sample is one of the four flips, image and mask the same one
        options = [(s["images"][i].flip(d), s["masks"][i].flip([x - 1 for x in d])) for d in ([1], [2], [1, 2])]
        options.append((s["images"][i], s["masks"][i]))
        assert any(torch.equal(flipped["images"][i], a) and torch.equal(flipped["masks"][i], b) for a, b in options)
    jitter = common.augment(batch, torch.Generator().manual_seed(2), flip=False, rotate=0, scale=0, color=0.3)
    assert torch.equal(jitter["masks"], s["masks"]) and not torch.equal(jitter["images"], s["images"])


def test_channel_stats_normalize_to_float():
    images = torch.randint(0, 256, (7, 3, 9, 11), dtype=torch.uint8)
    mean, std = common.channel_stats(images)
    x = images.double().permute(1, 0, 2, 3).reshape(3, -1) / 255
    assert torch.allclose(mean.double(), x.mean(1), atol=1e-6)
    assert torch.allclose(std.double(), x.std(1, unbiased=False), atol=1e-5)
    z = common.normalize(images, mean, std)
    assert z.dtype == torch.float32 and torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(common.to_float(images), images.float() / 255)


# ---------------------------------------------------------------------------------------------
# Official layouts: small trees in a temporary folder
# ---------------------------------------------------------------------------------------------


def _rgb(path, size=(20, 16), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _grey(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _disc_mask(w=20, h=16, cup=3, rim=125):
    """REFUGE style: 255 background, ~128 rim, ~0 cup (off-values test the thresholds)."""
    m = np.full((h, w), 255, np.uint8)
    m[4:12, 6:14] = rim
    m[6:10, 8:12] = cup
    return m


def _xlsx(path, rows):
    """A minimal .xlsx: strings in sharedStrings.xml, numbers inline, as Excel writes them."""
    strings = sorted({c for r in rows for c in r if isinstance(c, str)})
    cells = []
    for i, row in enumerate(rows, 1):
        xml = []
        for j, value in enumerate(row):
            ref = f"{chr(65 + j)}{i}"
            xml.append(f'<c r="{ref}" t="s"><v>{strings.index(value)}</v></c>' if isinstance(value, str)
                       else f'<c r="{ref}"><v>{value}</v></c>')
        cells.append(f'<row r="{i}">{"".join(xml)}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", f"<workbook {ns}><sheets><sheet name='S' sheetId='1'/></sheets></workbook>")
        shared = "".join(f"<si><t>{s}</t></si>" for s in strings)
        z.writestr("xl/sharedStrings.xml", f"<sst {ns}>{shared}</sst>")
        z.writestr("xl/worksheets/sheet1.xml", f"<worksheet {ns}><sheetData>{''.join(cells)}</sheetData></worksheet>")


def _refuge(tmp_path, test_by_folder=True):
    root = tmp_path / "REFUGE" / "REFUGE"  # doubled top folder
    for cls, ids in (("Glaucoma", ["g0001"]), ("Non-Glaucoma", ["n0001", "n0002"])):
        for i in ids:
            _rgb(root / "Training400" / cls / f"{i}.jpg")
            _grey(root / "Annotation-Training400" / "Disc_Cup_Masks" / cls / f"{i}.bmp", _disc_mask())
    (root / "__MACOSX" / "Training400").mkdir(parents=True)
    (root / "__MACOSX" / "Training400" / "._g0001.jpg").write_bytes(b"junk")
    for i in ("V0001", "V0002"):
        _rgb(root / "REFUGE-Validation400" / f"{i}.jpg")
        _grey(root / "REFUGE-Validation400-GT" / "Disc_Cup_Masks" / f"{i}.bmp", _disc_mask())
    _xlsx(root / "REFUGE-Validation400-GT" / "Fovea_locations.xlsx",
          [["ID", "ImgName", "Fovea_X", "Fovea_Y", "Glaucoma Label"],
           [1, "V0001.jpg", 10.5, 8.0, 1], [2, "V0002.jpg", 9.0, 7.5, 0]])
    for i, g in (("T0001", "G"), ("T0002", "N"), ("T0003", "N")):
        _rgb(root / "Test400" / f"{i}.jpg")
        folder = root / "REFUGE-Test-GT" / "Disc_Cup_Masks" / (g if test_by_folder else "")
        _grey(folder / f"{i}.bmp", _disc_mask())
    if not test_by_folder:
        _xlsx(root / "REFUGE-Test-GT" / "Glaucoma_label_and_Fovea_location.xlsx",
              [["ImgName", "Fovea_X", "Fovea_Y", "Label(Glaucoma=1)"],
               ["T0001.jpg", 1, 1, 0], ["T0002.jpg", 1, 1, 1], ["T0003.jpg", 1, 1, 0]])
    return tmp_path / "REFUGE"


@pytest.mark.parametrize("test_by_folder", [True, False])
def test_refuge_layout(tmp_path, test_by_folder):
    d = common.load_dataset("refuge", root=_refuge(tmp_path, test_by_folder), size=20, cache=tmp_path / "cache")
    assert {k: len(v["names"]) for k, v in d.items()} == {"train": 3, "val": 2, "test": 3}
    assert d["train"]["names"] == ["g0001", "n0001", "n0002"] and d["train"]["labels"].tolist() == [1, 0, 0]
    assert d["val"]["labels"].tolist() == [1, 0]
    assert d["test"]["labels"].tolist() == ([1, 0, 0] if test_by_folder else [0, 1, 0])
    classes = np.where(_disc_mask() < 64, 2, np.where(_disc_mask() < 192, 1, 0)).astype(np.uint8)  # 0 cup, 128 rim
    expected = torch.from_numpy(np.array(Image.fromarray(classes).resize((20, 20), Image.NEAREST)))
    assert torch.equal(d["val"]["masks"][0], expected) and set(d["test"]["masks"].unique().tolist()) == {0, 1, 2}
    assert d["train"]["images"].shape == (3, 3, 20, 20) and d["train"]["mask_names"] == ["background", "rim", "cup"]


def _isic2017(tmp_path):
    root = tmp_path / "isic"
    labels = {"Training": [("ISIC_0000001", "0.0", "0.0"), ("ISIC_0000002", "1.0", "0.0"),
                           ("ISIC_0000003", "0.0", "1.0")],
              "Validation": [("ISIC_0000010", "0.0", "0.0")], "Test_v2": [("ISIC_0000020", "1.0", "0.0")]}
    for tag, rows in labels.items():
        for image_id, _, _ in rows:
            _rgb(root / f"ISIC-2017_{tag}_Data" / f"{image_id}.jpg")
            _rgb(root / f"ISIC-2017_{tag}_Data" / f"{image_id}_superpixels.png")
            mask = np.zeros((16, 20), np.uint8)
            mask[4:12, 5:15] = 255
            _grey(root / f"ISIC-2017_{tag}_Part1_GroundTruth" / f"{image_id}_Segmentation.PNG", mask)
        (root / f"ISIC-2017_{tag}_Data" / f"ISIC-2017_{tag}_Data_metadata.csv").write_text("image_id,age\n")
        (root / f"ISIC-2017_{tag}_Part3_GroundTruth.csv").write_text(
            "image_id,melanoma,seborrheic_keratosis\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return root


def test_isic2017_layout(tmp_path):
    d = common.load_dataset("isic2017", root=_isic2017(tmp_path), size=20, cache=tmp_path / "cache")
    assert d["train"]["labels"].tolist() == [0, 1, 2] and d["val"]["labels"].tolist() == [0]
    assert d["test"]["labels"].tolist() == [1] and d["train"]["names"][0] == "ISIC_0000001"
    assert d["train"]["masks"].shape == (3, 20, 20) and set(d["train"]["masks"].unique().tolist()) == {0, 1}
    assert d["train"]["class_names"] == ["nevus", "melanoma", "seborrheic_keratosis"]


def test_isic_multi_both_layouts(tmp_path):
    a = tmp_path / "a"
    for i, k in enumerate([2, 3, 2, 2, 2]):
        _rgb(a / "inputs" / f"ISIC_000000{i}.jpg")
        for j in range(1, k + 1):
            mask = np.zeros((16, 20), np.uint8)
            mask[2:10 + j, 3:12] = 255
            _grey(a / "targets" / f"ISIC_000000{i}_segmentation_{j}.png", mask)
    d = common.load_dataset("isic-multi", root=a, size=16, cache=tmp_path / "cache")
    assert list(d) == ["train", "val"] and [len(d[s]["names"]) for s in d] == [4, 1]  # 80 / 20
    counts = torch.cat([d["train"]["n_annotations"], d["val"]["n_annotations"]]).tolist()
    merged = sorted(zip(d["train"]["names"] + d["val"]["names"], counts))
    assert [n for _, n in merged] == [2, 3, 2, 2, 2] and d["train"]["masks"].shape[1:] == (3, 16, 16)
    two = d["train"]["n_annotations"] == 2
    assert not d["train"]["masks"][two, 2].any() and d["train"]["masks"][:, :2].flatten(2).any(2).all()
    b = tmp_path / "b" / "ISIC_MultiAnnot"
    for i in range(3):
        _rgb(b / f"ISIC_000010{i}.JPG")
        for suffix in ("A1_T1_S1_0", "A2_T3_S2_0", "ST_T1_S1_0", "MV_T1_S1_0"):
            _grey(b / f"ISIC_000010{i}_{suffix}.png", np.full((16, 20), 255, np.uint8))
    e = common.load_dataset("isic-multi", root=tmp_path / "b", size=16, cache=tmp_path / "cache")
    assert torch.cat([e["train"]["n_annotations"], e["val"]["n_annotations"]]).tolist() == [2, 2, 2]


def test_ph2_layout(tmp_path):
    base = tmp_path / "data" / "PH2Dataset" / "PH2 Dataset images"
    for case in ("IMD002", "IMD010", "IMD003"):
        _rgb(base / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp")
        mask = np.zeros((16, 20), np.uint8)
        mask[5:10, 5:10] = 255
        _grey(base / case / f"{case}_lesion" / f"{case}_lesion.bmp", mask)
        _grey(base / case / f"{case}_roi" / f"{case}_R1_Label4.bmp", mask)
    (tmp_path / "data" / "PH2Dataset" / "PH2_dataset.txt").write_text(
        "|| Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry ||\n"
        "|| IMD002 ||   || 0 || 0 ||\n|| IMD003 || Melanoma || 2 || 2 ||\n|| IMD010 ||  || 1 || 0 ||\n"
        "\nLegend: 0 - Common Nevus\n")
    d = common.load_dataset("ph2", root=tmp_path / "data", size=16, cache=tmp_path / "cache")
    assert list(d) == ["test"] and d["test"]["names"] == ["IMD002", "IMD003", "IMD010"]
    assert d["test"]["labels"].tolist() == [0, 2, 1]
    resized = np.array(Image.fromarray(mask).resize((16, 16), Image.NEAREST)) > 0
    assert torch.equal(d["test"]["masks"], torch.from_numpy(resized).to(torch.uint8).expand(3, 16, 16))


def test_dermofit_layout(tmp_path):
    root = tmp_path / "data"
    for cls, ids in (("AK", ["a1", "A2"]), ("MEL", ["m5"])):
        for i in ids:
            _rgb(root / "originalImages" / cls / i / f"{i}.png")
            _grey(root / "originalMasks" / cls / i.upper() / f"{i.upper()}mask.png", np.full((16, 20), 255, np.uint8))
    d = common.load_dataset("dermofit", root=root, size=16, cache=tmp_path / "cache")
    assert d["test"]["class_names"] == ["AK", "MEL"] and d["test"]["labels"].tolist() == [0, 0, 1]
    assert d["test"]["masks"].min() == 1


def _glas(root, n_train=12):
    instance = np.zeros((32, 32), np.uint8)
    instance[2:12, 2:12] = 1  # a 10x10 gland
    instance[15:30, 15:25] = 2
    rows = ["name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for prefix, n in (("train", n_train), ("testA", 2), ("testB", 1)):
        for i in range(1, n + 1):
            _rgb(root / f"{prefix}_{i}.bmp", (32, 32))
            _grey(root / f"{prefix}_{i}_anno.bmp", instance)
            rows.append(f"{prefix}_{i}, {i}, {' malignant' if i % 2 else ' benign'}, adenomatous")
    (root / "Grade.csv").write_bytes(("\r".join(rows) + "\r").encode())  # CR-only line ends


def test_glas_layout_regions_from_instances(tmp_path):
    root = tmp_path / "data" / "Warwick QU Dataset (Released 2016_07_08)"
    _glas(root)
    d = common.load_dataset("glas", root=tmp_path / "data", size=32, cache=tmp_path / "cache", border_width=1)
    assert [len(d[s]["names"]) for s in ("train", "val", "test")] == [10, 2, 3]  # 15/85 of 12 = 2
    assert d["test"]["names"] == ["testA_1", "testA_2", "testB_1"]
    names = d["train"]["names"]
    assert sorted(names, key=lambda n: int(n.split("_")[1])) == names  # numeric order: train_2 before train_10
    labels = {n: int(l) for s in d.values() for n, l in zip(s["names"], s["labels"])}
    assert labels["train_1"] == 1 and labels["train_2"] == 0 and labels["testB_1"] == 1
    m, inst = d["test"]["masks"][0], d["test"]["instances"][0]
    assert inst.dtype == torch.int32 and inst.unique().tolist() == [0, 1, 2]
    assert int((m[2:12, 2:12] == 2).sum()) == 64 and int((m[2:12, 2:12] == 1).sum()) == 36  # 1 px ring
    assert int((m == 0).sum()) == 32 * 32 - 100 - 150


def test_folder_and_ispy1_layouts(tmp_path):
    root = tmp_path / "data"
    for split, names in (("train", ["a", "b", "c"]), ("val", ["d"]), ("test", ["e"])):
        for n in names:
            _rgb(root / split / "images" / f"{n}.png")
            mask = np.zeros((16, 20), np.uint8)
            mask[3:8, 3:8] = 255
            if n == "b":  # two annotators
                _grey(root / split / "masks" / f"{n}_1.png", mask)
                _grey(root / split / "masks" / f"{n}_2.png", mask // 255)
            else:
                _grey(root / split / "masks" / f"{n}.png", mask)
    (root / "labels.csv").write_text("name,label\na,pcr\nb,non_pcr\nc,pcr\nd,pcr\ne,non_pcr\n")
    d = common.load_dataset("folder", root=root, size=16, cache=tmp_path / "cache")
    assert d["train"]["class_names"] == ["non_pcr", "pcr"] and d["train"]["labels"].tolist() == [1, 0, 1]
    assert d["train"]["masks"].shape == (3, 2, 16, 16) and d["train"]["n_annotations"].tolist() == [1, 2, 1]
    assert d["train"]["masks"].max() == 1 and not d["train"]["masks"][0, 1].any()
    assert d["test"]["masks"].shape == (1, 16, 16) and d["test"]["n_annotations"] is None
    (root / "labels.csv").write_text("name,label\na,1\nb,0\nc,1\nd,1\ne,0\n")
    i = common.load_dataset("ispy1", root=root, size=16, cache=tmp_path / "cache")
    assert i["val"]["labels"].tolist() == [1] and i["val"]["class_names"] == ["non_pcr", "pcr"]


def test_cache_is_reused_and_never_inside_the_dataset(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _rgb(root / "test" / "images" / "x.bmp", value=10)
    _grey(root / "test" / "masks" / "x.png", np.ones((16, 20), np.uint8))
    before = sorted(p for p in root.rglob("*"))
    first = common.load_dataset("folder", root=root, size=8, cache=cache)
    assert sorted(p for p in root.rglob("*")) == before and len(list(cache.glob("*.pt"))) == 1
    # same size and mtime, other pixels: the cache (keyed by mtime) answers, not the file
    stat = (root / "test" / "images" / "x.bmp").stat()
    _rgb(root / "test" / "images" / "x.bmp", value=200)
    os.utime(root / "test" / "images" / "x.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = common.load_dataset("folder", root=root, size=8, cache=cache)
    assert torch.equal(second["test"]["images"], first["test"]["images"])
    os.utime(root / "test" / "images" / "x.bmp", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert int(common.load_dataset("folder", root=root, size=8, cache=cache)["test"]["images"].min()) == 200
    with pytest.raises(common.DatasetError, match="inside the dataset"):
        common.load_dataset("folder", root=root, size=8, cache=root / ".cache")


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ---------------------------------------------------------------------------------------------


def _folder(root, mask_size=(20, 16)):
    _rgb(root / "train" / "images" / "a.png")
    _grey(root / "train" / "masks" / "a.png", np.zeros(mask_size[::-1], np.uint8))
    return root


def test_errors_name_the_problem(tmp_path):
    def load(name, root):
        return common.load_dataset(name, root=root, size=8, cache=tmp_path / "cache")

    with pytest.raises(common.DatasetError, match=r"refuge: dataset folder .* does not exist"
                                                  r"(.|\n)*Training400(.|\n)*grand-challenge"):
        load("refuge", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.DatasetError, match=r"isic2017: .* is not in the isic2017 layout"
                                                  r"(.|\n)*challenge.isic-archive.com"):
        load("isic2017", tmp_path / "empty")
    with pytest.raises(common.DatasetError, match="unknown dataset 'mnist'"):
        common.load_dataset("mnist")
    with pytest.raises(common.DatasetError, match="unknown option"):
        common.load_dataset("synthetic-fundus", colour="red")
    bad = _folder(tmp_path / "bad")
    (bad / "train" / "images" / "b.jpg").write_bytes(b"not a jpeg")
    _grey(bad / "train" / "masks" / "b.png", np.zeros((16, 20), np.uint8))
    with pytest.raises(common.DatasetError, match=r"cannot read image .*b\.jpg"):
        load("folder", bad)
    with pytest.raises(common.DatasetError, match=r"mask .*a\.png' is 10x10 but its image .* is 20x16"):
        load("folder", _folder(tmp_path / "size", mask_size=(10, 10)))
    lonely = _folder(tmp_path / "lonely")
    _rgb(lonely / "train" / "images" / "c.png")
    with pytest.raises(common.DatasetError, match=r"image .*c\.png' has no mask"):
        load("folder", lonely)
    labelled = _folder(tmp_path / "labelled")
    (labelled / "labels.csv").write_text("name,label\na,0\nghost,1\n")
    with pytest.raises(common.DatasetError, match=r"names images that are not in the dataset: \['ghost'\]"):
        load("folder", labelled)
    empty = _folder(tmp_path / "emptysplit")
    (empty / "val" / "images").mkdir(parents=True)
    (empty / "val" / "masks").mkdir()
    with pytest.raises(common.DatasetError, match="split 'val' is empty"):
        load("folder", empty)
    glas = tmp_path / "glas"
    _glas(glas, n_train=2)
    (glas / "train_2_anno.bmp").unlink()
    with pytest.raises(common.DatasetError, match=r"train_2\.bmp' has no mask"):
        load("glas", glas)
