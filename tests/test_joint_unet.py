"""Tests of joint_unet.py: losses on hand-computed values, the pre- and post-processing steps on
crafted masks (scipy as the reference), the U-Net geometry, where the gradients of Eq. 4 go, and
--quick runs end to end (compare = seg + cls + joint, transfer, a-sweep, eval-only, resume after an
interruption, flags refused when parsed)."""
import csv
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
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


def test_each_task_runs_only_its_branches_and_trains_on_their_loss():
    torch.manual_seed(0)
    images, masks = torch.randn(2, 3, 32, 32), (torch.rand(2, 32, 32) > 0.5).float()
    labels, weights = torch.tensor([0, 2]), torch.tensor([0.5, 1.0, 3.0])
    for task, keys in (("seg", ["seg"]), ("cls", ["cls"]), ("joint", ["cls", "seg"])):
        model = ju.MultiTaskUNet(3, 4, 4, "same", 0.5, 2, 2, 16, 0.5, branches=ju.BRANCHES[task]).eval()
        outputs = model(images)
        assert sorted(outputs) == keys
        losses = ju.branch_losses(outputs, masks, labels, weights)
        assert sorted(losses) == keys
        if "seg" in outputs:  # Eq. 2 and Eq. 3 on the branch's own output
            assert losses["seg"].item() == pytest.approx(ju.segmentation_loss(outputs["seg"], masks).item())
        if "cls" in outputs:
            assert losses["cls"].item() == pytest.approx(ju.classification_loss(outputs["cls"], labels, weights).item())
        # the training step's Eq. 4, a switched-off branch adding nothing: a single task trains on its own term
        loss = ju.joint_loss(losses.get("seg", 0.0), losses.get("cls", 0.0), ju.task_alpha(task, 0.8))
        expected = {"seg": lambda: losses["seg"], "cls": lambda: losses["cls"],
                    "joint": lambda: 0.8 * losses["seg"] + 0.2 * losses["cls"]}[task]()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Model and gradients
# --------------------------------------------------------------------------------------------

def test_valid_unet_maps_572_to_388_and_the_head_sits_on_the_28x28_bottom():
    args = ju.resolve_defaults(ju.build_parser().parse_args(["--data", "isic2017", "--task", "joint"]))
    geometry = ju.network_geometry(args.size, args.depth, args.unet_padding)  # real data: --size 388, valid
    assert geometry == {"input": 572, "output": 388, "bottleneck": 28}
    model = ju.MultiTaskUNet(3, 2, 4, "valid", 0.5, geometry["bottleneck"], 3, 8, 0.5).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 572, 572))
    assert outputs["seg"].shape == (1, 388, 388) and outputs["cls"].shape == (1, 3)
    # synthetic 64 px images: the smallest valid input whose output covers them
    args = ju.resolve_defaults(ju.build_parser().parse_args(["--unet-padding", "valid"]))
    assert ju.network_geometry(args.size, args.depth, "valid") == {"input": 252, "output": 68, "bottleneck": 8}


def _unet_parameters_by_hand(width, depth):
    """The original U-Net without BatchNorm, RGB in, one logit out: 3x3 convolutions with biases,
    2x2 up-convolutions, a final 1x1 convolution."""
    conv = lambda cin, cout, k: k * k * cin * cout + cout  # noqa: E731
    ch = [width * 2 ** level for level in range(depth + 1)]
    total = conv(3, ch[0], 3) + conv(ch[0], ch[0], 3)
    for level in range(depth):  # contracting path
        total += conv(ch[level], ch[level + 1], 3) + conv(ch[level + 1], ch[level + 1], 3)
    for level in reversed(range(depth)):  # expanding path: up-convolution to half, then two 3x3
        total += conv(ch[level + 1], ch[level + 1] // 2, 2)
        total += conv(ch[level + 1] // 2 + ch[level], ch[level], 3) + conv(ch[level], ch[level], 3)
    return total + conv(ch[0], 1, 1)


def test_thesis_unet_has_no_batchnorm_and_the_parameter_counts_of_tables_iv_v_x():
    args = ju.resolve_defaults(ju.build_parser().parse_args(["--data", "isic2017", "--task", "joint"]))
    assert args.batchnorm is False and args.width == 32 and args.pool == 3 and args.fc == 1024
    model, _ = ju.build_model(args, 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    unet = count(model.unet.parameters())
    assert unet == _unet_parameters_by_hand(32, 4) == 7_760_097
    assert f"{unet / 1e6:.0f}M" == "8M" and int(unet / 1e6) == 7  # Table V: "7M" (width 32)
    # Table IV's baseline, width 64: the original U-Net's 31M
    baseline = ju.thesis_unet(64, 4, "valid", batchnorm=False)
    assert count(baseline.parameters()) == _unet_parameters_by_hand(64, 4) == 31_031_745
    assert f"{count(baseline.parameters()) / 1e6:.0f}M" == "31M"
    head = count(model.classifier.parameters())
    # width 32 (Table V), 3x3 pool on 28x28x512 -> 9x9x512, FC 1024: Table VII's "42M" FC layer
    assert head == 9 * 9 * 512 * 1024 + 1024 + 1024 * 3 + 3
    assert f"{(unet + head) / 1e6:.0f}M" == "50M"  # Table X: the multi-task model's 50M parameters
    # the parameter count of the branches a task runs: seg = the U-Net, cls = encoder + head
    assert count(model.branch_parameters()) == unet + head
    model.branches = ju.BRANCHES["seg"]
    assert count(model.branch_parameters()) == unet
    model.branches = ju.BRANCHES["cls"]
    encoder = count(model.unet.inc.parameters()) + count(model.unet.downs.parameters())
    assert count(model.branch_parameters()) == encoder + head
    assert f"{encoder / 1e6:.1f}M" == "4.7M"  # Table VII prints 4.5M for the encoder
    # --batchnorm puts it back (after every convolution: 18 in the U-Net of depth 4)
    with_bn, _ = ju.build_model(ju.resolve_defaults(ju.build_parser().parse_args(
        ["--data", "isic2017", "--task", "seg", "--batchnorm"])), 3)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 18


def test_quick_fills_only_the_flags_left_unset():
    parse = lambda argv: ju.resolve_defaults(ju.build_parser().parse_args(argv))  # noqa: E731
    quick = parse(["--quick"])
    assert (quick.fc, quick.pool, quick.width, quick.size, quick.epochs) == (32, 2, 4, 32, 1)
    explicit = parse(["--quick", "--fc", "64", "--pool", "1", "--width", "6", "--size", "48", "--epochs", "3"])
    assert (explicit.fc, explicit.pool, explicit.width, explicit.size, explicit.epochs) == (64, 1, 6, 48, 3)
    assert parse([]).fc == 1024 and parse([]).pool == 3


def test_a_pool_larger_than_the_bottleneck_is_refused_not_clamped():
    with pytest.raises(common.UsageError, match="--pool 3 does not fit the 2x2 bottleneck"):  # 32 px: 2x2 bottom
        ju.resolve_defaults(ju.build_parser().parse_args(["--quick", "--pool", "3"]))
    with pytest.raises(common.UsageError, match="--size 40 must be divisible by 2"):
        ju.resolve_defaults(ju.build_parser().parse_args(["--quick", "--size", "40"]))
    with pytest.raises(ValueError):
        ju.ClassificationHead(64, 2, 3, pool=3)


def _valid_sides_step_by_step(n, depth):
    """The valid U-Net's sides by walking the layers: (bottleneck, output), or None if a map vanishes
    or a pooling meets an odd side."""
    side = n - 4
    for _ in range(depth):
        if side <= 0 or side % 2:
            return None
        side = side // 2 - 4
    bottleneck = side
    for _ in range(depth):
        if side <= 0:
            return None
        side = 2 * side - 4
    return (bottleneck, side) if bottleneck > 0 and side > 0 else None


def _valid_geometry(n, depth):
    """network_geometry's closed form for the valid U-Net of input n, or None where it refuses n."""
    try:
        return ju.network_geometry(8, depth, "valid", input_size=n)
    except ValueError:
        return None


def test_valid_geometry_closed_form_matches_the_layer_walk():
    for depth in (1, 2, 3, 4, 5):
        walked = {n: _valid_sides_step_by_step(n, depth) for n in range(1, 1200)}
        fitting = {n: sides for n, sides in walked.items() if sides is not None}
        closed = {n: g for n in range(1, 1200) if (g := _valid_geometry(n, depth))}
        for n, (bottleneck, output) in fitting.items():  # every input that fits is n = 2^d (b + 8) - 4
            assert closed[n]["bottleneck"] == bottleneck and closed[n]["output"] == output
            assert n == 2 ** depth * (bottleneck + 8) - 4 and output == 2 ** depth * (bottleneck - 4) + 4
            assert n - output == 12 * 2 ** depth - 8
        assert set(fitting) == set(closed)
        assert min(fitting) == 2 ** depth * ((3 if depth == 1 else 4) + 8) - 4
    # the smallest input whose output covers --size, for every size: the closed form's b is minimal
    outputs = {n: sides[1] for n in range(1, 700) if (sides := _valid_sides_step_by_step(n, 4))}
    for size in range(1, 400):  # (--size itself starts at 8)
        geometry = ju.network_geometry(size, 4, "valid")
        assert geometry["input"] == min(n for n, out in outputs.items() if out >= size)
        assert geometry["output"] == outputs[geometry["input"]]
    assert ju.network_geometry(388, 4, "valid", input_size=572) == {"input": 572, "output": 388, "bottleneck": 28}
    assert ju.network_geometry(64, 4, "valid", input_size=572)["output"] == 388  # the flag wins over the least
    with pytest.raises(common.UsageError, match="572"):
        ju.resolve_defaults(ju.build_parser().parse_args(["--unet-padding", "valid", "--input-size", "570"]))


def _grads(task, alpha):
    torch.manual_seed(0)
    model = ju.MultiTaskUNet(3, 4, 4, "same", 0.5, 2, 2, 16, 0.5, branches=ju.BRANCHES[task])
    images = torch.randn(4, 3, 32, 32)
    masks = (torch.rand(4, 32, 32) > 0.5).float()
    losses = ju.branch_losses(model(images), masks, torch.tensor([0, 1, 2, 0]), torch.ones(3))
    ju.joint_loss(losses.get("seg", 0.0), losses.get("cls", 0.0), ju.task_alpha(task, alpha)).backward()
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
    # the single tasks: the branch switched off never runs (no gradient), whatever --alpha says
    classifier, decoder, encoder = _grads("seg", 0.2)
    assert classifier == 0.0 and decoder > 0 and encoder > 0
    classifier, decoder, encoder = _grads("cls", 0.8)
    assert decoder == 0.0 and classifier > 0 and encoder > 0


# --------------------------------------------------------------------------------------------
# Learning-rate schedule (Sec. XV.A) and augmentation
# --------------------------------------------------------------------------------------------

def _keras_reduce_lr_on_plateau(losses, lr, factor, patience, min_delta=1e-4):
    """Keras' ReduceLROnPlateau.on_epoch_end (mode min, cooldown 0, min_lr 0), written out plainly:
    the learning rate in force after each epoch."""
    best, wait, out = math.inf, 0, []
    for loss in losses:
        if loss < best - min_delta:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                lr, wait = lr * factor, 0
        out.append(lr)
    return out


def _our_schedule(losses, patience=5):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    scheduler = ju.keras_reduce_lr_on_plateau(optimizer, 0.8, patience)
    out = []
    for loss in losses:
        scheduler.step(loss)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_learning_rate_drops_as_keras_reduce_lr_on_plateau():
    # a flat loss: Keras drops after 5 stale epochs, i.e. after epochs 6, 11, 16 (torch's own
    # ReduceLROnPlateau(patience=5) would drop after epochs 7, 13, 19)
    lrs = _our_schedule([1.0] * 18)
    drops = [epoch for epoch in range(2, 19) if lrs[epoch - 1] < lrs[epoch - 2]]
    assert drops == [6, 11, 16]
    assert lrs[-1] == pytest.approx(1e-3 * 0.8 ** 3)
    # a made-up loss curve: improvements, improvements below min_delta (1e-4, stale for Keras), plateaus
    losses = [1.0, 0.9, 0.95, 0.9, 0.89995, 0.91, 0.92, 0.85, 0.85, 0.86, 0.87, 0.849, 0.86, 0.86,
              0.86, 0.86, 0.86, 0.86, 0.86, 0.84, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85]
    expected = _keras_reduce_lr_on_plateau(losses, 1e-3, 0.8, 5)
    assert _our_schedule(losses) == pytest.approx(expected, rel=1e-12)
    assert len(set(expected)) == 4  # the sequence does exercise three drops
    assert _our_schedule(losses, patience=2) == pytest.approx(_keras_reduce_lr_on_plateau(losses, 1e-3, 0.8, 2))


def test_flips_and_right_angle_rotations_move_image_and_mask_together():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)  # no symmetry of its own
    mask = (image[0] > 127).to(torch.uint8)
    batch = {"images": image.expand(400, 3, 6, 6).clone(), "masks": mask.expand(400, 6, 6).clone()}
    generator = torch.Generator().manual_seed(1)
    out = ju.flips_and_right_angle_rotations(batch, generator)
    assert torch.equal(out["masks"], (out["images"][:, 0] > 127).to(torch.uint8))  # still aligned
    symmetries = {torch.rot90(t, k, (-2, -1)).numpy().tobytes()
                  for k in range(4) for t in (image, image.flip(-1))}
    seen = [x.numpy().tobytes() for x in out["images"]]
    assert set(seen) == symmetries and len(symmetries) == 8  # all 8, nothing else
    assert min(seen.count(s) for s in symmetries) > 25       # roughly uniform (50 expected)


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
    target = ju.resize(masks.float(), geometry["output"], "nearest")  # the training targets
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


class _AllLesion(torch.nn.Module):
    """A stand-in network that calls every pixel lesion."""

    def forward(self, x):
        return {"seg": torch.full((x.shape[0], x.shape[-2], x.shape[-1]), 10.0)}


def test_jaccard_of_letterboxed_images_counts_only_the_image_pixels():
    args = ju.resolve_defaults(ju.build_parser().parse_args(["--task", "seg", "--size", "16", "--pool", "1"]))
    truth = torch.zeros(2, 16, 16, dtype=torch.uint8)
    truth[:, 6:10] = 1                        # 64 lesion pixels
    valid = torch.zeros(2, 16, 16, dtype=torch.uint8)
    valid[:, 4:12] = 1                        # a wide image: rows 4..11 of the canvas hold it (128 pixels)
    split = {"images": torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "masks": truth, "valid": valid,
             "labels": torch.zeros(2, dtype=torch.long), "class_names": CLASSES}
    geometry = ju.network_geometry(args.size, args.depth, args.unet_padding)
    metrics, outputs = ju.evaluate(_AllLesion(), split, args, geometry, torch.zeros(3), torch.ones(3), "cpu")
    # every image pixel called lesion: JAC = 64 / 128, not 64 / 256 (the padding is not the image)
    assert metrics["jaccard_post"] == pytest.approx(50.0) and metrics["jaccard"] == pytest.approx(50.0)
    assert torch.equal(outputs["pred_post"], valid.bool())
    split["valid"] = None  # synthetic data: the whole canvas is the image
    assert ju.evaluate(_AllLesion(), split, args, geometry, torch.zeros(3), torch.ones(3),
                       "cpu")[0]["jaccard_post"] == pytest.approx(25.0)


# --------------------------------------------------------------------------------------------
# End to end (--quick)
# --------------------------------------------------------------------------------------------

SEG_KEYS = {"jaccard", "jaccard_post"}
CLS_KEYS = {"balanced_accuracy", "accuracy"} | {f"{m}_{c}" for m in ("sensitivity", "specificity") for c in CLASSES}
JOINT_KEYS = SEG_KEYS | CLS_KEYS | {"mean_performance"}


def with_se(keys):
    return keys | {f"{k}_se" for k in keys}


def _results(folder):
    results = json.loads((Path(folder) / "results.json").read_text())
    assert results["script"] == "joint_unet"
    for value in results["metrics"].values():
        assert value is not None and math.isfinite(value)
    return results


def _job(folder, row, seed=0):
    """A job's result.json metrics, split into (test metrics, everything else)."""
    metrics = json.loads((Path(folder) / f"{row}-seed{seed}" / "result.json").read_text())["metrics"]
    test = {k: v for k, v in metrics.items() if not k.startswith("val_") and k not in ("best_epoch", "class_names")}
    return test, metrics


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint_unet") / "compare"
    ju.main(["--quick", "--out", str(out)])
    return out


def test_quick_compare_writes_the_three_task_tables(compare_run):
    expected = {"seg": SEG_KEYS, "cls": CLS_KEYS, "joint": JOINT_KEYS}
    for task, keys in expected.items():
        test, metrics = _job(compare_run, task)
        assert set(test) == keys and metrics["best_epoch"] == 1 and metrics["class_names"] == CLASSES
        assert set(metrics) - set(test) - {"best_epoch", "class_names"} == {f"val_{k}" for k in keys}
        for name in (f"examples_{task}.png", f"training_curves_{task}.png"):
            assert (compare_run / "figures" / name).stat().st_size > 0
        for name in ("best.pt", "last.pt"):
            assert (compare_run / f"{task}-seed0" / name).exists()
        # the checkpoint knows its row's task (the run's own --task is compare)
        assert torch.load(compare_run / f"{task}-seed0" / "best.pt", weights_only=True)["spec"]["task"] == task
    for name in ("config.json", "log.jsonl", "results.md"):
        assert (compare_run / name).exists()
    logged = [json.loads(line) for line in (compare_run / "log.jsonl").read_text().splitlines()]
    assert [(r["row"], r["epoch"]) for r in logged if "epoch" in r] == [("seg", 1), ("cls", 1), ("joint", 1)]
    joint, _ = _job(compare_run, "joint")
    assert joint["mean_performance"] == pytest.approx((joint["balanced_accuracy"] + joint["jaccard_post"]) / 2)
    top = _results(compare_run)
    assert [row["row"] for row in top["table"]] == ["separate segmentation", "separate classification", "joint"]
    assert [row["task"] for row in top["table"]] == ["seg", "cls", "joint"]
    assert set(top["metrics"]) == with_se(JOINT_KEYS)
    assert top["metrics"]["jaccard_post"] == pytest.approx(joint["jaccard_post"])  # one seed: the joint model's
    assert top["metrics"]["jaccard_post_se"] == 0.0
    assert (compare_run / "figures" / "separate_vs_joint.png").stat().st_size > 0
    markdown = (compare_run / "results.md").read_text()
    for title in ("Table VI", "Table IX", "Table XIV", "Table XIII", "70.6", "64.1", "66.3", "59.6",
                  "joint (a = 0.8)", "this run's joint model: a = 0.8"):
        assert title in markdown


def test_quick_transfer_trains_only_the_classification_layers(compare_run, tmp_path):
    seg_checkpoint = compare_run / "seg-seed0" / "best.pt"
    ju.main(["--quick", "--transfer", str(seg_checkpoint), "--out", str(tmp_path / "transfer")])
    results = _results(tmp_path / "transfer")
    assert set(results["metrics"]) == with_se(JOINT_KEYS)
    assert [row["row"] for row in results["table"]] == ["joint"]
    before = torch.load(seg_checkpoint, weights_only=True)["model"]
    after = torch.load(tmp_path / "transfer" / "joint-seed0" / "best.pt", weights_only=True)["model"]
    for key, value in before.items():
        if key.startswith("unet."):  # frozen, BatchNorm statistics included
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("classifier."))
    # the segmentation is the transferred network's
    assert results["metrics"]["jaccard_post"] == pytest.approx(_job(compare_run, "seg")[0]["jaccard_post"])
    # a classification checkpoint has no segmentation to transfer
    with pytest.raises(common.UsageError, match="is cls"):
        ju.main(["--quick", "--transfer", str(compare_run / "cls-seed0" / "best.pt"), "--out", str(tmp_path / "no")])


def test_quick_alpha_sweep_writes_table_xi(tmp_path):
    ju.main(["--quick", "--alpha-sweep", "0.3,0.8", "--out", str(tmp_path / "sweep")])
    results = _results(tmp_path / "sweep")
    assert [row["row"] for row in results["table"]] == ["alpha=0.3", "alpha=0.8"]
    assert [row["alpha"] for row in results["table"]] == [0.3, 0.8]
    for row in results["table"]:
        assert row["best_epoch"] == 1 and math.isfinite(row["mean_performance"])
    # Table XII: the row with the best validation Mean Performance; its test numbers are the metrics
    best = max(results["table"], key=lambda row: row["val_mean_performance"])
    assert results["metrics"]["mean_performance"] == best["mean_performance"]
    markdown = (tmp_path / "sweep" / "results.md").read_text()
    assert "Table XI" in markdown and f"Table XII (best multi-task model): a = {best['alpha']:g}" in markdown
    assert (tmp_path / "sweep" / "figures" / "alpha_sweep.png").stat().st_size > 0
    for row in ("alpha=0.3", "alpha=0.8"):
        assert (tmp_path / "sweep" / f"{row}-seed0" / "result.json").exists()
        assert (tmp_path / "sweep" / "figures" / f"examples_{row}.png").exists()
    assert torch.load(tmp_path / "sweep" / "alpha=0.3-seed0" / "best.pt", weights_only=True)["spec"] == {
        "task": "joint", "alpha": 0.3}


def test_quick_eval_only_reproduces_the_run(compare_run, tmp_path):
    ju.main(["--quick", "--eval-only", "--checkpoint", str(compare_run / "joint-seed0" / "best.pt"),
             "--out", str(tmp_path / "eval")])
    again = _results(tmp_path / "eval")
    assert again["metrics"] == pytest.approx(_results(compare_run)["metrics"])
    assert again["config"]["task"] == "joint"  # the checkpoint's row, not the compare run's --task
    assert (tmp_path / "eval" / "figures" / "examples_joint.png").exists()


class Killed(Exception):
    """Stands in for kill -9 in the middle of a job."""


SEEDS_RUN = ["--quick", "--task", "joint", "--seeds", "0,1", "--epochs", "2"]  # two jobs of two epochs


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint_unet_seeds") / "seeds"
    ju.main(SEEDS_RUN + ["--out", str(out)])
    return out


def test_resume_after_an_interruption_in_the_second_job_ends_with_the_uninterrupted_table(seeds_run, tmp_path,
                                                                                          monkeypatch):
    save = common.save

    def save_then_die(job, epoch, *args, **kwargs):  # the second job dies right after its first epoch's save
        best = save(job, epoch, *args, **kwargs)
        if job.index == 1 and epoch == 1:
            raise Killed()
        return best

    monkeypatch.setattr(common, "save", save_then_die)
    with pytest.raises(Killed):
        ju.main(SEEDS_RUN + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(common, "save", save)
    cut = tmp_path / "cut"
    assert (cut / "joint-seed0" / "result.json").exists() and not (cut / "joint-seed1" / "result.json").exists()
    assert not (cut / "results.json").exists()
    ju.main(["--resume", str(cut)])  # the run's own arguments, from its config.json
    whole, resumed = _results(seeds_run), _results(cut)
    assert [r["per_seed"] for r in resumed["table"]] == [r["per_seed"] for r in whole["table"]]
    assert resumed["metrics"] == whole["metrics"]
    epochs = [(r["seed"], r["epoch"]) for r in map(json.loads, (cut / "log.jsonl").read_text().splitlines())
              if "epoch" in r]
    assert epochs == [(0, 1), (0, 2), (1, 1), (1, 2)]  # seed 0 not trained again, seed 1 continued


def test_batch_size_is_honoured_and_a_bad_one_refused_when_parsed(tmp_path, monkeypatch, capsys):
    parse = lambda argv: ju.resolve_defaults(ju.build_parser().parse_args(argv))  # noqa: E731
    assert [ju.batch_size_for(parse([]), t) for t in ju.TASKS] == [16, 16, 16]  # synthetic default
    real = parse(["--data", "isic2017"])
    assert [ju.batch_size_for(real, t) for t in ju.TASKS] == [2, 8, 8]  # Tables V, VIII, X
    assert [ju.batch_size_for(parse(["--data", "isic2017", "--batch-size", "3"]), t) for t in ju.TASKS] == [3, 3, 3]
    monkeypatch.chdir(tmp_path)  # the default --out would be runs/ here
    for bad in ("0", "-1"):  # 0 used to become 16 silently
        with pytest.raises(SystemExit) as exit_:
            common.cli(ju.main, ["--quick", "--batch-size", bad])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]  # argparse's usage lines aside
        assert exit_.value.code == 2 and "Traceback" not in err
        assert len(errors) == 1 and errors[0].endswith(f"error: argument --batch-size: must be >= 1, not {bad}")
        assert list(tmp_path.iterdir()) == []  # nothing written


def test_quick_valid_unet_runs_end_to_end(tmp_path):
    ju.main(["--quick", "--task", "joint", "--unet-padding", "valid", "--out", str(tmp_path / "valid")])
    results = _results(tmp_path / "valid")
    assert set(results["metrics"]) == with_se(JOINT_KEYS)
    config = json.loads((tmp_path / "valid" / "config.json").read_text())["args"]
    assert config["unet_padding"] == "valid" and config["size"] == 32


def test_quick_compile_trains_reloads_the_best_checkpoint_and_evaluates(tmp_path):
    if shutil.which("gcc") is None and shutil.which("cc") is None and shutil.which("clang") is None:
        pytest.skip("torch.compile's CPU backend (inductor) needs a C compiler; none on PATH")
    # depth 2 and one batch shape everywhere (12 images: 2 training steps, one evaluation batch per
    # split) keep inductor's compile time, which dominates, to one training and one evaluation graph
    ju.main(["--quick", "--task", "seg", "--depth", "2", "--batch-size", "12", "--compile", "--device", "cpu",
             "--out", str(tmp_path / "compiled")])
    results = _results(tmp_path / "compiled")
    assert set(results["metrics"]) == with_se(SEG_KEYS)
    saved = torch.load(tmp_path / "compiled" / "seg-seed0" / "best.pt", weights_only=True)["model"]
    assert saved and not any(k.startswith("_orig_mod.") for k in saved)  # plain keys: loads anywhere
    # the plain model evaluates the checkpoint to the same numbers
    ju.main(["--quick", "--eval-only", "--checkpoint", str(tmp_path / "compiled" / "seg-seed0" / "best.pt"),
             "--out", str(tmp_path / "plain")])
    assert _results(tmp_path / "plain")["metrics"] == pytest.approx(results["metrics"], abs=1e-4)


def test_eval_only_rebuilds_the_checkpoints_architecture(tmp_path):
    # trained with constant border padding, valid U-Net, width 2, a 3 px closing ...
    ju.main(["--quick", "--task", "seg", "--unet-padding", "valid", "--border-mode", "constant", "--width", "2",
             "--closing-size", "3", "--out", str(tmp_path / "trained")])
    # ... and evaluated with a command line that says none of it (same padding, mirror, width 4, 5 px)
    ju.main(["--quick", "--eval-only", "--checkpoint", str(tmp_path / "trained" / "seg-seed0" / "best.pt"),
             "--out", str(tmp_path / "evaluated")])
    used = json.loads((tmp_path / "evaluated" / "config.json").read_text())["args"]
    assert (used["border_mode"], used["unet_padding"], used["width"], used["closing_size"], used["task"]) == (
        "constant", "valid", 2, 3, "seg")
    assert _results(tmp_path / "evaluated")["metrics"] == pytest.approx(_results(tmp_path / "trained")["metrics"])


def test_quick_seeds_give_means_and_standard_errors_over_seeds(seeds_run):
    results = _results(seeds_run)
    (row,) = results["table"]
    assert results["seeds"] == row["seeds"] == [0, 1] and [entry["seed"] for entry in row["per_seed"]] == [0, 1]
    for key in ("jaccard_post", "balanced_accuracy", "mean_performance", "val_mean_performance"):
        # each seed's value is that seed's own model's (its result.json), and the mean and SE are by hand
        a, b = (_job(seeds_run, "joint", s)[1] for s in (0, 1))
        per_seed = [entry[key] for entry in row["per_seed"]]
        assert per_seed == pytest.approx([a[key], b[key]])
        assert row[key] == pytest.approx((per_seed[0] + per_seed[1]) / 2, rel=1e-5)
        assert row[f"{key}_se"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2, rel=1e-5)  # std(ddof=1) / sqrt(2)
    assert results["metrics"]["jaccard_post"] == row["jaccard_post"]
    assert results["metrics"]["jaccard_post_se"] == row["jaccard_post_se"]
    # the two seeds drew different synthetic data (the generator is seeded too)
    assert a != b
    markdown = (seeds_run / "results.md").read_text()
    assert "over 2 seeds" in markdown and f"{row['jaccard_post']:.1f} ± {row['jaccard_post_se']:.1f}" in markdown


# --------------------------------------------------------------------------------------------
# --predict and the library functions
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint_unet_predict") / "joint"
    ju.main(["--quick", "--task", "joint", "--epochs", "4", "--out", str(out)])
    return out / "joint-seed0"


def _user_images(folder):
    """Odd sizes and formats, a corrupt image and a text file; returns {file: (width, height)}."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (61, 97, 3), dtype=np.uint8)).save(folder / "wide.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (80, 50), dtype=np.uint8), mode="L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 4), dtype=np.uint8), mode="RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (33, 33, 3), dtype=np.uint8)).save(folder / "UPPER.BMP")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (folder / "notes.txt").write_text("not an image")
    return {"wide.jpg": (97, 61), "grey.png": (50, 80), "alpha.png": (30, 40), "UPPER.BMP": (33, 33)}


def test_quick_predict_writes_masks_maps_and_rows_for_a_folder(joint_run, tmp_path):
    sizes = _user_images(tmp_path / "images")
    ju.main(["--predict", str(tmp_path / "images"), "--checkpoint", str(joint_run / "best.pt"),
             "--out", str(tmp_path / "pred")])
    out = tmp_path / "pred"
    for name, (width, height) in sizes.items():
        stem = Path(name).stem
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 1}
        entropy = np.load(out / f"{stem}_entropy.npy")
        assert entropy.shape == (height, width) and entropy.dtype == np.float32
        assert np.all(entropy >= 0) and np.all(entropy <= 1 + 1e-6)  # bits of a binary prediction
        assert (out / f"{stem}_overlay.png").exists() and (out / f"{stem}_entropy.png").exists()
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "width", "height", "predicted_class"] + [f"p_{c}" for c in CLASSES]
    assert sorted(r["image"] for r in rows) == sorted(sizes)
    for r in rows:
        assert (int(r["width"]), int(r["height"])) == sizes[r["image"]]
        probabilities = [float(r[f"p_{c}"]) for c in CLASSES]
        assert sum(probabilities) == pytest.approx(1, abs=1e-4)
        assert r["predicted_class"] == CLASSES[int(np.argmax(probabilities))]
    errors = (out / "errors.txt").read_text()
    assert "broken.png" in errors and "notes.txt" not in errors
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))


def test_predict_refuses_another_scripts_checkpoint(joint_run, tmp_path):
    state = torch.load(joint_run / "best.pt", weights_only=True)
    torch.save({**state, "script": "uml"}, tmp_path / "uml_best.pt")
    with pytest.raises(common.CheckpointError, match="uml.py, not of joint_unet.py"):
        ju.main(["--predict", str(tmp_path), "--checkpoint", str(tmp_path / "uml_best.pt"),
                 "--out", str(tmp_path / "pred")])
    # as a command: one line on stderr, exit code 2, no traceback
    done = subprocess.run([sys.executable, str(Path(ju.__file__)), "--predict", str(tmp_path), "--checkpoint",
                           str(tmp_path / "uml_best.pt"), "--out", str(tmp_path / "pred2")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr and "uml.py" in done.stderr


def test_predicting_the_runs_own_test_images_gives_the_masks_of_its_evaluation(joint_run, tmp_path):
    predictor = ju.load_model(joint_run / "best.pt")
    args = predictor.args
    test = ju.load_data(args)["test"]
    folder = tmp_path / "test_images"
    folder.mkdir()
    for i in range(len(test["names"])):
        Image.fromarray(test["images"][i].permute(1, 2, 0).numpy()).save(folder / f"case_{i:03d}.png")
    ju.main(["--predict", str(folder), "--checkpoint", str(joint_run / "best.pt"), "--out", str(tmp_path / "pred")])
    metrics, outputs = ju.evaluate(predictor.model, test, args, predictor.extra["geometry"],
                                   *predictor.norm, "cpu")
    masks = np.stack([np.asarray(Image.open(tmp_path / "pred" / f"case_{i:03d}_mask.png"))
                      for i in range(len(test["names"]))])
    np.testing.assert_array_equal(masks, outputs["pred_post"].numpy().astype(np.uint8))
    assert 0 < masks.mean() < 1  # not a trivial all-skin or all-lesion answer
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["image"])
    probabilities = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probabilities, outputs["probs"].numpy(), atol=1e-5)
    # the same through the library call on the tensors themselves
    direct = ju.predict_batch(predictor, test["images"])
    assert torch.equal(direct["mask"].bool(), outputs["pred_post"])
    # and the evaluation's JAC is that of these masks
    truth = test["masks"] > 0
    assert 100 * common.jaccard(torch.from_numpy(masks).bool(), truth).mean().item() == pytest.approx(
        metrics["jaccard_post"])


def _isic2017_tree(root):
    """A tiny ISIC 2017 layout with wide (40 x 24) images, every class in every split."""
    rng = np.random.default_rng(3)
    splits = {"Training": 6, "Validation": 3, "Test_v2": 3}
    number = 0
    for tag, n in splits.items():
        rows = []
        for i in range(n):
            number += 1
            image_id = f"ISIC_{number:07d}"
            image = rng.integers(60, 120, (24, 40, 3), dtype=np.uint8)
            mask = np.zeros((24, 40), np.uint8)
            mask[6:18, 8 + i:30 - i] = 255
            image[mask > 0] //= 3                                   # a dark lesion
            (root / f"ISIC-2017_{tag}_Data").mkdir(parents=True, exist_ok=True)
            (root / f"ISIC-2017_{tag}_Part1_GroundTruth").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / f"ISIC-2017_{tag}_Data" / f"{image_id}.jpg", quality=95)
            Image.fromarray(mask).save(root / f"ISIC-2017_{tag}_Part1_GroundTruth" / f"{image_id}_segmentation.png")
            rows.append(f"{image_id},{float(i % 3 == 1)},{float(i % 3 == 2)}\n")
        (root / f"ISIC-2017_{tag}_Part3_GroundTruth.csv").write_text("image_id,melanoma,seborrheic_keratosis\n"
                                                                      + "".join(rows))
    return root


def test_quick_isic2017_layout_trains_the_thesis_unet_on_letterboxed_images(tmp_path):
    root = _isic2017_tree(tmp_path / "isic")
    ju.main(["--quick", "--data", "isic2017", "--root", str(root), "--task", "joint", "--cache", str(tmp_path / "cache"),
             "--out", str(tmp_path / "run")])
    results = _results(tmp_path / "run")
    assert set(results["metrics"]) == with_se(JOINT_KEYS)
    used = json.loads((tmp_path / "run" / "config.json").read_text())["args"]
    assert (used["batchnorm"], used["unet_padding"], used["size"]) == (False, "valid", 32)  # the thesis' U-Net
    predictor = ju.load_model(tmp_path / "run" / "joint-seed0" / "best.pt")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    # evaluation counts only the image's pixels: predictions on the letterbox padding are dropped
    data = common.load_dataset("isic2017", root=root, size=32, cache=tmp_path / "cache")
    _, outputs = ju.evaluate(predictor.model, data["test"], predictor.args, predictor.extra["geometry"],
                             *predictor.norm, "cpu")
    assert not (outputs["pred_post"] & ~data["test"]["valid"].bool()).any()
    # a wide user image comes back at its own size
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(np.full((24, 40, 3), 90, np.uint8)).save(folder / "wide.png")
    ju.main(["--predict", str(folder), "--checkpoint", str(tmp_path / "run" / "joint-seed0" / "best.pt"),
             "--out", str(tmp_path / "p")])
    assert np.asarray(Image.open(tmp_path / "p" / "wide_mask.png")).shape == (24, 40)
