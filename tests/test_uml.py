"""Tests of uml.py: evidential quantities and losses against plain second computations, Eq. 3 / Eq. 5
on hand tensors, the component switches, and --quick end-to-end runs of every table."""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from scipy.special import digamma as sp_digamma

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import importlib  # noqa: E402

uml = importlib.import_module("uml")
common = importlib.import_module("common")


# ---------------------------------------------------------------------------------------------
# Eq. 1-2: belief and uncertainty
# ---------------------------------------------------------------------------------------------


def test_belief_plus_uncertainty_is_one_image_and_pixel():
    torch.manual_seed(0)
    logits = torch.randn(5, 2) * 3
    alpha, belief, u = uml.evidential_opinion(logits)
    assert torch.allclose(belief.sum(1) + u[:, 0], torch.ones(5), atol=1e-6)
    assert torch.all(alpha >= 1) and torch.all(belief >= 0) and torch.all(u > 0)
    pixel_logits = torch.randn(2, 3, 4, 5) * 3
    _, belief, u = uml.evidential_opinion(pixel_logits)
    assert torch.allclose(belief.sum(1) + u[:, 0], torch.ones(2, 4, 5), atol=1e-6)


def test_evidential_opinion_hand_values():
    # evidence = softplus(logits); logits chosen so that evidence = (3, 1): alpha = (4, 2), S = 6
    logits = torch.tensor([[math.log(math.exp(3) - 1), math.log(math.exp(1) - 1)]])
    alpha, belief, u = uml.evidential_opinion(logits)
    assert torch.allclose(alpha, torch.tensor([[4.0, 2.0]]), atol=1e-5)
    assert torch.allclose(belief, torch.tensor([[0.5, 1 / 6]]), atol=1e-5)
    assert torch.allclose(u, torch.tensor([[2 / 6]]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Eq. 6-7: ace, ice, KL, annealing, Dice
# ---------------------------------------------------------------------------------------------


def plain_kl_to_uniform(alpha):
    """KL(Dir(alpha) || Dir(1)) written out with math.lgamma and scipy's digamma."""
    k, s = len(alpha), sum(alpha)
    value = math.lgamma(s) - math.lgamma(k) - sum(math.lgamma(a) for a in alpha)
    return value + sum((a - 1) * (sp_digamma(a) - sp_digamma(s)) for a in alpha)


def test_ace_loss_against_plain_digamma():
    alpha = torch.tensor([[4.0, 2.0], [1.5, 7.0], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    expected = sum(sp_digamma(sum(a)) - sp_digamma(a[y]) for a, y in zip(alpha.tolist(), labels.tolist())) / 3
    assert uml.ace_loss(alpha, labels).item() == pytest.approx(expected, rel=1e-10)


def test_ice_loss_against_plain_loop():
    torch.manual_seed(1)
    alpha = 1 + 5 * torch.rand(2, 3, 2, 3, dtype=torch.float64)
    masks = torch.randint(0, 3, (2, 2, 3))
    total = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(3):
                a = alpha[b, :, i, j].tolist()
                total += sp_digamma(sum(a)) - sp_digamma(a[int(masks[b, i, j])])
    assert uml.ice_loss(alpha, masks).item() == pytest.approx(total / 12, rel=1e-10)


def test_kl_against_plain_and_torch_distributions():
    alpha = torch.tensor([[3.0, 1.5, 2.0], [1.0, 9.0, 1.2]], dtype=torch.float64)
    ours = uml.kl_to_uniform_dirichlet(alpha, dim=1)
    for row, value in zip(alpha.tolist(), ours.tolist()):
        assert value == pytest.approx(plain_kl_to_uniform(row), rel=1e-10)
    reference = torch.distributions.kl_divergence(torch.distributions.Dirichlet(alpha),
                                                  torch.distributions.Dirichlet(torch.ones_like(alpha)))
    assert torch.allclose(ours, reference)


def test_kl_loss_removes_target_evidence():
    # alpha~ = y + (1 - y) alpha: the target's alpha becomes 1, the others stay
    alpha = torch.tensor([[5.0, 2.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert uml.kl_loss(alpha, y).item() == pytest.approx(plain_kl_to_uniform([1.0, 2.0, 3.0]), rel=1e-10)


def test_kl_is_zero_when_alpha_tilde_is_one():
    # all evidence on the target class: alpha~ = 1 everywhere, KL(Dir(1) || Dir(1)) = 0
    alpha = torch.tensor([[7.0, 1.0], [1.0, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert uml.kl_loss(alpha, y).item() == pytest.approx(0.0, abs=1e-6)
    assert uml.kl_to_uniform_dirichlet(torch.ones(4, 3)).abs().max().item() < 1e-6
    # per pixel (dim 1 = classes), evidence only on the target: zero as well
    masks = torch.tensor([[[0, 2], [1, 1]]])
    y = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    assert uml.kl_loss(1 + 4 * y, y).item() == pytest.approx(0.0, abs=1e-6)


def test_learning_rate_is_held_then_decays_to_the_floor():
    # 100 steps, held for 30 (the authors' 30 of 100 epochs), power 0.9, floor 1e-5 / 1e-4
    assert uml.poly_lr_factor(0, 100, 30, 0.9, 0.1) == 1.0
    assert uml.poly_lr_factor(30, 100, 30, 0.9, 0.1) == 1.0
    assert uml.poly_lr_factor(65, 100, 30, 0.9, 0.1) == pytest.approx(0.5 ** 0.9)
    assert uml.poly_lr_factor(99, 100, 30, 0.9, 0.1) == 0.1            # floored
    assert uml.poly_lr_factor(50, 100, 0, 1.0, 0.0) == pytest.approx(0.5)


def test_annealing_coefficient():
    assert uml.annealing_coefficient(0, 50) == 0.0
    assert uml.annealing_coefficient(10, 50) == pytest.approx(0.2)
    assert uml.annealing_coefficient(50, 50) == 1.0
    assert uml.annealing_coefficient(80, 50) == 1.0


def test_classification_loss_anneals_kl():
    logits = torch.tensor([[0.3, 2.0], [1.0, -1.0]])
    labels = torch.tensor([0, 0])
    alpha, _, _ = uml.evidential_opinion(logits)
    y = torch.nn.functional.one_hot(labels, 2).float()
    ace, kl = uml.ace_loss(alpha, labels), uml.kl_loss(alpha, y)
    assert uml.classification_loss(logits, labels, True, 0.0).item() == pytest.approx(ace.item(), rel=1e-6)
    assert uml.classification_loss(logits, labels, True, 0.4).item() == pytest.approx((ace + 0.4 * kl).item(), rel=1e-6)
    assert uml.classification_loss(logits, labels, False, 1.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


def test_dice_loss_hand_values():
    masks = torch.tensor([[[0, 1], [1, 1]]])  # class 0: 1 pixel, class 1: 3 pixels
    perfect = torch.nn.functional.one_hot(masks, 2).permute(0, 3, 1, 2).float()
    assert uml.dice_loss(perfect, masks, eps=0).item() == pytest.approx(0.0, abs=1e-7)
    half = torch.full((1, 2, 2, 2), 0.5)
    # class 0: 2*0.5 / (2 + 1) = 1/3; class 1: 2*1.5 / (2 + 3) = 3/5; loss = 1 - (1/3 + 3/5)/2
    assert uml.dice_loss(half, masks, eps=0).item() == pytest.approx(1 - (1 / 3 + 3 / 5) / 2, rel=1e-6)


def test_mutual_loss_is_sum_of_its_terms():
    torch.manual_seed(2)
    alpha = 1 + 3 * torch.rand(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 4, 4))
    y = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float()
    expected = (uml.ice_loss(alpha, masks) + 0.3 * uml.kl_loss(alpha, y)
                + 0.7 * uml.dice_loss(alpha / alpha.sum(1, keepdim=True), masks))
    assert uml.mutual_loss(alpha, masks, 0.3, 0.7).item() == pytest.approx(expected.item(), rel=1e-6)


def test_segmentation_loss_deep_supervision_sums_levels():
    torch.manual_seed(3)
    masks = torch.randint(0, 2, (1, 8, 8))
    seg = [torch.randn(1, 2, 8 // 2 ** i, 8 // 2 ** i) for i in range(4)]
    levels = [uml.dice_loss(torch.nn.functional.interpolate(s, size=(8, 8), mode="bilinear",
                                                            align_corners=False).softmax(1), masks) for s in seg]
    full = uml.segmentation_loss(seg, masks, False, True, 1.0, 1.0)
    assert full.item() == pytest.approx(sum(levels).item(), rel=1e-6)  # Eq. 8: a sum over s_1..s_4
    assert uml.segmentation_loss(seg, masks, False, False, 1.0, 1.0).item() == pytest.approx(levels[0].item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Eq. 3 and Eq. 5 on hand tensors; model structure
# ---------------------------------------------------------------------------------------------


def test_reliable_mask_eq3():
    s = torch.tensor([[[[1.0]], [[2.0]]]])          # [1, 2, 1, 1]
    m = torch.tensor([[[[3.0]], [[1.0]]]])
    u = torch.full((1, 1, 1, 1), math.log(2.0))     # exp(-U) = 1/2
    assert torch.allclose(uml.reliable_mask(s, m, u), torch.tensor([[[[2.0]], [[1.5]]]]))
    assert torch.allclose(uml.reliable_mask(s, m, torch.zeros(1, 1, 1, 1)), s + m)


def test_reliable_classification_feature_eq5():
    f = torch.tensor([2.0, -1.0, 4.0])
    eta = torch.tensor([0.5, 3.0, 0.0])
    assert torch.allclose(uml.reliable_classification_feature(f, eta), torch.tensor([3.0, -4.0, 4.0]))


def test_uncertainty_instructor_pools_rs_three_times():
    ui = uml.UncertaintyInstructor(rs_ch=1, cls_ch=1)
    ui.conv = nn.Identity()  # check the d^3 and the gate, not the learned Conv
    r_s = torch.zeros(1, 1, 16, 16)
    r_s[..., :8, :8] = 2.0                          # mean 2 over the top-left 8x8 block only
    f = torch.ones(1, 1, 2, 2) * 3
    out = ui(f, r_s)
    assert torch.allclose(out, torch.tensor([[[[9.0, 3.0], [3.0, 3.0]]]]))  # 3 + 2*3 where r_s pooled to 2


def test_pcmi_interleaves_channel_maps():
    pcmi = uml.PairwiseChannelMapInteraction(2, 2, 2)
    pcmi.project_cls = pcmi.project_seg = pcmi.attention = pcmi.fuse = nn.Identity()
    c = torch.arange(2.0).view(1, 2, 1, 1)
    s = 10 + torch.arange(2.0).view(1, 2, 1, 1)
    assert pcmi(c, s).flatten().tolist() == [0.0, 10.0, 1.0, 11.0]


def test_encoders_give_four_levels():
    x = torch.randn(2, 3, 32, 32)
    vgg, res2net = uml.VGGEncoder(4), uml.Res2NetEncoder(4, (1, 2, 1))
    for encoder in (vgg, res2net):
        features = encoder(x)
        assert [f.shape[-1] for f in features] == [32, 16, 8, 4]
        assert [f.shape[1] for f in features] == encoder.channels
    assert res2net.channels == [4, 16, 32, 64]


def test_instructor_carries_classification_gradient_into_segmentation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    def grad_norm(spec):
        model = uml.UMLNet(spec, 2, 3, 4, (1, 1, 1))
        model(x)["cls_logits"].sum().backward()
        g = model.decoder.top[0].weight.grad
        return 0.0 if g is None else g.abs().sum().item()

    assert grad_norm(uml.ROWS["UML"][1]) > 0          # UI: r^s feeds the classifier
    assert grad_norm(uml.ROWS["+MD"][1]) == 0.0       # no UI: no path


SMALL = argparse.Namespace(width=4, res2net_blocks=[1, 1, 1], res2net_base_width=26, res2net_scale=4,
                           vgg_batch_norm=True)


def test_model_spec_switches_components():
    model = uml.build_model(uml.ROWS["+MD+UI"][1], SMALL, 2, 3)
    out = model(torch.randn(1, 3, 32, 32))
    assert isinstance(model.mutual_decoder, uml.MutualFeatureDecoder) and type(model.decoder) is uml.SegmentationDecoder
    assert out["mutual_alpha"].shape == (1, 3, 32, 32) and out["mutual_uncertainty"].shape == (1, 1, 32, 32)
    assert out["seg"][0].shape == (1, 3, 32, 32) and out["cls_logits"].shape == (1, 2)
    bcs = uml.build_model(uml.ROWS["BCS"][1], SMALL, 2, 3)
    assert isinstance(bcs.mutual_decoder, uml.NoMutualDecoder) and isinstance(bcs.instructor, uml.NoInstructor)
    assert list(bcs.mixer) == ["3"] and "mutual_alpha" not in bcs(torch.randn(1, 3, 32, 32))  # f_4^m only, no M
    tbrats = uml.build_model(uml.ROWS["TBraTS"][1], SMALL, 2, 3)
    assert isinstance(tbrats, uml.TBraTSNet) and type(tbrats.decoder) is uml.SegmentationDecoder
    assert list(tbrats.decoder.heads) == ["s1", "s2", "s3", "s4"]     # no deep supervision: Eq. 8 reads s_1 only
    assert set(tbrats(torch.randn(1, 3, 32, 32))) == {"seg"}
    no_ui = uml.build_model(uml.replace(uml.ROWS["UML"][1], instructor=False), SMALL, 2, 3)
    assert isinstance(no_ui.instructor, uml.NoInstructor) and isinstance(no_ui.decoder, uml.UncertaintyNavigator)
    # the paper's UML has no dead part: every parameter reaches the loss of Eq. 9
    torch.manual_seed(0)
    model, spec = uml.build_model(uml.ROWS["UML"][1], SMALL, 2, 3), uml.ROWS["UML"][1]
    loss, _ = uml.total_loss(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 3, (2, 32, 32)),
                             torch.tensor([0, 1]), spec, anneal=0.5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    ec = uml.build_model(uml.ROWS["EC"][1], SMALL, 2, 3)
    assert isinstance(ec, uml.ECNet) and not hasattr(ec, "seg_encoder") and set(ec(torch.randn(1, 3, 32, 32))) == {"cls_logits"}


def test_navigator_guides_by_m_and_u_eq3_eq4():
    # with U^s = 0 and M = 0 the UN's bottom level is the plain decoder's d_4, fused with Conv(M^r_4 = s_4)
    nav = uml.UncertaintyNavigator([4, 16, 32, 64], 32, 3).eval()
    f_seg = [torch.randn(1, c, 32 // 2 ** i, 32 // 2 ** i) for i, c in enumerate([4, 16, 32, 64])]
    bottom = torch.randn(1, 96, 4, 4)
    zero = {"mutual_alpha": torch.zeros(1, 3, 32, 32), "mutual_uncertainty": torch.zeros(1, 1, 32, 32)}
    d_4 = nav.bottom(bottom)
    s_4 = nav.heads["s4"](d_4)
    fused, s_4_nav = nav.bottom_level(bottom, zero)
    assert torch.allclose(s_4_nav, s_4) and torch.allclose(fused, nav.fuse_bottom(torch.cat([nav.mask_conv_bottom(s_4), d_4], 1)))
    # U^s = ln 2 everywhere: the bottom input is halved (exp(-U^s)) and M^r_4 = (s_4 + d^3(M)) / 2
    m = torch.rand(1, 3, 32, 32)
    half = {"mutual_alpha": m, "mutual_uncertainty": torch.full((1, 1, 32, 32), math.log(2.0))}
    d_4 = nav.bottom(bottom / 2)
    s_4 = nav.heads["s4"](d_4)
    m_r_4 = (s_4 + torch.nn.functional.avg_pool2d(m, 8)) / 2
    fused, _ = nav.bottom_level(bottom, half)
    assert torch.allclose(fused, nav.fuse_bottom(torch.cat([nav.mask_conv_bottom(m_r_4), d_4], 1)), atol=1e-6)
    seg, r_s = nav(f_seg, bottom, half)                   # Eq. 4: r^s = Cat(Conv((s_1 + M) / 2), Cat(f_1^s, f_2^b))
    assert r_s.shape == (1, nav.rs_channels, 32, 32) and nav.rs_channels == 4 + 4 + 8
    assert torch.allclose(r_s[:, :4], nav.mask_conv_top((seg[0] + m) / 2), atol=1e-6)
    assert torch.equal(r_s[:, 4:8], f_seg[0])
    plain = uml.SegmentationDecoder([4, 16, 32, 64], 32, 3).eval()   # the baselines: r^s = Cat(f_1^s, f_2^b)
    _, r_s = plain(f_seg, bottom, {})
    assert r_s.shape[1] == plain.rs_channels == 4 + 8 and torch.equal(r_s[:, :4], f_seg[0])


def test_total_loss_is_eq9_with_the_given_weights_and_lambdas():
    torch.manual_seed(5)
    masks, labels = torch.randint(0, 3, (2, 8, 8)), torch.tensor([1, 0])
    out = {"mutual_alpha": 1 + 3 * torch.rand(2, 3, 8, 8), "cls_logits": torch.randn(2, 2),
           "seg": [torch.randn(2, 3, 8 // 2 ** i, 8 // 2 ** i) for i in range(4)]}
    loss, parts = uml.total_loss(out, masks, labels, uml.ROWS["UML"][1], 0.25, loss_weights=(0.2, 0.3, 0.6),
                                 lambda_kl_mut=2.0, lambda_dice_mut=0.5, lambda_kl_cls=4.0, eq8="mean")
    l_mut = uml.mutual_loss(out["mutual_alpha"], masks, 0.25 * 2.0, 0.5)
    l_cls = uml.classification_loss(out["cls_logits"], labels, True, 0.25 * 4.0)
    l_seg = uml.segmentation_loss(out["seg"], masks, False, True, 0.5, 0.5, "mean")
    assert torch.allclose(parts, torch.stack([l_mut, l_cls, l_seg]))
    assert loss.item() == pytest.approx((0.2 * l_mut + 0.3 * l_cls + 0.6 * l_seg).item(), rel=1e-6)
    default, _ = uml.total_loss(out, masks, labels, uml.ROWS["UML"][1], 1.0)   # the paper's weights
    expected = (0.1 * uml.mutual_loss(out["mutual_alpha"], masks, 1.0, 1.0) + 0.5 * uml.classification_loss(
        out["cls_logits"], labels, True, 1.0) + 0.4 * uml.segmentation_loss(out["seg"], masks, False, True, 1.0, 1.0))
    assert default.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Metrics in the paper's forms
# ---------------------------------------------------------------------------------------------


def test_f1_weighted_hand_case():
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0, 1, 0])
    # class 0: TP 3, FP 1, FN 1 -> F1 6/8; class 1: TP 1, FP 1, FN 1 -> F1 1/2; supports 4 and 2
    assert common.f1_weighted(pred, target, 2) == pytest.approx(4 / 6 * 0.75 + 2 / 6 * 0.5)
    assert common.f1_score(pred, target, 2, positive=1) == pytest.approx(0.5)
    # a class never predicted nor present gets weight 0; an all-wrong prediction scores 0
    assert common.f1_weighted(torch.tensor([1, 1]), torch.tensor([0, 0]), 3) == 0.0


def medpy_assd_with_scipy(pred, target):
    """medpy.metric.binary.assd written with scipy: mean of the two directed means (4-connected boundary)."""
    import numpy as np
    from scipy import ndimage

    def directed(a, b):
        cross = ndimage.generate_binary_structure(2, 1)
        border_a = a ^ ndimage.binary_erosion(a, cross)
        border_b = b ^ ndimage.binary_erosion(b, cross)
        return ndimage.distance_transform_edt(~border_b)[border_a].mean()
    a, b = np.asarray(pred, bool), np.asarray(target, bool)
    return 0.5 * (directed(a, b) + directed(b, a))


def test_assd_authors_form_and_empty_convention():
    target = torch.zeros(1, 5, 5, dtype=torch.bool)
    target[0, 1:4, 1:4] = True                      # 3x3 block: 8 boundary pixels around the centre
    pred = torch.zeros(1, 5, 5, dtype=torch.bool)
    pred[0, 2, 2] = True                            # the centre pixel alone
    # pred -> target: 1; target -> pred: 4 edges at 1, 4 corners at sqrt 2 -> (4 + 4 sqrt 2) / 8
    medpy = 0.5 * (1 + (4 + 4 * math.sqrt(2)) / 8)
    assert common.assd_medpy(pred, target).item() == pytest.approx(medpy, abs=1e-9)
    assert common.assd_medpy(pred, target).item() == pytest.approx(medpy_assd_with_scipy(pred[0], target[0]), abs=1e-9)
    assert common.assd(pred, target).item() == pytest.approx((1 + 4 + 4 * math.sqrt(2)) / 9, abs=1e-9)  # pooled
    empty = torch.zeros(1, 5, 5, dtype=torch.bool)
    # the authors' medpy copy: an empty mask gives distances of 10 px, so ASSD 10 (both empty too)
    assert common.assd_medpy(empty, target).tolist() == [10.0] and common.assd_medpy(empty, empty).tolist() == [10.0]
    assert common.assd(empty, target).tolist() == [math.inf] and common.assd(empty, empty).tolist() == [0.0]


class FixedOutputs(nn.Module):
    """A stand-in model that returns given outputs (evaluate's arithmetic on hand cases)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def test_evaluate_reports_both_metric_forms_on_a_hand_case():
    # two 8x8 fundus images: masks 0 background, 1 rim, 2 cup
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[:, 2:6, 2:6] = 1
    masks[:, 3:5, 3:5] = 2
    predicted = masks.clone().long()
    predicted[1] = 0                                # image 1: nothing found
    seg = torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 10
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # evidential: predicts class 0, then class 1
    split = {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "masks": masks, "labels": torch.tensor([0, 0])}
    data = {"n_classes": 2, "structures": uml.mask_structures(["background", "rim", "cup"])}
    args = argparse.Namespace(batch_size=2, amp=False, seed=0)
    model = FixedOutputs({"cls_logits": logits, "seg": [seg], "mutual_uncertainty": torch.zeros(2, 1, 8, 8)})
    norm = (torch.zeros(3), torch.ones(3))
    metrics, _ = uml.evaluate(model, split, uml.ROWS["UML"][1], data, norm, args, torch.device("cpu"))
    assert metrics["dice_rim"] == pytest.approx(0.5) and metrics["dice_disc"] == pytest.approx(0.5)
    assert metrics["assd_rim"] == 0.0 and metrics["assd_rim_undefined_images"] == 1     # ours: left out, counted
    assert metrics["assd_rim_authors"] == pytest.approx(5.0)                    # authors': (0 + 10) / 2
    assert metrics["acc"] == 0.5 and metrics["f1_weighted"] == pytest.approx(2 / 3)  # F1_0 = 2/3 has all the support
    alpha = torch.nn.functional.softplus(logits) + 1
    confidence = (alpha / alpha.sum(1, keepdim=True)).max(1).values          # expected probability alpha/S
    assert metrics["ece"] == pytest.approx(common.expected_calibration_error(confidence, torch.tensor([True, False])))
    belief = (alpha - 1) / alpha.sum(1, keepdim=True)
    assert metrics["ece_belief"] == pytest.approx(common.expected_calibration_error(belief.max(1).values,
                                                                                    torch.tensor([True, False])))
    bcs, _ = uml.evaluate(model, split, uml.ROWS["BCS"][1], data, norm, args, torch.device("cpu"))
    softmax = logits.softmax(1).max(1).values
    assert bcs["ece"] == pytest.approx(common.expected_calibration_error(softmax, torch.tensor([True, False])))
    assert "ece_belief" not in bcs


def test_noisy_inputs_are_clipped_to_unit_range():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 4, 3).contiguous()
    identity = (torch.zeros(3), torch.ones(3))
    generator = torch.Generator().manual_seed(0)
    x = uml.model_input(images, identity, torch.device("cpu"), sigma=5.0, generator=generator)
    assert x.min().item() == 0.0 and x.max().item() == 1.0          # clipped, as the authors do
    clean = uml.model_input(images, identity, torch.device("cpu"))
    assert torch.allclose(clean[0, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))
    norm = (torch.full((3,), 0.5), torch.full((3,), 0.25))          # normalisation comes after the clip
    y = uml.model_input(images, norm, torch.device("cpu"), 5.0, torch.Generator().manual_seed(0))
    assert torch.allclose(y, (x - 0.5) / 0.25)


def test_tbrats_has_no_deep_supervision_and_eq8_mean_divides_by_four():
    assert not uml.ROWS["TBraTS"][1].deep_supervision and uml.ROWS["UML"][1].deep_supervision
    torch.manual_seed(4)
    masks = torch.randint(0, 3, (2, 8, 8))
    seg = [torch.randn(2, 3, 8 // 2 ** i, 8 // 2 ** i) for i in range(4)]
    loss, parts = uml.total_loss({"seg": seg}, masks, None, uml.ROWS["TBraTS"][1], anneal=0.5)
    alpha = torch.nn.functional.softplus(seg[0]) + 1
    only_s1 = uml.mutual_loss(alpha, masks, 0.5, 1.0)          # the KL annealed by 1/2
    assert loss.item() == pytest.approx(0.4 * only_s1.item(), rel=1e-6) and parts[2].item() == pytest.approx(only_s1.item())
    total = uml.segmentation_loss(seg, masks, False, True, 1.0, 1.0, "sum")
    assert uml.segmentation_loss(seg, masks, False, True, 1.0, 1.0, "mean").item() == pytest.approx(total.item() / 4)


# ---------------------------------------------------------------------------------------------
# ImageNet weights in the standard files' layouts
# ---------------------------------------------------------------------------------------------


def unused_tensor(*shape):
    """A tensor of the real shape backed by one number (the unused layers would be hundreds of MB)."""
    return torch.zeros(1).expand(*shape)


def torchvision_vgg16_state(batch_norm=False):
    """torchvision's vgg16 (vgg16-397923af.pth) / vgg16_bn key layout: features.N = conv, [bn], relu, pools."""
    generator, state, index, in_ch = torch.Generator().manual_seed(0), {}, 0, 3
    for position, ch in enumerate([64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]):
        if ch == "M":
            index += 1
            continue
        used = position < 13                                           # blocks 1-4
        make = (lambda *s: torch.randn(*s, generator=generator) * 0.05) if used else unused_tensor
        state[f"features.{index}.weight"], state[f"features.{index}.bias"] = make(ch, in_ch, 3, 3), make(ch)
        if batch_norm:
            state.update({f"features.{index + 1}.weight": make(ch), f"features.{index + 1}.bias": make(ch),
                          f"features.{index + 1}.running_mean": make(ch),
                          f"features.{index + 1}.running_var": (make(ch).abs() + 0.5) if used else unused_tensor(ch)})
        index += 3 if batch_norm else 2
        in_ch = ch
    for name, shape in (("classifier.0", (4096, 25088)), ("classifier.3", (4096, 4096)), ("classifier.6", (1000, 4096))):
        state[f"{name}.weight"], state[f"{name}.bias"] = unused_tensor(*shape), unused_tensor(shape[0])
    return state


def res2net50_v1b_state():
    """res2net50_v1b_26w_4s-3cf99910.pth key layout (Res2Net-PretrainedModels' res2net_v1b.py)."""
    generator, state = torch.Generator().manual_seed(1), {}

    def bn(prefix, ch, used=True):
        make = (lambda: torch.rand(ch, generator=generator) + 0.5) if used else (lambda: unused_tensor(ch))
        state.update({f"{prefix}.{k}": make() for k in ("weight", "bias", "running_mean", "running_var")})
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    def conv(prefix, *shape, used=True):
        state[f"{prefix}.weight"] = torch.randn(*shape, generator=generator) * 0.05 if used else unused_tensor(*shape)

    conv("conv1.0", 32, 3, 3, 3), bn("conv1.1", 32), conv("conv1.3", 32, 32, 3, 3), bn("conv1.4", 32)
    conv("conv1.6", 64, 32, 3, 3), bn("bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        width, used = planes * 26 // 64, layer < 4
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            conv(f"{p}.conv1", width * 4, inplanes, 1, 1, used=used), bn(f"{p}.bn1", width * 4, used)
            for i in range(3):
                conv(f"{p}.convs.{i}", width, width, 3, 3, used=used), bn(f"{p}.bns.{i}", width, used)
            conv(f"{p}.conv3", planes * 4, width * 4, 1, 1, used=used), bn(f"{p}.bn3", planes * 4, used)
            if b == 0:
                conv(f"{p}.downsample.1", planes * 4, inplanes, 1, 1, used=used), bn(f"{p}.downsample.2", planes * 4, used)
            inplanes = planes * 4
    state["fc.weight"], state["fc.bias"] = unused_tensor(1000, 2048), unused_tensor(1000)
    return state


def load_state(model, monkeypatch, vgg=None, res2net=None):
    """load_imagenet_weights with the files' contents given as state dicts (no file written)."""
    monkeypatch.setattr(uml, "read_state_dict", lambda path, flag: vgg if flag == "--pretrained-vgg" else res2net)
    uml.load_imagenet_weights(model, vgg and "vgg.pth", res2net and "res2net.pth")


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_file_loads_into_the_paper_size_encoder(batch_norm, monkeypatch, capsys):
    state = torchvision_vgg16_state(batch_norm)
    model = uml.ECNet(2, 64, batch_norm)
    load_state(model, monkeypatch, vgg=state)
    assert f"loaded {60 if batch_norm else 20} tensors" in capsys.readouterr().out  # 10 convs: w, b (+ 4 bn)
    encoder = model.cls_encoder.eval()
    x = torch.randn(1, 3, 16, 16)
    y = torch.nn.functional.conv2d(x, state["features.0.weight"], state["features.0.bias"], padding=1)
    if batch_norm:
        y = torch.nn.functional.batch_norm(y, state["features.1.running_mean"], state["features.1.running_var"],
                                           state["features.1.weight"], state["features.1.bias"])
    assert torch.allclose(encoder.features[:3 if batch_norm else 2](x), y.relu(), atol=1e-5)  # conv1_1 = the file's
    conv4_3 = "features.30" if batch_norm else "features.21"    # f_4^c's conv, by its index in the file
    assert torch.equal(encoder.features[int(conv4_3.split(".")[1])].bias, state[conv4_3 + ".bias"])
    assert torch.equal(encoder.features[0].weight, state["features.0.weight"])


def test_res2net_file_loads_into_the_paper_size_encoder(monkeypatch, capsys):
    state = res2net50_v1b_state()
    model = uml.TBraTSNet(3, 64, (3, 4, 6))
    load_state(model, monkeypatch, res2net=state)
    used = [k for k in state if not k.startswith(("layer4.", "fc."))]
    assert f"loaded {len(used)} tensors" in capsys.readouterr().out
    encoder = model.seg_encoder.eval()
    x = torch.randn(1, 3, 16, 16)
    y = torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x, state["conv1.0.weight"], padding=1),
                                       state["conv1.1.running_mean"], state["conv1.1.running_var"],
                                       state["conv1.1.weight"], state["conv1.1.bias"])
    assert torch.allclose(encoder.conv1[:3](x), y.relu(), atol=1e-5)   # stem conv 1 (stride 1: Deviations)
    assert torch.equal(encoder.layer3[0].downsample[1].weight, state["layer3.0.downsample.1.weight"])
    assert torch.equal(encoder.layer2[3].bns[2].running_var, state["layer2.3.bns.2.running_var"])
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())  # every tensor from the file


def test_pretrained_errors_name_the_key(monkeypatch):
    model = uml.TBraTSNet(3, 64, (3, 4, 6))
    renamed = res2net50_v1b_state()
    renamed["layer2.0.conv.1.weight"] = renamed.pop("layer2.0.convs.1.weight")
    with pytest.raises(common.UsageError, match='--pretrained-res2net res2net.pth does not fit.*Missing.*"layer2.0.convs.1.weight"'):
        load_state(model, monkeypatch, res2net=renamed)
    reshaped = res2net50_v1b_state()
    reshaped["layer1.2.conv3.weight"] = torch.zeros(256, 104, 3, 3)
    with pytest.raises(common.UsageError, match=r"layer1.2.conv3.weight: copying a param with shape .*256, 104, 3, 3"):
        load_state(model, monkeypatch, res2net=reshaped)
    extra = res2net50_v1b_state()
    extra["layer3.1.se.weight"] = torch.zeros(4)
    with pytest.raises(common.UsageError, match='Unexpected key.*"layer3.1.se.weight"'):
        load_state(model, monkeypatch, res2net=extra)
    with pytest.raises(common.UsageError, match='--pretrained-vgg .*"features.1.weight"'):   # plain vgg16 into vgg16_bn
        load_state(uml.ECNet(2, 64, vgg_batch_norm=True), monkeypatch, vgg=torchvision_vgg16_state(False))


def test_read_state_dict_opens_the_wrapper_and_names_bad_files(tmp_path):
    theirs = {"features.0.weight": torch.randn(2, 1, 3, 3), "fc.weight": torch.zeros(10, 2)}
    torch.save({"state_dict": theirs}, tmp_path / "w.pth")
    state = uml.read_state_dict(tmp_path / "w.pth", "--weights")                # the wrapper is opened
    assert set(state) == set(theirs) and torch.equal(state["features.0.weight"], theirs["features.0.weight"])
    (tmp_path / "bad.pth").write_bytes(b"not a file torch can read")
    with pytest.raises(common.UsageError, match="--weights .*bad.pth: cannot read it"):
        uml.read_state_dict(tmp_path / "bad.pth", "--weights")
    torch.save({"a": 1}, tmp_path / "numbers.pth")
    with pytest.raises(common.UsageError, match="not a state dict of tensors"):
        uml.read_state_dict(tmp_path / "numbers.pth", "--weights")


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    torch.save(torchvision_vgg16_state(False), folder / "vgg16-397923af.pth")
    torch.save(res2net50_v1b_state(), folder / "res2net50_v1b_26w_4s-3cf99910.pth")
    return folder / "vgg16-397923af.pth", folder / "res2net50_v1b_26w_4s-3cf99910.pth"


def test_pretrained_flags_load_for_every_method(weight_files):
    vgg, res2net = weight_files
    args = uml.resolve_defaults(uml.build_parser().parse_args(
        ["--width", "64", "--res2net-blocks", "3,4,6", "--pretrained-vgg", str(vgg), "--pretrained-res2net", str(res2net)]))
    assert args.vgg_batch_norm is False                         # follows the plain vgg16 file
    vgg_state, res2net_state = torch.load(vgg, weights_only=True), torch.load(res2net, weights_only=True)
    for method in ("EC", "TBraTS", "BCS", "ECS", "UML"):
        model = uml.build_model(uml.ROWS[method][1], args, 2, 3)
        uml.load_imagenet_weights(model, args.pretrained_vgg, args.pretrained_res2net)
        if method != "TBraTS":
            assert torch.equal(model.cls_encoder.features[5].weight, vgg_state["features.5.weight"])
        if method != "EC":
            assert torch.equal(model.seg_encoder.bn1.weight, res2net_state["bn1.weight"])
        assert hasattr(model, "cls_encoder") == (method != "TBraTS") and hasattr(model, "seg_encoder") == (method != "EC")
    with pytest.raises(common.UsageError, match="paper-size encoders"):
        uml.resolve_defaults(uml.build_parser().parse_args(["--pretrained-vgg", str(vgg)]))  # synthetic width 8


# ---------------------------------------------------------------------------------------------
# End to end (--quick)
# ---------------------------------------------------------------------------------------------

QUICK = ["--quick", "--n-train", "8", "--n-val", "4", "--n-test", "4", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def all_tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("uml") / "tables"
    uml.main(QUICK + ["--table1", "--table2", "--table3", "--out", str(out)])
    return out


def test_quick_tables_write_every_row(all_tables):
    results = json.loads((all_tables / "results.json").read_text())
    assert results["script"] == "uml" and results["data"] == "synthetic-fundus"
    for key in ("acc", "f1", "f1_weighted", "dice_disc", "assd_disc", "dice_cup", "assd_cup", "dice_rim",
                "assd_rim", "assd_disc_authors", "assd_rim_authors", "uncertainty_auroc", "ece", "ece_belief"):
        assert key in results["metrics"]
    for key in ("acc", "f1", "dice_disc", "dice_cup", "ece"):
        assert math.isfinite(results["metrics"][key])
    rows = {(r["table"], r["row"]) for r in results["table"]}
    assert {(1, n) for n in ("EC", "TBraTS", "BCS", "ECS", "UML")} <= rows
    noise = {(2, f"{n} sigma={s}") for n in ("BCS", "ECS", "UML") for s in ("0.00", "0.01", "0.03", "0.05")}
    assert noise <= rows                                      # --table2 writes all noise rows
    assert {(3, n) for n in ("BCS", "+MD", "+MD+UI", "UML")} <= rows
    by_row = {(r["table"], r["row"]): r for r in results["table"]}
    assert "dice_disc" not in by_row[(1, "EC")] and "acc" not in by_row[(1, "TBraTS")]  # shown as '\\'
    for key in ("f1_weighted", "dice_rim", "assd_rim_authors", "assd_cup_authors", "assd_cup_undefined_images", "ece"):
        assert key in by_row[(1, "BCS")] and key in by_row[(1, "UML")]   # both metric forms, every row
    assert "ece_belief" in by_row[(1, "UML")] and "ece_belief" not in by_row[(1, "BCS")]  # softmax: no belief
    assert by_row[(3, "+MD+UI")]["UN"] == "-" and by_row[(3, "UML")]["UN"] == "✓"
    markdown = (all_tables / "results.md").read_text()
    for title in ("Table 1 (paper's metric forms)", "Table 1, our metric forms", "Table 2: Gaussian noise sigma = 0.05",
                  "Table 3", "support-weighted F1"):
        assert title in markdown
    assert (all_tables / "figures" / "fig3.png").stat().st_size > 0
    assert (all_tables / "UML-seed0" / "best.pt").exists() and (all_tables / "BCS-seed0" / "best.pt").exists()
    log = [json.loads(line) for line in (all_tables / "log.jsonl").read_text().splitlines()]
    assert {r["row"] for r in log if "epoch" in r} == {"EC", "TBraTS", "BCS", "ECS", "UML", "+MD", "+MD+UI"}


def test_eval_only_reproduces_the_main_row(all_tables, tmp_path):
    uml.main(QUICK + ["--eval-only", "--checkpoint", str(all_tables / "UML-seed0" / "best.pt"),
                      "--out", str(tmp_path / "ev")])
    before = json.loads((all_tables / "results.json").read_text())["metrics"]
    after = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    for key in ("acc", "f1", "dice_disc", "dice_cup", "ece"):
        assert after[key] == pytest.approx(before[key], abs=1e-9)


class Killed(BaseException):
    """Stands for kill -9 in the middle of a run: not an Exception, so nothing on its way catches it."""


def interrupt_after(monkeypatch, seed, epoch):
    """The run stops right after the job of `seed` saved the checkpoint of `epoch` (counted from 1)."""
    save = common.save

    def save_then_stop(job, done, *args, **kwargs):
        best = save(job, done, *args, **kwargs)
        if (job.seed, done) == (seed, epoch):
            raise Killed
        return best
    monkeypatch.setattr(common, "save", save_then_stop)


def test_quick_breast_ablation_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "breast"
    with monkeypatch.context() as m:
        interrupt_after(m, seed=0, epoch=1)
        with pytest.raises(Killed):
            uml.main(QUICK + ["--data", "synthetic-breast", "--no-uncertainty-navigator", "--noise-sigmas", "0",
                              "--epochs", "2", "--out", str(out)])
    uml.main(["--resume", str(out / "+MD+UI-seed0" / "last.pt")])  # a checkpoint inside the run names it too
    results = json.loads((out / "results.json").read_text())
    assert {"acc", "f1", "dice_tumor", "assd_tumor", "uncertainty_auroc", "ece"} <= set(results["metrics"])
    assert results["table"][0]["row"] == "+MD+UI"
    epochs = [r["epoch"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "epoch" in r]
    assert epochs == [1, 2]  # the resumed run continued with epoch 2 in the same folder


def test_non_finite_loss_names_epoch_and_step_as_the_log(tmp_path, monkeypatch, capsys):
    real, calls = uml.total_loss, []

    def total_loss(*args, **kwargs):  # NaN from the 2nd step of the 1st epoch on
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) >= 2 else loss), parts
    monkeypatch.setattr(uml, "total_loss", total_loss)
    with pytest.raises(SystemExit) as stop:
        common.cli(uml.main, QUICK + ["--noise-sigmas", "0", "--log-every", "1", "--out", str(tmp_path / "nan")])
    printed = capsys.readouterr()
    assert stop.value.code == 2 and "loss is nan at epoch 1 step 2;" in printed.err and "Traceback" not in printed.err
    assert "[UML-seed0] epoch 1 step 1/2" in printed.out    # the progress line counts epochs as log.jsonl does


@pytest.mark.parametrize("flag", [["--width", "0"], ["--res2net-blocks", "3,4"], ["--res2net-scale", "1"],
                                  ["--noise-sigmas", "0,-0.1"], ["--loss-weights", "0.1", "nan", "0.4"],
                                  ["--lr-floor", "-1"], ["--annealing-epochs", "0"], ["--figure-images", "0"]])
def test_bad_method_flags_are_one_line_and_write_nothing(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stop:
        common.cli(uml.main, QUICK + flag + ["--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and flag[0] in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_navigator_needs_mutual_decoder():
    with pytest.raises(common.UsageError):
        uml.main(QUICK + ["--no-mutual-decoder"])


def test_quick_refuge_layout_headline_command(tmp_path):
    from test_data import _refuge  # the REFUGE tree (official layout) that the data tests build

    out = tmp_path / "refuge-run"
    uml.main(["--data", "refuge", "--root", str(_refuge(tmp_path)), "--quick", "--device", "cpu",
              "--cache", str(tmp_path / "cache"), "--noise-sigmas", "0,0.05", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == "refuge" and results["config"]["lr"] == 1e-4  # the paper's value on real data
    assert {"acc", "f1", "dice_disc", "assd_disc", "dice_cup", "assd_cup"} <= set(results["metrics"])
    assert [r["row"] for r in results["table"] if r["table"] == 2] == ["UML sigma=0.00", "UML sigma=0.05"]


def test_refuge_metrics_ignore_the_letterbox_padding(tmp_path):
    from test_data import _refuge

    data = uml.load_data(argparse.Namespace(dataset="refuge", root=str(_refuge(tmp_path)), size=32, cache=tmp_path / "c",
                                            n_train=None, n_val=None, n_test=None, eval_only=False), torch.device("cpu"), 0)
    split = data["test"]
    assert split["valid"] is not None and (split["valid"] == 0).any()     # the test images are letterboxed
    everywhere = torch.full((3, 3, 32, 32), -10.0)
    everywhere[:, 2] = 10.0                                                # "cup" on every pixel, padding included
    model = FixedOutputs({"cls_logits": torch.zeros(3, 2), "seg": [everywhere], "mutual_uncertainty": torch.zeros(3, 1, 32, 32)})
    args = argparse.Namespace(batch_size=4, amp=False, seed=0)
    metrics, _ = uml.evaluate(model, split, uml.ROWS["UML"][1], data, (torch.zeros(3), torch.ones(3)), args, torch.device("cpu"))
    cup = (split["masks"] == 2)
    expected = (2 * cup.sum((1, 2)) / (cup.sum((1, 2)) + split["valid"].sum((1, 2)))).double().mean()
    assert metrics["dice_cup"] == pytest.approx(expected.item())          # the valid region counts, not the canvas


# ---------------------------------------------------------------------------------------------
# Seeds, noise rows and --predict
# ---------------------------------------------------------------------------------------------


SEEDS = QUICK + ["--seeds", "0,1", "--epochs", "2", "--noise-sigmas", "0,0.05", "--figure-images", "1"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("uml") / "seeds"
    uml.main(SEEDS + ["--out", str(out)])
    return out


def test_seeds_give_means_and_standard_errors(two_seeds):
    out = two_seeds
    results = json.loads((out / "results.json").read_text())
    row = results["table"][0]
    assert row["seeds"] == [0, 1] and [r["seed"] for r in row["per_seed"]] == [0, 1]
    for key in ("acc", "f1_weighted", "dice_cup", "assd_cup_authors", "ece"):
        a, b = (r[key] for r in row["per_seed"])
        assert results["metrics"][key] == pytest.approx((a + b) / 2)
        assert results["metrics"][key + "_se"] == pytest.approx(abs(a - b) / 2, rel=1e-5)  # std(ddof=1)/sqrt(2)
    assert (out / "UML-seed0" / "best.pt").exists() and (out / "UML-seed1" / "best.pt").exists()


def test_noise_rows_keep_their_seeds(two_seeds):
    results = json.loads((two_seeds / "results.json").read_text())
    noisy = next(r for r in results["table"] if r["row"] == "UML sigma=0.05")
    clean = next(r for r in results["table"] if r["row"] == "UML sigma=0.00")
    assert noisy["table"] == 2 and [r["seed"] for r in noisy["per_seed"]] == [0, 1]
    for seed, entry in zip((0, 1), noisy["per_seed"]):   # each seed's metrics at sigma 0.05, unprefixed
        job = json.loads((two_seeds / f"UML-seed{seed}" / "result.json").read_text())["metrics"]
        assert entry["acc"] == job["sigma=0.05/acc"] and entry["dice_cup"] == job["sigma=0.05/dice_cup"]
        assert not any(k.startswith("sigma=") for k in entry)
    for key in ("acc", "dice_disc", "assd_cup_authors"):
        a, b = (r[key] for r in noisy["per_seed"])
        assert noisy[key] == pytest.approx((a + b) / 2) and noisy[key + "_se"] == pytest.approx(abs(a - b) / 2, rel=1e-5)
    assert [r["acc"] for r in clean["per_seed"]] == [r["acc"] for r in results["table"][0]["per_seed"]]


def test_resume_in_the_second_seed_gives_the_uninterrupted_table(two_seeds, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        interrupt_after(m, seed=1, epoch=1)
        with pytest.raises(Killed):
            uml.main(SEEDS + ["--out", str(out)])
    assert (out / "UML-seed0" / "result.json").exists() and not (out / "UML-seed1" / "result.json").exists()
    capsys.readouterr()
    uml.main(["--resume", str(out)])
    printed = capsys.readouterr().out
    assert "[job 1/2]" not in printed and "[job 2/2]" in printed           # seed 0 kept, seed 1 continued
    assert "[UML-seed1] resumed after epoch 1" in printed
    assert re.findall(r"\[UML-seed1\] epoch (\d+) step (\d+)/(\d+)", printed) == [("2", "2", "2")]
    expected = json.loads((two_seeds / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["table"] == expected["table"] and resumed["metrics"] == expected["metrics"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["epoch"]) for r in log if "epoch" in r] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    speed = [r for r in log if r.get("event") == "speed"]                  # one per finished job
    assert [r["seed"] for r in speed] == [0, 1]
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait_share"] < 1 for r in speed)


def write_test_images(folder):
    """Images a user might have: odd sizes, greyscale, RGBA, a corrupt file and a text file."""
    from PIL import Image
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (31, 20), dtype=np.uint8)).save(folder / "tall_grey.JPG")
    Image.fromarray(rng.integers(0, 255, (29, 41, 4), dtype=np.uint8), mode="RGBA").save(folder / "alpha.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    return {"wide": (53, 37), "tall_grey": (20, 31), "alpha": (41, 29)}


def test_predict_a_folder_of_user_images(all_tables, tmp_path):
    from PIL import Image
    import csv
    import numpy as np

    sizes = write_test_images(tmp_path / "images")
    out = tmp_path / "predicted"
    uml.main(["--predict", str(tmp_path / "images"), "--checkpoint", str(all_tables / "UML-seed0" / "best.pt"),
              "--out", str(out), "--device", "cpu"])
    for stem, (w, h) in sizes.items():
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 1, 2}       # background / rim / cup
        assert np.load(out / f"{stem}_uncertainty.npy").shape == (h, w)         # pixel-wise U^s
        assert (out / f"{stem}_overlay.png").exists()
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "width", "height", "class", "uncertainty", "belief_non_glaucoma", "belief_glaucoma"]
    assert {(r["image"], int(r["width"]), int(r["height"])) for r in rows} == {
        (f"{stem}.{'JPG' if 'grey' in stem else 'png'}", w, h) for stem, (w, h) in sizes.items()}
    assert len(rows) == 3 and all(0 < float(r["uncertainty"]) <= 1 for r in rows)
    for r in rows:   # Eq. 1: beliefs and u sum to one
        assert sum(float(v) for k, v in r.items() if k.startswith("belief_")) + float(r["uncertainty"]) == pytest.approx(1, abs=1e-5)
    assert "broken.png" in (out / "errors.txt").read_text() and "notes" not in (out / "errors.txt").read_text()
    other = tmp_path / "other.pt"
    torch.save({"script": "joint_unet", "model": {}, "args": {}}, other)
    with pytest.raises(common.CheckpointError, match="joint_unet"):
        uml.main(["--predict", str(tmp_path / "images"), "--checkpoint", str(other), "--out", str(tmp_path / "o2")])


def test_predicting_the_test_images_gives_the_evaluation_masks(all_tables, tmp_path):
    from PIL import Image
    import numpy as np

    predictor = uml.load_model(all_tables / "UML-seed0" / "best.pt")
    args = predictor.args
    data = uml.load_data(argparse.Namespace(**{**vars(args), "eval_only": True}), torch.device("cpu"), args.seed)
    folder = tmp_path / "test-images"
    folder.mkdir()
    for name, image in zip(data["test"]["names"], data["test"]["images"]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    uml.main(["--predict", str(folder), "--checkpoint", str(all_tables / "UML-seed0" / "best.pt"),
              "--out", str(tmp_path / "p")])
    evaluated = uml.forward_split(predictor.model, data["test"], predictor.extra["spec"], predictor.norm, args,
                                  torch.device("cpu"))["seg"]
    for name, expected in zip(data["test"]["names"], evaluated):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "p" / f"{name}_mask.png")), expected.numpy())
