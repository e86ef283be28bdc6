"""Tests of ensemble_annotators.py (D-LEMA): subsets, losses, meta weights, fusion, consensus, end to end."""
import argparse
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


@pytest.mark.parametrize("mode", ["uniform", "first"])
def test_subsets_follow_the_priorities_as_in_the_docstring_example(mode):
    """The same generator draws the priorities; slot a goes to the subset with the a-th lowest one."""
    n_ann = torch.tensor([2, 3, 1, 5])
    subset_of = ea.non_contradictory_subsets(n_ann, 5, torch.Generator().manual_seed(7), mode)
    priority = torch.rand(4, 5, generator=torch.Generator().manual_seed(7)).tolist()
    for n in range(4):
        allowed = range(5) if mode == "uniform" else range(int(n_ann[n]))
        order = sorted(allowed, key=lambda i: priority[n][i])
        expected = order[:int(n_ann[n])] + [-1] * (5 - int(n_ann[n]))
        assert subset_of[n].tolist() == expected


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


def test_meta_weighted_loss_is_eq2_and_its_sgd_step_follows_the_weighted_gradient():
    torch.manual_seed(2)
    model = pixel_classifier([0.1, 0.1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(2, 2, 4, 4), (torch.rand(2, 4, 4) > 0.5).float()
    weights, loss_u = ea.spatial_weight_maps(model, x, y, x, y, 0.5, 1)
    grads = torch.autograd.grad((weights * loss_u).sum(), list(model.parameters()))
    expected = [p.detach() - 0.5 * g for p, g in zip(model.parameters(), grads)]
    loss = ea.meta_weighted_loss(model, x, y, x, y, virtual_lr=0.5, n_samples=1)
    torch.testing.assert_close(loss.detach(), (weights * loss_u).sum().detach(), atol=1e-6, rtol=1e-6)
    optimizer.zero_grad(set_to_none=True)   # the step as the script's train_row writes it
    loss.backward()
    optimizer.step()
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


def test_image_level_fusion_is_finite_for_huge_log_variances():
    """Row I with log s^2 in [100, 200]: exp overflows float32 (the old 1 / exp(.).mean() gave NaN);
    the weights must equal alpha_i = (1/u_i) / sum_j (1/u_j), u_i = mean_q s_iq^2, computed in float64,
    where exp(200) ~ 7e86 still fits."""
    gen = torch.Generator().manual_seed(5)
    log_vars = 102 + 98 * torch.rand(3, 2, 4, 4, generator=gen)        # [M=3, N=2, 4, 4]
    log_vars[1, 0] = log_vars[:, 0].min(0).values - 2                    # model 1 surest on image 0
    probs = torch.rand(3, 2, 4, 4, generator=gen)
    naive = 1.0 / torch.exp(log_vars).mean((2, 3))                      # 1 / inf = 0 for every model ...
    assert (naive == 0).all() and torch.isnan(naive / naive.sum(0)).all()  # ... and 0 / 0 = NaN
    fused = ea.fuse_predictions(probs, log_vars, "image")
    u = torch.exp(log_vars.double()).mean((2, 3))                       # u_i [M,N], float64
    alpha = (1 / u) / (1 / u).sum(0)
    assert torch.isfinite(fused).all()
    assert alpha[1, 0] > 0.75 and log_vars.min() >= 100                 # not just uniform weights
    expected = (alpha[:, :, None, None] * probs.double()).sum(0)
    torch.testing.assert_close(fused.double(), expected, atol=1e-6, rtol=1e-6)


def test_pixel_level_fusion_is_finite_for_huge_log_variances():
    log_vars = torch.tensor([[[[150.0]]], [[[151.0]]]])                # s^2 = e^150, e^151
    probs = torch.tensor([[[[0.9]]], [[[0.1]]]])
    alpha0 = 1 / (1 + math.exp(-1.0))                                   # (1/e^150) / (1/e^150 + 1/e^151)
    torch.testing.assert_close(ea.fuse_predictions(probs, log_vars, "pixel"),
                               torch.tensor([[[0.9 * alpha0 + 0.1 * (1 - alpha0)]]]))


def test_image_level_fusion_averages_the_variance_over_the_images_own_pixels():
    """Row I's u_i = mean_q s_iq^2 over the image's pixels only: model 0 is sure on the image (s^2 = 1)
    and unsure on the letterbox padding (s^2 = 100), model 1 has s^2 = 2 everywhere. Over the image
    alpha = (2/3, 1/3); a mean over the whole canvas would give u_0 = 50.5 and alpha_0 = 0.038."""
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, :2] = True                                                     # a wide image: rows 0-1
    log_vars = torch.stack([torch.where(valid, 0.0, math.log(100.0)), torch.full((1, 4, 4), math.log(2.0))])
    probs = torch.stack([torch.full((1, 4, 4), 0.9), torch.full((1, 4, 4), 0.3)])
    torch.testing.assert_close(ea.fuse_predictions(probs, log_vars, "image", valid), torch.full((1, 4, 4), 0.7))
    alpha0 = (1 / 50.5) / (1 / 50.5 + 1 / 2)                                # the padded mean's weight
    torch.testing.assert_close(ea.fuse_predictions(probs, log_vars, "image"),
                               torch.full((1, 4, 4), 0.9 * alpha0 + 0.3 * (1 - alpha0)))


class StubMember(nn.Module):
    """A base model with fixed outputs: Y = `prob` everywhere, s^2 = `var_image` on image pixels and
    `var_padding` on the zero pixels of the canvas (inputs normalised with mean 0, std 1)."""

    def __init__(self, prob, var_image, var_padding):
        super().__init__()
        self.dropout = nn.Dropout(0.0)
        self.register_buffer("values", torch.tensor([math.log(prob / (1 - prob)), math.log(var_image),
                                                     math.log(var_padding)]))

    def forward(self, x):
        padding = (x.abs().sum(1, keepdim=True) == 0).float()
        log_var = padding * self.values[2] + (1 - padding) * self.values[1]
        return torch.cat([torch.full_like(log_var, float(self.values[0])), log_var], dim=1)


def letterboxed_canvas():
    """Two 8 x 8 canvases of a wide image (rows 2-5, non-zero pixels) on zero padding."""
    canvas = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    canvas[:, :, 2:6] = torch.randint(1, 256, (2, 3, 4, 8), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8)
    return canvas


def stub_ensemble():
    with torch.no_grad():
        members = [StubMember(0.9, 1.0, 100.0), StubMember(0.3, 2.0, 2.0)]
    for member in members:
        member.weight = nn.Parameter(torch.zeros(1))                    # predict reads the device from it
    return nn.ModuleDict({"B": members[0], "C": members[1]})


def test_predict_batch_fuses_over_the_image_not_its_letterbox():
    """--predict with fusion I on letterboxed canvases: alpha = (2/3, 1/3) from the image's pixels, so
    Y = 0.7 (lesion) and s^2 = 2/3 * 1 + 1/3 * 2; averaging over the canvas would give Y = 0.32."""
    predictor = ea.common.Predictor(model=stub_ensemble(), args=argparse.Namespace(amp=False),
                                    norm=(torch.zeros(3), torch.ones(3)), size=8, extra={"fusion": "image"})
    out = ea.predict_batch(predictor, letterboxed_canvas())
    assert (out["mask"] == 1).all()
    torch.testing.assert_close(out["maps"]["aleatoric"][:, 2:6], torch.full((2, 4, 8), 4 / 3))
    for row in out["rows"]:
        assert row["lesion_area_fraction"] == pytest.approx(1.0)
        assert row["mean_aleatoric"] == pytest.approx(4 / 3, rel=1e-5)
        assert row["mean_epistemic"] == pytest.approx(0.3, rel=1e-5)     # std of (0.9, 0.3), ddof 0


def test_evaluate_fuses_and_scores_over_the_images_own_pixels():
    """Tables 1-2 on a letterboxed test set: row I (fusion over the image's pixels) predicts the lesion
    everywhere (Y = 0.7), so Jaccard 100 and NLL -log 0.7 against an all-lesion image; a fusion
    averaged over the padding (Y = 0.32) would score 0."""
    canvas = letterboxed_canvas()
    valid = torch.zeros(2, 8, 8, dtype=torch.uint8)
    valid[:, 2:6] = 1
    split = {"images": canvas, "valid": valid, "reference": valid.clone()}
    args = argparse.Namespace(fusion="image", normalize="train", amp=False, mc_passes=2)
    rows = ea.table_rows(2, baselines=False)                            # B, C; fusions D (G), E (H), F (I)
    entries, outputs = ea.evaluate(stub_ensemble(), rows, {"isic": split}, (torch.zeros(3), torch.ones(3)), args)
    table1 = {e["row"]: e for e in entries if e["table"] == "1"}
    assert table1["F"]["jaccard"] == pytest.approx(100.0) and table1["F"]["method"].startswith("image-level")
    assert table1["C"]["jaccard"] == 0.0                                  # Y = 0.3 everywhere
    deep_ensemble = next(e for e in entries if e["table"] == "2" and e["method"].startswith("deep ensemble"))
    assert deep_ensemble["nll"] == pytest.approx(-math.log(0.7), rel=1e-5)
    assert deep_ensemble["brier"] == pytest.approx(0.09, rel=1e-4)
    torch.testing.assert_close(outputs["isic"]["fused"], torch.full((2, 8, 8), 0.7))

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
    mean, std = torch.zeros(3), torch.ones(3)
    plain, _ = ea.predict(model, images, mean, std, amp=False)
    again, _ = ea.predict(model, images, mean, std, amp=False)
    mc, _ = ea.predict(model, images, mean, std, amp=False, mc_passes=4)
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
    shares = [r[k] for r in weights.values() for k in ("zero_weight_inconsistent", "zero_weight_consistent")]
    assert all(v is None or 0 <= v <= 1 for v in shares)   # None: no INC pixel among the 16 sampled
    assert sum(v is not None for v in shares) >= 5
    assert all(r["annotations"] == 16 for r in weights.values())   # --quick samples 2 batches of 8
    modes = {r["row"]: r for r in results["table"] if r["table"] == "meta-mode"}
    assert set(modes) == set("BCDEF")
    assert all(0 <= r[k] <= 1 for r in modes.values() for k in ("tv_train_vs_eval", "tv_train_redraw", "zero_flip"))
    main_row = next(r for r in table1 if r["row"] == "I" and r["test_set"] == "test" and r["reference"] == "annotation")
    assert main_row["jaccard"] == pytest.approx(metrics["jaccard"])
    markdown = (out / "results.md").read_text()
    assert "Table 1" in markdown and "Table 2" in markdown and "| STAPLE |" in markdown
    for name in ("fig3_weight_maps_model0.png", "fig4_weight_maps_model3.png", "predictions.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    for name in ("config.json", "log.jsonl", "ensemble-seed0/best.pt", "ensemble-seed0/result.json"):
        assert (out / name).exists()
    for row in rows1 - {"G", "H", "I"}:                      # one folder per trained row x seed
        assert {p.name for p in (out / f"{row}-seed0").iterdir()} == {"last.pt", "best.pt", "result.json"}
    logged = {json.loads(line)["row"] for line in (out / "log.jsonl").read_text().splitlines()}
    assert logged == rows1 - {"G", "H", "I"}
    # --eval-only on the ensemble's best.pt reproduces the deterministic Table 1
    again = tmp_path / "eval"
    ea.main(["--quick", "--out", str(again), "--device", "cpu", "--eval-only", "--checkpoint",
             str(out / "ensemble-seed0" / "best.pt")])
    table1_again = [r for r in json.loads((again / "results.json").read_text())["table"] if r["table"] == "1"]
    assert [r["jaccard"] for r in table1_again] == pytest.approx([r["jaccard"] for r in table1])


@pytest.fixture(scope="module")
def quick_ensemble(tmp_path_factory):
    """One --quick --no-baselines run (rows B-F and the fusions) shared by the tests below."""
    out = tmp_path_factory.mktemp("quick") / "run"
    ea.main(["--quick", "--out", str(out), "--device", "cpu", "--no-baselines"])
    return out


def without_timing(results):
    """results.json's table and metrics without the speed numbers (they differ between any two runs)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.startswith(("images_per_s", "data_wait_share"))}
        return [strip(v) for v in value] if isinstance(value, list) else value
    return strip({"table": results["table"], "metrics": results["metrics"], "seeds": results["seeds"]})


def test_resume_dir_after_an_interruption_in_a_later_base_model_ends_as_the_uninterrupted_run(
        tmp_path, monkeypatch, two_seeds):
    """A --seeds 0,1 run stopped inside seed 1's model D (after its first epoch's
    checkpoint), then `--resume DIR` alone: finished jobs are kept, D continues at epoch 2, E and F of
    seed 1 start, and results.json holds the uninterrupted run's table."""
    save = ea.common.save

    def save_then_die(job, epoch, *args, **kwargs):
        best = save(job, epoch, *args, **kwargs)
        if (job.row, job.seed, epoch) == ("D", 1, 1):
            raise KeyboardInterrupt("killed")
        return best
    monkeypatch.setattr(ea.common, "save", save_then_die)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        ea.main(TWO_SEEDS + ["--out", str(out)])
    monkeypatch.undo()
    assert (out / "D-seed1" / "last.pt").exists() and not (out / "D-seed1" / "result.json").exists()
    assert (out / "C-seed1" / "result.json").exists() and not (out / "E-seed1").exists()
    lines_before = len((out / "log.jsonl").read_text().splitlines())
    ea.main(["--resume", str(out)])
    resumed = [(r["row"], r["seed"], r["epoch"]) for r in
               map(json.loads, (out / "log.jsonl").read_text().splitlines()[lines_before:]) if "epoch" in r]
    assert resumed == [("D", 1, 2), ("E", 1, 1), ("E", 1, 2), ("F", 1, 1), ("F", 1, 2)]
    got = json.loads((out / "results.json").read_text())
    assert without_timing(got) == without_timing(json.loads((two_seeds / "results.json").read_text()))


@pytest.mark.parametrize("flags", [
    ["--batch-size", "-1"], ["--batch-size", "0"], ["--lr", "nan"], ["--epochs", "-1"], ["--n-train", "0"],
    ["--dropout", "1"], ["--dropout", "-0.1"], ["--momentum", "1.5"], ["--weight-decay", "-1"],
    ["--clean-batch-size", "0"], ["--width", "0"], ["--depth", "0"], ["--mc-samples", "0"], ["--mc-passes", "0"],
    ["--dropout-layers", "-1"], ["--staple-iterations", "0"], ["--weight-samples", "0"],
    ["--kappa-threshold", "2"], ["--fusion", "median"], ["--subsets", "some"], ["--seeds", "0,0"],
    ["--dropout-layers", "9"], ["--depth", "6"], ["--test", "ph3=/x"], ["--parallel", "data"]])
def test_a_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, flags):
    """A bad flag (--batch-size -1 once spun at 100 % CPU for ever): every flag is checked when
    parsed, within seconds: one line on stderr, exit code 2, no run folder, no cache."""
    import signal
    monkeypatch.chdir(tmp_path)

    def too_slow(*_):
        raise TimeoutError(f"{flags} still running after 5 s")
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(5)
    try:
        with pytest.raises(SystemExit) as exited:
            ea.common.cli(ea.main, flags + ["--out", str(tmp_path / "run"), "--device", "cpu"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0], err
    assert list(tmp_path.iterdir()) == []


def tiny_training_sets(seed=0):
    """Six 6x6 training images with 2-3 annotations (squares of different sizes) and their sets."""
    gen = torch.Generator().manual_seed(seed)
    n_ann = torch.tensor([2, 3, 2, 2, 3, 2])
    masks = torch.zeros(6, 5, 6, 6, dtype=torch.uint8)
    for n in range(6):
        for a in range(int(n_ann[n])):
            top, side = int(torch.randint(0, 2, (1,), generator=gen)), int(torch.randint(2, 5, (1,), generator=gen))
            masks[n, a, top:top + side, 1:1 + side] = 1
    images = torch.randint(0, 256, (6, 3, 6, 6), generator=gen, dtype=torch.uint8)
    train = {"images": images, "masks": masks, "n_annotations": n_ann}
    return train, ea.build_training_sets(train, 5, seed, "uniform", kappa_threshold=-1.0, staple_iterations=3)


def test_weight_consistency_counts_zero_weights_on_inc_and_agreeing_pixels(monkeypatch):
    """All of U in one batch; the weights are stubbed as 1 on lesion pixels and 0 on background, so
    the shares follow from the masks alone, counted here pixel by pixel."""
    train, sets = tiny_training_sets()
    monkeypatch.setattr(ea, "training_weights", lambda model, x_u, y_u, x_c, y_c, lr, n, mode="train": y_u.float())
    n_union = len(sets["U"]["images"])
    args = type("Args", (), {"seed": 0, "batch_size": n_union, "clean_batch_size": 2, "weight_samples": n_union,
                             "lr": 0.1, "mc_samples": 1})
    row = ea.table_rows(5, baselines=False)[2]                       # model 2 trusts C_3
    got = ea.weight_statistics(None, row, sets, args, torch.zeros(3), torch.ones(3))["fig3-4"]
    counts = {"inc": [0, 0, 0.0], "agree": [0, 0, 0.0]}              # pixels, zero-weight pixels, weight sum
    for n in range(6):
        trusted = [a for a in range(5) if sets["subset_of"][n, a] == 2]
        if not trusted:
            continue
        reference = train["masks"][n, trusted[0]]
        for a in range(int(train["n_annotations"][n])):
            annotation = train["masks"][n, a]
            for i in range(6):
                for j in range(6):
                    key = "inc" if annotation[i, j] != reference[i, j] else "agree"
                    weight = float(annotation[i, j])
                    counts[key][0] += 1
                    counts[key][1] += weight == 0
                    counts[key][2] += weight
    assert counts["inc"][0] > 0
    assert got["zero_weight_inconsistent"] == pytest.approx(counts["inc"][1] / counts["inc"][0])
    assert got["zero_weight_consistent"] == pytest.approx(counts["agree"][1] / counts["agree"][0])
    ratio = (counts["inc"][2] / counts["inc"][0]) / (counts["agree"][2] / counts["agree"][0])
    assert got["mean_weight_ratio"] == pytest.approx(ratio)
    assert got["inconsistent_pixels"] == counts["inc"][0] and got["annotations"] == n_union


def test_ratio_and_se_on_hand_values():
    # batches (a, n) = (1, 2), (3, 4), (2, 2): R = 6 / 8; residuals a - R n = -0.5, 0, 0.5
    ratio, se = ea.ratio_and_se(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([2.0, 4.0, 2.0]))
    assert ratio == pytest.approx(0.75)
    assert se == pytest.approx(math.sqrt(0.5 / 6) / (8 / 3))
    assert math.isnan(ea.ratio_and_se(torch.zeros(2), torch.zeros(2))[0])


def test_meta_mode_effect_is_zero_without_batchnorm_and_dropout_and_not_with_them():
    train, sets = tiny_training_sets(1)
    args = type("Args", (), {"seed": 0, "batch_size": 4, "clean_batch_size": 3, "weight_samples": 4, "lr": 0.1,
                             "mc_samples": 2})
    row = ea.table_rows(5, baselines=False)[0]
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    plain = nn.Conv2d(3, 2, 1)                                   # no BatchNorm, no dropout
    with torch.no_grad():
        plain.bias[1] = -40.0                                    # sigma ~ 0: MC samples do not matter
    effect = ea.weight_statistics(plain, row, sets, args, mean, std)["meta-mode"]
    assert effect["tv_train_vs_eval"] == pytest.approx(0, abs=1e-6) and effect["zero_flip"] == 0
    torch.manual_seed(0)
    fcn = ea.BayesianResidualFCN(width=4, depth=1, dropout=0.5, dropout_layers=1)
    with torch.no_grad():
        fcn.head.bias[1] = -40.0
    effect = ea.weight_statistics(fcn, row, sets, args, mean, std)["meta-mode"]
    assert effect["tv_train_vs_eval"] > 0.01 and effect["tv_eval_redraw"] == pytest.approx(0, abs=1e-6)
    assert effect["tv_train_redraw"] > 0                         # other dropout masks
    assert not fcn.training


def test_make_batch_picks_one_used_annotation_per_image():
    masks = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    masks[0, 0], masks[1, :2] = 1, 1                            # used slots are all ones, unused zeros
    batch = {"images": torch.zeros(2, 3, 2, 2, dtype=torch.uint8), "masks": masks,
             "n_annotations": torch.tensor([1, 2])}
    for seed in range(20):
        out = ea.make_batch(batch, torch.Generator().manual_seed(seed), torch.zeros(3), torch.ones(3),
                            pick_annotation=True, augment=False)
        assert out["y"].shape == (2, 2, 2) and (out["y"] == 1).all()
    single = ea.make_batch({"images": batch["images"], "masks": masks[:, 0]}, torch.Generator(), torch.zeros(3),
                           torch.ones(3), pick_annotation=False, augment=False)
    assert torch.equal(single["y"], masks[:, 0])


def test_training_weights_leave_batchnorm_statistics_alone():
    torch.manual_seed(3)
    model = ea.BayesianResidualFCN(width=4, depth=2, dropout=0.3, dropout_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(3, 3, 16, 16), (torch.rand(3, 16, 16) > 0.5).float()
    weights = ea.training_weights(model, x, y, x[:2], y[:2], virtual_lr=0.01, n_samples=2)
    assert weights.shape == (3, 16, 16) and weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


# ------------------------------------------------------------------------------------------------
# Tables over seeds, --predict, the paper's protocol on a tiny ISIC Archive tree
# ------------------------------------------------------------------------------------------------

TWO_SEEDS = ["--quick", "--device", "cpu", "--no-baselines", "--seeds", "0,1", "--epochs", "2"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """One uninterrupted --quick run of rows B-F over seeds 0 and 1, two epochs each."""
    out = tmp_path_factory.mktemp("seeds") / "run"
    ea.main(TWO_SEEDS + ["--out", str(out)])
    return out


def test_quick_seeds_give_means_and_standard_errors_over_seeds(two_seeds):
    out = two_seeds
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    row = next(r for r in results["table"] if r["table"] == "1" and r["row"] == "I" and r["test_set"] == "test"
               and r["reference"] == "annotation")
    values = [entry["jaccard"] for entry in row["per_seed"]]
    assert [entry["seed"] for entry in row["per_seed"]] == [0, 1]
    assert row["jaccard"] == pytest.approx((values[0] + values[1]) / 2)
    assert row["jaccard_se"] == pytest.approx(abs(values[0] - values[1]) / 2)   # sd / sqrt(2) for two values
    assert results["metrics"]["jaccard"] == pytest.approx(row["jaccard"])
    assert results["metrics"]["jaccard_se"] == pytest.approx(row["jaccard_se"])
    nll = next(r for r in results["table"] if r["table"] == "2" and r["row"] == "F" and r["test_set"] == "test"
               and r["reference"] == "annotation")
    nll_values = [entry["nll"] for entry in nll["per_seed"]]
    assert nll_values[0] != nll_values[1] and nll["nll"] == pytest.approx(sum(nll_values) / 2)
    assert results["metrics"]["nll_se"] == pytest.approx(abs(nll_values[0] - nll_values[1]) / 2)
    trained = {r["row"]: r for r in results["table"] if r["table"] == "training"}
    assert set(trained) == set("BCDEF") and all(r["rank"] == [0, 0] for r in trained.values())
    assert "mean ± standard error over the seeds 0, 1" in (out / "results.md").read_text()
    best = torch.load(out / "ensemble-seed0" / "best.pt", weights_only=True)
    assert best["seeds"] == [0, 1] and sorted(best["norm"]) == ["0", "1"]
    assert {tuple(key.split(".")[:2]) for key in best["model"]} == {(f"seed{s}", r) for s in (0, 1) for r in "BCDEF"}
    seed1_f = {key.split(".", 2)[2]: value for key, value in best["model"].items() if key.startswith("seed1.F.")}
    assert seed1_f.keys() == ea.BayesianResidualFCN(4, 3).state_dict().keys()
    weights = torch.load(out / "F-seed1" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(v, weights[k]) for k, v in seed1_f.items())


def write_image(path, size, mode="RGB", fmt=None):
    from PIL import Image
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(width * height).integers(0, 255, (height, width, len(mode)), dtype=np.uint8)
    Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(path, fmt)


def test_quick_train_then_predict_a_folder_of_odd_images(tmp_path, quick_ensemble):
    from PIL import Image
    run = quick_ensemble
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "wide.jpg", (97, 61))
    write_image(images / "grey.png", (50, 80), "L")
    write_image(images / "alpha.png", (33, 47), "RGBA")
    write_image(images / "UPPER.BMP", (40, 40), fmt="BMP")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "predicted"
    count = ea.main(["--predict", str(images), "--checkpoint", str(run / "ensemble-seed0" / "best.pt"),
                     "--out", str(out), "--device", "cpu"])
    assert count == 4
    sizes = {"wide": (97, 61), "grey": (50, 80), "alpha": (33, 47), "UPPER": (40, 40)}
    for stem, size in sizes.items():
        with Image.open(out / f"{stem}_mask.png") as mask:
            assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 1}
        for name in ("aleatoric", "epistemic"):
            values = np.load(out / f"{stem}_{name}.npy")
            assert values.shape == size[::-1] and np.isfinite(values).all() and (values >= 0).all()
        assert (out / f"{stem}_overlay.png").exists()
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "image,width,height,lesion_area_fraction,mean_aleatoric,mean_epistemic"
    assert len(lines) == 5 and all(0 <= float(line.split(",")[3]) <= 1 for line in lines[1:])
    assert "broken.png" in (out / "errors.txt").read_text()
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))
    with pytest.raises(ea.common.CheckpointError, match="no trained ensemble"):
        ea.load_model(run / "B-seed0" / "best.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"script": "uml", "model": {}}, foreign)
    with pytest.raises(ea.common.CheckpointError, match="uml.py, not of ensemble_annotators.py"):
        ea.main(["--predict", str(images), "--checkpoint", str(foreign), "--out", str(tmp_path / "p2")])


def test_predict_batch_masks_are_the_fused_lesion_of_the_run(quick_ensemble):
    predictor = ea.load_model(quick_ensemble / "ensemble-seed0" / "best.pt")
    assert predictor.extra["fusion"] == "image" and predictor.size == 32
    predictor.extra["fusion"] = "pixel"   # what a run with --fusion pixel stores
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = ea.predict_batch(predictor, images)
    probs, log_vars = zip(*[ea.predict(m, images, *predictor.norm, amp=False) for m in predictor.model.values()])
    fused = ea.fuse_predictions(torch.stack(probs), torch.stack(log_vars), "pixel")
    assert torch.equal(out["mask"], (fused > 0.5).long())
    alpha = torch.softmax(-torch.stack(log_vars), 0)
    torch.testing.assert_close(out["maps"]["aleatoric"], (alpha * torch.stack(log_vars).exp()).sum(0),
                               rtol=1e-4, atol=1e-6)
    assert [set(r) for r in out["rows"]] == [{"lesion_area_fraction", "mean_aleatoric", "mean_epistemic"}] * 3


def test_canvas_content_is_the_letterbox_box():
    canvas = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    canvas[0, :, 2:6, :] = 9          # a wide image: rows 2..5
    canvas[1, 1, 3, 4] = 1            # one non-zero pixel
    content = ea.canvas_content(canvas)
    assert content[0].sum() == 32 and content[0, 2:6].all()
    assert content[1].sum() == 1 and content[1, 3, 4]


def isic_archive_tree(root):
    """Ribeiro et al.'s layout: ten images with two masks (the training pool), three with one (the
    ISIC test set); non-square images; masks that nearly agree (kappa >= 0.5 for row J)."""
    from PIL import Image
    for i in range(13):
        write_image(root / "inputs" / f"ISIC_000000{i:02d}.jpg", (30, 22))
        for k in range(1 if i >= 10 else 2):
            mask = np.zeros((22, 30), np.uint8)
            mask[5:16 + k, 8:20] = 255
            (root / "targets").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "targets" / f"ISIC_000000{i:02d}_segmentation_{k}.png")


def test_the_papers_protocol_on_a_tiny_isic_archive(tmp_path):
    from PIL import Image
    archive = tmp_path / "archive"
    isic_archive_tree(archive)
    isic2017 = tmp_path / "isic2017"       # only the Test_v2 folders; one image also sits in the pool
    for image_id in ("ISIC_00000001", "ISIC_00000099"):
        write_image(isic2017 / "ISIC-2017_Test_v2_Data" / f"{image_id}.jpg", (30, 22))
        mask = np.zeros((22, 30), np.uint8)
        mask[4:12, 5:15] = 255
        (isic2017 / "ISIC-2017_Test_v2_Part1_GroundTruth").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(isic2017 / "ISIC-2017_Test_v2_Part1_GroundTruth" / f"{image_id}_segmentation.png")
    argv = ["--data", "isic-multi", "--root", str(archive), "--test", f"isic2017={isic2017}", "--quick",
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--no-baselines", "--size", "16"]
    args = ea.resolve_defaults(ea.build_parser().parse_args(argv))
    train, val, tests, removed = ea.load_data(args, 0)
    single = {f"ISIC_000000{i}" for i in (10, 11, 12)}
    assert set(tests["isic"]["names"]) == single                          # single-mask images: the test set
    assert not single & set(train["names"] + val["names"]) and len(train["names"]) + len(val["names"]) == 10
    assert (train["n_annotations"] == 2).all() and train["valid"] is not None
    assert tests["isic2017"]["names"] == ["ISIC_00000099"] and removed["isic2017"] == ["ISIC_00000001"]
    assert list(tests) == ["isic", "isic2017"]
    out = tmp_path / "run"
    ea.main(argv + ["--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "isic" and results["metrics"]["removed_overlap_isic2017"] == 1
    assert results["metrics"]["removed_overlap_isic"] == 0
    overlap = {r["row"]: r for r in results["table"] if r["table"] == "overlap"}
    assert overlap["isic2017"]["removed_names"] == ["ISIC_00000001"]
    assert {r["test_set"] for r in results["table"] if r["table"] == "1"} == {"isic", "isic2017"}
    assert "Test images removed" in (out / "results.md").read_text()
    with pytest.raises(ea.common.UsageError, match="NAME=ROOT"):
        ea.main(argv[:4] + ["--test", "ph3=/x", "--out", str(tmp_path / "bad")])


def test_torchrun_shares_out_the_base_models_and_equals_one_process(tmp_path, quick_ensemble):
    """Two gloo processes, rows mode: the base models are trained on both ranks, and every table row
    equals the single-process run's."""
    import os
    import subprocess
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float sums as this process
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(Path(ea.__file__)), "--quick", "--device", "cpu", "--no-baselines", "--out", str(out)],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600)
    two = json.loads((out / "results.json").read_text())
    one = json.loads((quick_ensemble / "results.json").read_text())

    def by_key(results):
        return {(r["table"], r["row"], r["test_set"], r["reference"]): r for r in results["table"]}
    two_rows, one_rows = by_key(two), by_key(one)
    assert two_rows.keys() == one_rows.keys()
    for key, row in one_rows.items():
        for metric in ("jaccard", "nll", "brier", "zero_weight_inconsistent", "val_jaccard"):
            if metric in row:
                assert two_rows[key][metric] == row[metric], (key, metric)
    ranks = [r["rank"][0] for r in two["table"] if r["table"] == "training"]
    assert ranks == [0, 1, 0, 1, 0] and json.loads((out / "config.json").read_text())["world_size"] == 2
    assert all((out / f"{row}-seed0" / "best.pt").exists() for row in "BCDEF")
    assert (out / "ensemble-seed0" / "best.pt").exists()
