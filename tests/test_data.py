"""Tests of the data half of common.py: synthetic benchmarks, official layouts, batches, augmentation.

Official layouts are built as small trees in a temporary folder, with the pitfalls users meet
(doubled top folder, __MACOSX debris, upper-case names, superpixel files, CR-only line ends,
spaces in CSV cells); every assertion is on what `load_dataset` returns.
"""

import gzip
import os
import struct
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
    # glands that touch or overlap stay separate instances (as GlaS annotates them), each ringed by
    # its own border: 4-neighbour pairs of two different glands are common, and never touch a lumen
    pairs = [(inst[:, :, 1:], inst[:, :, :-1], masks[:, :, 1:], masks[:, :, :-1]),
             (inst[:, 1:], inst[:, :-1], masks[:, 1:], masks[:, :-1])]
    meet = torch.zeros(120, dtype=torch.bool)
    for a, b, mask_a, mask_b in pairs:
        between = (a > 0) & (b > 0) & (a != b)
        meet |= between.flatten(1).any(1)
        assert not (between & ((mask_a == 2) | (mask_b == 2))).any()
    assert meet[labels == 1].float().mean() > 0.5 and meet.float().mean() > 0.33  # malignant glands crowd
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
    assert 0.53 < mean_jaccard < 0.67  # documented: 0.60 (400 images)
    # Cohen's kappa per annotation pair (Ribeiro et al.: 0.67 on the ISIC Archive)
    kappas = []
    for i in range(200):
        m = masks[i, : n[i]].flatten(1).float()
        for a in range(len(m)):
            for b in range(a + 1, len(m)):
                agree = (m[a] == m[b]).float().mean()
                chance = m[a].mean() * m[b].mean() + (1 - m[a].mean()) * (1 - m[b].mean())
                kappas.append((agree - chance) / (1 - chance))
    assert 0.60 < torch.stack(kappas).mean() < 0.74  # documented: 0.67
    edge = truth.bool()
    touches = edge[:, 0].any(1) | edge[:, -1].any(1) | edge[:, :, 0].any(1) | edge[:, :, -1].any(1)
    assert 0.22 < touches.float().mean() < 0.40  # 30 % pushed over the frame
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


def test_channel_stats_and_normalize():
    images = torch.randint(0, 256, (7, 3, 9, 11), dtype=torch.uint8)
    mean, std = common.channel_stats(images)
    x = images.double().permute(1, 0, 2, 3).reshape(3, -1) / 255
    assert torch.allclose(mean.double(), x.mean(1), atol=1e-6)
    assert torch.allclose(std.double(), x.std(1, unbiased=False), atol=1e-5)
    z = common.normalize(images, mean, std)
    assert z.dtype == torch.float32 and torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Letterbox: aspect ratio kept, and back to the original size
# ---------------------------------------------------------------------------------------------


def _disc(height, width, cy, cx, radius):
    yy, xx = np.mgrid[:height, :width]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2).astype(np.uint8)


def test_letterbox_box_worked_examples():
    assert common.letterbox_box(522, 775, 128) == (21, 0, 86, 128)  # GlaS: 522 * 128 / 775 = 86.2
    assert common.letterbox_box(775, 522, 128) == (0, 21, 128, 86)
    assert common.letterbox_box(16, 20, 20) == (2, 0, 16, 20)
    assert common.letterbox_box(5, 10, 9) == (2, 0, 5, 9)  # 4.5 rounds half up to 5
    assert common.letterbox_box(1, 1000, 8) == (3, 0, 1, 8)  # never thinner than one pixel
    assert common.letterbox_box(64, 64, 64) == (0, 0, 64, 64)


def test_letterbox_keeps_discs_round_and_from_canvas_restores_the_size():
    disc = torch.from_numpy(_disc(300, 500, 150, 200, 60))  # a 121-pixel disc in a wide image
    canvas = common.letterbox(disc, 100, "nearest")  # scale 0.2: the disc is about 24 pixels across
    assert canvas.shape == (100, 100) and canvas.dtype == torch.uint8
    rows, cols = canvas.any(1).nonzero()[:, 0], canvas.any(0).nonzero()[:, 0]
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    assert height == width and 23 <= height <= 26  # round stays round (a squash would give 24 x 16)
    assert not canvas[:20].any() and not canvas[80:].any()  # 300 x 500 -> 60 x 100 at rows 20..79
    back = common.from_canvas(canvas, 300, 500)  # integer input -> nearest
    assert back.shape == (300, 500) and back.dtype == torch.uint8
    overlap = (back.bool() & disc.bool()).sum() / (back.bool() | disc.bool()).sum()
    assert overlap > 0.9
    # an image the canvas holds at scale 1 goes there and back unchanged, any dtype
    instances = torch.randint(0, 300, (2, 20, 32), dtype=torch.int32)
    boxed = common.letterbox(instances, 32, "nearest")
    assert torch.equal(boxed[:, 6:26], instances) and not boxed[:, :6].any()
    assert torch.equal(common.from_canvas(boxed, 20, 32), instances)
    image = torch.randint(0, 256, (3, 20, 32), dtype=torch.uint8)
    assert torch.equal(common.letterbox(image, 32)[:, 6:26], image)
    # a float map comes back bilinear, a constant stays constant
    prob = torch.full((2, 64, 64), 0.25)
    assert torch.allclose(common.from_canvas(prob, 300, 500), torch.full((2, 300, 500), 0.25))
    shrunk = common.letterbox(torch.full((3, 300, 500), 200, dtype=torch.uint8), 100)
    assert shrunk.dtype == torch.uint8 and (shrunk[:, 20:80] == 200).all() and not shrunk[:, :20].any()


# ---------------------------------------------------------------------------------------------
# Official layouts: small trees in a temporary folder
# ---------------------------------------------------------------------------------------------


def _rgb(path, size=(20, 16), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _rgb_from(path, grey):
    """A greyscale array saved as an RGB JPEG (what plt.imsave with the grey colour map writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([grey] * 3, -1)).save(path, quality=75)


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


_REFUGE_ZIPS = {  # each zip unpacked into a folder named after it, as the issue found users do
    "Training400": "REFUGE-Training400/Training400",
    "Annotation-Training400": "Annotation-Training400/Annotation-Training400",
    "REFUGE-Validation400": "REFUGE-Validation400/REFUGE-Validation400",
    "REFUGE-Validation400-GT": "REFUGE-Validation400-GT/REFUGE-Validation400-GT",
    "Test400": "REFUGE-Test400/Test400", "REFUGE-Test-GT": "REFUGE-Test-GT/REFUGE-Test-GT"}


def _refuge(tmp_path, test_by_folder=True, wrapped=False):
    root = tmp_path / "REFUGE" / "REFUGE"  # doubled top folder
    at = lambda component: root / (_REFUGE_ZIPS[component] if wrapped else component)  # noqa: E731
    for cls, ids in (("Glaucoma", ["g0001"]), ("Non-Glaucoma", ["n0001", "n0002"])):
        for i in ids:
            _rgb(at("Training400") / cls / f"{i}.jpg")
            _grey(at("Annotation-Training400") / "Disc_Cup_Masks" / cls / f"{i}.bmp", _disc_mask())
    (root / "__MACOSX" / "Training400").mkdir(parents=True)
    (root / "__MACOSX" / "Training400" / "._g0001.jpg").write_bytes(b"junk")
    for i in ("V0001", "V0002"):
        _rgb(at("REFUGE-Validation400") / f"{i}.jpg")
        _grey(at("REFUGE-Validation400-GT") / "Disc_Cup_Masks" / f"{i}.bmp", _disc_mask())
    _xlsx(at("REFUGE-Validation400-GT") / "Fovea_locations.xlsx",
          [["ID", "ImgName", "Fovea_X", "Fovea_Y", "Glaucoma Label"],
           [1, "V0001.jpg", 10.5, 8.0, 1], [2, "V0002.jpg", 9.0, 7.5, 0]])
    for i, g in (("T0001", "G"), ("T0002", "N"), ("T0003", "N")):
        _rgb(at("Test400") / f"{i}.jpg")
        folder = at("REFUGE-Test-GT") / "Disc_Cup_Masks" / (g if test_by_folder else "")
        _grey(folder / f"{i}.bmp", _disc_mask())
    if not test_by_folder:
        _xlsx(at("REFUGE-Test-GT") / "Glaucoma_label_and_Fovea_location.xlsx",
              [["ImgName", "Fovea_X", "Fovea_Y", "Label(Glaucoma=1)"],
               ["T0001.jpg", 1, 1, 0], ["T0002.jpg", 1, 1, 1], ["T0003.jpg", 1, 1, 0]])
    return tmp_path / "REFUGE"


@pytest.mark.parametrize("test_by_folder, wrapped", [(True, False), (False, False), (True, True)])
def test_refuge_layout(tmp_path, test_by_folder, wrapped):
    root = _refuge(tmp_path, test_by_folder, wrapped)
    d = common.load_dataset("refuge", root=root, size=20, cache=tmp_path / "cache")
    assert {k: len(v["names"]) for k, v in d.items()} == {"train": 3, "val": 2, "test": 3}
    assert d["train"]["names"] == ["g0001", "n0001", "n0002"] and d["train"]["labels"].tolist() == [1, 0, 0]
    assert d["val"]["labels"].tolist() == [1, 0]
    assert d["test"]["labels"].tolist() == ([1, 0, 0] if test_by_folder else [0, 1, 0])
    classes = np.where(_disc_mask() < 64, 2, np.where(_disc_mask() < 192, 1, 0)).astype(np.uint8)  # 0 cup, 128 rim
    # 20 x 16 letterboxed at 20: width kept, 16 rows centred at rows 2..17, 2 zero rows above and below
    expected = torch.zeros(20, 20, dtype=torch.uint8)
    expected[2:18] = torch.from_numpy(classes)
    assert torch.equal(d["val"]["masks"][0], expected) and set(d["test"]["masks"].unique().tolist()) == {0, 1, 2}
    assert d["train"]["images"].shape == (3, 3, 20, 20) and d["train"]["mask_names"] == ["background", "rim", "cup"]
    assert d["train"]["sizes"].tolist() == [[16, 20]] * 3 and d["train"]["sizes"].dtype == torch.int64
    assert d["val"]["valid"][0].sum(1).tolist() == [0, 0] + [20] * 16 + [0, 0]
    assert (d["train"]["images"][:, :, :2] == 0).all() and (d["train"]["images"][:, :, 2:18] == 100).all()
    if not test_by_folder:  # a label workbook that is not an .xlsx is named
        (root / "REFUGE" / "REFUGE-Validation400-GT" / "Fovea_locations.xlsx").write_bytes(b"ID;ImgName\n")
        with pytest.raises(common.DatasetError, match=r"cannot read '.*Fovea_locations.xlsx' as an .xlsx workbook"):
            common.load_dataset("refuge", root=root, size=20, cache=tmp_path / "cache")
    if wrapped:  # a second copy of one folder elsewhere: an error naming both
        _rgb(root / "REFUGE" / "old" / "Training400" / "Glaucoma" / "g0001.jpg")
        with pytest.raises(common.DatasetError, match=r"image id 'g0001' found twice: '.*old/Training400/Glaucoma/"
                                                      r"g0001.jpg' and '.*REFUGE-Training400/Training400/Glaucoma"):
            common.load_dataset("refuge", root=root, size=20, cache=tmp_path / "cache")


def _isic2017(tmp_path, tags=("Training", "Validation", "Test_v2"), csv=True):
    root = tmp_path / "isic"
    labels = {"Training": [("ISIC_0000001", "0.0", "0.0"), ("ISIC_0000002", "1.0", "0.0"),
                           ("ISIC_0000003", "0.0", "1.0")],
              "Validation": [("ISIC_0000010", "0.0", "0.0")],
              "Test_v2": [("ISIC_0000020", "1.0", "0.0"), ("ISIC_0000021", "0.0", "0.0")]}
    for tag in tags:
        rows = labels[tag]
        # the training zip unpacked into a folder of its own name (the thesis author's notebooks)
        data = root / f"ISIC-2017_{tag}_Data" / (f"ISIC-2017_{tag}_Data" if tag == "Training" else "")
        for image_id, _, _ in rows:
            _rgb(data / f"{image_id}.jpg")
            _rgb(data / f"{image_id}_superpixels.png")
            mask = np.zeros((16, 20), np.uint8)
            mask[4:12, 5:15] = 255
            _grey(root / f"ISIC-2017_{tag}_Part1_GroundTruth" / f"{image_id}_Segmentation.PNG", mask)
        (data / f"ISIC-2017_{tag}_Data_metadata.csv").write_text("image_id,age\n")
        if csv:
            (root / f"ISIC-2017_{tag}_Part3_GroundTruth.csv").write_text(
                "image_id,melanoma,seborrheic_keratosis\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return root


def test_isic2017_layout(tmp_path):
    d = common.load_dataset("isic2017", root=_isic2017(tmp_path), size=20, cache=tmp_path / "cache")
    assert d["train"]["labels"].tolist() == [0, 1, 2] and d["val"]["labels"].tolist() == [0]
    assert d["test"]["labels"].tolist() == [1, 0] and d["train"]["names"][0] == "ISIC_0000001"
    assert d["train"]["masks"].shape == (3, 20, 20) and set(d["train"]["masks"].unique().tolist()) == {0, 1}
    assert d["train"]["class_names"] == ["nevus", "melanoma", "seborrheic_keratosis"]
    # exclude: ids of another dataset's training images leave the test split (any case, with extension)
    e = common.load_dataset("isic2017", root=tmp_path / "isic", size=20, cache=tmp_path / "cache",
                            exclude=["isic_0000020.JPG", "ISIC_9999999"])
    assert e["test"]["names"] == ["ISIC_0000021"] and e["test"]["removed_overlap"] == ["ISIC_0000020"]
    assert e["test"]["labels"].tolist() == [0] and e["test"]["images"].shape[0] == 1


def test_isic2017_test_set_alone(tmp_path, capsys):
    root = _isic2017(tmp_path, tags=("Test_v2",), csv=False)
    with pytest.raises(common.DatasetError, match=r"no file 'ISIC-2017_Test_v2_Part3_GroundTruth.csv'"):
        common.load_dataset("isic2017", root=root, size=20, cache=tmp_path / "cache")
    d = common.load_dataset("isic2017", root=root, size=20, cache=tmp_path / "cache", need_labels=False)
    assert list(d) == ["test"] and d["test"]["names"] == ["ISIC_0000020", "ISIC_0000021"]
    assert d["test"]["labels"] is None and "going on without them" in capsys.readouterr().err


def _lesion_mask(path, rows):
    mask = np.zeros((16, 20), np.uint8)
    mask[2:rows, 3:12] = 255
    _grey(path, mask)


def test_isic_multi_ribeiro_layout_single_mask_images_are_the_test_set(tmp_path):
    a = tmp_path / "a" / "ISIC Archive"
    counts = [2, 3, 2, 1, 2, 2, 1]  # five multi-mask images (the training pool) and two single-mask ones
    for i, k in enumerate(counts):
        _rgb(a / "inputs" / "inputs" / f"ISIC_000000{i}.jpg")  # doubled folder
        for j in range(1, k + 1):
            _lesion_mask(a / "targets" / f"ISIC_000000{i}_segmentation_{j}.png", 10 + j)
    d = common.load_dataset("isic-multi", root=tmp_path / "a", size=16, cache=tmp_path / "cache")
    assert list(d) == ["train", "val", "test"] and [len(d[s]["names"]) for s in d] == [4, 1, 2]  # 80 / 20
    counts = torch.cat([d["train"]["n_annotations"], d["val"]["n_annotations"]]).tolist()
    merged = sorted(zip(d["train"]["names"] + d["val"]["names"], counts))
    assert [n for _, n in merged] == [2, 3, 2, 2, 2] and d["train"]["masks"].shape[1:] == (3, 16, 16)
    two = d["train"]["n_annotations"] == 2
    assert not d["train"]["masks"][two, 2].any() and d["train"]["masks"][:, :2].flatten(2).any(2).all()
    test = d["test"]
    assert test["names"] == ["ISIC_0000003", "ISIC_0000006"] and test["masks"].shape == (2, 1, 16, 16)
    assert test["n_annotations"].tolist() == [1, 1] and test["removed_overlap"] == []
    assert set(test["masks"].unique().tolist()) == {0, 1}


def test_isic_multi_split_lists_with_foreign_paths(tmp_path):
    a = tmp_path / "data"
    for i, k in enumerate([2, 2, 3, 1, 1]):
        _rgb(a / "inputs" / f"ISIC_000000{i}.jpg")
        for j in range(1, k + 1):
            _lesion_mask(a / "targets" / f"ISIC_000000{i}_segmentation_{j}.png", 10 + j)
    far = "/home/someone/Skin Data/isic archive"  # the authors' machine; a space inside the path

    def line(i, k):
        return " ".join([f"{far}/inputs/ISIC_000000{i}.jpg"] +
                        [f"{far}/targets/ISIC_000000{i}_segmentation_{j}.png" for j in range(1, k + 1)])
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_isic_titans_full.txt").write_text(line(0, 2) + "\n" + line(2, 3) + "\n\n")
    (lists / "validation_isic_titans_full.txt").write_text(line(1, 2) + "\n")
    (lists / "test_isic_titans_2000.txt").write_text(line(3, 1) + "\n" + line(4, 1) + "\n" + line(0, 1) + "\n")
    d = common.load_dataset("isic-multi", root=a, size=16, cache=tmp_path / "cache", splits=lists)
    assert d["train"]["names"] == ["ISIC_0000000", "ISIC_0000002"] and d["val"]["names"] == ["ISIC_0000001"]
    assert d["train"]["n_annotations"].tolist() == [2, 3] and d["train"]["masks"].shape == (2, 3, 16, 16)
    # ISIC_0000000 is listed for test too: removed from the test split and recorded
    assert d["test"]["names"] == ["ISIC_0000003", "ISIC_0000004"]
    assert d["test"]["removed_overlap"] == ["ISIC_0000000"] and d["test"]["masks"].shape == (2, 1, 16, 16)
    # the lists found under the dataset folder, any depth, work the same
    (a / "meta" / "splits").mkdir(parents=True)
    for f in lists.iterdir():
        (a / "meta" / "splits" / f.name).write_text(f.read_text())
    e = common.load_dataset("isic-multi", root=a, size=16, cache=tmp_path / "cache")
    assert e["val"]["names"] == ["ISIC_0000001"] and e["test"]["removed_overlap"] == ["ISIC_0000000"]
    # a listed file that is absent is named
    (lists / "validation_isic_titans_full.txt").write_text(line(1, 2) + "\n" + line(7, 2) + "\n")
    with pytest.raises(common.DatasetError, match=r"3 file\(s\) listed in '.*validation_isic_titans_full.txt' are "
                                                  r"not in the dataset folder: ISIC_0000007.jpg, "
                                                  r"ISIC_0000007_segmentation_1.png"):
        common.load_dataset("isic-multi", root=a, size=16, cache=tmp_path / "cache", splits=lists)


def test_isic_multi_annot_plus_plus(tmp_path, capsys):
    b = tmp_path / "b" / "IMA++" / "IMA++"
    for i in range(4):
        _rgb(b / "images" / f"ISIC_000010{i}.JPG")
        suffixes = ["A01_T1_S1", "A02_T3_S2", "ST_T1_S1", "MV_T1_S1"] if i < 3 else ["A05_T2_S1"]
        for suffix in suffixes:
            _grey(b / "masks" / f"ISIC_000010{i}_{suffix}.png", np.full((16, 20), 255, np.uint8))
    # annotator A01 segmented ISIC_0000100 twice: as IMA++ counts them, every segmentation is an annotation
    _grey(b / "masks" / "ISIC_0000100_A01_T2_S1.png", np.zeros((16, 20), np.uint8))
    e = common.load_dataset("isic-multi", root=tmp_path / "b", size=16, cache=tmp_path / "cache")
    pool = {n: int(k) for s in ("train", "val") for n, k in zip(e[s]["names"], e[s]["n_annotations"])}
    assert pool == {"ISIC_0000100": 3, "ISIC_0000101": 2, "ISIC_0000102": 2}
    assert e["test"]["names"] == ["ISIC_0000103"] and e["test"]["n_annotations"].tolist() == [1]
    assert "3 images with two or more masks (train/val), 1 with one (test)" in capsys.readouterr().out
    first = e["train"] if "ISIC_0000100" in e["train"]["names"] else e["val"]
    k = first["names"].index("ISIC_0000100")
    on = first["valid"][k] == 1  # masks in name order: A01_T1 (full), A01_T2 (empty), A02_T3 (full)
    assert [bool(first["masks"][k, a][on].all()) for a in range(3)] == [True, False, True]
    assert not first["masks"][k, 1].any()


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
    # 20 x 16 -> 16 x 13 (round(16 * 16 / 20) = 12.8 -> 13 rows, top = 1): nearest keeps the square
    expected = torch.zeros(16, 16, dtype=torch.uint8)
    expected[1:14] = torch.from_numpy(np.array(Image.fromarray(mask).resize((16, 13), Image.NEAREST)) > 0)
    assert torch.equal(d["test"]["masks"], expected.expand(3, 16, 16))
    assert d["test"]["sizes"].tolist() == [[16, 20]] * 3 and d["test"]["removed_overlap"] == []
    # a txt that does not parse never blocks segmentation-only use: a warning, no labels
    (tmp_path / "data" / "PH2Dataset" / "PH2_dataset.txt").write_text("|| Name || Asymmetry ||\n|| IMD002 || 0 ||\n")
    e = common.load_dataset("ph2", root=tmp_path / "data", size=16, cache=tmp_path / "cache")
    assert e["test"]["labels"] is None and torch.equal(e["test"]["masks"], d["test"]["masks"])
    with pytest.raises(common.DatasetError, match=r"ph2: .*PH2_dataset.txt' has no header row with columns 'Name' "
                                                  r"and 'Clinical Diagnosis'"):
        common.load_dataset("ph2", root=tmp_path / "data", size=16, cache=tmp_path / "cache", need_labels=True)


def test_dermofit_layout(tmp_path):
    root = tmp_path / "data"
    for cls, ids in (("AK", ["a1", "A2"]), ("MEL", ["m5"])):
        for i in ids:
            _rgb(root / "originalImages" / "originalImages" / cls / i / f"{i}.png")  # doubled
            _grey(root / "masks_zip" / "originalMasks" / cls / i.upper() / f"{i.upper()}mask.png",  # in a zip's folder
                  np.full((16, 20), 255, np.uint8))
    d = common.load_dataset("dermofit", root=root, size=16, cache=tmp_path / "cache")
    assert d["test"]["class_names"] == ["AK", "MEL"] and d["test"]["labels"].tolist() == [0, 0, 1]
    assert d["test"]["masks"][d["test"]["valid"] == 1].min() == 1 and d["test"]["masks"][d["test"]["valid"] == 0].max() == 0


def _glas(root, n_train=12, instance=None):
    if instance is None:
        instance = np.zeros((32, 32), np.uint8)
        instance[2:12, 2:12] = 1  # a 10x10 gland
        instance[15:30, 15:25] = 2
    rows = ["name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for prefix, n in (("train", n_train), ("testA", 2), ("testB", 1)):
        for i in range(1, n + 1):
            _rgb(root / f"{prefix}_{i}.bmp", instance.shape[::-1])
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


def test_glas_round_glands_stay_round_and_full_resolution_maps(tmp_path):
    from scipy import ndimage
    root = tmp_path / "data" / "GlaS" / "GlaS"  # doubled folder
    instance = (_disc(60, 96, 30, 30, 12) + 2 * _disc(60, 96, 28, 70, 9)).astype(np.uint8)  # 96 wide, 60 high
    _glas(root, n_train=7, instance=instance)
    d = common.load_dataset("glas", root=tmp_path / "data", size=48, cache=tmp_path / "cache", border_width=3)
    test = d["test"]
    assert test["sizes"].tolist() == [[60, 96]] * 3 and test["valid"][0].sum(1).tolist() == [0] * 9 + [48] * 30 + [0] * 9
    # on the canvas (scale 1/2) each disc keeps a square bounding box, about half its diameter both ways
    for k, diameter in ((1, 25), (2, 19)):
        on = test["instances"][0] == k
        rows, cols = on.any(1).nonzero()[:, 0], on.any(0).nonzero()[:, 0]
        assert int(rows[-1] - rows[0]) == int(cols[-1] - cols[0]) and abs(int(rows[-1] - rows[0]) + 1 - diameter / 2) <= 2
        back = common.from_canvas(test["instances"][0], 60, 96) == k
        truth = torch.from_numpy(instance == k)
        assert (back & truth).sum() / (back | truth).sum() > 0.85
    # original resolution: instances as stored, regions by the border rule in original pixels (scipy oracle)
    assert all(torch.equal(f, torch.from_numpy(instance.astype(np.int32))) for f in test["full_instances"])
    lumen = sum(ndimage.binary_erosion(instance == k, np.ones((7, 7)), border_value=1) for k in (1, 2))
    expected = torch.from_numpy(((instance > 0).astype(np.uint8) + lumen).astype(np.uint8))
    assert all(torch.equal(m, expected) for m in test["full_masks"]) and test["full_masks"][0].dtype == torch.uint8
    assert torch.equal(test["masks"][0], common.letterbox(expected, 48, "nearest"))
    assert len(d["val"]["full_instances"]) == 1 and "full_instances" not in d["train"]  # val/test only
    # the cache key covers border_width: a wider border, less lumen
    e = common.load_dataset("glas", root=tmp_path / "data", size=48, cache=tmp_path / "cache", border_width=5)
    assert int((e["test"]["full_masks"][0] == 2).sum()) < int((expected == 2).sum())
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_folder_and_ispy1_layouts(tmp_path):
    root = tmp_path / "data"
    for split, names in (("train", ["a", "b", "c"]), ("val", ["d"]), ("test", ["e"])):
        for n in names:
            _rgb(root / split / "images" / f"{n}.png", value=10 * ord(n) % 256)  # distinct pixels
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


def _nifti(path, data, dtype="<i2", code=4, slope=0.0, inter=0.0, gz=False, sizeof=348):
    """A single-file NIfTI-1 image written by hand: the 348-byte header (sizeof_hdr, dim at 40,
    datatype/bitpix at 70, vox_offset at 108, scl_slope/scl_inter at 112, magic at 344), 4 bytes
    of extension flag, then the voxels with i fastest (data given as [k, j, i])."""
    e = dtype[0]
    header = bytearray(348)
    struct.pack_into(e + "i", header, 0, sizeof)
    nz, ny, nx = data.shape
    struct.pack_into(e + "8h", header, 40, 3, nx, ny, nz, 1, 1, 1, 1)
    struct.pack_into(e + "2h", header, 70, code, np.dtype(dtype).itemsize * 8)
    struct.pack_into(e + "8f", header, 76, 1, 1, 1, 2, 0, 0, 0, 0)
    struct.pack_into(e + "3f", header, 108, 352.0, slope, inter)
    header[344:348] = b"n+1\0"
    raw = bytes(header) + bytes(4) + np.ascontiguousarray(data).astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_nifti_reader_byte_order_types_scaling_gzip(tmp_path):
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # [k, j, i]
    for i, (dtype, code, gz) in enumerate([("<i2", 4, False), (">i2", 4, True), ("<f4", 16, True),
                                           (">u2", 512, False), ("<u1", 2, False), (">f8", 64, True)]):
        _nifti(tmp_path / f"v{i}.nii", data, dtype, code, slope=2.0, inter=-5.0, gz=gz)
        volume = common._read_nifti("ispy1", tmp_path / f"v{i}.nii")
        assert volume.dtype == np.float32 and np.array_equal(volume, data * 2.0 - 5.0), dtype
    _nifti(tmp_path / "plain.nii", data, slope=0.0, inter=7.0)  # slope 0 means "no scaling"
    assert np.array_equal(common._read_nifti("ispy1", tmp_path / "plain.nii"), data)
    _nifti(tmp_path / "two.nii", data, sizeof=540)
    with pytest.raises(common.DatasetError, match=r"two.nii' is not a NIfTI-1 file \(NIfTI-2\)"):
        common._read_nifti("ispy1", tmp_path / "two.nii")
    (tmp_path / "junk.nii").write_bytes(b"not an image" * 40)
    with pytest.raises(common.DatasetError, match=r"junk.nii' is not a NIfTI-1 file"):
        common._read_nifti("ispy1", tmp_path / "junk.nii")


_ISPY_PATIENTS = {1001: 0, 1002: 1, 1003: 0, 1004: 0, 1005: 1, 1006: 0, 1007: 1, 1008: 0}


def _ispy_download(root, short=1008, mismatch=None, columns=("SUBJECTID", "PCR")):
    """(a): 8 patients, volumes 12 (i) x 10 (j) x 16 (k) slices, tumour blocks on slices 3..14
    with the largest area on slice 9 (patient 1003: 0..12, largest on 2; patient `short`: only
    7 tumour slices, 6..12). The image is a ramp along i, so orientation is visible."""
    download = root / "ISPY_Download" / "ISPY_Download"  # doubled
    for n, (subject, pcr) in enumerate(_ISPY_PATIENTS.items()):
        volume = np.tile(np.arange(12, dtype=np.int16) * 10, (16, 10, 1))  # [k, j, i]: grows with i
        mask = np.zeros((16, 10, 12), np.uint8)
        first, last, peak = (6, 12, 9) if subject == short else (0, 12, 2) if subject == 1003 else (3, 14, 9)
        mask[first:last + 1, 3:6, 2:5] = 1
        mask[peak, 2:8, 1:9] = 1  # the largest area
        ext = ".nii.gz" if n % 2 else ".nii"
        _nifti(download / "Dataset ISPY" / f"ISPY_{subject}" / f"DCEMRI_1{ext}", volume, "<i2" if n % 3 else ">i2")
        if subject == mismatch:
            mask = mask[:, :, :11]
        _nifti(download / "Tumor_segmentation_new" / f"ISPY_{subject}_tumor_mask{ext}", mask, "<u1", code=2, gz=n % 2)
    _xlsx(download / "outcome_new.xlsx", [list(columns)] + [[s, p] for s, p in _ISPY_PATIENTS.items()])
    return root


def test_ispy1_nifti_download_split_by_patient(tmp_path, capsys):
    root = _ispy_download(tmp_path / "data")
    d = common.load_dataset("ispy1", root=root, size=12, cache=tmp_path / "cache", seed=3)
    assert "ISPY_1008: 7 slice(s) with tumour" in capsys.readouterr().err
    names = [n for s in d.values() for n in s["names"]]
    assert len(names) == 7 * 10 + 7 and len(set(names)) == len(names)
    slices = {n for n in names if n.startswith("ISPY_1001_")}
    assert slices == {f"ISPY_1001_s{k}" for k in range(4, 14)}  # from peak - 5 upwards: 4..13
    assert {n for n in names if n.startswith("ISPY_1003_")} == {f"ISPY_1003_s{k}" for k in range(10)}
    assert {n for n in names if n.startswith("ISPY_1008_")} == {f"ISPY_1008_s{k}" for k in range(6, 13)}
    patients = [{n.rsplit("_s", 1)[0] for n in d[s]["names"]} for s in ("train", "val", "test")]
    assert [len(p) for p in patients] == [6, 1, 1] and not (patients[0] & patients[1] or patients[0] & patients[2])
    for split in d.values():
        for name, label in zip(split["names"], split["labels"].tolist()):
            assert label == _ISPY_PATIENTS[int(name[5:9])]
    # orientation: rows are j, columns i (the ramp grows to the right); 12 x 10 -> rows 1..10 of 12
    image, mask = d["train"]["images"][0], d["train"]["masks"][0]
    assert d["train"]["sizes"][0].tolist() == [10, 12] and d["train"]["valid"][0].sum(1).tolist() == [0] + [12] * 10 + [0]
    assert (image[:, 1:11, 1:] > image[:, 1:11, :-1]).all() and (image[:, 1:11] == image[:, 1:2]).all()
    assert image[0, 5, 0] == 0 and image[0, 5, 11] == 255  # each slice stretched to 0..255
    assert set(mask.unique().tolist()) <= {0, 1} and mask[1 + 3:1 + 6, 2:5].all()
    again = common.load_dataset("ispy1", root=root, size=12, cache=tmp_path / "cache", seed=3)
    assert again["test"]["names"] == d["test"]["names"]  # seeded


def test_ispy1_bad_input(tmp_path):
    def load(root):
        return common.load_dataset("ispy1", root=root, size=12, cache=tmp_path / "cache")

    root = _ispy_download(tmp_path / "shape", mismatch=1002)
    with pytest.raises(common.DatasetError, match=r"image '.*ISPY_1002/DCEMRI_1.nii.gz' has shape \(12, 10, 16\) "
                                                  r"but its mask '.*ISPY_1002_tumor_mask.nii.gz' has \(11, 10, 16\)"):
        load(root)
    root = _ispy_download(tmp_path / "columns", columns=("SUBJECTID", "pCR response"))
    with pytest.raises(common.DatasetError, match=r"outcome_new.xlsx' has no header row with columns 'SUBJECTID' "
                                                  r"and 'PCR'"):
        load(root)
    root = _ispy_download(tmp_path / "missing")
    next((root / "ISPY_Download").rglob("ISPY_1004_tumor_mask.nii*")).unlink()
    with pytest.raises(common.DatasetError, match=r"SUBJECTID 1004 of '.*outcome_new.xlsx' has no "
                                                  r"'.*Tumor_segmentation_new/ISPY_1004_tumor_mask.nii\[.gz\]'"):
        load(root)


def test_ispy1_patient_split_in_the_papers_proportions():
    labels = [0] * 114 + [1] * 43  # 157 patients, 43 pCR (UML Sec. 3)
    split = {"names": [f"ISPY_{1000 + p}_s{k}" for p in range(157) for k in range(10)],
             "labels": torch.tensor([labels[p] for p in range(157) for _ in range(10)])}
    train, val, test = common._split_by_patient("ispy1", split, 0, (1230, 170, 170))
    assert [len(s["names"]) for s in (train, val, test)] == [1230, 170, 170]
    assert 4 <= int(val["labels"].sum()) // 10 <= 5 and 4 <= int(test["labels"].sum()) // 10 <= 5  # 43 * 17 / 157
    groups = [{n.rsplit("_s", 1)[0] for n in s["names"]} for s in (train, val, test)]
    assert sum(map(len, groups)) == 157 and len(set.union(*groups)) == 157


def test_ispy1_preprocessed_jpeg_tree(tmp_path):
    root = tmp_path / "data" / "ISPY_Dataset"
    plan = {"Train": [(1001, 0), (1002, 1)], "Valid": [(1003, 0)], "Test": [(1004, 1)]}
    for split, patients in plan.items():
        for subject, pcr in patients:
            for k in (7, 8):
                ramp = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (20, 1))
                _rgb_from(root / split / "images" / f"ispy_{subject}" / f"ispy_{subject}_{pcr}_s{k}_img.jpg", ramp)
                mask = np.zeros((20, 24), np.uint8)
                mask[5:15, 6:16] = 255
                _rgb_from(root / split / "masks" / f"ispy_{subject}" / f"ispy_{subject}_{pcr}_s{k}_msk.jpg", mask)
    d = common.load_dataset("ispy1", root=tmp_path / "data", size=24, cache=tmp_path / "cache")
    assert d["train"]["names"] == ["ISPY_1001_s7", "ISPY_1001_s8", "ISPY_1002_s7", "ISPY_1002_s8"]
    assert d["train"]["labels"].tolist() == [0, 0, 1, 1] and d["test"]["labels"].tolist() == [1, 1]
    assert d["val"]["names"] == ["ISPY_1003_s7", "ISPY_1003_s8"]
    masks = d["train"]["masks"]
    assert set(masks.unique().tolist()) == {0, 1}  # lossy JPEG masks thresholded, never 0..255
    expected = torch.zeros(24, 24, dtype=torch.uint8)
    expected[2 + 5:2 + 15, 6:16] = 1  # 24 x 20 -> rows 2..21
    assert (masks == expected).float().mean() > 0.98


def test_ispy1_folder_layout_split_by_patient(tmp_path):
    root = tmp_path / "data"
    for p in range(6):
        for k in (3, 4):
            _rgb(root / "train" / "images" / f"P{p}_s{k}.png")
            _grey(root / "train" / "masks" / f"P{p}_s{k}.png", np.full((16, 20), 255 * (k == 3), np.uint8))
    (root / "labels.csv").write_text("name,label\n" + "".join(f"P{p}_s{k},{p % 2}\n" for p in range(6) for k in (3, 4)))
    before = sorted(root.rglob("*"))
    d = common.load_dataset("ispy1", root=root, size=16, cache=tmp_path / "cache", seed=1)
    patients = [{n.split("_")[0] for n in d[s]["names"]} for s in ("train", "val", "test")]
    assert [len(p) for p in patients] == [4, 1, 1] and len(set.union(*patients)) == 6
    assert all(len(d[s]["names"]) == 2 * len(p) for s, p in zip(("train", "val", "test"), patients))
    assert sorted(root.rglob("*")) == before  # nothing written into the dataset
    assert set(d["train"]["masks"].unique().tolist()) == {0, 1}


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
    assert int(common.load_dataset("folder", root=root, size=8, cache=cache)["test"]["images"].max()) == 200
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

    with pytest.raises(common.DatasetError, match=r"refuge: dataset folder .* does not exist; see the dataset "
                                                  r"table in README.md \(published at .*grand-challenge"):
        load("refuge", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.DatasetError, match=r"isic2017: no ISIC-2017_\{Training,Validation,Test_v2\}_Data/"
                                                  r"ISIC_\*.jpg images under '.*empty'. See the dataset table in "
                                                  r"README.md .*challenge.isic-archive.com"):
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


# ---------------------------------------------------------------------------------------------
# What users' real copies hold: each case on a small tree made here
# ---------------------------------------------------------------------------------------------


def _refuge_as_folder(root, mask=None):
    """The common redistributed REFUGE: {train,val,test}/{images,masks} with the original grey-level
    masks (0 cup, 128 rim, 255 background) and a labels.csv."""
    rows = ["name,label"]
    for split, ids in (("train", ["g1", "n1"]), ("val", ["v1"]), ("test", ["t1"])):
        for i in ids:
            _rgb(root / split / "images" / f"{i}.jpg", value=60 + 10 * len(rows))
            _grey(root / split / "masks" / f"{i}.png", _disc_mask(cup=0, rim=128) if mask is None else mask)
            rows.append(f"{i},{int(i.startswith('g'))}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_folder_masks_hold_class_indices_and_refuge_grey_levels_are_refused(tmp_path):
    root = _refuge_as_folder(tmp_path / "refuge_copy")
    with pytest.raises(common.DatasetError, match=r"folder: mask '.*g1.png' holds the values \[0, 128, 255\], but no "
                                                  r"mask of the dataset holds 1: .*class indices.*--data refuge"):
        common.load_dataset("folder", root=root, size=16, cache=tmp_path / "cache")
    # --data refuge reads that copy: REFUGE's classes, its labels
    d = common.load_dataset("refuge", root=root, size=16, cache=tmp_path / "cache")
    assert sorted(d) == ["test", "train", "val"] and d["train"]["labels"].tolist() == [1, 0]
    assert set(d["train"]["masks"].unique().tolist()) == {0, 1, 2} and d["train"]["mask_names"][2] == "cup"
    assert d["train"]["class_names"] == ["non_glaucoma", "glaucoma"]
    # other grey levels are refused without the REFUGE hint; class indices 0..2 and 0/255 binary masks load
    other = np.where(_disc_mask(cup=0, rim=128) == 128, 50, 0).astype(np.uint8)
    with pytest.raises(common.DatasetError, match=r"holds the values \[0, 50\].*binary mask\)\.$"):
        common.load_dataset("folder", root=_refuge_as_folder(tmp_path / "grey", other), size=16, cache=tmp_path / "c")
    indices = np.where(_disc_mask(cup=0, rim=128) < 64, 2, np.where(_disc_mask(cup=0, rim=128) < 192, 1, 0))
    d = common.load_dataset("folder", root=_refuge_as_folder(tmp_path / "idx", indices), size=16, cache=tmp_path / "c")
    assert set(d["test"]["masks"].unique().tolist()) == {0, 1, 2} and len(d["test"]["mask_names"]) == 3
    binary = np.where(_disc_mask() < 192, 255, 0).astype(np.uint8)
    d = common.load_dataset("folder", root=_refuge_as_folder(tmp_path / "bin", binary), size=16, cache=tmp_path / "c")
    assert set(d["test"]["masks"].unique().tolist()) == {0, 1}


def test_ispy1_jpeg_tree_slices_below_zero_keep_their_names(tmp_path):
    root = tmp_path / "data" / "ISPY_Dataset"
    for split, subject in (("Train", 1001), ("Valid", 1002), ("Test", 1003)):
        for k in (-2, -1, 0, 1):  # the authors' slice range starts below 0 when the largest tumour is low
            stem = f"ispy_{subject}_1_s{k}"
            _rgb_from(root / split / "images" / f"ispy_{subject}" / f"{stem}_img.jpg", np.full((20, 24), 90, np.uint8))
            _rgb_from(root / split / "masks" / f"ispy_{subject}" / f"{stem}_msk.jpg", np.full((20, 24), 255, np.uint8))
    d = common.load_dataset("ispy1", root=tmp_path / "data", size=24, cache=tmp_path / "cache")
    assert d["train"]["names"] == ["ISPY_1001_s-2", "ISPY_1001_s-1", "ISPY_1001_s0", "ISPY_1001_s1"]
    assert [len(d[s]["names"]) for s in ("train", "val", "test")] == [4, 4, 4] and d["test"]["labels"].tolist() == [1] * 4
    assert common._patient_of("ISPY_1001_s-2") == "ispy_1001"


def test_isic_multi_root_above_ima_and_isic2017(tmp_path):
    ima, isic = tmp_path / "skin" / "IMA++", tmp_path / "skin" / "ISIC2017"
    for i in range(3):
        _rgb(ima / "images" / f"ISIC_000010{i}.jpg")
        for suffix in ("A01_T1_S1", "A02_T2_S2"):
            _lesion_mask(ima / "masks" / f"ISIC_000010{i}_{suffix}.png", 12)
    # ISIC 2017's ground truth of an IMA++ image is not one more annotator
    _lesion_mask(isic / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000101_segmentation.png", 9)
    d = common.load_dataset("isic-multi", root=tmp_path / "skin", size=16, cache=tmp_path / "cache")
    assert torch.cat([d["train"]["n_annotations"], d["val"]["n_annotations"]]).tolist() == [2, 2, 2]
    # the same image twice (ISIC 2017's copy of it): an error naming both files
    _rgb(isic / "ISIC-2017_Training_Data" / "ISIC_0000101.jpg")
    with pytest.raises(common.DatasetError, match=r"image id 'isic_0000101' found twice: '.*IMA\+\+/images/"
                                                  r"ISIC_0000101.jpg' and '.*ISIC-2017_Training_Data/ISIC_0000101.jpg'"):
        common.load_dataset("isic-multi", root=tmp_path / "skin", size=16, cache=tmp_path / "cache")


def test_messages_say_what_to_do(tmp_path, capsys):
    def load(name, root, **options):
        return common.load_dataset(name, root=root, size=16, cache=tmp_path / "cache", **options)

    glas = tmp_path / "glas"
    _glas(glas, n_train=4)
    (glas / "Grade.csv").unlink()
    with pytest.raises(common.DatasetError, match=r"glas: Grade.csv \(the benign / malignant grade of each image\) "
                                                  r"is missing: found 7 GlaS images under '.*glas' but no Grade.csv"):
        load("glas", glas)
    moved = tmp_path / "glas_moved"  # images moved into train/ and test/ sub-folders: still found
    _glas(moved, n_train=4)
    for f in list(moved.glob("*.bmp")):
        (moved / ("train" if f.name.startswith("train") else "test")).mkdir(exist_ok=True)
        f.rename(moved / ("train" if f.name.startswith("train") else "test") / f.name)
    d = load("glas", moved, border_width=1)
    assert [len(d[s]["names"]) for s in ("train", "val", "test")] == [3, 1, 3]
    renamed = tmp_path / "ribeiro"  # inputs/targets renamed images/masks
    for i in range(2):
        _rgb(renamed / "images" / f"ISIC_000000{i}.jpg")
        _lesion_mask(renamed / "masks" / f"ISIC_000000{i}_segmentation_1.png", 10)
    with pytest.raises(common.DatasetError, match=r"2 image\(s\) have no mask, e.g. '.*ISIC_0000000.jpg'. Masks are "
                                                  r"read from a folder named 'targets'.*'ISIC_0000000_segmentation_1"):
        load("isic-multi", renamed)
    (tmp_path / "REFUGE.zip").write_bytes(b"PK")
    with pytest.raises(common.DatasetError, match=r"--root '.*REFUGE.zip' is a file, not a folder; unpack it first"):
        load("refuge", tmp_path / "REFUGE.zip")
    packed = tmp_path / "REFUGE2"  # REFUGE2.zip unpacked, its inner zips not
    packed.mkdir()
    for inner in ("REFUGE2-Training.zip", "REFUGE2-Validation.zip", "REFUGE2-Test.zip"):
        (packed / inner).write_bytes(b"PK")
    with pytest.raises(common.DatasetError, match=r"refuge: no Training400/(.|\n)*Still zipped under it: REFUGE2-Test.zip, "
                                                  r"REFUGE2-Training.zip, REFUGE2-Validation.zip; unpack each"):
        load("refuge", packed)
    # ISIC 2017's test folder under its first name, and the splits found said when one is missing
    root = _isic2017(tmp_path, tags=("Training", "Test_v2"))
    for f in sorted(root.rglob("*Test_v2*"), key=lambda p: -len(p.parts)):
        f.rename(f.with_name(f.name.replace("Test_v2", "Test")))
    capsys.readouterr()
    d = load("isic2017", root)
    assert sorted(d) == ["test", "train"] and d["test"]["labels"].tolist() == [1, 0]
    assert "isic2017: found split(s) ['test', 'train']; no ['val']" in capsys.readouterr().out


def test_folder_numbered_per_split_compares_pixels(tmp_path):
    root = tmp_path / "mine"
    for split, values in (("train", (10, 20, 30)), ("test", (40, 20, 50))):  # test 0002 is train 0002's image
        for k, value in enumerate(values, 1):
            _rgb(root / split / "images" / f"{k:04d}.png", value=value)
            _grey(root / split / "masks" / f"{k:04d}.png", np.zeros((16, 20), np.uint8))
    d = common.load_dataset("folder", root=root, size=16, cache=tmp_path / "cache")
    assert d["test"]["names"] == ["0001", "0003"] and d["test"]["removed_overlap"] == ["0002"]
    assert d["test"]["images"][:, 0, 8, 8].tolist() == [40, 50]


def test_a_damaged_cache_file_is_rebuilt(tmp_path, capsys):
    root, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    first = common.load_dataset("folder", root=root, size=16, cache=cache)
    path = next(cache.glob("*.pt"))
    raw = bytearray(path.read_bytes())
    raw[200:2200] = bytes(2000)  # 2,000 bytes overwritten inside the payload
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    again = common.load_dataset("folder", root=root, size=16, cache=cache)
    assert "does not match its checksum: reading the dataset again" in capsys.readouterr().out
    assert torch.equal(again["train"]["images"], first["train"]["images"])
    assert common._cache_read(path) is not None  # rewritten whole


def test_channel_statistics_leave_the_letterbox_padding_out():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[:, :, 1:3] = torch.tensor([51, 102, 204], dtype=torch.uint8).view(1, 3, 1, 1)  # rows 1-2: the image
    images[1, 0, 1:3, :2] = 153  # one patch of another red
    valid = torch.zeros(2, 4, 4, dtype=torch.uint8)
    valid[:, 1:3] = 1
    mean, std = common.channel_stats(images, valid)
    red = torch.tensor([51.0] * 8 + [51.0] * 4 + [153.0] * 4) / 255  # the 16 image pixels' red values
    assert torch.allclose(mean, torch.tensor([red.mean(), 0.4, 0.8]), atol=1e-6)
    assert torch.allclose(std[0], red.std(unbiased=False), atol=1e-6) and std[1] < 1e-5
    padded, _ = common.channel_stats(images)  # without valid: the padding's zeros pull the mean down by half
    assert torch.allclose(padded, mean / 2, atol=1e-6)
