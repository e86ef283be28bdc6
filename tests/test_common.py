"""Tests of the networks, metrics and run bookkeeping of common.py.

Metric values are either worked out by hand (in the comments) or compared with a second, plainly
written computation on scipy.ndimage (tests only; the project itself never imports scipy).
"""
import argparse
import io
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


def test_unet_valid_padding_maps_572_to_388():
    model = common.UNet(3, 2, width=2, depth=4, padding="valid")
    with torch.no_grad():
        features = model.encode(torch.zeros(1, 3, 572, 572))
        out = model.decode(features)
    # Ronneberger et al. 2015, Fig. 1: 568, 280, 136, 64 then a 28x28 bottleneck; 388x388 output.
    assert [f.shape[-1] for f in features] == [568, 280, 136, 64, 28]
    assert [f.shape[1] for f in features] == model.feature_channels == [2, 4, 8, 16, 32]
    assert out.shape == (1, 2, 388, 388)


@pytest.mark.parametrize("up_mode,residual", [("transpose", False), ("bilinear", True)])
def test_unet_same_padding_keeps_size(up_mode, residual):
    model = common.UNet(3, 4, width=4, depth=3, up_mode=up_mode, residual=residual, dropout=0.1)
    assert model(torch.zeros(2, 3, 37, 50)).shape == (2, 4, 37, 50)  # odd sizes too
    assert model.encode(torch.zeros(1, 3, 64, 64))[-1].shape == (1, 32, 8, 8)


def test_blocks_and_crop():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(common.center_crop(x, 2, 4), x[..., 2:4, 1:5])
    assert common.DoubleConv(3, 8, padding="valid")(torch.zeros(1, 3, 20, 20)).shape == (1, 8, 16, 16)
    assert common.ResidualBlock(3, 8)(torch.zeros(1, 3, 20, 20)).shape == (1, 8, 20, 20)
    assert common.Down(8, 16)(torch.zeros(1, 8, 20, 20)).shape == (1, 16, 10, 10)
    up = common.Up(16, 8, 8, padding="valid")
    assert up(torch.zeros(1, 16, 10, 10), torch.zeros(1, 8, 24, 24)).shape == (1, 8, 16, 16)
    with pytest.raises(ValueError):
        common.Down(8, 16, padding="valid", residual=True)


# --------------------------------------------------------------------------------------------------
# Overlap, calibration and classification metrics: hand-computed values
# --------------------------------------------------------------------------------------------------


def test_jaccard_and_dice_by_hand():
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]]])
    target = torch.tensor([[[1, 0, 1, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 0]]])
    # image 0: |P&T| = 1, |P|T| = 3, |P|+|T| = 4; image 1: both empty; image 2: empty prediction;
    # image 3: |P&T| = 3, |P|T| = 4, |P|+|T| = 7.
    assert torch.allclose(common.jaccard(pred, target), torch.tensor([1 / 3, 1.0, 0.0, 3 / 4], dtype=torch.float64))
    assert torch.allclose(common.dice(pred, target), torch.tensor([2 / 4, 1.0, 0.0, 6 / 7], dtype=torch.float64))
    assert common.pixel_accuracy(pred, target).tolist() == [0.5, 1.0, 0.75, 0.75]


def test_nll_and_brier_by_hand():
    prob = torch.tensor([[[0.8, 0.3]], [[1.0, 0.0]]])
    target = torch.tensor([[[1, 0]], [[1, 0]]])
    # Eq. 6: -(log 0.8 + log 0.7) / 2; a perfect prediction is clamped to eps, so ~ -log(1 - 1e-7).
    expected_nll = torch.tensor([-(math.log(0.8) + math.log(0.7)) / 2, -math.log(1 - 1e-7)], dtype=torch.float64)
    assert torch.allclose(common.nll(prob, target), expected_nll, atol=1e-9)
    # Eq. 7: ((0.2)^2 + (0.3)^2) / 2 = 0.065
    assert torch.allclose(common.brier(prob, target), torch.tensor([0.065, 0.0], dtype=torch.float64))


def test_expected_calibration_error_by_hand():
    confidence = [0.15, 0.25, 0.28, 0.95]
    correct = [1, 0, 1, 1]
    # 10 bins (i/10, (i+1)/10]: bin 1 {0.15} acc 1 conf 0.15; bin 2 {0.25, 0.28} acc 0.5 conf 0.265;
    # bin 9 {0.95} acc 1 conf 0.95.  ECE = (1*0.85 + 2*0.235 + 1*0.05) / 4 = 0.3425
    assert common.expected_calibration_error(confidence, correct, n_bins=10) == pytest.approx(0.3425)
    # 2 bins: (0, .5] acc 2/3 conf 0.68/3; (.5, 1] acc 1 conf 0.95 -> (3*|2/3-.68/3| + .05) / 4
    assert common.expected_calibration_error(confidence, correct, n_bins=2) == pytest.approx((2 - 0.68 + 0.05) / 4)


def test_classification_metrics_on_a_known_confusion_matrix():
    # rows = true, cols = predicted: [[3,1,0],[1,2,1],[0,0,2]]
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 0, 1, 1, 2, 2, 2])
    assert common.confusion_matrix(pred, target, 3).tolist() == [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
    sens, spec = common.sensitivity_specificity(pred, target, 3)
    # sensitivity = diag / row sum; specificity = TN / (N - row sum), TN = N - row - col + diag
    assert torch.allclose(sens, torch.tensor([3 / 4, 2 / 4, 2 / 2], dtype=torch.float64))
    assert torch.allclose(spec, torch.tensor([5 / 6, 5 / 6, 7 / 8], dtype=torch.float64))
    assert common.accuracy(pred, target) == pytest.approx(0.7)
    assert common.balanced_accuracy(pred, target, 3) == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # per-class F1 = 2TP / (row + col): 6/8, 4/7, 4/5; macro mean
    assert common.f1_score(pred, target, 3) == pytest.approx((0.75 + 4 / 7 + 0.8) / 3)
    # binary: TP = 2, FP = 1, FN = 1 -> F1 = 4 / 6
    assert common.f1_score(torch.tensor([1, 1, 1, 0, 0]), torch.tensor([1, 1, 0, 1, 0])) == pytest.approx(4 / 6)


def test_auroc_and_mean_and_se():
    # pairs (positive, negative): (0.35 vs 0.1) win, (0.35 vs 0.4) lose, 0.8 wins both -> 3/4
    assert common.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert common.auroc([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx(0.75)  # a tie counts 1/2
    assert math.isnan(common.auroc([0.1, 0.2], [1, 1]))
    mean, se = common.mean_and_se([1.0, 2.0, 3.0, math.inf])  # the inf is left out
    assert mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))
    assert common.mean_and_se([4.0]) == (4.0, 0.0)


def test_mean_and_se_in_float64_by_hand():
    # 0.1, 0.2, 0.4, 0.8: mean 0.375; deviations -0.275, -0.175, 0.025, 0.425; squares sum to 0.2875;
    # sample variance 0.2875 / 3; SE = sqrt(0.2875 / 3 / 4). Through float32 both are off by ~1e-8.
    for values in ([0.1, 0.2, 0.4, 0.8], np.array([0.1, 0.2, 0.4, 0.8]), torch.tensor([0.1, 0.2, 0.4, 0.8],
                                                                                      dtype=torch.float64)):
        mean, se = common.mean_and_se(values)
        assert mean == pytest.approx(0.375, rel=1e-12, abs=0)
        assert se == pytest.approx(math.sqrt(0.2875 / 3 / 4), rel=1e-12, abs=0)
    # 0.7, 0.8, 0.9 (one-element tensors, a nan left out): mean 0.8, std 0.1, SE 0.1 / sqrt(3)
    mean, se = common.mean_and_se([torch.tensor(0.7, dtype=torch.float64), 0.8, math.nan, 0.9])
    assert mean == pytest.approx(0.8, rel=1e-12, abs=0) and se == pytest.approx(0.1 / math.sqrt(3), rel=1e-12, abs=0)
    float32_se = torch.tensor([0.7, 0.8, 0.9]).double().std().item() / math.sqrt(3)
    assert abs(float32_se - 0.1 / math.sqrt(3)) > 1e-9  # what the float32 route used to give
    assert all(math.isnan(x) for x in common.mean_and_se([math.inf, math.nan]))


# --------------------------------------------------------------------------------------------------
# Surface distances against a plain scipy reference (MONAI's definition)
# --------------------------------------------------------------------------------------------------


def test_classification_metrics_from_probabilities():
    prob = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])   # predicts 0, 1, 0, 1
    labels = torch.tensor([0, 0, 1, 1])                                     # right, wrong, wrong, right
    uncertainty = torch.tensor([0.1, 0.5, 0.4, 0.2])                        # higher on both errors
    belief = prob * 0.5
    metrics = common.classification_metrics(prob, labels, uncertainty, belief)
    assert list(metrics) == ["acc", "f1", "f1_weighted", "uncertainty_auroc", "ece", "ece_belief"]
    assert metrics["acc"] == 0.5 and metrics["f1"] == pytest.approx(0.5) and metrics["f1_weighted"] == pytest.approx(0.5)
    assert metrics["uncertainty_auroc"] == 1.0                              # u ranks every error above every hit
    # ECE, 10 bins: 0.9 (right), 0.6 (wrong), 0.7 (wrong), 0.8 (right) -> (0.1 + 0.6 + 0.7 + 0.2) / 4
    assert metrics["ece"] == pytest.approx(0.4)
    assert metrics["ece_belief"] == pytest.approx((0.55 + 0.3 + 0.35 + 0.6) / 4)   # beliefs 0.45, 0.3, 0.35, 0.4
    assert list(common.classification_metrics(prob, labels)) == ["acc", "f1", "f1_weighted", "ece"]


def test_finite_mean_counts_undefined_values():
    # an ASSD of inf (one empty mask) is left out of the mean and counted; none finite gives nan
    assert common.finite_mean(torch.tensor([1.0, math.inf, 3.0, math.nan])) == (2.0, 2)
    mean, undefined = common.finite_mean([math.inf])
    assert math.isnan(mean) and undefined == 1
    assert common.finite_mean(torch.tensor([0.5, 1.0], dtype=torch.float64)) == (0.75, 0)


def reference_surface_distances(pred, target):
    """MONAI's get_mask_edges + get_surface_distance, written plainly with scipy."""
    edge_p = pred ^ ndimage.binary_erosion(pred)
    edge_t = target ^ ndimage.binary_erosion(target)
    return (ndimage.distance_transform_edt(~edge_t)[edge_p], ndimage.distance_transform_edt(~edge_p)[edge_t])


def check_against_reference(pred, target):
    hd = common.hausdorff(torch.from_numpy(pred), torch.from_numpy(target))
    hd95 = common.hausdorff(torch.from_numpy(pred), torch.from_numpy(target), percentile=95)
    mean = common.assd(torch.from_numpy(pred), torch.from_numpy(target))
    for n in range(len(pred)):
        d_pt, d_tp = reference_surface_distances(pred[n], target[n])
        assert hd[n].item() == pytest.approx(max(d_pt.max(), d_tp.max()), abs=1e-4)
        assert hd95[n].item() == pytest.approx(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)), abs=1e-4)
        assert mean[n].item() == pytest.approx(np.concatenate([d_pt, d_tp]).mean(), abs=1e-4)


def test_surface_distances_match_scipy_on_random_shapes():
    rng = np.random.default_rng(0)
    pred = ndimage.gaussian_filter(rng.random((5, 64, 72)), (0, 3, 3)) > 0.5
    target = ndimage.gaussian_filter(rng.random((5, 64, 72)), (0, 4, 4)) > 0.5
    pred[4] = rng.random((64, 72)) < 0.5  # a noisy mask: many boundary pixels (distance-transform path)
    pred[3, :, :10] = True  # touching the image border: border pixels are boundary pixels
    check_against_reference(pred, target)


def test_surface_distances_match_scipy_on_concentric_discs():
    yy, xx = np.mgrid[:96, :96]
    radius = np.sqrt((yy - 47.5) ** 2 + (xx - 47.3) ** 2)
    pred = np.stack([radius < r for r in (10, 20, 30)])
    target = np.stack([radius < r for r in (14, 21.5, 40)])
    check_against_reference(pred, target)
    # an annulus against a disc: the hole's boundary counts too
    check_against_reference(((radius < 30) & (radius > 12))[None], (radius < 25)[None])


def test_surface_distances_by_hand_and_empty_cases():
    pred = torch.zeros(4, 8, 8, dtype=torch.bool)
    target = torch.zeros(4, 8, 8, dtype=torch.bool)
    pred[0, 2, 2] = target[0, 5, 6] = True  # single pixels: every distance is sqrt(3^2 + 4^2) = 5
    target[1, 3, 3] = True  # image 1: empty prediction -> inf; image 2: both empty -> 0
    pred[3, 1:4, 1:4] = target[3, 1:4, 1:4] = True  # identical masks -> 0
    assert common.hausdorff(pred, target).tolist() == [5.0, math.inf, 0.0, 0.0]
    assert common.hausdorff(pred, target, percentile=95).tolist() == [5.0, math.inf, 0.0, 0.0]
    assert common.assd(pred, target).tolist() == [5.0, math.inf, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# Connected components and the GlaS object metrics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_equals_scipy_label(connectivity):
    rng = np.random.default_rng(connectivity)
    masks = rng.random((3, 60, 70)) < 0.45
    masks[2] = ndimage.gaussian_filter(rng.random((60, 70)), 2) > 0.5
    # a spiral-like snake: one component whose geodesic length is ~ the pixel count
    masks[1] = False
    masks[1, ::4, :] = True
    masks[1, 1::8, -1] = masks[1, 2::8, -1] = masks[1, 3::8, -1] = True
    masks[1, 5::8, 0] = masks[1, 6::8, 0] = masks[1, 7::8, 0] = True
    labels = common.label_components(torch.from_numpy(masks), connectivity)
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    assert labels.dtype == torch.int32
    for n in range(3):
        assert np.array_equal(labels[n].numpy(), ndimage.label(masks[n], structure)[0])  # same numbering
    assert common.label_components(torch.zeros(5, 5, dtype=torch.bool)).max() == 0  # [H,W] input, empty
    assert common.label_components(torch.ones(5, 5, dtype=torch.bool)).unique().tolist() == [1]


def test_object_dice_and_hausdorff_by_hand():
    gt = torch.zeros(10, 12, dtype=torch.int32)
    pred = torch.zeros(10, 12, dtype=torch.int32)
    gt[1:5, 1:5] = 1     # G1: 16 px, rows 1-4, cols 1-4
    gt[7:9, 9:11] = 2    # G2: 4 px, rows 7-8, cols 9-10, overlaps no predicted object
    pred[1:5, 2:6] = 5   # S1: 16 px, rows 1-4, cols 2-5, overlaps G1 on 12 px
    pred[7:9, 1:3] = 3   # S2: 4 px, rows 7-8, cols 1-2, overlaps no true object
    # Dice(S1, G1) = 2*12/32 = 0.75, weights 16/20 on both sides; unmatched objects score 0:
    # object Dice = 1/2 (0.8*0.75 + 0.2*0 + 0.8*0.75 + 0.2*0) = 0.6
    assert common.object_dice(pred, gt).item() == pytest.approx(0.6)
    # Hausdorff between pixel sets: H(S1, G1) = 1 (one column shifted).
    # S2 unmatched: H(S2, G1) = sqrt(6^2 + 2^2) = sqrt(40) (pixel (1,4) of G1 to (7,2) of S2),
    #   H(S2, G2) = 8 -> nearest is G1, sqrt(40).
    # G2 unmatched: H(G2, S1) = sqrt(6^2 + 7^2) = sqrt(85) ((1,2) of S1 to (7,9)), H(G2, S2) = 8 -> 8.
    # object Hausdorff = 1/2 [(0.8*1 + 0.2*sqrt(40)) + (0.8*1 + 0.2*8)] = 1.6 + 0.1*sqrt(40)
    assert common.object_hausdorff(pred, gt).item() == pytest.approx(1.6 + 0.1 * math.sqrt(40))
    empty = torch.zeros_like(gt)
    assert common.object_dice(torch.stack([empty, empty]), torch.stack([empty, gt])).tolist() == [1.0, 0.0]
    assert common.object_hausdorff(torch.stack([empty, empty]), torch.stack([empty, gt])).tolist() == [0.0, math.inf]


def reference_glas(pred, gt):
    """The GlaS challenge's ObjectDice.m / ObjectHausdorff.m, written plainly in numpy."""
    def hausdorff(a, b):
        pa, pb = np.argwhere(a), np.argwhere(b)
        d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
        return max(d.min(1).max(), d.min(0).max())

    def one_side(a_labels, b_labels):
        dice = haus = 0.0
        others = [j for j in np.unique(b_labels) if j]
        for i in [i for i in np.unique(a_labels) if i]:
            a = a_labels == i
            hits = b_labels[a][b_labels[a] > 0]
            weight = a.sum() / (a_labels > 0).sum()
            if len(hits):
                values, counts = np.unique(hits, return_counts=True)
                b = b_labels == values[counts.argmax()]
                dice += weight * 2 * (a & b).sum() / (a.sum() + b.sum())
                haus += weight * hausdorff(a, b)
            else:
                haus += weight * min(hausdorff(a, b_labels == j) for j in others)
        return dice, haus

    (d1, h1), (d2, h2) = one_side(pred, gt), one_side(gt, pred)
    return (d1 + d2) / 2, (h1 + h2) / 2


def test_object_metrics_match_the_glas_reference_on_random_glands():
    rng = np.random.default_rng(3)
    for _ in range(3):
        gt = ndimage.label(ndimage.gaussian_filter(rng.random((40, 44)), 2) > 0.52)[0]
        pred = ndimage.label(ndimage.gaussian_filter(rng.random((40, 44)), 2) > 0.52)[0] * 3  # any ids
        expected_dice, expected_haus = reference_glas(pred, gt)
        assert common.object_dice(torch.from_numpy(pred), torch.from_numpy(gt)).item() == pytest.approx(expected_dice)
        assert common.object_hausdorff(torch.from_numpy(pred), torch.from_numpy(gt)).item() == pytest.approx(expected_haus)


# --------------------------------------------------------------------------------------------------
# Run bookkeeping
# --------------------------------------------------------------------------------------------------


def make_args(out, **extra):
    parser = common.add_common_args(argparse.ArgumentParser(), size=32, epochs=2, batch_size=4, lr=0.05)
    args = parser.parse_args(["--out", str(out), "--device", "cpu", "--no-amp"])
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def test_common_args_and_run_folder(tmp_path):
    args = make_args(tmp_path / "run")
    assert (args.data, args.size, args.epochs, args.batch_size, args.lr) == ("synthetic", 32, 2, 4, 0.05)
    assert args.amp is False and args.log_every == 20 and args.cache == ".cache" and args.resume is None
    assert (args.seeds, args.n_train, args.n_val, args.n_test, args.predict, args.parallel) == (None,) * 6
    assert not (args.overwrite or args.recursive or args.debug)
    assert common.seed_list(args) == [0]
    parser = common.add_common_args(argparse.ArgumentParser(), size=32, epochs=2, batch_size=4, lr=0.05)
    parsed = parser.parse_args(["--seeds", "3,1,2", "--n-train", "10", "--n-val", "4", "--n-test", "5"])
    assert common.seed_list(parsed) == [3, 1, 2] and (parsed.n_train, parsed.n_val, parsed.n_test) == (10, 4, 5)
    for bad in ("1,x", "1,1"):
        with pytest.raises(SystemExit):  # argparse: message and exit code 2
            parser.parse_args(["--seeds", bad])
    run = common.Run(args, "toy.py")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["script"] == "toy" and config["args"]["lr"] == 0.05 and config["device"] == "cpu"
    assert config["world_size"] == 1 and config["parallel"] == "single" and run.is_main
    assert config["versions"]["torch"] == torch.__version__
    assert run.figures.is_dir()
    run.log({"epoch": 1, "loss": torch.tensor(0.5), "hd": math.inf})
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and record["loss"] == 0.5 and record["hd"] is None and "time" in record
    assert common.choose_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError, match="--device cuda"):
            common.choose_device("cuda")


def tiny_model():
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))


def train(run_dir, epochs, resume=None, stop_after=None, nan_at_step=None, reseed=0):
    """A tiny training loop written the way the scripts write theirs (Run, Progress, check_finite,
    checkpoint_state / restore_state, a torch.Generator for the shuffling)."""
    args = make_args(run_dir, log_every=2, resume=resume)
    common.seed_everything(reseed)
    data_rng = torch.Generator().manual_seed(123)
    x, y = torch.randn(24, 3, generator=data_rng), torch.randn(24, 1, generator=data_rng)
    common.seed_everything(args.seed)
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    shuffle = torch.Generator().manual_seed(args.seed)
    run = common.Run(args, "toy")
    start, best = 0, math.inf
    if resume is not None:
        start, best = common.restore_state(common.load_checkpoint(resume, "toy"), model, optimizer, scheduler,
                                           generator=shuffle)
    step = start * 6
    for epoch in range(start, epochs):
        progress = common.Progress(6, every=args.log_every, epoch=epoch + 1, min_interval=0.0, file=io.StringIO())
        for batch in torch.randperm(24, generator=shuffle).split(4):
            step += 1
            # the numpy and python generators feed a jitter, so their states must be restored too
            jitter = float(np.random.randn()) * 0.01 + random.random() * 0.01
            loss = ((model(x[batch] + jitter) - y[batch]) ** 2).mean()
            if step == nan_at_step:
                loss = loss * math.nan
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            mean = progress.step(loss, images=len(batch))
            if mean is not None:
                common.check_finite(mean, f"{step} (epoch {epoch + 1})", run)
        scheduler.step()
        best = min(best, mean)
        run.log({"epoch": epoch + 1, "loss": mean})
        run.save("last.pt", common.checkpoint_state(model, optimizer, scheduler, epoch + 1, best, args,
                                                    generator=shuffle))
        if stop_after == epoch + 1:
            break
    return model


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = train(tmp_path / "a", epochs=2)
    train(tmp_path / "b", epochs=2, stop_after=1)
    # a fresh process would start from other RNG states: scramble them before resuming
    resumed = train(tmp_path / "b", epochs=2, resume=tmp_path / "b" / "last.pt", reseed=999)
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    state = common.load_checkpoint(tmp_path / "b" / "last.pt", "toy")
    assert state["epoch"] == 2 and state["scheduler"]["last_epoch"] == 2 and state["args"]["lr"] == 0.05


def test_checkpoint_round_trip_and_refusal(tmp_path):
    args = make_args(tmp_path)
    run = common.Run(args, "uml")
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    common.seed_everything(5)
    path = run.save("last.pt", common.checkpoint_state(model, optimizer, None, 3, 0.25, args))
    after_save = (torch.rand(3), np.random.rand(), random.random())
    assert not list(tmp_path.glob("*.tmp"))
    # loads with weights_only=True (RNG states stored as tensors and plain lists)
    state = torch.load(path, weights_only=True)
    copy = tiny_model()
    copy_optimizer = torch.optim.SGD(copy.parameters(), lr=0.1, momentum=0.9)
    epoch, best = common.restore_state(common.load_checkpoint(path, "uml.py"), copy, copy_optimizer)
    assert (epoch, best) == (3, 0.25)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), copy.state_dict().values()))
    assert torch.equal(copy_optimizer.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(3), after_save[0])
    assert (np.random.rand(), random.random()) == after_save[1:]
    assert state["script"] == "uml"
    with pytest.raises(common.CheckpointError, match=r"uml\.py.*joint_unet\.py"):
        common.load_checkpoint(path, "joint_unet")
    with pytest.raises(common.CheckpointError, match="missing.pt"):
        common.load_checkpoint(tmp_path / "missing.pt", "uml")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(common.CheckpointError, match=r"cannot read checkpoint .*truncated\.pt \(corrupt or truncated"):
        common.load_checkpoint(truncated, "uml")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(common.CheckpointError, match="not a checkpoint written by this project"):
        common.load_checkpoint(tmp_path / "foreign.pt", "uml")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(common.NonFiniteLossError, match=r"step 10 \(epoch 2\)"):
        train(tmp_path, epochs=3, nan_at_step=9)  # detected at the log step after it (every 2 steps)
    state = common.load_checkpoint(tmp_path / "last.pt", "toy")
    assert state["epoch"] == 1  # the last good checkpoint, readable
    assert "non_finite_loss" in (tmp_path / "log.jsonl").read_text()
    with pytest.raises(common.NonFiniteLossError, match="step 7"):
        common.check_finite(torch.tensor([1.0, math.inf]), 7)
    assert common.check_finite(torch.tensor(2.5), 1) == 2.5


def test_progress_line():
    out = io.StringIO()
    progress = common.Progress(4, every=2, epoch=3, min_interval=0.0, file=out)
    returned = [progress.step(torch.tensor(v), images=8, wait_s=0.0) for v in (1.0, 2.0, 3.0, 5.0)]
    assert returned == [None, 1.5, None, 4.0]  # mean loss of each window, at the printed steps
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 3 step 2/4 loss 1.5000 img/s ") and "data-wait 0%" in lines[0]
    assert lines[1].startswith("epoch 3 step 4/4 loss 4.0000") and lines[1].endswith("eta 0:00")
    summary = progress.summary()
    assert summary["images_per_s"] > 0 and summary["data_wait_share"] == 0.0


def test_progress_report_and_timed_batches(tmp_path, capsys):
    import time as time_module

    def slow_batches():
        for i in range(3):
            time_module.sleep(0.02)       # the time a batch takes to make counts as waiting
            yield i

    waits = []
    for batch, wait in common.timed(slow_batches()):
        waits.append(wait)
        time_module.sleep(0.01)           # the caller's step does not
    assert len(waits) == 3 and all(0.015 < w < 0.5 for w in waits)
    assert list(common.timed([])) == [] and [b for b, _ in common.timed([4, 5])] == [4, 5]
    progress = common.Progress(2, every=10, file=io.StringIO())
    progress.step(torch.tensor(1.0), images=6, wait_s=0.0)
    args = argparse.Namespace(out=str(tmp_path / "run"), data="synthetic")
    run = common.Run(args, "toy", "cpu")
    speed = progress.report("bcs", run, row="bcs", seed=1)
    assert set(speed) == {"images_per_s", "data_wait_share", "steps", "seconds"} and speed["steps"] == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[bcs] ") and "img/s, data wait 0%" in line
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert (record["event"], record["row"], record["seed"], record["steps"]) == ("speed", "bcs", 1, 1)


def test_tables_and_results(tmp_path):
    rows = [{"row": "A", "dice": 0.8123, "hd": math.inf}, {"row": "B", "dice": 0.9, "hd": 4.25}]
    table = common.markdown_table(rows, ["row", "dice", "hd", "n"], formats={"dice": "{:.1%}"}, title="T")
    assert table == ("### T\n\n| row | dice | hd | n |\n|---|---|---|---|\n"
                     "| A | 81.2% | inf | – |\n| B | 90.0% | 4.25 | – |\n")
    assert common.fmt_mean_se(0.8213, 0.0042, percent=True) == "82.1 ± 0.4"
    assert common.fmt_mean_se(7.123, 0.31) == "7.12 ± 0.31"
    common.write_results(tmp_path, "uml.py", "synthetic", "test", {"dice": torch.tensor(0.5), "hd": math.inf},
                         rows, {"lr": 0.1, "out": tmp_path}, table)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"script", "data", "split", "seeds", "metrics", "table", "config"}
    assert results["seeds"] is None  # a config without seed or seeds
    assert results["script"] == "uml" and results["metrics"] == {"dice": 0.5, "hd": None}
    assert results["table"][1] == {"row": "B", "dice": 0.9, "hd": 4.25}
    assert (tmp_path / "results.md").read_text() == table


def test_row_metrics_drop_the_bookkeeping():
    per_row = {"A": [{"dice": 0.5, "seed": 0, "rank": 0}, {"dice": 0.7, "seed": 1, "rank": 0}]}
    row = common.summarize_rows(per_row)[0]
    assert common.row_metrics(row) == pytest.approx({"dice": 0.6, "dice_se": 0.1})
    assert common.fmt_over_seeds(row, "dice", digits=3) == "0.600 ± 0.100"


def test_figures(tmp_path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2)
    common.show_image(axes[0], torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8))
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:10, 4:10] = True
    common.draw_contours(axes[0], mask, "lime", label="truth")
    common.plot_uncertainty(axes[1], torch.rand(16, 16), title="entropy")
    paths = [common.save_figure(fig, tmp_path / "figures" / "sample.png")]
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "loss": 0.5}\n')
    paths.append(common.plot_curves(tmp_path / "log.jsonl", ["loss"], tmp_path / "curves.png"))
    paths.append(common.plot_reliability(torch.rand(100), torch.rand(100) < 0.5, tmp_path / "rel.png"))
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Errors, run folders that already hold a run, checkpoints of wrapped models
# --------------------------------------------------------------------------------------------------


def test_figure_helpers(tmp_path):
    import matplotlib.pyplot as plt
    labels = torch.tensor([1, 1, 0, 2, 0])
    assert common.pick_examples(5, 4, labels) == [2, 0, 3, 1]      # first of classes 0, 1, 2, then the rest
    assert common.pick_examples(5, 2) == [0, 1] and common.pick_examples(2, 5, torch.tensor([1, 1])) == [0, 1]
    fig, axes = plt.subplots(1, 2)
    disc, cup = torch.zeros(16, 16, dtype=torch.bool), torch.zeros(16, 16, dtype=torch.bool)
    disc[2:14, 2:14], cup[5:9, 5:9] = True, True
    common.show_with_contours(axes[0], torch.zeros(3, 16, 16), {"disc": disc, "cup": cup}, "truth", legend=True)
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["disc", "cup"]
    assert axes[0].get_title() == "truth"
    common.plot_bars(axes[1], ["a", "b", "u"], [0.2, 0.3, 0.5], ["tab:blue", "tab:blue", "tab:red"], "opinion")
    assert [round(p.get_height(), 6) for p in axes[1].patches] == [0.2, 0.3, 0.5]
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["a", "b", "u"]
    assert common.save_figure(fig, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_run_refuses_a_folder_that_holds_a_run(tmp_path):
    out = tmp_path / "run"
    run = common.Run(make_args(out), "toy")
    run.log({"epoch": 1})
    run.save("best.pt", {"model": {}})
    for name in ("config.json", "best.pt"):  # either file marks the folder as a run
        with pytest.raises(common.UsageError, match=r"already holds a run.*--resume .*last\.pt.*--overwrite"):
            common.Run(make_args(out), "toy")
        if name == "config.json":
            (out / "config.json").unlink()
    assert (out / "best.pt").exists() and (out / "log.jsonl").exists()  # nothing was touched
    common.Run(make_args(out, resume=str(out / "last.pt")), "toy")  # continuing that run is allowed
    assert (out / "log.jsonl").exists()
    with pytest.raises(common.UsageError):  # a checkpoint of another folder does not continue this one
        common.Run(make_args(out, resume=str(tmp_path / "other" / "last.pt")), "toy")
    common.Run(make_args(out, overwrite=True), "toy")  # --overwrite: the old run's files are gone
    assert not (out / "best.pt").exists() and not (out / "log.jsonl").exists() and (out / "config.json").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    common.Run(make_args(tmp_path / "empty"), "toy")  # a folder without a run is fine
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    def forward(self, x):
        return self.body(x)


def test_load_model_state_across_compile_and_ddp_prefixes():
    torch.manual_seed(0)
    source = TwoLayers()
    plain = source.state_dict()
    compiled_keys = {"_orig_mod." + k: v for k, v in plain.items()}      # torch.compile'd model's keys
    ddp_keys = {"module." + k: v for k, v in plain.items()}              # DistributedDataParallel's keys
    both = {"module._orig_mod." + k: v for k, v in plain.items()}
    for saved in (plain, compiled_keys, ddp_keys, both):
        for target in (TwoLayers(), torch.compile(TwoLayers())):  # compiling is lazy: no compiler needed
            common.load_model_state(target, saved)
            assert all(torch.equal(a, b) for a, b in zip(common._unwrap(target).state_dict().values(), plain.values()))
    with pytest.raises(RuntimeError, match="Missing key"):
        common.load_model_state(TwoLayers(), {"body.0.weight": plain["body.0.weight"]})
    # checkpoint_state of a compiled model saves plain keys; restore_state loads them into a compiled model
    state = common.checkpoint_state(torch.compile(source), None, None, 1, 0.0, {}, rng=False)
    assert set(state["model"]) == set(plain)
    target = torch.compile(TwoLayers())
    assert common.restore_state(state, target) == (1, 0.0)
    assert torch.equal(common._unwrap(target).body[0].weight, source.body[0].weight)


def test_restore_architecture(capsys):
    args = argparse.Namespace(width=8, padding="same", blocks=[1, 2], lr=0.1)
    checkpoint = {"args": {"width": 16, "padding": "same", "blocks": [1, 2], "lr": 0.5}}
    changed = common.restore_architecture(args, checkpoint, ["width", "padding", "blocks", "absent"])
    assert changed == {"width": (8, 16)}
    assert (args.width, args.padding, args.blocks, args.lr) == (16, "same", [1, 2], 0.1)  # lr not asked for
    assert not hasattr(args, "absent")
    assert capsys.readouterr().out.strip() == "--width: using the checkpoint's 16 (command line: 8)"


def test_fill_defaults_takes_the_first_table_that_has_the_key():
    args = argparse.Namespace(size=None, epochs=7, lr=None, width=None)
    common.fill_defaults(args, {"size": 32}, {"size": 256, "epochs": 100, "lr": 1e-4})
    assert (args.size, args.epochs, args.lr, args.width) == (32, 7, 1e-4, None)  # set values stay
    sizes = argparse.Namespace(n_train=12, n_val=None, n_test=0)
    assert common.synthetic_split_sizes(sizes) == {"n_train": 12, "n_test": 0}   # only the flags given
    assert common.synthetic_split_sizes(argparse.Namespace()) == {}


def test_starting_checkpoint(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path / "first"), data="synthetic", width=8, lr=0.1)
    run = common.Run(args, "toy", "cpu")
    run.save("last.pt", {"model": {}, "args": {"width": 16, "lr": 0.5}})
    fresh = argparse.Namespace(eval_only=False, checkpoint=None, resume=None, out=None, width=8)
    assert common.starting_checkpoint(fresh, "toy") is None and fresh.out is None
    resume = argparse.Namespace(eval_only=False, checkpoint=None, resume=str(run.path("last.pt")), out=None, width=8)
    assert common.starting_checkpoint(resume, "toy", keys=["width"])["args"]["width"] == 16
    assert resume.width == 16 and resume.out == str(tmp_path / "first")  # the interrupted run's folder
    with pytest.raises(common.UsageError, match="--eval-only needs --checkpoint"):
        common.starting_checkpoint(argparse.Namespace(eval_only=True, checkpoint=None, resume=None, out=None), "toy")
    evaluate = argparse.Namespace(eval_only=True, checkpoint=str(run.path("last.pt")), resume=None, out=None)
    assert common.starting_checkpoint(evaluate, "toy")["args"]["lr"] == 0.5 and evaluate.out is None
    with pytest.raises(common.CheckpointError, match="toy"):
        common.starting_checkpoint(evaluate, "other")


def test_best_checkpoint_keeps_last_and_best(tmp_path):
    run = common.Run(argparse.Namespace(out=str(tmp_path / "run"), data="synthetic"), "toy", "cpu")
    model = nn.Linear(2, 1)
    checkpoints = common.BestCheckpoint(run, "a-last.pt", "a-best.pt")
    for epoch, (value, score) in enumerate([(1.0, 0.5), (2.0, 0.7), (3.0, 0.6)]):
        nn.init.constant_(model.weight, value)
        checkpoints.save({"model": model.state_dict(), "epoch": epoch + 1}, score)
    assert checkpoints.best_score == 0.7
    assert common.load_checkpoint(run.path("a-best.pt"), "toy")["epoch"] == 2      # the best epoch
    assert common.load_checkpoint(run.path("a-last.pt"), "toy")["epoch"] == 3      # the last one
    assert checkpoints.load_best(model).weight.flatten().tolist() == [2.0, 2.0]    # in memory
    resumed = common.BestCheckpoint(run, "a-last.pt", "a-best.pt", best_score=0.7)
    resumed.save({"model": nn.Linear(2, 1).state_dict(), "epoch": 4}, 0.65)       # no better: best.pt stays
    nn.init.constant_(model.weight, 0.0)
    assert resumed.load_best(model).weight.flatten().tolist() == [2.0, 2.0]        # read from a-best.pt


def test_pretrained_weights_by_key_table(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    theirs = {"features.0.weight": torch.randn(2, 1, 3, 3), "features.0.bias": torch.randn(2),
              "features.1.weight": torch.rand(2), "features.1.bias": torch.rand(2),
              "features.1.running_mean": torch.rand(2), "features.1.running_var": torch.rand(2),
              "features.1.num_batches_tracked": torch.tensor(5), "fc.weight": torch.zeros(10, 2)}
    torch.save({"state_dict": theirs}, tmp_path / "w.pth")
    state = common.read_state_dict(tmp_path / "w.pth", "--weights")             # the wrapper is opened
    table = [("features.0", "0", "conv+bias"), ("features.1", "1", "bn")]
    assert common.load_pretrained(model, state, table, ("fc.",), "--weights") == 6
    assert torch.equal(model[0].weight, theirs["features.0.weight"])
    assert torch.equal(model[1].running_var, theirs["features.1.running_var"])
    with pytest.raises(common.UsageError, match="'fc.weight'"):                 # a key with no place
        common.load_pretrained(model, state, table, (), "--weights")
    with pytest.raises(RuntimeError, match="key table misses"):                # a table that forgets our bn
        common.load_pretrained(model, state, table[:1], ("fc.", "features.1."), "--weights")
    (tmp_path / "bad.pth").write_bytes(b"not a file torch can read")
    with pytest.raises(common.UsageError, match="--weights .*bad.pth: cannot read it"):
        common.read_state_dict(tmp_path / "bad.pth", "--weights")
    torch.save({"a": 1}, tmp_path / "numbers.pth")
    with pytest.raises(common.UsageError, match="not a state dict of tensors"):
        common.read_state_dict(tmp_path / "numbers.pth", "--weights")


def test_cli_turns_expected_errors_into_one_message(capsys, monkeypatch):
    monkeypatch.delenv("COMMON_DEBUG", raising=False)

    def failing(error):
        def main(argv=None):
            raise error
        return main

    for error in (common.UsageError("--eval-only needs --checkpoint PATH"),
                  common.CheckpointError("x.pt is a checkpoint of uml.py, not of joint_unet.py"),
                  common.DatasetError("glas: dataset folder /nope does not exist"),
                  common.NonFiniteLossError("loss is nan at step 7")):
        with pytest.raises(SystemExit) as exit_info:
            common.cli(failing(error), [])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith(f"error: {error}\n") and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(common.UsageError):  # --debug: the traceback comes back
        common.cli(failing(common.UsageError("bad")), ["--debug"])
    monkeypatch.setenv("COMMON_DEBUG", "1")
    with pytest.raises(common.CheckpointError):
        common.cli(failing(common.CheckpointError("bad")), [])
    monkeypatch.delenv("COMMON_DEBUG")
    with pytest.raises(ZeroDivisionError):  # unexpected errors keep their traceback
        common.cli(failing(ZeroDivisionError("bug")), [])
    seen = []
    common.cli(lambda argv=None: seen.append(argv), ["--quick"])
    assert seen == [["--quick"]]


def test_cli_removes_a_new_run_folder_that_failed_before_writing_anything(tmp_path, capsys):
    def main_failing_after(write):
        def main(argv=None):
            run = common.Run(argparse.Namespace(out=str(tmp_path / "run"), device="cpu"), "toy")
            write(run)
            raise common.DatasetError("refuge: dataset folder /nope does not exist")
        return main

    with pytest.raises(SystemExit):  # only config.json and an empty figures/: removed, the command can be rerun
        common.cli(main_failing_after(lambda run: None), [])
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")  # a folder that was there keeps what it held
    with pytest.raises(SystemExit):
        common.cli(main_failing_after(lambda run: None), [])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit):  # a run that logged or saved something keeps its folder
        common.cli(main_failing_after(lambda run: run.log({"epoch": 1})), [])
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "log.jsonl").exists()
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------
# Tables over seeds, and torchrun (rows shared out; one model data-parallel)
# --------------------------------------------------------------------------------------------------


def test_current_job_names_each_seeds_files_apart(tmp_path):
    run = common.Run(make_args(tmp_path / "run"), "toy")
    seen = []

    def train_and_evaluate(row, seed):
        job = common.current_job()
        seen.append(tuple(job))
        if row == "outer":  # a run_rows nested in a job sees its own job, then the outer one again
            inner = common.run_rows([("inner", 7)], lambda r, s: {"x": float(tuple(common.current_job()) == (r, s, 0))})
            assert inner["inner"][0]["x"] == 1.0 and common.current_job() == job
        run.save(f"{job.row}-seed{job.seed}-best.pt", {"seed": seed, "row": row})
        run.log({"row": row, "epoch": 1})  # gets the job's seed
        return {"x": 1.0}

    jobs = [("A", 0), ("A", 1), ("outer", 3)]
    common.run_rows(jobs, train_and_evaluate, run)
    assert seen == [("A", 0, 0), ("A", 1, 1), ("outer", 3, 2)] and common.current_job() is None
    for row, seed in jobs:  # the two seeds of row A wrote two files, each its own
        state = common.load_checkpoint(run.path(f"{row}-seed{seed}-best.pt"), "toy")
        assert (state["row"], state["seed"]) == (row, seed)
    records = [json.loads(line) for line in run.path("log.jsonl").read_text().splitlines()]
    assert [(r["row"], r["seed"]) for r in records if r.get("epoch") == 1] == [("A", 0), ("A", 1), ("outer", 3)]
    run.log({"row": "after"})
    assert "seed" not in json.loads(run.path("log.jsonl").read_text().splitlines()[-1])


def test_run_rows_and_summarize_rows_by_hand(tmp_path):
    calls = []

    def train_and_evaluate(row, seed):
        calls.append((row, seed))
        draw = torch.rand(1).item()  # run_rows seeds every generator with the job's seed first
        torch.manual_seed(seed)
        assert draw == torch.rand(1).item()
        dice = {("A", 0): 0.80, ("A", 1): 0.90, ("A", 2): 0.70, ("B", 0): 0.50, ("B", 1): 0.60, ("B", 2): 0.40}
        hd = math.inf if (row, seed) == ("B", 2) else 2.0 + seed
        return {"dice": dice[(row, seed)], "hd": torch.tensor(hd), "epochs": 3, "task": "seg",
                "note": f"seed {seed}"}

    run = common.Run(make_args(tmp_path / "run"), "toy")
    jobs = [(row, seed) for row in ("A", "B") for seed in (2, 0, 1)]
    per_row = common.run_rows(jobs, train_and_evaluate, run)
    assert calls == jobs and list(per_row) == ["A", "B"]
    assert [e["seed"] for e in per_row["A"]] == [2, 0, 1] and {e["rank"] for e in per_row["B"]} == {0}
    table = common.summarize_rows(per_row)
    a, b = table
    # A: dice 0.70, 0.80, 0.90 -> mean 0.80, sample std 0.10, SE 0.10 / sqrt(3) = 0.057735
    assert a["row"] == "A" and a["dice"] == pytest.approx(0.80) and a["dice_se"] == pytest.approx(0.1 / math.sqrt(3))
    # A: hd 4, 2, 3 -> mean 3, std 1, SE 1/sqrt(3)
    assert a["hd"] == pytest.approx(3.0) and a["hd_se"] == pytest.approx(1 / math.sqrt(3)) and "hd_undefined" not in a
    # B: hd inf (seed 2), 2, 3 -> mean of the two defined values 2.5, std 0.7071, SE 0.5; one undefined
    assert b["hd"] == pytest.approx(2.5) and b["hd_se"] == pytest.approx(0.5) and b["hd_undefined"] == 1
    assert b["dice"] == pytest.approx(0.5) and b["dice_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert a["epochs"] == 3 and a["epochs_se"] == 0.0 and a["task"] == "seg" and "note" not in a
    assert a["seeds"] == [2, 0, 1] and a["rank"] == [0, 0, 0] and a["per_seed"][1]["dice"] == 0.80
    assert common.fmt_over_seeds(a, "dice", percent=True) == "80.0 ± 5.8"
    assert common.fmt_over_seeds({"row": "x", "seeds": [0], "dice": 0.8, "dice_se": 0.0}, "dice", percent=True) == "80.0"
    jobs_logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["row"], r["seed"]) for r in jobs_logged] == jobs
    common.write_results(tmp_path / "run", "toy", "synthetic", "test", {}, table, {"seed": 0, "seeds": [2, 0, 1]}, "t")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["seeds"] == [2, 0, 1]  # results.json records the seeds of the table
    written = results["table"]
    assert written[1]["per_seed"][0]["hd"] is None and written[0]["per_seed"][2]["seed"] == 1


TORCHRUN_PROGRAM = '''
# A table's rows (rows mode), then one model data-parallel (data mode), in one torchrun launch.
import argparse, sys
sys.path.insert(0, {root!r})
import torch
import torch.nn as nn
import common

torch.set_num_threads(1)
modes, out = sys.argv[1].split(","), sys.argv[2]
parser = common.add_common_args(argparse.ArgumentParser(), size=8, epochs=1, batch_size=8, lr=0.1)


def toy_model():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))


def fit(model, x, y, steps, dist=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        part = common.shard({{"x": x, "y": y}}, dist) if dist is not None else {{"x": x, "y": y}}
        loss = ((model(part["x"]) - part["y"]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


args = parser.parse_args(["--device", "cpu", "--seeds", "0,1,2", "--out", out + "/rows"])
dist = common.init_distributed(args, n_jobs=6)  # rows mode: 2 rows x 3 seeds
if "rows" in modes:
    run = common.Run(args, "toy")

    def job(row, seed):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 3, generator=gen), torch.randn(16, 1, generator=gen)
        model = fit(toy_model(), x, y * (2.0 if row == "b" else 1.0), steps=5)
        sub = common.Run(argparse.Namespace(out=f"{{out}}/rows/{{row}}-seed{{seed}}", device="cpu"), "toy")
        sub.save("best.pt", common.checkpoint_state(model, None, None, 1, 0.0, {{}}, rng=False))
        back = common.load_checkpoint(sub.path("best.pt"), "toy")["model"]  # written by this job's rank
        # the job's own files in the ONE run folder made by rank 0: this job's rank writes them
        assert run.is_main and common.current_job()[:2] == (row, seed)
        run.save(f"{{row}}-seed{{seed}}-best.pt", common.checkpoint_state(model, None, None, 1, 0.0, {{}}, rng=False))
        for k in range(20):  # long lines from both ranks at once into one log.jsonl
            run.log({{"row": row, "event": "trained", "rank": dist.rank, "k": k, "pad": "x" * 10000}})
        return {{"loss": ((model(x) - y) ** 2).mean().item(), "w": back["0.weight"][0, 0].item()}}

    per_row = common.run_rows([(r, s) for r in ("a", "b") for s in common.seed_list(args)], job, run)
    assert run.is_main == (dist.rank == 0) and common.current_job() is None  # the run's files: rank 0
    common.write_results(run.dir, "toy", "synthetic", "test", {{}}, common.summarize_rows(per_row), args, "rows")
if "data" in modes:
    dist.mode = "data"  # what init_distributed picks for a run of one job (or --parallel data)
    args.out = out + "/ddp"
    torch.manual_seed(0)
    model = common.wrap_data_parallel(toy_model(), dist)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)
    fit(model, x, y, steps=3, dist=dist)
    run = common.Run(args, "toy")
    run.save("last.pt", common.checkpoint_state(model, None, None, 3, 0.0, args, rng=False))
    state = common.load_checkpoint(run.path("last.pt"), "toy")  # every rank reads it after the save
    common.write_results(run.dir, "toy", "synthetic", "test", {{"rank_read": dist.rank}}, [], args, "data")
'''


def test_torchrun_rows_equal_one_process_and_data_parallel_equals_whole_batch(tmp_path, monkeypatch):
    import os
    import runpy
    import subprocess
    program = tmp_path / "toy_program.py"
    program.write_text(TORCHRUN_PROGRAM.format(root=str(Path(common.__file__).resolve().parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(program), "rows,data", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the same table in this (single) process
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", [str(program), "rows", str(tmp_path / "one")])
    runpy.run_path(str(program), run_name="__main__")
    assert common._DIST["dist"].mode == "single"

    one = json.loads((tmp_path / "one" / "rows" / "results.json").read_text())["table"]
    two = json.loads((tmp_path / "two" / "rows" / "results.json").read_text())["table"]
    assert len(one) == len(two) == 2
    for r1, r2 in zip(one, two):
        for key in ("row", "loss", "loss_se", "w", "w_se", "seeds"):
            assert r1[key] == r2[key]  # bitwise: same seeds, same thread count
        assert [{k: v for k, v in e.items() if k != "rank"} for e in r1["per_seed"]] == \
               [{k: v for k, v in e.items() if k != "rank"} for e in r2["per_seed"]]
    # jobs (a,0) (a,1) (a,2) (b,0) (b,1) (b,2) -> ranks i % 2
    assert two[0]["rank"] == [0, 1, 0] and two[1]["rank"] == [1, 0, 1] and one[0]["rank"] == [0, 0, 0]
    config = json.loads((tmp_path / "two" / "rows" / "config.json").read_text())
    assert config["world_size"] == 2 and config["parallel"] == "rows"
    assert len(list((tmp_path / "two" / "rows").glob("*/best.pt"))) == 6  # each job's rank wrote its sub-run
    for row, seed in [(r, s) for r in "ab" for s in (0, 1, 2)]:  # and its own checkpoint in the run folder
        state = common.load_checkpoint(tmp_path / "two" / "rows" / f"{row}-seed{seed}-best.pt", "toy")
        assert state["epoch"] == 1
    log = [json.loads(line) for line in (tmp_path / "two" / "rows" / "log.jsonl").read_text().splitlines()]
    trained = [(r["row"], r["seed"], r["rank"], r["k"]) for r in log if r.get("event") == "trained"]
    assert all(len(r["pad"]) == 10000 for r in log if r.get("event") == "trained")  # no line cut into
    expected = [(r, s, (3 * "ab".index(r) + i) % 2, k) for r in "ab" for i, s in enumerate((0, 1, 2)) for k in range(20)]
    assert sorted(trained) == sorted(expected)  # rank 1's jobs logged too, each line whole
    assert [(r["row"], r["seed"], r["rank"]) for r in log if r.get("event") == "job"] == \
           [(r, s, (3 * "ab".index(r) + i) % 2) for r in "ab" for i, s in enumerate((0, 1, 2))]

    config = json.loads((tmp_path / "two" / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2 and config["parallel"] == "data"
    assert json.loads((tmp_path / "two" / "ddp" / "results.json").read_text())["metrics"] == {"rank_read": 0}
    weights = common.load_checkpoint(tmp_path / "two" / "ddp" / "last.pt", "toy")["model"]
    # the same 3 SGD steps in one process on the whole batch of 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert set(weights) == set(model.state_dict())  # saved without DDP's "module." prefix
    for key, value in model.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
    assert sum((weights[k] - v).abs().sum() for k, v in initial.items()) > 1e-3  # the steps did train


def test_shard_slices_per_image_entries():
    batch = {"images": torch.arange(10), "names": list("abcdefghij"), "size": 32}
    parts = [common.shard(batch, common.Dist(rank=r, world_size=3, mode="data")) for r in range(3)]
    assert [p["images"].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert parts[1]["names"] == ["e", "f", "g"] and parts[2]["size"] == 32
    assert common.shard(batch, common.Dist(rank=1, world_size=3, mode="rows")) is batch


def test_readme_test_command_is_what_ci_runs():
    root = Path(common.__file__).resolve().parent
    command = "python -m pip install -r requirements.txt pytest scipy && python -m pytest -q"
    assert f"```bash\n{command}\n```" in (root / "README.md").read_text(encoding="utf-8")
    assert f"TEST_COMMAND='{command}'" in (root / ".ci" / "run").read_text(encoding="utf-8")
    requirements = (root / "requirements.txt").read_text(encoding="utf-8")
    assert "scipy" not in requirements and "pytest" not in requirements  # test-only, not run-time


# --------------------------------------------------------------------------------------------------
# Predict glue: a script's load_model and --predict
# --------------------------------------------------------------------------------------------------


def test_predictor_from_checkpoint_and_run_predict(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    trained = nn.Conv2d(3, 2, 1)
    checkpoint = {"model": trained.state_dict(), "args": {"size": 16, "amp": False},
                  "normalization": [torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.25)],
                  "class_names": ["a", "b"], "mask_names": ["background", "object"]}
    predictor = common.predictor_from_checkpoint(checkpoint, nn.Conv2d(3, 2, 1), "cpu", keep_aspect=False, tag=7)
    assert torch.equal(predictor.model.weight, trained.weight) and not predictor.model.training
    assert predictor.size == 16 and predictor.args.amp is False and predictor.extra == {"tag": 7}
    assert predictor.norm[0].dtype == torch.float32 and predictor.norm[1].tolist() == [0.25] * 3
    assert (predictor.class_names, predictor.mask_names, predictor.keep_aspect) == (["a", "b"], ["background", "object"], False)

    def load_model(path, device):
        assert path == "ckpt.pt" and torch.device(device).type == "cpu"
        return predictor

    def predict_batch(p, images):
        x = (images.float() / 255 - p.norm[0].view(1, 3, 1, 1)) / p.norm[1].view(1, 3, 1, 1)
        return {"mask": p.model(x).argmax(1), "maps": {}, "rows": [{"n": i} for i in range(len(images))]}

    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((9, 12, 3), dtype=np.uint8)).save(tmp_path / "in" / "x.png")
    args = argparse.Namespace(predict=str(tmp_path / "in"), checkpoint="ckpt.pt", out=str(tmp_path / "out"),
                              device="cpu", recursive=False, batch_size=4)
    assert common.run_predict(args, load_model, predict_batch, "toy.py") == 1
    assert np.asarray(Image.open(tmp_path / "out" / "x_mask.png")).shape == (9, 12)
    with pytest.raises(common.UsageError, match=r"--predict needs --checkpoint PATH \(a best.pt of toy.py\)"):
        common.run_predict(argparse.Namespace(**{**vars(args), "checkpoint": None}), load_model, predict_batch, "toy")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "y.png").write_bytes(b"not a png")
    with pytest.raises(common.UsageError, match="no image could be read"):
        common.run_predict(argparse.Namespace(**{**vars(args), "predict": str(tmp_path / "broken"),
                                                 "out": str(tmp_path / "o2")}), load_model, predict_batch, "toy")
