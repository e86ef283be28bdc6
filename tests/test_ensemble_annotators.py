"""Tests of ensemble_annotators.py (D-LEMA): subsets, losses, meta weights, fusion, consensus, end to end."""
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ea = importlib.import_module("ensemble_annotators")


# ------------------------------------------------------------------------------------------------
# Non-contradictory subsets (Sec. 2.2 / 3.1)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["uniform", "first"])
def test_subsets_one_annotation_per_image_and_every_annotation_once(mode):
    n_ann = torch.tensor([2, 3, 5, 1, 4, 2, 5, 3] * 50)
    subset = ea.non_contradictory_subsets(n_ann, 5, torch.Generator().manual_seed(0), mode)
    slots = torch.arange(5)
    used = slots < n_ann[:, None]
    assert (subset[~used] == -1).all()                       # unused slots belong to no subset
    assert ((subset >= 0) & (subset < 5))[used].all()        # every annotation lands in one C_i
    for i in range(5):                                       # at most one annotation of an image per C_i
        assert ((subset == i).sum(1) <= 1).all()
    assert (subset >= 0).sum() == n_ann.sum()
    if mode == "first":                                      # Sec. 2.2: only C_1..C_{M_n}
        assert (subset < n_ann[:, None]).all()
    else:                                                    # Sec. 3.1: the subsets are balanced
        counts = torch.stack([(subset == i).sum() for i in range(5)]).float()
        assert counts.min() > 0.8 * counts.mean()


def test_subsets_first_mode_puts_the_only_two_annotations_in_c1_c2():
    subset = ea.non_contradictory_subsets(torch.tensor([2] * 30), 5, torch.Generator().manual_seed(1), "first")
    assert sorted(subset[:, :2].flatten().unique().tolist()) == [0, 1]
    assert (subset[:, 0] != subset[:, 1]).all()


# ------------------------------------------------------------------------------------------------
# Aleatoric loss (Eq. 5, Kendall & Gal)
# ------------------------------------------------------------------------------------------------

def test_aleatoric_loss_tends_to_cross_entropy_as_sigma_vanishes():
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 5, 5)
    target = (torch.rand(2, 5, 5) > 0.5).float()
    loss = ea.aleatoric_loss(logits, torch.full_like(logits, -40.0), target, n_samples=10)
    expected = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_aleatoric_loss_is_minus_log_of_the_mc_mean_probability():
    logits = torch.tensor([[[1.5, -0.5], [0.0, 4.0]]])
    log_var = torch.tensor([[[0.0, 1.0], [2.0, -1.0]]])
    target = torch.tensor([[[1, 0], [1, 0]]])
    loss = ea.aleatoric_loss(logits, log_var, target, 7, torch.Generator().manual_seed(3))
    z = torch.randn((7, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    u = logits + torch.exp(log_var / 2) * z
    p_target = torch.where(target.bool(), torch.sigmoid(u), 1 - torch.sigmoid(u))   # p(y | U_t)
    torch.testing.assert_close(loss, -torch.log(p_target.mean(0)), atol=1e-6, rtol=1e-6)


def test_aleatoric_loss_attenuates_a_confident_error():
    """Kendall & Gal: a large predicted variance lowers the loss of a confidently wrong logit."""
    logits, target = torch.full((1, 1, 1), 6.0), torch.zeros(1, 1, 1)
    certain = ea.aleatoric_loss(logits, torch.full_like(logits, -40.0), target, 1000)
    unsure = ea.aleatoric_loss(logits, torch.full_like(logits, math.log(36.0)), target, 1000)
    assert certain.item() == pytest.approx(F.softplus(torch.tensor(6.0)).item(), abs=1e-4)
    assert unsure.item() < 0.5 * certain.item()


# ------------------------------------------------------------------------------------------------
# Meta-learned spatial weights (Eq. 1-2)
# ------------------------------------------------------------------------------------------------

def pixel_classifier(weight=None):
    """A 1x1 convolution: per-pixel logistic regression; the log-variance channel is fixed at -40
    (sigma ~ 2e-9) so the aleatoric loss is the cross-entropy."""
    conv = nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.0, -40.0]))
        if weight is not None:
            conv.weight[0, :, 0, 0] = torch.tensor(weight)
    return conv


def test_meta_weights_are_clipped_normalised_gradient_alignments():
    """Second computation: -dL_C/deps_j = lr * grad L_C . grad l_j (theta' = theta at eps = 0)."""
    torch.manual_seed(0)
    model = pixel_classifier([0.3, -0.2])
    x_u, x_c = torch.randn(2, 2, 3, 3), torch.randn(3, 2, 3, 3)
    y_u, y_c = (torch.rand(2, 3, 3) > 0.5).float(), (torch.rand(3, 3, 3) > 0.5).float()
    weights, loss_u = ea.spatial_weight_maps(model, x_u, y_u, x_c, y_c, virtual_lr=0.1, n_samples=1)
    params = list(model.parameters())

    def flat_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    def bce(x, y):
        return F.binary_cross_entropy_with_logits(model(x)[:, 0], y, reduction="none")

    g_clean = flat_grad(bce(x_c, y_c).mean())
    per_pixel = bce(x_u, y_u)
    align = torch.stack([g_clean @ flat_grad(per_pixel[b, i, j]) for b in range(2) for i in range(3)
                         for j in range(3)]).view(2, 3, 3)
    expected = align.clamp_min(0) / align.clamp_min(0).sum()
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(loss_u.detach(), per_pixel.detach(), atol=1e-5, rtol=1e-5)


def test_meta_step_gives_contradicting_pixels_lower_weight():
    """Toy problem: the clean subset and U share an image; one annotation of U flips a square."""
    torch.manual_seed(1)
    clean = torch.zeros(1, 8, 8)
    clean[0, 2:7, 1:6] = 1
    image = torch.stack([2 * clean[0] - 1 + 0.1 * torch.randn(8, 8), torch.randn(8, 8)])[None]  # [1,2,8,8]
    contradicting = clean.clone()
    contradicting[0, 3:6, 2:5] = 0          # a second annotator misses part of the lesion
    disagree = (clean != contradicting)[0]
    x_u, y_u = image.expand(2, -1, -1, -1), torch.cat([clean, contradicting])
    weights, _ = ea.spatial_weight_maps(pixel_classifier(), x_u, y_u, image, clean, 1e-4, 1)
    bad = weights[1][disagree]
    agreeing = torch.cat([weights[0].flatten(), weights[1][~disagree]])
    assert (bad == 0).all()                 # pixels that contradict C_i get no weight at all
    assert agreeing.mean() > 0 and (agreeing > 0).float().mean() > 0.9


def test_all_zero_meta_weights_stay_zero():
    """When every U pixel opposes C_i, w = max(-dL/deps, 0) is all zero and not normalised (no NaN)."""
    image = torch.ones(1, 2, 4, 4)
    model = pixel_classifier()
    weights, _ = ea.spatial_weight_maps(model, image, torch.zeros(1, 4, 4), image, torch.ones(1, 4, 4), 0.1, 1)
    assert torch.equal(weights, torch.zeros_like(weights))


def test_meta_train_step_updates_with_the_weighted_loss():
    torch.manual_seed(2)
    model = pixel_classifier([0.1, 0.1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(2, 2, 4, 4), (torch.rand(2, 4, 4) > 0.5).float()
    weights, loss_u = ea.spatial_weight_maps(model, x, y, x, y, 0.5, 1)
    grads = torch.autograd.grad((weights * loss_u).sum(), list(model.parameters()))
    expected = [p.detach() - 0.5 * g for p, g in zip(model.parameters(), grads)]
    args = type("Args", (), {"lr": 0.5, "mc_samples": 1})
    ea.meta_train_step(model, optimizer, {"x": x, "y": y}, {"x": x, "y": y}, args)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Fusion (Eq. 4)
# ------------------------------------------------------------------------------------------------

def test_fusion_rules_on_hand_values():
    probs = torch.tensor([[[[0.8, 0.6]]], [[[0.2, 0.4]]]])                  # [M=2, N=1, 1, 2]
    log_vars = torch.log(torch.tensor([[[[1.0, 4.0]]], [[[3.0, 4.0]]]]))   # s^2
    equal = ea.fuse_predictions(probs, log_vars, "equal")
    torch.testing.assert_close(equal, torch.tensor([[[0.5, 0.5]]]))
    # pixel 0: alpha = (1, 1/3) / (4/3) = (0.75, 0.25); pixel 1: equal variances -> (0.5, 0.5)
    pixel = ea.fuse_predictions(probs, log_vars, "pixel")
    torch.testing.assert_close(pixel, torch.tensor([[[0.65, 0.5]]]))
    # image: u = (2.5, 3.5), alpha = (1/2.5, 1/3.5) / (1/2.5 + 1/3.5) = (7/12, 5/12)
    image = ea.fuse_predictions(probs, log_vars, "image")
    torch.testing.assert_close(image, torch.tensor([[[0.8 * 7 / 12 + 0.2 * 5 / 12, 0.6 * 7 / 12 + 0.4 * 5 / 12]]]))


# ------------------------------------------------------------------------------------------------
# Agreement and consensus: kappa (row J), majority vote (MV), STAPLE
# ------------------------------------------------------------------------------------------------

def test_cohens_kappa_on_known_pairs():
    a = torch.tensor([[1, 1], [1, 0]])
    b = torch.tensor([[1, 0], [1, 0]])    # p_o = 3/4, p_e = 3/4*1/2 + 1/4*1/2 = 1/2 -> kappa = 1/2
    c = torch.zeros(2, 2, dtype=torch.long)   # kappa(a, c) = kappa(b, c) = 0
    junk = torch.ones(2, 2, dtype=torch.long)  # an unused slot must be ignored
    masks = torch.stack([torch.stack([a, b, junk]), torch.stack([a, b, c]), torch.stack([c, c, junk])]).to(torch.uint8)
    kappa = ea.mean_pairwise_kappa(masks, torch.tensor([2, 3, 2]))
    torch.testing.assert_close(kappa, torch.tensor([0.5, 0.5 / 3, 1.0]))


def test_majority_vote_is_strict():
    masks = torch.tensor([[[[1, 1, 0, 0]], [[1, 0, 1, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 1]]],
                          [[[1, 1, 0, 0]], [[1, 0, 1, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]]], dtype=torch.uint8)
    mv = ea.majority_vote(masks, torch.tensor([3, 2]))
    assert mv.tolist() == [[[1, 0, 0, 0]], [[1, 0, 0, 0]]]   # 4th slot of image 0 is unused; ties -> 0


def staple_plain(d, iterations):
    """Warfield et al.'s EM written pixel by pixel for one image: d [J, P] of 0/1."""
    d = np.asarray(d, dtype=float)
    f = d.mean()
    p, q = np.full(len(d), 0.9), np.full(len(d), 0.9)
    for _ in range(iterations):
        w = np.zeros(d.shape[1])
        for i in range(d.shape[1]):
            a, b = f, 1 - f
            for j in range(len(d)):
                a *= p[j] if d[j, i] else 1 - p[j]
                b *= 1 - q[j] if d[j, i] else q[j]
            w[i] = a / (a + b)
        p = np.array([(w * d[j]).sum() / w.sum() for j in range(len(d))])
        q = np.array([((1 - w) * (1 - d[j])).sum() / (1 - w).sum() for j in range(len(d))])
    return w, p, q


def test_staple_matches_a_plain_em():
    gen = torch.Generator().manual_seed(4)
    truth = (torch.rand(2, 6, 6, generator=gen) > 0.5)
    masks = torch.zeros(2, 4, 6, 6, dtype=torch.uint8)
    for j in range(4):  # annotators flip 10, 20, 30, 40 % of the pixels
        flip = torch.rand(2, 6, 6, generator=gen) < 0.1 * (j + 1)
        masks[:, j] = (truth ^ flip).to(torch.uint8)
    n_ann = torch.tensor([4, 3])
    masks[1, 3] = 0
    w, p, q = ea.staple(masks, n_ann, iterations=6)
    for n in range(2):
        w_ref, p_ref, q_ref = staple_plain(masks[n, :n_ann[n]].flatten(1).numpy(), 6)
        np.testing.assert_allclose(w[n].flatten().numpy(), w_ref, atol=1e-5)
        np.testing.assert_allclose(p[n, :n_ann[n]].numpy(), p_ref, atol=1e-5)
        np.testing.assert_allclose(q[n, :n_ann[n]].numpy(), q_ref, atol=1e-5)


def test_staple_of_identical_annotations_is_that_annotation():
    mask = (torch.arange(16).view(4, 4) % 3 == 0).to(torch.uint8)
    w, _, _ = ea.staple(mask.expand(1, 3, 4, 4).clone(), torch.tensor([3]))
    assert torch.equal((w[0] > 0.5).to(torch.uint8), mask)


# ------------------------------------------------------------------------------------------------
# Model and end to end
# ------------------------------------------------------------------------------------------------

def test_base_model_has_two_maps_and_five_central_dropout_layers():
    model = ea.BayesianResidualFCN(width=4, depth=3, dropout=0.3, dropout_layers=5)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 2, 16, 16)
    # encoder blocks 0..3 (3 = bottleneck): the last three; decoder blocks 0..2: the first two
    assert model.encoder_dropout == {1, 2, 3} and model.decoder_dropout == {0, 1}
    with pytest.raises(ValueError):
        ea.BayesianResidualFCN(width=4, depth=1, dropout_layers=5)


def test_mc_dropout_prediction_averages_stochastic_passes():
    torch.manual_seed(0)
    model = ea.BayesianResidualFCN(width=4, depth=2, dropout=0.5, dropout_layers=3)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    args = type("Args", (), {"amp": False})
    mean, std = torch.zeros(3), torch.ones(3)
    plain, _ = ea.predict(model, images, mean, std, torch.device("cpu"), args)
    again, _ = ea.predict(model, images, mean, std, torch.device("cpu"), args)
    mc, _ = ea.predict(model, images, mean, std, torch.device("cpu"), args, mc_passes=4)
    assert torch.equal(plain, again) and not torch.allclose(plain, mc)
    assert not model.training and not model.dropout.training  # predict leaves the model in eval mode


def test_quick_run_writes_both_tables_and_figures(tmp_path):
    out = tmp_path / "run"
    ea.main(["--quick", "--out", str(out), "--device", "cpu"])
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    for key in ("jaccard", "jaccard_se", "nll", "brier"):
        assert math.isfinite(metrics[key])
    assert 0 <= metrics["jaccard"] <= 100 and 0 <= metrics["brier"] <= 1
    table1 = [r for r in results["table"] if r["table"] == "1"]
    table2 = [r for r in results["table"] if r["table"] == "2"]
    rows1 = {"A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "MV", "STAPLE"}
    for test_set in ("test", "test_shift"):
        for reference in ("annotation", "truth"):
            got = {r["row"] for r in table1 if r["test_set"] == test_set and r["reference"] == reference}
            assert got == rows1
            got = {r["row"] for r in table2 if r["test_set"] == test_set and r["reference"] == reference}
            assert got == set("ABCDEF")
    assert all(math.isfinite(r["jaccard"]) for r in table1)
    assert all(math.isfinite(r["nll"]) and math.isfinite(r["brier"]) for r in table2)
    weights = {r["row"]: r for r in results["table"] if r["table"] == "fig3-4"}
    assert set(weights) == set("BCDEF")
    assert all(0 <= r[k] <= 1 for r in weights.values() for k in ("zero_weight_inconsistent", "zero_weight_consistent"))
    main_row = next(r for r in table1 if r["row"] == "I" and r["test_set"] == "test" and r["reference"] == "annotation")
    assert main_row["jaccard"] == pytest.approx(metrics["jaccard"])
    markdown = (out / "results.md").read_text()
    assert "Table 1" in markdown and "Table 2" in markdown and "| STAPLE |" in markdown
    for name in ("fig3_weight_maps_model0.png", "fig4_weight_maps_model3.png", "predictions.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    for name in ("config.json", "log.jsonl", "last.pt", "best.pt"):
        assert (out / name).exists()
    logged = {json.loads(line)["row"] for line in (out / "log.jsonl").read_text().splitlines()}
    assert logged == rows1 - {"G", "H", "I"}
    # --eval-only on best.pt reproduces the deterministic Table 1
    again = tmp_path / "eval"
    ea.main(["--quick", "--out", str(again), "--device", "cpu", "--eval-only", "--checkpoint", str(out / "best.pt")])
    table1_again = [r for r in json.loads((again / "results.json").read_text())["table"] if r["table"] == "1"]
    assert [r["jaccard"] for r in table1_again] == pytest.approx([r["jaccard"] for r in table1])


def test_resume_trains_only_what_is_left(tmp_path):
    first = tmp_path / "first"
    ea.main(["--quick", "--out", str(first), "--device", "cpu", "--no-baselines"])
    state = torch.load(first / "last.pt", weights_only=True)
    assert state["row"] == "F" and state["epoch"] == 1 and state["done"] == ["B", "C", "D", "E"]
    resumed = tmp_path / "resumed"
    ea.main(["--quick", "--out", str(resumed), "--device", "cpu", "--no-baselines", "--epochs", "2",
             "--resume", str(first / "last.pt")])
    logged = [(r["row"], r["epoch"]) for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines())]
    assert logged == [("F", 2)]   # rows B-E were finished; F continues at its second epoch
    rows = {r["row"] for r in json.loads((resumed / "results.json").read_text())["table"] if r["table"] == "1"}
    assert rows == set("BCDEFGHI")


def test_training_weights_leave_batchnorm_statistics_alone():
    torch.manual_seed(3)
    model = ea.BayesianResidualFCN(width=4, depth=2, dropout=0.3, dropout_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(3, 3, 16, 16), (torch.rand(3, 16, 16) > 0.5).float()
    args = type("Args", (), {"lr": 0.01, "mc_samples": 2})
    weights = ea.training_weights(model, x, y, x[:2], y[:2], args)
    assert weights.shape == (3, 16, 16) and weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
