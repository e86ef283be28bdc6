"""Tests of common.py's predict plumbing (section 9) with a tiny fake predict_batch, no training:
reading a folder of user images of odd sizes and formats, the letterbox geometry there and back,
and what is written (masks, instances, overlays, maps, predictions.csv, errors.txt)."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

torch.set_num_threads(1)

SIZE = 32


def fake_predict_batch(predictor, images):
    """Class 1 where the red channel is bright, 2 where the blue one is, 0 elsewhere (padding too);
    instances = 300 x class (16-bit values); a map = red / 255; one row of image-level outputs."""
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, predictor.size, predictor.size)
    red, blue = images[:, 0] > 127, images[:, 2] > 127
    mask = torch.where(red, 1, torch.where(blue, 2, 0)).long()
    return {"mask": mask, "instances": mask * 300,
            "maps": {"uncertainty": images[:, 0].float() / 255},
            "rows": [{"class": "lesion", "red_share": red[b].float().mean()} for b in range(len(images))]}


def predictor(keep_aspect=True):
    return common.Predictor(model=None, args=None, norm=None, size=SIZE, keep_aspect=keep_aspect, device="cpu",
                            class_names=["benign", "malignant"], mask_names=["background", "red", "blue"])


def two_halves(height, width):
    """uint8 [h,w,3]: left half red (255,0,0), right half blue (0,0,255)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2:, 2] = 255
    return image


def expected_classes(height, width):
    truth = np.full((height, width), 2, dtype=np.uint8)
    truth[:, : width // 2] = 1
    return truth


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(two_halves(61, 97)).save(root / "a_wide.jpg", quality=95)         # 97 wide x 61 high JPEG
    grey = np.zeros((80, 50), dtype=np.uint8)
    grey[:, :25] = 200                                                                 # grey -> R = G = B
    Image.fromarray(grey, mode="L").save(root / "b_grey.png")                         # 50 wide x 80 high
    rgba = np.concatenate([two_halves(30, 40), np.full((30, 40, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(root / "c_rgba.png")
    Image.fromarray(two_halves(20, 33)).save(root / "D_UPPER.BMP")
    (root / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "notes.txt").write_text("not an image")
    (root / "sub").mkdir()
    Image.fromarray(two_halves(24, 24)).save(root / "sub" / "f_deep.png")
    return root


def test_letterbox_box_by_hand():
    # 61 x 97 into 32: scale 32/97, height round(20.12) = 20, top (32 - 20) // 2 = 6
    assert common.letterbox_box(61, 97, 32) == (6, 0, 20, 32)
    assert common.letterbox_box(80, 50, 32) == (0, 6, 32, 20)
    assert common.letterbox_box(1, 500, 32) == (15, 0, 1, 32)  # never thinner than one pixel
    assert common.letterbox_box(32, 32, 32) == (0, 0, 32, 32)


def test_geometry_there_and_back_crops_the_padding():
    image = torch.full((3, 64, 30), 200, dtype=torch.uint8)  # tall: padded left and right on the canvas
    canvas = common._to_model_input(image, SIZE, keep_aspect=True)
    top, left, h, w = common.letterbox_box(64, 30, SIZE)
    assert (top, left, h, w) == (0, 8, 32, 15)
    assert (canvas[:, :, left:left + w] == 200).all() and canvas[:, :, :left].sum() == 0 and canvas[:, :, left + w:].sum() == 0
    back = common._to_image_size((canvas[0] > 0).long(), 64, 30, True, "nearest")
    assert back.shape == (64, 30) and (back == 1).all()  # no padding column survives the way back
    squashed = common._to_model_input(image, SIZE, keep_aspect=False)
    assert (squashed == 200).all()
    assert common._to_image_size(torch.ones(SIZE, SIZE), 64, 30, False, "bilinear").shape == (64, 30)


def test_predict_folder_writes_every_output_at_each_images_size(folder, tmp_path, capsys):
    out = tmp_path / "predictions"
    count = common.predict_images_in(folder, predictor(), fake_predict_batch, out, recursive=False, batch_size=3,
                                     script="uml.py")
    assert count == 4
    sizes = {"a_wide": (97, 61), "b_grey": (50, 80), "c_rgba": (40, 30), "D_UPPER": (33, 20)}
    for stem, (width, height) in sizes.items():
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.mode == "L" and mask.size == (width, height)
        classes = np.asarray(mask)
        assert set(np.unique(classes)) <= {0, 1, 2}
        if stem != "b_grey":  # red left half, blue right half: right at the original size but for the seam
            agree = (classes == expected_classes(height, width)).mean()
            assert agree > 0.9, (stem, agree)
        instances = np.asarray(Image.open(out / f"{stem}_instances.png")).astype(np.int64)
        assert instances.shape == (height, width) and set(np.unique(instances)) <= {0, 300, 600}
        assert (instances == classes.astype(np.int64) * 300).all()
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (width, height)
        umap = np.load(out / f"{stem}_uncertainty.npy")
        assert umap.dtype == np.float32 and umap.shape == (height, width) and 0 <= umap.min() and umap.max() <= 1
        assert Image.open(out / f"{stem}_uncertainty.png").size == (width, height)
    grey = np.asarray(Image.open(out / "b_grey_mask.png"))
    assert (grey[:, :20] == 1).all() and (grey[:, 30:] == 0).all()  # grey 200 became RGB (200, 200, 200)
    # instance contours in white: the image's left and right edges and both sides of the red/blue seam
    white = np.flatnonzero((np.asarray(Image.open(out / "a_wide_overlay.png"))[30] == 255).all(axis=1))
    assert len(white) == 4 and white[0] == 0 and white[3] == 96 and white[2] == white[1] + 1 and 45 <= white[1] <= 49
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["a_wide.jpg", "b_grey.png", "c_rgba.png", "D_UPPER.BMP"]
    assert list(rows[0]) == ["image", "width", "height", "class", "red_share"]
    assert (rows[0]["width"], rows[0]["height"], rows[0]["class"]) == ("97", "61", "lesion")
    # on the 32 x 32 canvas the 97 x 61 image is 32 x 20 (letterboxed), its red half 16 x 20 pixels
    assert float(rows[0]["red_share"]) == pytest.approx(16 * 20 / 32 ** 2)
    errors = (out / "errors.txt").read_text()
    assert "e_corrupt.png" in errors and "notes.txt" not in errors and len(errors.splitlines()) == 1
    assert "e_corrupt.png" in capsys.readouterr().err
    assert not list(out.glob("e_corrupt*")) and not list(out.glob("notes*")) and not (out / "sub").exists()

    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(common.UsageError, match="is not empty; choose another --out"):
        common.predict_images_in(folder, predictor(), fake_predict_batch, out, script="uml")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing replaced


def test_predict_recursive_single_file_and_refusals(folder, tmp_path):
    out = tmp_path / "deep"
    assert common.predict_images_in(folder, predictor(False), fake_predict_batch, out, recursive=True) == 5
    assert Image.open(out / "sub" / "f_deep_mask.png").size == (24, 24)
    with open(out / "predictions.csv", newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)][-1] == "sub/f_deep.png"
    one = tmp_path / "one"
    assert common.predict_images_in(folder / "D_UPPER.BMP", predictor(), fake_predict_batch, one) == 1
    assert sorted(p.name for p in one.iterdir()) == ["D_UPPER_instances.png", "D_UPPER_mask.png", "D_UPPER_overlay.png",
                                                     "D_UPPER_uncertainty.npy", "D_UPPER_uncertainty.png",
                                                     "errors.txt", "predictions.csv"]
    with pytest.raises(common.UsageError, match="does not exist"):
        common.predict_images_in(tmp_path / "nowhere", predictor(), fake_predict_batch, tmp_path / "x")
    with pytest.raises(common.UsageError, match="not an image file"):
        common.predict_images_in(folder / "notes.txt", predictor(), fake_predict_batch, tmp_path / "x")
    with pytest.raises(common.UsageError, match="inside the images' folder"):
        common.predict_images_in(folder, predictor(), fake_predict_batch, folder / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UsageError, match="no image files"):
        common.predict_images_in(tmp_path / "empty", predictor(), fake_predict_batch, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_predict_counts_zero_when_nothing_is_readable_and_names_twins_apart(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    assert common.predict_images_in(root, predictor(), fake_predict_batch, out) == 0  # the caller exits non-zero
    assert "broken.jpg" in (out / "errors.txt").read_text()
    twins = tmp_path / "twins"
    twins.mkdir()
    Image.fromarray(two_halves(10, 12)).save(twins / "x.png")
    Image.fromarray(two_halves(14, 12)).save(twins / "x.jpg")
    assert common.predict_images_in(twins, predictor(), fake_predict_batch, tmp_path / "t") == 2
    assert Image.open(tmp_path / "t" / "x_jpg_mask.png").size == (12, 14)
    assert Image.open(tmp_path / "t" / "x_png_mask.png").size == (12, 10)


def test_outputs_of_inputs_that_would_collide_get_distinct_names(tmp_path, capsys):
    # a.png -> a_png, a.jpg -> a_jpg, and a_png.bmp, whose own stem is a_png, -> a_png_2: every name is
    # decided before anything is written, so the run neither stops halfway nor overwrites an output
    images = tmp_path / "images"
    images.mkdir()
    for name, height in (("a.png", 10), ("a.jpg", 14), ("a_png.bmp", 18), ("A_PNG_2.tif", 22)):
        Image.fromarray(two_halves(height, 12)).save(images / name)
    assert common.predict_images_in(images, predictor(), fake_predict_batch, tmp_path / "out") == 4
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert {r["image"]: int(r["height"]) for r in rows} == {"a.png": 10, "a.jpg": 14, "a_png.bmp": 18,
                                                            "A_PNG_2.tif": 22}
    sizes = {p.name: Image.open(p).size[1] for p in (tmp_path / "out").glob("*_mask.png")}
    assert sizes == {"a_png_mask.png": 10, "a_jpg_mask.png": 14, "a_png_2_mask.png": 18, "A_PNG_2_2_mask.png": 22}
    with pytest.raises(common.UsageError, match="cannot create it"):  # an --out that cannot be made: one line
        (tmp_path / "file").write_text("x")
        common.predict_images_in(images, predictor(), fake_predict_batch, tmp_path / "file" / "out")
