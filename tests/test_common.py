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


# --------------------------------------------------------------------------------------------------
# Surface distances against a plain scipy reference (MONAI's definition)
# --------------------------------------------------------------------------------------------------


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
    run = common.Run(args, "toy.py")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["script"] == "toy" and config["args"]["lr"] == 0.05 and config["device"] == "cpu"
    assert config["versions"]["torch"] == torch.__version__
    assert run.figures.is_dir()
    run.log({"epoch": 1, "loss": torch.tensor(0.5), "hd": math.inf})
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and record["loss"] == 0.5 and record["hd"] is None and "time" in record
    assert common.choose_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cuda"):
            common.choose_device("cuda")


def tiny_model():
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))


def train(run_dir, epochs, resume=None, stop_after=None, nan_at_step=None, reseed=0):
    """A tiny training loop written the way the scripts write theirs (Run, Progress, check_finite,
    checkpoint_state / restore_state, a torch.Generator for the shuffling)."""
    args = make_args(run_dir, log_every=2)
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
    with pytest.raises(ValueError, match=r"uml\.py.*joint_unet\.py"):
        common.load_checkpoint(path, "joint_unet")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        common.load_checkpoint(tmp_path / "missing.pt", "uml")


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
    assert set(results) == {"script", "data", "split", "metrics", "table", "config"}
    assert results["script"] == "uml" and results["metrics"] == {"dice": 0.5, "hd": None}
    assert results["table"][1] == {"row": "B", "dice": 0.9, "hd": 4.25}
    assert (tmp_path / "results.md").read_text() == table


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
