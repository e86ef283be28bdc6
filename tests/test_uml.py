"""Tests of uml.py: evidential quantities and losses against plain second computations, Eq. 3 / Eq. 5
on hand tensors, the component switches, and --quick end-to-end runs of every table."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from scipy.special import digamma as sp_digamma

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import importlib  # noqa: E402

uml = importlib.import_module("uml")


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
        g = model.navigator.top[0].weight.grad
        return 0.0 if g is None else g.abs().sum().item()

    assert grad_norm(uml.model_spec("uml")) > 0          # UI: r^s feeds the classifier
    assert grad_norm(uml.model_spec("uml", True, False, False)) == 0.0  # no UI: no path


def test_model_spec_switches_components():
    model = uml.UMLNet(uml.model_spec("uml", True, True, False), 2, 3, 4, (1, 1, 1))
    out = model(torch.randn(1, 3, 32, 32))
    assert model.mutual_decoder is not None and not model.navigator.navigate and out["reliable_mask"] is None
    assert out["mutual_alpha"].shape == (1, 3, 32, 32) and out["mutual_uncertainty"].shape == (1, 1, 32, 32)
    bcs = uml.UMLNet(uml.model_spec("bcs"), 2, 3, 4, (1, 1, 1))
    assert bcs.mutual_decoder is None and bcs.instructor is None and bcs.mixer is not None
    ec = uml.UMLNet(uml.model_spec("ec"), 2, 3, 4, (1, 1, 1))
    assert ec.seg_encoder is None and ec.mixer is None and "seg" not in ec(torch.randn(1, 3, 32, 32))


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
    for key in ("acc", "f1", "dice_disc", "assd_disc", "dice_cup", "assd_cup", "uncertainty_auroc", "ece"):
        assert key in results["metrics"]
    for key in ("acc", "f1", "dice_disc", "dice_cup", "ece"):
        assert math.isfinite(results["metrics"][key])
    rows = {(r["table"], r["row"]) for r in results["table"]}
    assert {(1, n) for n in ("EC", "TBraTS", "BCS", "ECS", "UML")} <= rows
    noise = {(2, f"{n} sigma={s}") for n in ("BCS", "ECS", "UML") for s in ("0.00", "0.01", "0.03", "0.05")}
    assert noise <= rows                                      # --table2 writes all noise rows
    assert {(3, n) for n in ("BCS", "+MD", "+MD+UI", "UML")} <= rows
    by_row = {(r["table"], r["row"]): r for r in results["table"]}
    assert by_row[(1, "EC")]["dice_disc"] is None and by_row[(1, "TBraTS")]["acc"] is None
    assert by_row[(3, "+MD+UI")]["UN"] == "-" and by_row[(3, "UML")]["UN"] == "✓"
    markdown = (all_tables / "results.md").read_text()
    for title in ("Table 1", "Table 2: Gaussian noise sigma = 0.05", "Table 3"):
        assert title in markdown
    for slug in ("ec", "tbrats", "bcs", "ecs", "uml", "uml-md", "uml-md-ui"):
        assert (all_tables / "figures" / f"curves_{slug}.png").stat().st_size > 0
    assert (all_tables / "figures" / "fig3.png").stat().st_size > 0
    assert (all_tables / "best.pt").exists() and (all_tables / "bcs-best.pt").exists()
    log = [json.loads(line) for line in (all_tables / "log.jsonl").read_text().splitlines()]
    assert {r["row"] for r in log if "epoch" in r} == {"ec", "tbrats", "bcs", "ecs", "uml", "uml-md", "uml-md-ui"}


def test_eval_only_reproduces_the_main_row(all_tables, tmp_path):
    uml.main(QUICK + ["--eval-only", "--checkpoint", str(all_tables / "best.pt"), "--out", str(tmp_path / "ev")])
    before = json.loads((all_tables / "results.json").read_text())["metrics"]
    after = json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    for key in ("acc", "f1", "dice_disc", "dice_cup", "ece"):
        assert after[key] == pytest.approx(before[key], abs=1e-9)


def test_quick_breast_ablation_and_resume(tmp_path):
    out = tmp_path / "breast"
    argv = QUICK + ["--data", "synthetic-breast", "--no-uncertainty-navigator", "--noise-sigmas", "0",
                    "--out", str(out)]
    uml.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert {"acc", "f1", "dice_tumor", "assd_tumor", "uncertainty_auroc", "ece"} <= set(results["metrics"])
    assert results["table"][0]["row"] == "+MD+UI"
    uml.main(argv + ["--resume", str(out / "last.pt"), "--epochs", "2"])
    epochs = [r["epoch"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "epoch" in r]
    assert epochs == [1, 2]  # the resumed run continued with epoch 2 in the same folder


def test_navigator_needs_mutual_decoder():
    with pytest.raises(SystemExit):
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
