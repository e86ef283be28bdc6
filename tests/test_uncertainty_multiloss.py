"""Tests of uncertainty_multiloss.py: the losses on hand-computed cases, the model's shapes and block
order, and the script end to end with --quick (single run, --table1, --sweep, --eval-only, --resume)."""
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
um = importlib.import_module("uncertainty_multiloss")

# f_s at one pixel, channel order (lumen, border, stroma)
F_PIXEL = (1.0, 0.5, -0.3)


def pixel_logits(values=F_PIXEL):
    return torch.tensor(values).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------
# Eq. 7: hierarchical probabilities
# ------------------------------------------------------------------------------------------------


def test_hierarchical_probabilities_hand_case():
    log_pt = um.hierarchical_log_probabilities(pixel_logits())  # [1,8,1,1]
    p = log_pt.exp().flatten()
    # Valid vectors and their energies sum_r f_r S^r: stroma (0,0,1) -> -0.3, border (0,1,0) -> 0.5,
    # lumen (1,1,0) -> 1.0 + 0.5 = 1.5.  Z = e^-0.3 + e^0.5 + e^1.5 = 0.740818 + 1.648721 + 4.481689
    z = 6.871228
    assert p[1].item() == pytest.approx(0.740818 / z, abs=1e-6)  # (0,0,1) stroma   = 0.107814
    assert p[2].item() == pytest.approx(1.648721 / z, abs=1e-6)  # (0,1,0) border   = 0.239946
    assert p[6].item() == pytest.approx(4.481689 / z, abs=1e-6)  # (1,1,0) lumen    = 0.652240
    # the five topologically invalid vectors get exactly zero mass, the three valid ones sum to one
    for invalid in (0, 3, 4, 5, 7):  # (0,0,0) (0,1,1) (1,0,0) (1,0,1) (1,1,1)
        assert p[invalid].item() == 0.0
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert um.VALID.nonzero().flatten().tolist() == [1, 2, 6]
    assert um.LABEL_VECTORS[[1, 2, 6]].tolist() == [[0, 0, 1], [0, 1, 0], [1, 1, 0]]


def test_hierarchical_probabilities_random_pixels_sum_to_one():
    torch.manual_seed(0)
    p = um.hierarchical_log_probabilities(3 * torch.randn(2, 3, 5, 4)).exp()
    assert torch.allclose(p.sum(1), torch.ones(2, 5, 4), atol=1e-6)
    assert (p[:, ~um.VALID] == 0).all()


def test_decode_regions_is_most_probable_valid_vector():
    # lumen-ish, border-ish, stroma-ish pixels; (1, -5, 0): lumen alone would win for independent
    # sigmoids, but lumen requires the border: energies stroma 0, border -5, lumen -4 -> stroma
    logits = torch.tensor([[1.0, 2.0, 0.0], [-3.0, 2.0, 0.0], [-1.0, -1.0, 2.0], [1.0, -5.0, 0.0]])
    regions = um.decode_regions(logits.T.reshape(1, 3, 1, 4))
    assert regions.flatten().tolist() == [2, 1, 0, 0]


# ------------------------------------------------------------------------------------------------
# Eq. 3-6, 8, 9: the loss terms and the uncertainty weighting
# ------------------------------------------------------------------------------------------------


def test_targets_follow_the_containment_hierarchy():
    vector, maps = um.label_vector_targets(torch.tensor([[[0, 1, 2]]], dtype=torch.uint8))
    assert vector.tolist() == [[[1, 2, 6]]]
    # (lumen, border, stroma) maps: stroma pixel (0,0,1), border (0,1,0), lumen (1,1,0)
    assert maps[0, :, 0].T.tolist() == [[0, 0, 1], [0, 1, 0], [1, 1, 0]]


def sigmoid_ce(f, s):
    return -(s * math.log(1 / (1 + math.exp(-f))) + (1 - s) * math.log(1 - 1 / (1 + math.exp(-f))))


def test_segmentation_loss_hand_value():
    # one lumen pixel (S = (1,1,0)) and one stroma pixel (S = (0,0,1))
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.3, -0.7]]).T.reshape(1, 3, 1, 2)
    _, maps = um.label_vector_targets(torch.tensor([[[2, 0]]], dtype=torch.uint8))
    lumen = sigmoid_ce(2.0, 1) + sigmoid_ce(-1.0, 1) + sigmoid_ce(0.5, 0)
    stroma = sigmoid_ce(0.0, 0) + sigmoid_ce(0.3, 0) + sigmoid_ce(-0.7, 1)
    assert um.segmentation_loss(logits, maps).item() == pytest.approx((lumen + stroma) / 2, rel=1e-6)


def test_topology_loss_hand_value():
    log_pt = um.hierarchical_log_probabilities(pixel_logits())
    lumen = torch.tensor([[[6]]])  # ground truth (1,1,0)
    border = torch.tensor([[[2]]])
    assert um.topology_loss(log_pt, lumen).item() == pytest.approx(-math.log(4.481689 / 6.871228), abs=1e-6)
    assert um.topology_loss(log_pt, border).item() == pytest.approx(-math.log(1.648721 / 6.871228), abs=1e-6)


MASK_3X3 = torch.tensor([[[0, 0, 1], [0, 2, 1], [1, 1, 1]]])


def test_geometry_loss_zero_for_prediction_constant_inside_each_region():
    vector, _ = um.label_vector_targets(MASK_3X3)
    per_region = torch.tensor([[0.3, -1.0, 2.0], [-2.0, 1.5, 0.1], [1.0, 0.7, -0.4]])  # logits of stroma/border/lumen
    logits = per_region[MASK_3X3[0].long()].permute(2, 0, 1).unsqueeze(0)  # [1,3,3,3], constant per region
    log_pt = um.hierarchical_log_probabilities(logits)
    assert um.geometry_loss(log_pt, vector).item() == pytest.approx(0.0, abs=1e-7)
    assert um.topology_loss(log_pt, vector).item() > 0.1  # not trivially zero for other reasons


def test_geometry_loss_hand_value_3x3():
    vector, _ = um.label_vector_targets(MASK_3X3)
    # log P_t of each pixel's ground-truth vector; the other channels do not enter Eq. 9
    a = torch.tensor([[-0.1, -0.3, -0.2], [-0.5, -1.0, -0.4], [-0.2, -0.6, -0.1]])
    log_pt = torch.full((1, 8, 3, 3), -50.0)
    log_pt.scatter_(1, vector.unsqueeze(1), a.view(1, 1, 3, 3))
    # same-label neighbour pairs (B_pq = 1), mask rows: [s s b] [s l b] [b b b]:
    #   horizontal: (0,0)-(0,1) |-0.1+0.3| = 0.2; (2,0)-(2,1) 0.4; (2,1)-(2,2) 0.5
    #   vertical:   (0,0)-(1,0) 0.4; (0,2)-(1,2) 0.2; (1,2)-(2,2) 0.3            -> 2.0 over pairs
    # each pair is in N4(p) and N4(q): sum over p is 4.0; mean over the 9 pixels = 4/9
    assert um.geometry_loss(log_pt, vector).item() == pytest.approx(4 / 9, abs=1e-6)


def test_uncertainty_weighting_equals_plain_loss_at_sigma_one():
    zero = torch.tensor(0.0)
    for value in (0.0, 0.37, 5.0):
        assert um.uncertainty_weighted(torch.tensor(value), zero).item() == pytest.approx(value)
    # Eq. 5 with sigma^2 = e^s: L / sigma^2 + log sigma^2
    assert um.uncertainty_weighted(torch.tensor(2.0), torch.tensor(math.log(4.0))).item() == pytest.approx(0.5 + math.log(4.0))
    torch.manual_seed(1)
    class_logits, pixel = torch.randn(4, 2), torch.randn(4, 3, 6, 6)
    labels, masks = torch.tensor([0, 1, 1, 0]), torch.randint(0, 3, (4, 6, 6), dtype=torch.uint8)
    terms = um.loss_terms(class_logits, pixel, labels, masks, list(um.LOSS_NAMES))
    assert terms["c"].item() == pytest.approx(torch.nn.functional.cross_entropy(class_logits, labels).item())
    log_sigma2 = {k: torch.tensor(0.0) for k in um.LOSS_NAMES}
    learned = um.combine_losses(terms, {"weights": dict.fromkeys(um.LOSS_NAMES, 1.0), "uncertainty": True}, log_sigma2)
    fixed = um.combine_losses(terms, {"weights": dict.fromkeys(um.LOSS_NAMES, 1.0), "uncertainty": False}, log_sigma2)
    assert learned.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
    assert fixed.item() == pytest.approx(learned.item(), rel=1e-6)
    tuned = {"weights": dict(zip(um.LOSS_NAMES, (0.1, 0.6, 0.22, 0.08))), "uncertainty": False}
    expected = sum(w * terms[k].item() for k, w in tuned["weights"].items())
    assert um.combine_losses(terms, tuned, log_sigma2).item() == pytest.approx(expected, rel=1e-6)


def test_every_log_sigma2_receives_a_gradient():
    torch.manual_seed(0)
    model = um.MultiLossFCN(width=4, depth=2)
    class_logits, pixel = model(torch.randn(2, 3, 16, 16))
    masks = torch.randint(0, 3, (2, 16, 16), dtype=torch.uint8)
    terms = um.loss_terms(class_logits, pixel, torch.tensor([0, 1]), masks, list(um.LOSS_NAMES))
    um.combine_losses(terms, {"weights": dict.fromkeys(um.LOSS_NAMES, 1.0), "uncertainty": True}, model.log_sigma2).backward()
    for k in um.LOSS_NAMES:
        grad = model.log_sigma2[k].grad
        # d/ds (e^-s L + s) = 1 - L at s = 0
        assert grad is not None and grad.item() == pytest.approx(1 - terms[k].item(), abs=1e-5)
        assert abs(grad.item()) > 1e-4


# ------------------------------------------------------------------------------------------------
# Fig. 1: the model
# ------------------------------------------------------------------------------------------------


def test_model_follows_fig1():
    model = um.MultiLossFCN(width=2, depth=4)
    block = model.encoder.levels[0][0]
    assert [type(m) for m in block] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.BatchNorm2d]  # Conv-ReLU-BN
    features = model.encoder(torch.randn(1, 3, 250, 250))
    assert [f.shape[-1] for f in features] == [250, 125, 63, 32, 16]  # Fig. 1's encoder sizes
    class_logits, pixel = model(torch.randn(2, 3, 50, 38))
    assert class_logits.shape == (2, 2) and pixel.shape == (2, 3, 50, 38)
    assert set(model.log_sigma2) == set(um.LOSS_NAMES)


def test_random_patches_cut_images_and_masks_alike():
    b, h, w = 3, 12, 10
    position = torch.arange(h * w).view(1, h, w).expand(b, h, w)
    batch = {"images": (position % 251).to(torch.uint8).unsqueeze(1).repeat(1, 3, 1, 1),
             "masks": (position % 251).to(torch.uint8), "instances": position.to(torch.int32)}
    out = um.random_patches(batch, 5, torch.Generator().manual_seed(0))
    assert out["images"].shape == (b, 3, 5, 5) and out["masks"].shape == (b, 5, 5)
    assert torch.equal(out["images"][:, 0], out["masks"])
    start = out["instances"][:, :1, :1]  # the patch is a contiguous window of the image
    expected = start + (torch.arange(5).view(5, 1) * w + torch.arange(5)).unsqueeze(0)
    assert torch.equal(out["instances"], expected)


# ------------------------------------------------------------------------------------------------
# End to end (--quick)
# ------------------------------------------------------------------------------------------------


def read(path):
    return json.loads(Path(path).read_text())


def test_quick_default_run_eval_only_and_resume(tmp_path):
    cpu = ["--quick", "--device", "cpu"]  # bitwise-repeatable evaluation for the eval-only comparison
    run_dir = um.main(cpu + ["--out", str(tmp_path / "run")])
    results = read(run_dir / "results.json")
    metrics = results["metrics"]
    assert set(metrics) == {"accuracy", "pixel_accuracy", "object_dice", "object_hausdorff",
                            "sigma2_c", "sigma2_s", "sigma2_t", "sigma2_g"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["pixel_accuracy"] <= 1 and metrics["sigma2_c"] > 0
    for name in ("config.json", "log.jsonl", "last.pt", "best.pt", "results.md"):
        assert (run_dir / name).exists()
    assert (run_dir / "figures" / "fig3_predictions.png").exists() and (run_dir / "figures" / "sigma2.png").exists()
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all(f"sigma2_{k}" in log[0] for k in um.LOSS_NAMES)
    evaluated = um.main(cpu + ["--eval-only", "--checkpoint", str(run_dir / "best.pt"), "--out", str(tmp_path / "eval")])
    again = read(evaluated / "results.json")["metrics"]
    for k in metrics:  # the test metrics of the best checkpoint, recomputed from the file
        assert again[k] == pytest.approx(metrics[k], rel=1e-5)
    resumed = um.main(cpu + ["--epochs", "2", "--resume", str(run_dir / "last.pt"), "--out", str(tmp_path / "resumed")])
    epochs = [json.loads(line).get("epoch") for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert epochs[0] == 2


def test_quick_fixed_weights_subset(tmp_path):
    run_dir = um.main(["--quick", "--losses", "s,g", "--weights", "0.7,0.3", "--no-uncertainty",
                       "--out", str(tmp_path / "run")])
    results = read(run_dir / "results.json")
    assert set(results["metrics"]) == {"pixel_accuracy", "object_dice", "object_hausdorff"}
    row = results["table"][0]
    assert (row["lambda_c"], row["lambda_s"], row["lambda_t"], row["lambda_g"]) == (0.0, 0.7, 0.0, 0.3)
    with pytest.raises(SystemExit):
        um.main(["--quick", "--weights", "0.5,0.5", "--out", str(tmp_path / "bad")])


def test_quick_table1_writes_all_rows(tmp_path):
    run_dir = um.main(["--quick", "--table1", "--out", str(tmp_path / "t1")])
    results = read(run_dir / "results.json")
    rows = results["table"]
    assert [r["row"] for r in rows] == [name for name, _, _ in um.TABLE1]
    assert "accuracy" in rows[0] and "pixel_accuracy" not in rows[0]  # Lc only: no segmentation
    assert "accuracy" not in rows[1] and "object_dice" in rows[1]  # Ls only: no classification
    assert rows[7]["lambda_s"] == 0.6 and not rows[7]["uncertainty"]
    assert all(f"sigma2_{k}" in rows[-1] for k in um.LOSS_NAMES) and "sigma2_t" not in rows[8]
    assert set(results["metrics"]) >= {"accuracy", "pixel_accuracy", "object_dice", "object_hausdorff", "sigma2_g"}
    assert "Table 1" in (run_dir / "results.md").read_text()


def test_quick_sweep_writes_both_plots(tmp_path):
    run_dir = um.main(["--quick", "--sweep", "--out", str(tmp_path / "sweep")])
    assert (run_dir / "figures" / "fig2_lambda_Lc_Ls.png").stat().st_size > 0
    assert (run_dir / "figures" / "fig2_lambda_Lt_Lg.png").stat().st_size > 0
    rows = read(run_dir / "results.json")["table"]
    assert len(rows) == 6  # --quick: lambda in {0, 0.5, 1} for each sweep
    assert rows[0]["lambda_c"] == 0.0 and "accuracy" not in rows[0]  # lambda = 0: Ls only
    assert rows[3]["lambda_t"] == 0.0 and rows[3]["lambda_g"] == 1.0


def test_quick_glas_layout_with_patches(tmp_path):
    """A tiny tree in the GlaS layout (train_N.bmp + _anno.bmp, testA/testB, Grade.csv): the real-data
    path with its 250-pixel patch default replaced by --quick's 24."""
    from PIL import Image
    root = tmp_path / "GlaS"
    root.mkdir()
    rows = ["name,patient ID,grade (GlaS),grade (Sirinukunwattana et al. 2015)"]
    names = [f"train_{i}" for i in range(1, 9)] + ["testA_1", "testA_2", "testB_1", "testB_2"]
    for k, name in enumerate(names):
        anno = torch.zeros(30, 40, dtype=torch.uint8)
        anno[4:16, 5 + k % 3:20] = 1  # two glands, one of them touching nothing
        anno[18:28, 24:36] = 2
        image = torch.full((30, 40, 3), 200, dtype=torch.uint8)
        image[anno > 0] = torch.tensor([120, 60, 140], dtype=torch.uint8)
        Image.fromarray(image.numpy()).save(root / f"{name}.bmp")
        Image.fromarray(anno.numpy()).save(root / f"{name}_anno.bmp")
        rows.append(f"{name},{k},{'benign' if k % 2 else 'malignant'},x")
    (root / "Grade.csv").write_text("\n".join(rows) + "\n")
    run_dir = um.main(["--quick", "--data", "glas", "--root", str(root), "--cache", str(tmp_path / "cache"),
                       "--out", str(tmp_path / "run")])
    config = read(run_dir / "config.json")["args"]
    assert config["patch"] == 24 and config["size"] == 32
    results = read(run_dir / "results.json")
    assert results["data"] == "glas" and math.isfinite(results["metrics"]["object_dice"])


def test_loss_configuration_from_flags():
    config = um.config_from_args(um.parse_args(["--losses", "c,s,t", "--weights", "0,0.7,0.3", "--no-uncertainty"]))
    assert config == {"row": "Ls + Lt", "weights": {"s": 0.7, "t": 0.3}, "uncertainty": False}  # lambda = 0 is off
    default = um.config_from_args(um.parse_args([]))
    assert default["uncertainty"] and list(default["weights"]) == list(um.LOSS_NAMES)  # Eq. 2
    for bad in (["--losses", "c,x"], ["--losses", "c,s", "--weights", "1", "--no-uncertainty"]):
        with pytest.raises(SystemExit):
            um.config_from_args(um.parse_args(bad))
