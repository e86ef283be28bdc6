"""Tests of uncertainty_multiloss.py: the losses on hand-computed cases (Eq. 9 in both readings), the
model's shapes and block order, glands as objects (regions_to_instances), and the script end to end
with --quick (single run, --seeds, --table1, --sweep, --eval-only, --resume DIR, --predict, GlaS layout),
and the run kit's promises (flags checked at parse time, a run that overflows stops with one line)."""
import argparse
import csv
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
um = importlib.import_module("uncertainty_multiloss")
common = importlib.import_module("common")

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


def test_regions_are_the_most_probable_valid_vector():
    # lumen-ish, border-ish, stroma-ish pixels; (1, -5, 0): lumen alone would win for independent
    # sigmoids, but lumen requires the border: energies stroma 0, border -5, lumen -4 -> stroma
    logits = torch.tensor([[1.0, 2.0, 0.0], [-3.0, 2.0, 0.0], [-1.0, -1.0, 2.0], [1.0, -5.0, 0.0]])
    regions = um.region_log_probabilities(logits.T.reshape(1, 3, 1, 4)).argmax(1)  # as evaluate decodes
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
    ones = dict.fromkeys(um.LOSS_NAMES, 1.0)
    learned = um.combine_losses(terms, ones, True, log_sigma2)
    fixed = um.combine_losses(terms, ones, False, log_sigma2)
    assert learned.item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-6)
    assert fixed.item() == pytest.approx(learned.item(), rel=1e-6)
    tuned = dict(zip(um.LOSS_NAMES, (0.1, 0.6, 0.22, 0.08)))
    expected = sum(w * terms[k].item() for k, w in tuned.items())
    assert um.combine_losses(terms, tuned, False, log_sigma2).item() == pytest.approx(expected, rel=1e-6)
    # a term left out of `active` is left out of the sum
    assert set(um.loss_terms(class_logits, pixel, labels, masks, ["s", "g"])) == {"s", "g"}


def test_every_log_sigma2_receives_a_gradient():
    torch.manual_seed(0)
    model = um.MultiLossFCN(width=4, depth=2)
    class_logits, pixel = model(torch.randn(2, 3, 16, 16))
    masks = torch.randint(0, 3, (2, 16, 16), dtype=torch.uint8)
    terms = um.loss_terms(class_logits, pixel, torch.tensor([0, 1]), masks, list(um.LOSS_NAMES))
    um.combine_losses(terms, dict.fromkeys(um.LOSS_NAMES, 1.0), True, model.log_sigma2).backward()
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
    block = model.encoder[0][0]
    assert [type(m) for m in block] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.BatchNorm2d]  # Conv-ReLU-BN
    sides = []
    for level in list(model.encoder) + list(model.decoder):
        level.register_forward_hook(lambda module, inputs, output: sides.append(output.shape[-1]))
    model(torch.randn(1, 3, 250, 250))
    assert sides == [250, 125, 63, 32, 16, 32, 63, 125, 250]  # Fig. 1's encoder and decoder sizes
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




def log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


def test_geometry_loss_eq9_reading():
    """Eq. 9's formula (P_t, used) against its sentence ("log-sigmoid label probabilities") on one
    pair: two neighbouring lumen pixels p, q with logits (lumen, border, stroma)."""
    f_p, f_q = (1.0, 0.5, -0.3), (0.2, 1.5, 0.4)
    logits = torch.tensor([f_p, f_q]).T.reshape(1, 3, 1, 2)
    vector, _ = um.label_vector_targets(torch.tensor([[[2, 2]]], dtype=torch.uint8))
    # P_t reading: log P_t(lumen | x) = (f_lum + f_bor) - log(e^f_str + e^f_bor + e^(f_lum + f_bor))
    log_pt_p = 1.5 - math.log(math.exp(-0.3) + math.exp(0.5) + math.exp(1.5))  # -0.427343
    log_pt_q = 1.7 - math.log(math.exp(0.4) + math.exp(1.5) + math.exp(1.7))   # -0.737768
    # the pair is in N4(p) and N4(q): 2 |difference| over the 2 pixels
    pt_reading = 2 * abs(log_pt_p - log_pt_q) / 2
    assert pt_reading == pytest.approx(0.310425, abs=1e-6)
    log_pt = um.hierarchical_log_probabilities(logits)
    assert um.geometry_loss(log_pt, vector).item() == pytest.approx(pt_reading, abs=1e-6)
    # log-sigmoid reading: sum_r S_p^r |log sigmoid(f_r(x_p)) - log sigmoid(f_r(x_q))|, S = (1, 1, 0)
    sigmoid_reading = 2 * sum(abs(log_sigmoid(a) - log_sigmoid(b)) for a, b, s in zip(f_p, f_q, (1, 1, 0)) if s) / 2
    assert sigmoid_reading == pytest.approx(0.557541, abs=1e-6)  # the other reading: 1.8x larger here
    assert abs(um.geometry_loss(log_pt, vector).item() - sigmoid_reading) > 0.2


def test_region_probabilities_are_a_three_way_softmax():
    torch.manual_seed(0)
    f = torch.randn(2, 3, 4, 5)  # channels (lumen, border, stroma)
    three_way = torch.stack([f[:, 2], f[:, 1], f[:, 0] + f[:, 1]], 1).log_softmax(1)  # (stroma, border, lumen)
    assert torch.allclose(um.region_log_probabilities(f), three_way, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Glands as objects: regions_to_instances
# ------------------------------------------------------------------------------------------------

def glas_regions(instances, border=3):
    """Regions by GlaS's rule (as --data glas derives them from instances): a gland pixel is border
    when a pixel of another label (stroma or another gland) lies within `border` px (chessboard
    distance), the rest of the gland is lumen."""
    padded = torch.nn.functional.pad(instances[None].float(), (border,) * 4, mode="replicate")
    high = torch.nn.functional.max_pool2d(padded, 2 * border + 1, 1)[0]
    low = -torch.nn.functional.max_pool2d(-padded, 2 * border + 1, 1)[0]
    lumen = (instances > 0) & (high == instances) & (low == instances)
    return (instances > 0).long() + lumen.long()


def discs_in_contact(n_glands, overlap, radius=10, noise=0.0, seed=0):
    """n_glands discs of `radius` px in a row, slid into contact: overlap 0 touches along a short
    edge, 1-3 presses them together by that many px; each pixel to the nearer centre, as GlaS splits
    glands where they meet. Returns (regions by the GlaS rule, the instances they were drawn from,
    the true instances); with noise > 0 the regions are drawn from distance fields shifted by smooth
    noise of that many px (each gland's own: outlines and the lines where glands meet wobble), a
    prediction's errors, while the truth stays clean."""
    spacing = 2 * radius - 1 - overlap
    h, w = 2 * radius + 12, (n_glands - 1) * spacing + 2 * radius + 12
    yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    distance = torch.stack([((yy - h // 2) ** 2 + (xx - radius - 6 - j * spacing) ** 2).sqrt()
                            for j in range(n_glands)])  # [G,H,W]

    def instances(d):
        nearest, owner = d.min(0)
        return torch.where(nearest < radius, owner + 1, 0)

    truth = instances(distance)
    if noise:
        grid = torch.rand(n_glands, 1, 5, w // 6, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        distance = distance + noise * torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic")[:, 0]
    drawn = instances(distance)
    return glas_regions(drawn), drawn, truth


def test_glands_touching_or_pressed_together_are_separate_objects():
    for n_glands in (2, 3, 4, 5):
        for overlap in (0, 1, 2, 3):  # touching along an edge, then pressed together by 1-3 px
            regions, _, truth = discs_in_contact(n_glands, overlap)
            merged = common.label_components(regions >= 1)  # what connected components would give
            assert int(merged.max()) == 1 and common.object_dice(merged, truth).item() < 0.7
            glands = um.regions_to_instances(regions)
            assert glands.shape == regions.shape and int(glands.max()) == n_glands
            assert common.object_dice(glands, truth).item() >= 0.98
            assert common.object_hausdorff(glands, truth).item() <= 2.0


def test_glands_sharing_a_straight_edge_or_a_corner_are_split_exactly():
    truth = torch.zeros(32, 60, dtype=torch.long)
    truth[4:20, 4:20], truth[4:20, 20:36] = 1, 2  # two square glands sharing a 16 px edge
    truth[20:28, 36:44] = 3  # a third touching the second at a corner only
    glands = um.regions_to_instances(glas_regions(truth, border=2))
    assert torch.equal(glands, truth)
    # with 8-connectivity a lumen-free corner would join; the marker growth never steps across a
    # corner that no gland pixel fills
    assert torch.equal(um.regions_to_instances(glas_regions(truth, border=2), connectivity=8), truth)


def test_noisy_region_maps_of_touching_glands_hold_up():
    for seed, (n_glands, overlap) in enumerate([(2, 0), (3, 2), (4, 1), (5, 3), (5, 0), (3, 3)]):
        noisy, drawn, truth = discs_in_contact(n_glands, overlap, noise=1.5, seed=seed)
        glands = um.regions_to_instances(noisy)
        assert int(glands.max()) == n_glands
        # the glands the noisy map shows come back, and the map's own errors are all that is lost
        assert common.object_dice(glands, drawn).item() >= 0.98
        assert common.object_dice(glands, truth).item() >= 0.9
        assert common.object_dice(common.label_components(noisy >= 1), truth).item() < 0.75


def test_a_gland_without_lumen_is_one_object_and_edge_cases():
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(64.0), indexing="ij")
    disc = lambda cy, cx, r: (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # noqa: E731
    regions = (disc(20, 16, 12) | disc(20, 50, 6)).long() + disc(20, 16, 6).long()  # lumen in the first only
    glands = um.regions_to_instances(regions)
    assert int(glands.max()) == 2
    assert glands[disc(20, 16, 12)].unique().tolist() == [1] and glands[disc(20, 50, 6)].unique().tolist() == [2]
    # an image that is all gland and one without glands
    full = torch.ones(1, 10, 12, dtype=torch.uint8)
    full[0, 3:5, 3:5] = 2
    assert int(um.regions_to_instances(full).max()) == 1
    assert int(um.regions_to_instances(torch.zeros(1, 5, 5, dtype=torch.uint8)).max()) == 0
    # batched = one image at a time
    touching, _, _ = discs_in_contact(2, 1, radius=10)
    touching = touching[:, :40]
    padded = torch.nn.functional.pad(touching, (0, 64 - touching.shape[1], 0, 40 - touching.shape[0]))
    batch = um.regions_to_instances(torch.stack([regions, padded]))
    assert torch.equal(batch[0], glands) and torch.equal(batch[1], um.regions_to_instances(padded))


# ------------------------------------------------------------------------------------------------
# End to end (--quick)
# ------------------------------------------------------------------------------------------------


def read(path):
    return json.loads(Path(path).read_text())


MAIN_ROW = "Lc + Ls + Lt + Lg (uncertainty)"
TIMING = ("images_per_s", "data_wait_share", "seconds")  # keys that differ between two identical runs


def job_dir(run_dir, row=MAIN_ROW, seed=0):
    """<out>/<row>-seed<seed>/: a job's last.pt, best.pt and result.json."""
    return common.job_folder(argparse.Namespace(dir=Path(run_dir)), row, seed)


def without_timing(table):
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith(TIMING)}  # noqa: E731
    return [{**strip(r), "per_seed": [strip(e) for e in r["per_seed"]]} for r in table]


def test_quick_default_run_eval_only_and_predict(tmp_path):
    cpu = ["--quick", "--device", "cpu"]  # bitwise-repeatable evaluation for the eval-only comparison
    run_dir = um.main(cpu + ["--out", str(tmp_path / "run")])
    results = read(run_dir / "results.json")
    metrics = results["metrics"]
    names = ["accuracy", "pixel_accuracy", "object_dice", "object_hausdorff", "sigma2_c", "sigma2_s", "sigma2_t", "sigma2_g"]
    assert set(metrics) == set(names) | {f"{k}_se" for k in names}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["pixel_accuracy"] <= 1 and metrics["sigma2_c"] > 0 and metrics["accuracy_se"] == 0
    for name in ("config.json", "log.jsonl", "results.md"):
        assert (run_dir / name).exists()
    best = job_dir(run_dir) / "best.pt"
    assert best.exists() and (job_dir(run_dir) / "last.pt").exists() and (job_dir(run_dir) / "result.json").exists()
    assert (run_dir / "figures" / "fig3_predictions.png").exists() and (run_dir / "figures" / "sigma2.png").exists()
    assert {"images_per_s", "data_wait_share", "steps", "seconds"} <= set(results["table"][0])
    assert results["table"][0]["steps"] == 3  # 12 training images, batch 4, one epoch
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "epoch" in r]
    assert all(epochs[0][f"inv_sigma2_{k}"] == pytest.approx(1 / epochs[0][f"sigma2_{k}"]) for k in um.LOSS_NAMES)
    evaluated = um.main(cpu + ["--eval-only", "--checkpoint", str(best), "--out", str(tmp_path / "eval")])
    again = read(evaluated / "results.json")["metrics"]
    for k in metrics:  # the test metrics of the best checkpoint, recomputed from the file
        assert again[k] == pytest.approx(metrics[k], rel=1e-5, abs=1e-9)
    assert (evaluated / "figures" / "fig3_predictions.png").exists()

    # --predict on a folder of odd images, a corrupt file and a text file
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (61, 97, 3), dtype=np.uint8)).save(images / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (80, 50), dtype=np.uint8)).save(images / "grey.png")
    Image.fromarray(rng.integers(0, 255, (33, 45, 4), dtype=np.uint8)).save(images / "rgba.PNG")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "predicted"
    assert um.main(["--predict", str(images), "--checkpoint", str(best), "--out", str(out),
                    "--device", "cpu"]) is None
    sizes = {"wide": (97, 61), "grey": (50, 80), "rgba": (45, 33)}
    for stem, size in sizes.items():
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 1, 2}
        instances = np.asarray(Image.open(out / f"{stem}_instances.png"))
        assert instances.shape == size[::-1] and instances.dtype in (np.uint16, np.int32)
        assert np.load(out / f"{stem}_entropy.npy").shape == size[::-1]
        assert (np.load(out / f"{stem}_entropy.npy") <= math.log(3) + 1e-5).all()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["image"] for r in rows) == ["grey.png", "rgba.PNG", "wide.jpg"]
    assert list(rows[0]) == ["image", "width", "height", "predicted_class", "p_benign", "p_malignant", "n_glands"]
    for r in rows:
        assert r["predicted_class"] in ("benign", "malignant")
        assert float(r["p_benign"]) + float(r["p_malignant"]) == pytest.approx(1, abs=1e-4)
        stem = Path(r["image"]).stem
        assert int(r["n_glands"]) == int(np.asarray(Image.open(out / f"{stem}_instances.png")).max())
    assert "broken.png" in (out / "errors.txt").read_text() and not list(out.glob("broken*")) and not list(out.glob("notes*"))
    # predicting the run's own test images gives the regions its evaluation decoded
    args = um.parse_args(cpu)
    data, stats = um.load_data(args, 0)
    own = tmp_path / "own"
    own.mkdir()
    for i in range(3):
        Image.fromarray(data["test"]["images"][i].permute(1, 2, 0).numpy()).save(own / f"test_{i}.png")
    um.main(["--predict", str(own), "--checkpoint", str(best), "--out", str(tmp_path / "own_out"),
             "--device", "cpu"])
    predictor = um.load_model(best)
    _, region_prob = um.predict(predictor.model, data["test"], stats, args)
    for i in range(3):
        predicted = np.asarray(Image.open(tmp_path / "own_out" / f"test_{i}_mask.png"))
        assert np.array_equal(predicted, region_prob[i].argmax(0).numpy())
    # library use: load_model + predict_batch, and another script's checkpoint refused
    predictor = um.load_model(best)
    canvas = torch.stack([common.letterbox(torch.from_numpy(np.array(Image.open(images / "wide.jpg"))).permute(2, 0, 1),
                                           predictor.size)])
    batch = um.predict_batch(predictor, canvas)
    assert batch["mask"].shape == (1, predictor.size, predictor.size) and batch["rows"][0]["n_glands"] >= 0
    foreign = dict(torch.load(best, weights_only=True), script="uml")
    torch.save(foreign, tmp_path / "uml.pt")
    with pytest.raises(common.CheckpointError, match="uml"):
        um.load_model(tmp_path / "uml.pt")


def test_quick_two_seeds_mean_and_standard_error(tmp_path):
    run_dir = um.main(["--quick", "--seeds", "0,1", "--device", "cpu", "--out", str(tmp_path / "seeds")])
    results = read(run_dir / "results.json")
    row = results["table"][0]
    assert row["seeds"] == [0, 1] and [e["seed"] for e in row["per_seed"]] == [0, 1]
    for key in ("accuracy", "pixel_accuracy", "object_dice", "sigma2_t"):
        a, b = (e[key] for e in row["per_seed"])
        assert row[key] == pytest.approx((a + b) / 2, rel=1e-5)
        # standard error of two values: sample std (ddof 1) / sqrt(2) = |a - b| / 2
        assert row[f"{key}_se"] == pytest.approx(abs(a - b) / 2, rel=1e-4)
        assert results["metrics"][key] == pytest.approx(row[key]) and results["metrics"][f"{key}_se"] == pytest.approx(row[f"{key}_se"])
    assert row["per_seed"][0]["object_dice"] != row["per_seed"][1]["object_dice"]  # the seed changes data and model
    assert "Mean ± standard error over 2 seeds" in (run_dir / "results.md").read_text()
    assert (job_dir(run_dir, seed=1) / "best.pt").exists() and (job_dir(run_dir) / "best.pt").exists()

    # torchrun, 2 processes (gloo): rows mode shares the seeds out and equals the 1-process table;
    # data mode trains one model data-parallel; each writes one run folder
    import os
    import subprocess
    script = str(Path(um.__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                "--quick", "--device", "cpu"]
    subprocess.run(torchrun + ["--seeds", "0,1", "--out", str(tmp_path / "rows")], check=True, env=env,
                   capture_output=True, timeout=600)
    shared = read(tmp_path / "rows" / "results.json")["table"][0]
    assert [e["rank"] for e in shared["per_seed"]] == [0, 1]
    for mine, theirs in zip(row["per_seed"], shared["per_seed"]):
        for key in ("accuracy", "pixel_accuracy", "object_dice", "object_hausdorff", "sigma2_c"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-6)
    subprocess.run(torchrun + ["--out", str(tmp_path / "data")], check=True, env=env, capture_output=True, timeout=600)
    config = read(tmp_path / "data" / "config.json")
    assert config["world_size"] == 2 and config["parallel"] == "data"
    assert math.isfinite(read(tmp_path / "data" / "results.json")["metrics"]["object_dice"])


def test_quick_fixed_weights_subset_and_pixel_head_metrics(tmp_path):
    run_dir = um.main(["--quick", "--losses", "s,g", "--weights", "0.7,0.3", "--no-uncertainty",
                       "--out", str(tmp_path / "run")])
    results = read(run_dir / "results.json")
    assert {k for k in results["metrics"] if not k.endswith("_se")} == {"pixel_accuracy", "object_dice", "object_hausdorff"}
    row = results["table"][0]
    assert (row["lambda_c"], row["lambda_s"], row["lambda_t"], row["lambda_g"]) == pytest.approx((0.0, 0.7, 0.0, 0.3))
    # Lg alone trains the pixel head too: its segmentation is reported
    run_dir = um.main(["--quick", "--losses", "c,g", "--out", str(tmp_path / "cg")])
    assert {"accuracy", "pixel_accuracy", "object_dice"} <= set(read(run_dir / "results.json")["metrics"])
    with pytest.raises(common.UsageError):
        um.main(["--quick", "--weights", "0.5,0.5", "--out", str(tmp_path / "bad")])


def test_quick_table1_writes_all_rows(tmp_path):
    run_dir = um.main(["--quick", "--table1", "--out", str(tmp_path / "t1")])
    results = read(run_dir / "results.json")
    rows = results["table"]
    assert [r["row"] for r in rows] == [row[0] for row in um.TABLE1]
    assert "accuracy" in rows[0] and "pixel_accuracy" not in rows[0]  # Lc only: no segmentation
    assert "accuracy" not in rows[1] and "object_dice" in rows[1]  # Ls only: no classification
    assert rows[7]["lambda_s"] == pytest.approx(0.6) and not rows[7]["uncertainty"]
    assert all(f"sigma2_{k}" in rows[-1] for k in um.LOSS_NAMES) and "sigma2_t" not in rows[8]
    assert set(results["metrics"]) >= {"accuracy", "pixel_accuracy", "object_dice", "object_hausdorff", "sigma2_g"}
    assert "Table 1" in (run_dir / "results.md").read_text()
    assert (job_dir(run_dir) / "best.pt").exists() and (job_dir(run_dir, "Lc") / "best.pt").exists()


def test_quick_sweep_writes_both_plots(tmp_path):
    run_dir = um.main(["--quick", "--sweep", "--out", str(tmp_path / "sweep")])
    assert (run_dir / "figures" / "fig2_lambda_Lc_Ls.png").stat().st_size > 0
    assert (run_dir / "figures" / "fig2_lambda_Lt_Lg.png").stat().st_size > 0
    rows = read(run_dir / "results.json")["table"]
    assert len(rows) == 6  # --quick: lambda in {0, 0.5, 1} for each sweep
    assert rows[0]["lambda_c"] == 0.0 and "accuracy" not in rows[0]  # lambda = 0: Ls only
    assert rows[3]["lambda_t"] == 0.0 and rows[3]["lambda_g"] == 1.0


def test_quick_glas_layout_keeps_the_aspect_ratio(tmp_path):
    """A tiny tree in the GlaS layout (train_N.bmp + _anno.bmp, testA/testB, Grade.csv) of 30x40
    images: the real-data path (letterbox canvas, patches, metrics at the original resolution)."""
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
                       "--border-width", "2", "--out", str(tmp_path / "run")])
    config = read(run_dir / "config.json")["args"]
    assert config["patch"] == 24 and config["size"] == 32 and config["width"] == 4
    results = read(run_dir / "results.json")
    assert results["data"] == "glas" and math.isfinite(results["metrics"]["object_dice"])
    # a perfect prediction scored the way evaluate does, at the original 30x40: object Dice 1
    data = common.load_dataset("glas", root=root, size=32, cache=tmp_path / "cache", border_width=2)
    test = data["test"]
    h, w = test["sizes"][0].tolist()
    assert (h, w) == (30, 40) and test["images"].shape[-1] == 32
    regions = test["full_masks"][0][None].long()
    dice, hd = um._object_scores(regions, test["full_instances"][0][None], 4)
    assert dice.item() == pytest.approx(1.0) and hd.item() == 0.0


def test_arguments_and_loss_configuration():
    config = um.config_from_args(um.parse_args(["--losses", "c,s,t", "--weights", "0,0.7,0.3", "--no-uncertainty"]))
    assert config == {"row": "Ls + Lt", "weights": {"s": 0.7, "t": 0.3}, "uncertainty": False}  # lambda = 0 is off
    default = um.config_from_args(um.parse_args([]))
    assert default["uncertainty"] and list(default["weights"]) == list(um.LOSS_NAMES)  # Eq. 2
    for bad in (["--losses", "c,x"], ["--losses", "c,s", "--weights", "1", "--no-uncertainty"]):
        with pytest.raises(common.UsageError):
            um.config_from_args(um.parse_args(bad))
    # the defaults that depend on --data: one parse, explicit flags win, all listed by --help
    synthetic, real = um.parse_args([]), um.parse_args(["--data", "glas", "--root", "x"])
    assert (synthetic.size, synthetic.patch, synthetic.width, synthetic.epochs) == (64, 0, 16, 40)
    assert (real.size, real.patch, real.width, real.epochs, real.elastic) == (512, 250, 32, 100, 8.0)
    assert um.parse_args(["--data", "glas", "--size", "256"]).size == 256
    assert not synthetic.flip and synthetic.color_jitter == 0  # Sec. 3: elastic + affine only
    help_text = um.build_parser().epilog  # the defaults that depend on --data
    assert "512" in help_text and "250" in help_text
    # every flag is checked when parsed, and so are the checks across flags: one UsageError line
    for bad in (["--width", "0"], ["--momentum", "nan"], ["--patch", "-1"], ["--connectivity", "6"]):
        with pytest.raises(common.UsageError, match=bad[0]):
            um.parse_args(bad)
    for bad in (["--table1", "--sweep"], ["--sweep", "--lambdas", "0,2"], ["--losses", "c", "--no-uncertainty",
                                                                           "--weights", "nan"]):
        with pytest.raises(common.UsageError):
            um.parse_args(bad)


# ------------------------------------------------------------------------------------------------
# The run kit's promises: --resume DIR, flags checked when parsed, an overflow stops with one line
# ------------------------------------------------------------------------------------------------


def test_epochs_zero_is_refused_before_anything_is_written(tmp_path, capsys):
    """--epochs 0 used to exit 0 with an untrained model's results."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        common.cli(um.main, ["--quick", "--epochs", "0", "--out", str(out)])
    assert stop.value.code == 2 and "--epochs" in capsys.readouterr().err
    assert not out.exists()


def test_overflowing_log_sigma2_stops_with_one_line_and_finite_checkpoints(tmp_path, capsys):
    """--lr 6: s_c, s_t pass 138 and 378 in epoch 1 and e^s_t overflows in epoch 2 (the old
    math.exp raised OverflowError, a traceback); now one line naming epoch and step, exit 2, and
    the checkpoints left (epoch 1's) hold finite parameters and buffers."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        common.cli(um.main, ["--quick", "--device", "cpu", "--lr", "6", "--epochs", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "epoch 2 step 3" in err and "--lr" in err
    checkpoints = list(out.rglob("*.pt"))
    assert {p.name for p in checkpoints} == {"last.pt", "best.pt"}
    for path in checkpoints:
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_dir_alone_continues_an_interrupted_run(tmp_path, monkeypatch):
    """--resume DIR (no --out) continues DIR: a run killed after its first epoch ends with the table
    of the uninterrupted run (it used to start a new folder)."""
    argv = ["--quick", "--epochs", "2", "--device", "cpu"]
    whole = read(um.main(argv + ["--out", str(tmp_path / "whole")]) / "results.json")
    evaluate, validations = um.evaluate, []

    def evaluate_then_die(*args, **kwargs):  # as kill -9 in epoch 2, after the checkpoint of epoch 1
        validations.append(kwargs.get("objects", True))
        if validations.count(False) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(um, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        um.main(argv + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(um, "evaluate", evaluate)
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = um.main(["--resume", str(tmp_path / "cut")])
    assert resumed == tmp_path / "cut"  # the same folder, not a new one
    epochs = [r["epoch"] for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines()) if "epoch" in r]
    assert epochs == [1, 2]
    again = read(resumed / "results.json")
    assert without_timing(again["table"]) == without_timing(whole["table"])
    assert again["metrics"] == whole["metrics"]
