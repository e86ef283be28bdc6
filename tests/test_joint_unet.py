"""Tests of joint_unet.py: losses on hand-computed values, the pre- and post-processing steps on
crafted masks (scipy as the reference), the U-Net geometry, where the gradients of Eq. 4 go, and
--quick runs end to end (compare = seg + cls + joint, transfer, a-sweep, eval-only, resume)."""
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ju = importlib.import_module("joint_unet")
common = importlib.import_module("common")

CLASSES = ["nevus", "melanoma", "seborrheic_keratosis"]


# --------------------------------------------------------------------------------------------
# Losses (Eq. 2, 3, 4, 12)
# --------------------------------------------------------------------------------------------

def test_class_weights_match_the_thesis_on_table_iii_counts():
    # Table III, training set: 1372 nevus, 374 melanoma, 254 seborrheic keratosis (N = 2000)
    labels = torch.cat([torch.full((1372,), 0), torch.full((374,), 1), torch.full((254,), 2)])
    weights = ju.class_weights(labels, 3)
    # Sec. XV.A: "Nevus has a weight of 0.486, Melanoma 1.783, Seborrheic Keratosis 2.625"
    assert weights.tolist() == pytest.approx([0.486, 1.783, 2.625], abs=5e-4)
    assert weights.tolist() == pytest.approx([2000 / (3 * 1372), 2000 / (3 * 374), 2000 / (3 * 254)], rel=1e-6)


def test_classification_loss_is_the_class_weighted_mean_of_eq_3():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    weights = torch.tensor([0.5, 1.0, 3.0])
    # by hand: -log softmax of the true class, weighted, divided by N = 2 (Keras class_weight)
    p0 = math.exp(2.0) / (math.exp(2.0) + 1 + math.exp(-1.0))
    p1 = 1.0 / (math.exp(0.5) + math.exp(1.5) + 1.0)
    expected = (0.5 * -math.log(p0) + 3.0 * -math.log(p1)) / 2
    assert ju.classification_loss(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)


def test_segmentation_loss_is_the_pixel_mean_binary_cross_entropy():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    masks = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = -(math.log(s(0.0)) + math.log(1 - s(2.0)) + math.log(1 - s(-1.0)) + math.log(s(3.0))) / 4
    assert ju.segmentation_loss(logits, masks).item() == pytest.approx(expected, rel=1e-6)


def test_joint_loss_weighs_segmentation_by_alpha_and_classification_by_one_minus_alpha():
    assert ju.joint_loss(torch.tensor(2.0), torch.tensor(10.0), 0.8).item() == pytest.approx(0.8 * 2 + 0.2 * 10)
    assert ju.task_alpha("seg", 0.3) == 1.0 and ju.task_alpha("cls", 0.3) == 0.0 and ju.task_alpha("joint", 0.3) == 0.3


# --------------------------------------------------------------------------------------------
# Model and gradients
# --------------------------------------------------------------------------------------------

def test_valid_unet_maps_572_to_388_and_the_head_sits_on_the_28x28_bottom():
    args = ju.resolve_defaults(ju.build_parser().parse_args(["--data", "isic2017", "--task", "joint"]))
    geometry = ju.network_geometry(args)  # real-data defaults: --size 388, valid padding
    assert geometry == {"input": 572, "output": 388, "bottleneck": 28}
    model = ju.MultiTaskUNet(3, 2, 4, "valid", 0.5, geometry["bottleneck"], 3, 8, 0.5).eval()
    with torch.no_grad():
        seg, cls = model(torch.randn(1, 3, 572, 572))
    assert seg.shape == (1, 388, 388) and cls.shape == (1, 3)
    # synthetic 64 px images: the smallest valid input whose output covers them
    assert ju.network_geometry(ju.resolve_defaults(ju.build_parser().parse_args(
        ["--unet-padding", "valid"]))) == {"input": 252, "output": 68, "bottleneck": 8}


def test_thesis_configuration_has_table_x_parameter_count():
    # width 32 (Table V), 3x3 pool on 28x28x512 -> 9x9x512, FC 1024: Table X's "50M" parameters
    model = ju.MultiTaskUNet(3, 32, 4, "valid", 0.5, 28, 3, 1024, 0.5)
    head = sum(p.numel() for p in model.classifier.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert head == 9 * 9 * 512 * 1024 + 1024 + 1024 * 3 + 3
    assert 49e6 < total < 51e6


def _grads(task, alpha):
    torch.manual_seed(0)
    geometry = {"input": 32, "output": 32, "bottleneck": 2}
    model = ju.MultiTaskUNet(3, 4, 4, "same", 0.5, 2, 2, 16, 0.5)
    images = torch.randn(4, 3, 32, 32)
    masks = (torch.rand(4, 32, 32) > 0.5).to(torch.uint8)
    loss, _, _ = ju.training_step(model, images, masks, torch.tensor([0, 1, 2, 0]), task, alpha,
                                  torch.ones(3), geometry)
    loss.backward()
    norm = lambda module: sum(0.0 if p.grad is None else p.grad.abs().sum().item()  # noqa: E731
                              for p in module.parameters())
    decoder = torch.nn.ModuleList([model.unet.ups, model.unet.head])
    return norm(model.classifier), norm(decoder), norm(model.unet.inc)


def test_alpha_one_leaves_the_classifier_without_gradient_and_alpha_zero_the_decoder():
    classifier, decoder, encoder = _grads("joint", 1.0)
    assert classifier == 0.0 and decoder > 0 and encoder > 0
    classifier, decoder, encoder = _grads("joint", 0.0)
    assert decoder == 0.0 and classifier > 0 and encoder > 0
    classifier, decoder, encoder = _grads("joint", 0.5)
    assert decoder > 0 and classifier > 0


# --------------------------------------------------------------------------------------------
# Pre-processing (Sec. VIII)
# --------------------------------------------------------------------------------------------

def test_mirror_padding_wider_than_the_image_matches_numpy_reflect():
    x = torch.randn(1, 1, 5, 7)
    padded = ju.mirror_pad(x, 13)[0, 0].numpy()
    np.testing.assert_allclose(padded, np.pad(x[0, 0].numpy(), 13, mode="reflect"))


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_valid_output_covers_exactly_the_scaled_image(mode):
    geometry = {"input": 252, "output": 68, "bottleneck": 8}
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x = ju.preprocess(images, mean, std, geometry, mode)
    assert x.shape == (2, 3, 252, 252)
    scaled = F.interpolate(common.normalize(images, mean, std), size=(68, 68), mode="bilinear", align_corners=False)
    torch.testing.assert_close(common.center_crop(x, 68, 68), scaled)
    if mode == "constant":  # the border is the mean image value (0 after normalisation)
        assert x[:, :, :92].abs().max() == 0 and x[:, :, :, -92:].abs().max() == 0
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:20, 30:50] = 1
    target = ju.target_masks(masks, geometry)
    assert target.shape == (1, 68, 68) and 0.9 * 200 * (68 / 64) ** 2 < target.sum() < 1.1 * 200 * (68 / 64) ** 2


# --------------------------------------------------------------------------------------------
# Post-processing (Sec. IX)
# --------------------------------------------------------------------------------------------

def test_closing_fills_speckles_and_matches_scipy():
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 4:16, 4:16] = True
    mask[0, 7, 7] = mask[0, 10, 11] = mask[0, 12, 9] = False  # speckles inside the lesion
    closed = ju.morphological_closing(mask, 3)
    expected = torch.zeros_like(mask)
    expected[0, 4:16, 4:16] = True
    assert torch.equal(closed, expected)
    rng = np.random.default_rng(0)
    random = rng.random((3, 24, 24)) > 0.6
    for k in (3, 5):
        ours = ju.morphological_closing(torch.from_numpy(random), k).numpy()
        structure = np.ones((1, k, k), bool)  # per image; outside the image neither grows nor erodes
        dilated = ndimage.binary_dilation(random, structure)
        reference = ndimage.binary_erosion(dilated, structure, border_value=1)
        np.testing.assert_array_equal(ours, reference)


def test_largest_connected_component_keeps_the_bigger_blob():
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 1:4, 1:4] = True    # 9 pixels
    mask[0, 8:14, 6:12] = True  # 36 pixels: kept
    mask[0, 15, 15] = True
    # second image: empty stays empty
    out = ju.largest_connected_component(mask)
    expected = torch.zeros_like(mask)
    expected[0, 8:14, 6:12] = True
    assert torch.equal(out, expected)
    # diagonal neighbours are one component (8-connectivity)
    diagonal = torch.zeros(1, 6, 6, dtype=torch.bool)
    diagonal[0, 0, 0] = diagonal[0, 1, 1] = diagonal[0, 2, 2] = True
    diagonal[0, 5, 5] = diagonal[0, 5, 4] = True
    assert ju.largest_connected_component(diagonal).sum() == 3


def test_fill_holes_fills_a_ring_and_matches_scipy():
    ring = torch.zeros(1, 12, 12, dtype=torch.bool)
    ring[0, 2:10, 2:10] = True
    ring[0, 4:8, 4:8] = False
    filled = ju.fill_holes(ring)
    expected = torch.zeros_like(ring)
    expected[0, 2:10, 2:10] = True
    assert torch.equal(filled, expected)
    # a lesion touching the border with a notch open to the border: not a hole
    open_notch = torch.zeros(1, 8, 8, dtype=torch.bool)
    open_notch[0, :, :5] = True
    open_notch[0, 0:3, 2] = False
    assert torch.equal(ju.fill_holes(open_notch), open_notch)
    rng = np.random.default_rng(1)
    random = rng.random((4, 40, 40)) > 0.45
    ours = ju.fill_holes(torch.from_numpy(random)).numpy()
    reference = np.stack([ndimage.binary_fill_holes(m) for m in random])  # 4-connected background
    np.testing.assert_array_equal(ours, reference)


def test_postprocess_and_resolution_restore_on_a_crafted_prediction():
    prob = torch.zeros(1, 34, 34)
    prob[0, 5:25, 5:25] = 0.9       # the lesion
    prob[0, 12:16, 12:16] = 0.2     # a dark interior hole: filled
    prob[0, 9, 20] = 0.3            # a speckle: closed
    prob[0, 29:32, 29:32] = 0.8     # a small foreign object: dropped (not the largest component)
    post = ju.postprocess(prob, 3)
    expected = torch.zeros(1, 34, 34, dtype=torch.bool)
    expected[0, 5:25, 5:25] = True
    assert torch.equal(post, expected)
    restored = ju.restore_resolution(post, 17)  # 34 -> 17: every second pixel
    assert restored.shape == (1, 17, 17)
    assert torch.equal(restored, expected[:, ::2, ::2])
    assert torch.equal(ju.restore_resolution(post, 34), post)


# --------------------------------------------------------------------------------------------
# End to end (--quick)
# --------------------------------------------------------------------------------------------

SEG_KEYS = {"jaccard", "jaccard_post"}
CLS_KEYS = {"balanced_accuracy", "accuracy"} | {f"{m}_{c}" for m in ("sensitivity", "specificity") for c in CLASSES}


def _results(folder):
    results = json.loads((Path(folder) / "results.json").read_text())
    assert results["script"] == "joint_unet"
    for value in results["metrics"].values():
        assert value is not None and math.isfinite(value)
    return results


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint_unet") / "compare"
    ju.main(["--quick", "--out", str(out)])
    return out


def test_quick_compare_writes_the_three_task_tables(compare_run):
    expected = {"seg": SEG_KEYS, "cls": CLS_KEYS, "joint": SEG_KEYS | CLS_KEYS | {"mean_performance"}}
    for task, keys in expected.items():
        results = _results(compare_run / task)
        assert set(results["metrics"]) == keys
        assert [row["row"] for row in results["table"]] == ["validation", "test"]
        for name in ("examples.png", "training_curves.png", ):
            assert (compare_run / task / "figures" / name).stat().st_size > 0
        for name in ("best.pt", "last.pt", "config.json", "log.jsonl", "results.md"):
            assert (compare_run / task / name).exists()
    joint = _results(compare_run / "joint")["metrics"]
    assert joint["mean_performance"] == pytest.approx((joint["balanced_accuracy"] + joint["jaccard_post"]) / 2)
    top = _results(compare_run)
    assert [row["row"] for row in top["table"]] == ["separate segmentation", "separate classification", "joint"]
    assert set(top["metrics"]) == expected["joint"]
    assert (compare_run / "figures" / "separate_vs_joint.png").stat().st_size > 0
    markdown = (compare_run / "results.md").read_text()
    for title in ("Table VI", "Table IX", "Table XIV", "Table XIII", "70.6", "64.1", "66.3", "59.6"):
        assert title in markdown


def test_quick_transfer_trains_only_the_classification_layers(compare_run, tmp_path):
    seg_checkpoint = compare_run / "seg" / "best.pt"
    ju.main(["--quick", "--transfer", str(seg_checkpoint), "--out", str(tmp_path / "transfer")])
    results = _results(tmp_path / "transfer")
    assert set(results["metrics"]) == SEG_KEYS | CLS_KEYS | {"mean_performance"}
    before = torch.load(seg_checkpoint, weights_only=True)["model"]
    after = torch.load(tmp_path / "transfer" / "best.pt", weights_only=True)["model"]
    for key, value in before.items():
        if key.startswith("unet."):  # frozen, BatchNorm statistics included
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("classifier."))
    # the segmentation is the transferred network's
    seg_results = _results(compare_run / "seg")["metrics"]
    assert results["metrics"]["jaccard_post"] == pytest.approx(seg_results["jaccard_post"])


def test_quick_alpha_sweep_writes_table_xi(tmp_path):
    ju.main(["--quick", "--alpha-sweep", "0.3,0.8", "--out", str(tmp_path / "sweep")])
    results = _results(tmp_path / "sweep")
    assert [row["row"] for row in results["table"]] == ["alpha=0.3", "alpha=0.8"]
    assert [row["alpha"] for row in results["table"]] == [0.3, 0.8]
    for row in results["table"]:
        assert row["epoch"] == 1 and math.isfinite(row["mean_performance"])
    assert "Table XI" in (tmp_path / "sweep" / "results.md").read_text()
    assert (tmp_path / "sweep" / "figures" / "alpha_sweep.png").stat().st_size > 0
    assert (tmp_path / "sweep" / "alpha_0.8" / "results.json").exists()


def test_quick_eval_only_reproduces_the_run_and_resume_continues(compare_run, tmp_path):
    joint = _results(compare_run / "joint")["metrics"]
    ju.main(["--quick", "--eval-only", "--checkpoint", str(compare_run / "joint" / "best.pt"),
             "--out", str(tmp_path / "eval")])
    again = _results(tmp_path / "eval")["metrics"]
    assert again == pytest.approx(joint)
    ju.main(["--quick", "--task", "cls", "--epochs", "2", "--resume", str(compare_run / "cls" / "last.pt"),
             "--out", str(tmp_path / "resumed")])
    epochs = [json.loads(line).get("epoch") for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [e for e in epochs if e is not None] == [2]


def test_quick_valid_unet_runs_end_to_end(tmp_path):
    ju.main(["--quick", "--task", "joint", "--unet-padding", "valid", "--out", str(tmp_path / "valid")])
    results = _results(tmp_path / "valid")
    assert set(results["metrics"]) == SEG_KEYS | CLS_KEYS | {"mean_performance"}
    config = json.loads((tmp_path / "valid" / "config.json").read_text())["args"]
    assert config["unet_padding"] == "valid" and config["size"] == 32
