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


SCRIPT_TOY = "toy"


def toy_parser(epochs=3):
    return common.add_common_args(argparse.ArgumentParser(prog="toy.py"), size=32, epochs=epochs, batch_size=4,
                                  lr=0.05)


def toy_main(argv, stop=None, nan_at=None, lr_scale=1.0, kill=False):
    """A small script written as the four are: the step in the loop, common.save / resume / load_best,
    jobs over rows x seeds. `stop` = (row, seed, epoch): raise KeyboardInterrupt after that epoch's
    save (a kill); `nan_at` = (epoch, step): the loss becomes NaN there (epochs and steps from 1)."""
    args = common.parse_args(toy_parser(), SCRIPT_TOY, argv)
    jobs = [(row, seed) for row in ("A", "B") for seed in common.seed_list(args)]
    run = common.open_run(args, SCRIPT_TOY, len(jobs))

    def train_and_test(job):
        data = torch.Generator().manual_seed(100 + job.seed)
        x, y = torch.randn(24, 3, generator=data), torch.randn(24, 1, generator=data)
        model = common.prepare_model(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2),
                                                   nn.Linear(8, 1)), run)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr * lr_scale)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        start, best = common.resume(job, model, optimizer, scheduler)
        progress = common.Progress(job, 6, args.epochs, start, every=args.log_every)
        for epoch in range(start, args.epochs):
            model.train()
            shuffle = torch.Generator().manual_seed(1000 * job.seed + epoch)
            for step, index in enumerate(progress.epoch(epoch, torch.randperm(24, generator=shuffle).split(4))):
                # the numpy and python generators feed a jitter: resume must restore their states too
                jitter = float(np.random.randn()) * 0.01 + random.random() * 0.01
                loss = ((model(x[index] + jitter) - y[index]) ** 2).mean()
                if nan_at == (epoch + 1, step + 1):
                    loss = loss * math.nan
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.step(loss, len(index))
            scheduler.step()
            model.eval()
            with torch.no_grad():
                score = -((model(x) - y) ** 2).mean().item() + (0.3 if job.row == "B" and epoch == 0 else 0)
            job.log(epoch=epoch + 1, val_score=score)
            best = common.save(job, epoch + 1, score, best, model, optimizer, scheduler, note="toy")
            if stop == (job.row, job.seed, epoch + 1):
                if kill:  # kill -9: no Python clean-up at all
                    import os
                    import signal
                    os.kill(os.getpid(), signal.SIGKILL)
                raise KeyboardInterrupt
        progress.report()
        best_state = common.load_best(job, model)
        model.eval()
        with torch.no_grad():
            return {"mse": ((model(x) - y) ** 2).mean().item(), "best_epoch": best_state["epoch"],
                    "weight": model[0].weight[0, 0].item()}

    table = common.run_jobs(run, jobs, train_and_test)
    if table is not None:
        common.write_results(run, common.row_metrics(table[0]), table, common.markdown_table(table, ["row", "mse"]))
    return run.dir


def run_cli(main, argv, capsys):
    """(exit code, stderr) of `main` run as a command through common.cli."""
    try:
        common.cli(main, argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def tables_of(folder):
    return [[{k: v for k, v in e.items() if k != "rank"} for e in r["per_seed"]]
            for r in json.loads((folder / "results.json").read_text())["table"]]


def test_shared_flags_and_their_checks(tmp_path, capsys):
    args = common.parse_args(toy_parser(), SCRIPT_TOY, ["--out", str(tmp_path / "r"), "--seeds", "3,1,2"])
    assert (args.data, args.size, args.epochs, args.batch_size, args.lr, args.log_every) == ("synthetic", 32, 3, 4,
                                                                                             0.05, 20)
    assert common.seed_list(args) == [3, 1, 2] and common.seed_list(argparse.Namespace(seed=4, seeds=None)) == [4]
    # every bad value is one argparse line and exit 2, before anything is written
    for bad in (["--batch-size", "0"], ["--batch-size", "-1"], ["--lr", "-1"], ["--lr", "nan"], ["--lr", "inf"],
                ["--lr", "0"], ["--epochs", "0"], ["--epochs", "-1"], ["--size", "4"], ["--seeds", "1,1"],
                ["--seeds", "1,x"], ["--seed", "-2"], ["--log-every", "0"], ["--n-train", "0"], ["--overwrite"]):
        code, err = run_cli(lambda argv: toy_main(argv), bad + ["--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and "error: " in err and "Traceback" not in err and err.count("\n") == 1, bad
        assert not (tmp_path / "bad").exists()
    assert "must be > 0, not -1" in run_cli(lambda argv: toy_main(argv), ["--lr", "-1"], capsys)[1]
    assert "expected a finite number, not 'nan'" in run_cli(lambda argv: toy_main(argv), ["--lr", "nan"], capsys)[1]
    assert common.checked(float, low=0, high=1)("1") == 1.0  # the bounds themselves are allowed
    with pytest.raises(argparse.ArgumentTypeError, match="must be <= 1, not 1.5"):
        common.checked(float, low=0, high=1)("1.5")
    with pytest.raises(common.UsageError, match="--eval-only needs --checkpoint"):
        common.parse_args(toy_parser(), SCRIPT_TOY, ["--eval-only"])
    with pytest.raises(common.UsageError, match="--predict needs --checkpoint"):
        common.parse_args(toy_parser(), SCRIPT_TOY, ["--predict", "x.png"])


def test_run_folder_is_new_or_empty_and_never_loses_a_users_file(tmp_path, capsys):
    # a folder holding a user's own files is refused, the files untouched; no --overwrite exists
    for name in ("imagenet_vgg16.pt", "results.md", "log.jsonl"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text("mine")
        code, err = run_cli(lambda argv: toy_main(argv), ["--out", str(folder), "--epochs", "1"], capsys)
        assert code == 2 and "is not empty; choose another --out or remove that folder" in err
        assert [p.name for p in folder.iterdir()] == [name] and (folder / name).read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    for out, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "cannot create it")):
        code, err = run_cli(lambda argv: toy_main(argv), ["--out", str(out)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    folder = toy_main(["--out", str(tmp_path / "empty"), "--epochs", "1", "--device", "cpu", "--no-amp"])
    config = json.loads((folder / "config.json").read_text())
    assert config["script"] == "toy" and config["args"]["lr"] == 0.05 and config["device"] == "cpu"
    assert (config["world_size"], config["parallel"], config["versions"]["torch"]) == (1, "single", torch.__version__)
    assert sorted(p.name for p in folder.iterdir()) == ["A-seed0", "B-seed0", "config.json", "figures",
                                                       "log.jsonl", "results.json", "results.md"]
    assert sorted(p.name for p in (folder / "A-seed0").iterdir()) == ["best.pt", "last.pt", "result.json"]


def _claim_in_a_process(folder, start, queue):
    start.wait()
    try:
        common.open_run(argparse.Namespace(out=str(folder), resume=None, device="cpu", data="synthetic",
                                           parallel=None, compile=False), "toy")
        queue.put("ok")
    except common.UsageError as error:
        queue.put(str(error))


def test_two_runs_started_at_once_never_share_a_folder(tmp_path):
    import multiprocessing
    context = multiprocessing.get_context("fork")
    for attempt in range(3):
        folder = tmp_path / f"race{attempt}"
        if attempt == 2:
            folder.mkdir()  # an empty folder given to both
        start, queue = context.Event(), context.Queue()
        workers = [context.Process(target=_claim_in_a_process, args=(folder, start, queue)) for _ in range(4)]
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(60)
        answers = sorted(queue.get(timeout=10) for _ in workers)
        assert answers.count("ok") == 1, answers
        assert all("not empty" in a or "just taken by another run" in a for a in answers if a != "ok")


def test_an_expected_error_after_the_folder_was_made_leaves_no_trace(tmp_path, capsys):
    def failing(argv):
        run = common.open_run(common.parse_args(toy_parser(), SCRIPT_TOY, argv), SCRIPT_TOY)
        raise common.DatasetError(f"refuge: dataset folder /nope does not exist ({run.dir.name})")

    assert run_cli(failing, ["--out", str(tmp_path / "new")], capsys)[0] == 2
    assert not (tmp_path / "new").exists()  # the corrected command can use the same --out
    (tmp_path / "empty").mkdir()
    assert run_cli(failing, ["--out", str(tmp_path / "empty")], capsys)[0] == 2
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())  # it was there: it stays


def test_resume_of_a_multi_seed_run_equals_the_uninterrupted_run(tmp_path, capsys):
    straight = toy_main(["--out", str(tmp_path / "a"), "--seeds", "0,1", "--device", "cpu"])
    with pytest.raises(KeyboardInterrupt):  # killed in the second seed of row B, after its 2nd epoch
        toy_main(["--out", str(tmp_path / "b"), "--seeds", "0,1", "--device", "cpu"], stop=("B", 1, 2))
    finished = {p: p.read_bytes() for p in (tmp_path / "b").glob("*-seed0/*")}
    assert len(finished) == 6 and not (tmp_path / "b" / "B-seed1" / "result.json").exists()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a fresh process starts from other states
    # a checkpoint inside the run names the run too; the finished jobs are kept as they were
    resumed = toy_main(["--resume", str(tmp_path / "b" / "B-seed1" / "last.pt")])
    assert resumed == tmp_path / "b" and tables_of(straight) == tables_of(resumed)
    assert all(p.read_bytes() == data for p, data in finished.items())
    assert "[B-seed1] resumed after epoch 2" in capsys.readouterr().out
    # row B's best epoch is 1 (its score is lifted there): after the resume no epoch improved, yet
    # the test used best.pt of epoch 1, written before the interruption
    b_row = json.loads((tmp_path / "b" / "results.json").read_text())["table"][1]
    assert [e["best_epoch"] for e in b_row["per_seed"]] == [1, 1]
    epochs = [(r["row"], r["seed"], r["epoch"]) for r in map(json.loads, (tmp_path / "b" / "log.jsonl")
                                                             .read_text().splitlines()) if "epoch" in r]
    assert epochs == [(row, seed, e) for row in "AB" for seed in (0, 1) for e in (1, 2, 3)]


def test_kill_9_then_resume_ends_with_the_uninterrupted_numbers(tmp_path):
    import os
    import signal
    import subprocess
    program = tmp_path / "program.py"
    program.write_text(TORCHRUN_PROGRAM.format(tests=str(Path(__file__).resolve().parent),
                                               root=str(Path(common.__file__).resolve().parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(program), str(tmp_path / "killed"), "kill"], env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (tmp_path / "killed" / "B-seed0" / "result.json").exists()
    straight = toy_main(["--out", str(tmp_path / "straight"), "--seeds", "0,1", "--device", "cpu"])
    assert tables_of(toy_main(["--resume", str(tmp_path / "killed")])) == tables_of(straight)


def test_flags_beside_resume_must_agree_with_the_run(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        toy_main(["--out", str(tmp_path / "r"), "--lr", "0.01", "--device", "cpu"], stop=("A", 0, 1))
    for bad, named in ((["--lr", "0.5"], "--lr"), (["--lr", "0.05"], "--lr"), (["--epochs", "2"], "--epochs"),
                       (["--out", str(tmp_path / "other")], "--out"), (["--seeds", "0,1"], "--seeds")):
        code, err = run_cli(lambda argv: toy_main(argv), ["--resume", str(tmp_path / "r")] + bad, capsys)
        assert code == 2 and f"{named}" in err and "differ from the run's config.json" in err, bad
    code, err = run_cli(lambda argv: toy_main(argv), ["--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no config.json" in err
    # --device, --log-every and a larger --epochs may change; the optimiser keeps the run's rate
    folder = toy_main(["--resume", str(tmp_path / "r"), "--lr", "0.01", "--device", "cpu", "--log-every", "2",
                       "--epochs", "4"])
    state = common.load_checkpoint(folder / "A-seed0" / "last.pt", "toy")
    assert state["epoch"] == 4 and state["optimizer"]["param_groups"][0]["initial_lr"] == 0.01
    assert state["args"]["epochs"] == 4 and state["args"]["lr"] == 0.01 and state["note"] == "toy"
    toy_main(["--resume", str(folder), "--epochs", "5"])  # finished jobs go on too, from their last.pt
    assert [common.load_checkpoint(folder / f"{row}-seed0" / "last.pt", "toy")["epoch"] for row in "AB"] == [5, 5]
    assert [json.loads((folder / f"{row}-seed0" / "result.json").read_text())["epochs"] for row in "AB"] == [5, 5]
    assert json.loads((folder / "config.json").read_text())["args"]["epochs"] == 5  # the run trains to 5 now
    log_lines = (folder / "log.jsonl").read_text()
    toy_main(["--resume", str(folder)])  # nothing left to do: no job runs again
    assert (folder / "log.jsonl").read_text() == log_lines


def test_a_non_finite_loss_stops_naming_epoch_and_step_as_the_log_does(tmp_path, capsys):
    code, err = run_cli(lambda argv: toy_main(argv, nan_at=(2, 3)), ["--out", str(tmp_path / "r"), "--log-every",
                                                                      "2", "--device", "cpu"], capsys)
    # NaN at epoch 2 step 3; seen at the next progress line, step 4
    assert code == 2 and "A-seed0: loss is nan at epoch 2 step 4" in err and err.count("\n") == 1
    assert common.load_checkpoint(tmp_path / "r" / "A-seed0" / "last.pt", "toy")["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()
            if "epoch" in json.loads(line)] == [1]


def test_a_checkpoint_is_only_written_with_finite_weights_and_buffers(tmp_path):
    run = common.open_run(common.parse_args(toy_parser(), SCRIPT_TOY, ["--out", str(tmp_path / "r")]), SCRIPT_TOY)
    job = common.Job("A", 0, 0, run, tmp_path / "r" / "A-seed0", tmp_path / "r" / "log.jsonl")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert common.save(job, 1, 0.5, -math.inf, model) == 0.5
    assert common.save(job, 2, 0.4, 0.5, model) == 0.5               # not better: best.pt stays epoch 1
    assert common.save(job, 3, math.nan, 0.5, model) == 0.5          # a NaN score never becomes the best
    assert common.load_checkpoint(job.dir / "best.pt", "toy")["epoch"] == 1
    model[1].running_var[2] = math.inf                               # what a diverged step leaves
    with pytest.raises(common.NonFiniteLossError, match=r"after epoch 4 1\.running_var is not finite"):
        common.save(job, 4, 0.9, 0.5, model)
    last = common.load_checkpoint(job.dir / "last.pt", "toy")
    assert last["epoch"] == 3 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert sorted(p.name for p in job.dir.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left


def test_checkpoint_round_trip_and_refusal(tmp_path):
    run = common.open_run(common.parse_args(toy_parser(), "uml", ["--out", str(tmp_path / "r")]), "uml")
    job = common.Job("A", 0, 0, run, tmp_path / "r" / "A-seed0", tmp_path / "r" / "log.jsonl")
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    common.seed_everything(5)
    common.save(job, 3, 0.25, -math.inf, model, optimizer)
    after_save = (torch.rand(3), np.random.rand(), random.random())
    copy = nn.Linear(3, 2)
    copy_optimizer = torch.optim.SGD(copy.parameters(), lr=0.1, momentum=0.9)
    assert common.resume(job, copy, copy_optimizer) == (3, 0.25)      # weights, optimiser and RNG states
    assert torch.equal(copy.weight, model.weight)
    assert torch.equal(copy_optimizer.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(3), after_save[0]) and (np.random.rand(), random.random()) == after_save[1:]
    path = job.dir / "last.pt"
    assert torch.load(path, weights_only=True)["script"] == "uml"
    with pytest.raises(common.CheckpointError, match=r"uml\.py.*joint_unet\.py"):
        common.load_checkpoint(path, "joint_unet")
    with pytest.raises(common.CheckpointError, match="missing.pt"):
        common.load_checkpoint(tmp_path / "missing.pt", "uml")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(common.CheckpointError, match=r"truncated\.pt \(corrupt or truncated"):
        common.load_checkpoint(tmp_path / "truncated.pt", "uml")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(common.CheckpointError, match="not a checkpoint written by this project"):
        common.load_checkpoint(tmp_path / "foreign.pt", "uml")
    # a checkpoint of an older version: a missing key or weights of another layout are one-line errors
    state = common.load_checkpoint(path, "uml")
    with pytest.raises(common.CheckpointError, match=r"last\.pt has no 'normalization': .*another version"):
        state["normalization"]
    with pytest.raises(common.CheckpointError, match=r"weights do not fit this model .*Missing key"):
        common.load_model_state(nn.Linear(3, 2), {"w": torch.zeros(2, 3)})


def test_progress_line_and_report(tmp_path, capsys):
    import time as time_module
    run = common.open_run(common.parse_args(toy_parser(), SCRIPT_TOY, ["--out", str(tmp_path / "r")]), SCRIPT_TOY)
    job = common.Job("UML", 0, 0, run, tmp_path / "r" / "UML-seed0", tmp_path / "r" / "log.jsonl")
    progress = common.Progress(job, 4, epochs=5, start_epoch=2, every=3)

    def slow(values):
        for v in values:
            time_module.sleep(0.02)  # making a batch counts as waiting
            yield v

    for value in progress.epoch(2, slow([1.0, 2.0, 3.0, 5.0])):
        progress.step(torch.tensor(value), 8)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[UML-seed0] epoch 3 step 3/4 loss 2.0000 img/s ")   # steps 1-3
    assert lines[1].startswith("[UML-seed0] epoch 3 step 4/4 loss 5.0000") and "eta 0:0" in lines[1]  # 8 of 12 left
    assert len(lines) == 2
    speed = progress.report()
    assert speed["images_per_s"] > 0 and 0.3 < speed["data_wait_share"] <= 1
    record = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])
    assert (record["event"], record["row"], record["seed"]) == ("speed", "UML", 0)


def test_summarize_rows_by_hand_and_results_files(tmp_path):
    per_row = {"A": [{"dice": 0.70, "hd": 4.0, "task": "seg", "seed": 2, "rank": 0},
                     {"dice": 0.80, "hd": 2.0, "task": "seg", "seed": 0, "rank": 0},
                     {"dice": 0.90, "hd": 3.0, "task": "seg", "seed": 1, "rank": 0}],
               "B": [{"dice": 0.4, "hd": math.inf, "seed": 2, "rank": 1}, {"dice": 0.5, "hd": 2.0, "seed": 0, "rank": 0},
                     {"dice": 0.6, "hd": 3.0, "seed": 1, "rank": 1}]}
    a, b = common.summarize_rows(per_row)
    # A: dice 0.70, 0.80, 0.90 -> mean 0.80, sample std 0.10, SE 0.10 / sqrt(3); hd 4, 2, 3 -> 3, SE 1/sqrt(3)
    assert a["dice"] == pytest.approx(0.80) and a["dice_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert a["hd"] == pytest.approx(3.0) and a["hd_se"] == pytest.approx(1 / math.sqrt(3)) and "hd_undefined" not in a
    # B: hd inf, 2, 3 -> the two defined values: mean 2.5, std 0.7071, SE 0.5; one undefined
    assert b["hd"] == pytest.approx(2.5) and b["hd_se"] == pytest.approx(0.5) and b["hd_undefined"] == 1
    assert a["task"] == "seg" and a["seeds"] == [2, 0, 1] and b["rank"] == [1, 0, 1] and a["per_seed"][1]["dice"] == 0.8
    assert common.row_metrics(a) == pytest.approx({"dice": 0.8, "dice_se": 0.1 / math.sqrt(3), "hd": 3.0,
                                                   "hd_se": 1 / math.sqrt(3), "task": "seg"})
    assert common.fmt_over_seeds(a, "dice", percent=True) == "80.0 ± 5.8"
    assert common.fmt_over_seeds({"seeds": [0], "dice": 0.8, "dice_se": 0.0}, "dice", percent=True) == "80.0"
    assert common.fmt_mean_se(0.8213, 0.0042, percent=True) == "82.1 ± 0.4"
    assert common.fmt_mean_se(7.123, 0.31) == "7.12 ± 0.31" and common.fmt_mean_se(math.inf, 0.1) == "n/a"
    rows = [{"row": "A", "dice": 0.8123, "hd": math.inf}, {"row": "B", "dice": 0.9, "hd": 4.25}]
    table = common.markdown_table(rows, ["row", "dice", "hd", "n"], formats={"dice": "{:.1%}"}, title="T")
    assert table == ("### T\n\n| row | dice | hd | n |\n|---|---|---|---|\n"
                     "| A | 81.2% | inf | – |\n| B | 90.0% | 4.25 | – |\n")
    run = common.open_run(common.parse_args(toy_parser(), "uml", ["--out", str(tmp_path / "r"), "--seeds", "2,0,1"]),
                          "uml")
    common.write_results(run, {"dice": torch.tensor(0.5), "hd": math.inf}, [a, b], table)
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(results) == {"script", "data", "split", "seeds", "metrics", "table", "config"}
    assert results["script"] == "uml" and results["seeds"] == [2, 0, 1] and results["metrics"] == {"dice": 0.5,
                                                                                                   "hd": None}
    assert results["table"][1]["per_seed"][0]["hd"] is None and (tmp_path / "r" / "results.md").read_text() == table


TORCHRUN_PROGRAM = '''
# The toy script of test_common.py under torchrun: rows mode (2 rows x 3 seeds shared out), then one
# model data-parallel (one job).
import sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import test_common
out, mode = sys.argv[1], sys.argv[2]
if mode == "rows":  # as a script runs: through common.cli, which leaves the process group cleanly
    test_common.common.cli(test_common.toy_main, ["--out", out, "--seeds", "0,1,2", "--device", "cpu", "--epochs", "2"])
elif mode == "kill":
    test_common.toy_main(["--out", out, "--seeds", "0,1", "--device", "cpu"], stop=("B", 0, 2), kill=True)
else:
    test_common.common.cli(test_common.ddp_main, ["--out", out, "--device", "cpu"])
'''


class WithAnUnusedHead(nn.Module):
    """A baseline that leaves a component out: DDP must not need every parameter used."""
    def __init__(self):
        super().__init__()
        self.body, self.unused_head = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)), nn.Linear(1, 1)

    def forward(self, x):
        return self.body(x)


def ddp_main(argv):
    """One job trained data-parallel: 3 SGD steps on a batch of 8 split over the ranks."""
    args = common.parse_args(toy_parser(epochs=1), SCRIPT_TOY, argv)
    run = common.open_run(args, SCRIPT_TOY, n_jobs=1)

    def train_and_test(job):
        torch.manual_seed(0)
        model = common.prepare_model(WithAnUnusedHead(), run)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        batch = {"x": torch.randn(8, 3, generator=gen), "y": torch.randn(8, 1, generator=gen)}
        for _ in range(3):
            part = common.shard(batch, run.dist)
            loss = ((model(part["x"]) - part["y"]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        common.save(job, 1, 0.0, -math.inf, model)
        return {"rank_seen": float(run.dist.rank)}

    table = common.run_jobs(run, [("ddp", 0)], train_and_test)
    if table is not None:
        common.write_results(run, {}, table, "ddp")


def test_torchrun_rows_equal_one_process_and_data_parallel_equals_whole_batch(tmp_path):
    import os
    import subprocess
    program = tmp_path / "program.py"
    program.write_text(TORCHRUN_PROGRAM.format(tests=str(Path(__file__).resolve().parent),
                                               root=str(Path(common.__file__).resolve().parent)))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    for mode in ("rows", "data"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(program), str(tmp_path / mode), mode], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = toy_main(["--out", str(tmp_path / "one"), "--seeds", "0,1,2", "--device", "cpu", "--epochs", "2"])
    assert tables_of(tmp_path / "rows") == tables_of(one)  # bitwise: same seeds, one thread per process
    two = json.loads((tmp_path / "rows" / "results.json").read_text())["table"]
    assert two[0]["rank"] == [0, 1, 0] and two[1]["rank"] == [1, 0, 1]  # job i on rank i % 2
    config = json.loads((tmp_path / "rows" / "config.json").read_text())
    assert (config["world_size"], config["parallel"]) == (2, "rows")
    log = [json.loads(line) for line in (tmp_path / "rows" / "log.jsonl").read_text().splitlines()]
    assert sorted((r["row"], r["seed"], r["epoch"]) for r in log if "epoch" in r) == \
        [(row, seed, e) for row in "AB" for seed in (0, 1, 2) for e in (1, 2)]  # both ranks' lines, whole
    data = json.loads((tmp_path / "data" / "results.json").read_text())
    assert data["table"][0]["per_seed"][0]["rank"] == "all" and data["table"][0]["rank_seen"] == 0.0
    assert json.loads((tmp_path / "data" / "config.json").read_text())["parallel"] == "data"
    weights = common.load_checkpoint(tmp_path / "data" / "ddp-seed0" / "best.pt", "toy")["model"]
    torch.manual_seed(0)  # the same 3 SGD steps in one process on the whole batch of 8
    model = WithAnUnusedHead()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)
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


def test_load_model_state_across_compile_and_ddp_prefixes():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    plain = source.state_dict()
    for prefix in ("", "_orig_mod.", "module.", "module._orig_mod."):  # torch.compile, DDP, both
        saved = {prefix + k: v for k, v in plain.items()}
        for target in (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
                       torch.compile(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))):
            common.load_model_state(target, saved)
            assert all(torch.equal(a, b) for a, b in zip(common.unwrap(target).state_dict().values(), plain.values()))
    with pytest.raises(common.CheckpointError, match="do not fit this model.*Missing key"):
        common.load_model_state(nn.Sequential(nn.Linear(3, 4)), {"0.weight": plain["0.weight"]})


def test_restore_architecture_and_fill_defaults(capsys):
    args = argparse.Namespace(width=8, padding="same", blocks=[1, 2], lr=0.1)
    checkpoint = {"args": {"width": 16, "padding": "same", "blocks": [1, 2], "lr": 0.5}}
    common.restore_architecture(args, checkpoint, ["width", "padding", "blocks", "absent"])
    assert (args.width, args.padding, args.blocks, args.lr) == (16, "same", [1, 2], 0.1)  # lr not asked for
    assert not hasattr(args, "absent")
    assert capsys.readouterr().out.strip() == "--width: using the checkpoint's 16 (command line: 8)"
    args = argparse.Namespace(size=None, epochs=7, lr=None, width=None)
    common.fill_defaults(args, {"size": 32}, {"size": 256, "epochs": 100, "lr": 1e-4})
    assert (args.size, args.epochs, args.lr, args.width) == (32, 7, 1e-4, None)  # set values stay
    sizes = argparse.Namespace(n_train=12, n_val=None, n_test=0)
    assert common.synthetic_split_sizes(sizes) == {"n_train": 12, "n_test": 0}   # only the flags given


def test_figures(tmp_path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2)
    common.show_image(axes[0], torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8))
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:10, 4:10] = True
    common.draw_contours(axes[0], mask, "lime", label="truth")
    common.plot_uncertainty(axes[1], torch.rand(16, 16), title="entropy")
    paths = [common.save_figure(fig, tmp_path / "figures" / "sample.png")]
    run = common.open_run(common.parse_args(toy_parser(), SCRIPT_TOY, ["--out", str(tmp_path / "r")]), SCRIPT_TOY)
    job = common.Job("A", 0, 0, run, tmp_path / "r" / "A-seed0", tmp_path / "r" / "log.jsonl")
    for epoch, loss in ((1, 1.0), (2, 0.5)):
        job.log(epoch=epoch, loss=loss)
    paths.append(common.plot_curves(job, ["loss"], tmp_path / "curves.png"))
    paths.append(common.plot_reliability(torch.rand(100), torch.rand(100) < 0.5, tmp_path / "rel.png"))
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



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


def test_run_predict(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    predictor = common.Predictor(model=nn.Conv2d(3, 2, 1).eval(), args=None, size=16, keep_aspect=False,
                                 norm=(torch.full((3,), 0.5), torch.full((3,), 0.25)))

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
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "y.png").write_bytes(b"not a png")
    with pytest.raises(common.UsageError, match="no image could be read"):
        common.run_predict(argparse.Namespace(**{**vars(args), "predict": str(tmp_path / "broken"),
                                                 "out": str(tmp_path / "o2")}), load_model, predict_batch, "toy")
