"""Uncertainty driven multi-loss fully convolutional networks for gland analysis.

Reference: A. BenTaieb and G. Hamarneh, "Uncertainty Driven Multi-Loss Fully Convolutional Networks
for Histopathology", MICCAI 2017 workshops (LABELS), LNCS 10552 (../shared/papers/uncertainty_multiloss.txt).

Idea. One encoder-decoder FCN (Fig. 1) trains four losses at once: benign/malignant classification (Lc, last encoder
layer), a per-pixel sigmoid cross-entropy over L = 3 region labels (Ls, last decoder layer), a topology loss (Lt)
whose hierarchical probabilities give zero mass to label assignments that break containment or exclusion, and a
geometry loss (Lg) asking neighbouring pixels of one region for the same log-probability. Instead of hand-tuned
weights (Eq. 1), each loss i is weighted by a learned uncertainty (Eq. 2-9): L_i / sigma_i^2 + log sigma_i^2, s_i =
log sigma_i^2 trained with the network.

Region labels (r = 1..L, the channel order of f_s): lumen, epithelial border (the whole gland, so a lumen pixel is
lumen and border: containment), stroma (excludes both). Of the 2^L label vectors only stroma (0,0,1), border
(0,1,0) and lumen (1,1,0) are valid, so P_t (Eq. 7) is a softmax over (f_stroma, f_border, f_lumen + f_border).

Equations -> code (the method is one block, "The method" below)
    Fig. 1     MultiLossFCN (level_block = Conv3x3-ReLU-BN twice; 2x2 pooling; 2x2 up-sampling + 1x1 conv;
               class_head -> f_c, pixel_head -> f_s; log_sigma2 = s_c, s_s, s_t, s_g)
    Eq. 1, 2   combine_losses: sum_i lambda_i L_i (uncertainty=False); Lc + Ls + Lt + Lg (True)
    Eq. 3-5    classification_loss, uncertainty_weighted (L / sigma^2 + log sigma^2, every term)
    Eq. 6      segmentation_loss;   Eq. 8  topology_loss;   Eq. 9  geometry_loss
    Eq. 7      hierarchical_log_probabilities (LABEL_VECTORS, VALID), region_log_probabilities (argmax: regions)
    Sec. 3     regions_to_instances (glands as objects); train (SGD, lr 1e-2, elastic + affine augmentation,
               250x250 patches on GlaS); evaluate (accuracy, pixel accuracy, GlaS object Dice and Hausdorff)
    Table 1    TABLE1, --table1;   Fig. 2  --sweep;   Fig. 3  figure_predictions

Usage (and --eval-only --checkpoint, --resume DIR, torchrun --nproc_per_node N, as README.md says)
    python uncertainty_multiloss.py [--seeds 0,1,2]       # Lc+Ls+Lt+Lg, learned sigma; synthetic; mean ± SE over seeds
    python uncertainty_multiloss.py --table1 --seeds 0,1,2    # the 11 rows of Table 1
    python uncertainty_multiloss.py --sweep --epochs 20   # Fig. 2, both lambda sweeps (22 runs)
    python uncertainty_multiloss.py --losses c,s,t,g --weights 0.1,0.6,0.22,0.08 --no-uncertainty
    python uncertainty_multiloss.py --data glas --root GlaS/  # Warwick-QU: 512 px canvas, 250x250 patches
    python uncertainty_multiloss.py --predict my_images/ --checkpoint runs/<run>/<row>-seed0/best.pt

Deviations (ambiguities resolved, and why)
    - Eq. 6 prints only -S log P; the "sigmoid cross entropy" it names has both terms: both are used.
    - Eq. 7-8: P_t is a distribution over label vectors (the "modified softmax" of [4]): Z sums over all 2^L
      vectors, not "over r" as printed; Lt = -log P_t(S_p | x_p), once per pixel (literally, Eq. 8 counts a lumen
      pixel twice; as label marginals it never penalises a border pixel for the lumen vector: both S^border = 1).
    - Eq. 9: the formula's P_t of the ground-truth vector, not the "log-sigmoid label probabilities" of the
      sentence after it (the tests work one case in both readings).
    - Sums over pixels (Eq. 6, 8, 9) are means, so Table 1's fixed lambdas weigh terms of comparable size; Lg
      sums over the 4 neighbours of each pixel (each pair counts twice).
    - Eq. 5 (the paper's approximation of Eq. 3-4), + log sigma^2 and no factor 1/2, for every term. L_i e^-s + s
      is least at sigma_i^2 = L_i, so 1/sigma_i^2 follows 1/L_i (the training loss), bounded only by the step
      size; log.jsonl and figures/sigma2.png hold both per epoch.
    - Augmentation (Sec. 3: "elastic and affine"): rotation, scaling, elastic warp; --flip, --color-jitter optional.
    - Not in the paper, chosen here: two Conv3x3-ReLU-BN per level; ceil max pooling (250 -> 125 -> 63 -> 32 -> 16
      as Fig. 1); nearest 2x up-sampling, then a 1x1 conv halving the channels; class logits = 1x1 conv on the
      last encoder layer averaged over space; SGD momentum 0.9; s_i = 0 at the start; the epoch tested is the best
      on validation by the mean of accuracy, pixel accuracy and the gland mask's pixel Dice; predicted regions =
      the most probable valid vector under P_t.
    - Glands as objects (the paper does not say how): regions_to_instances gives every gland pixel to its
      geodesically nearest lumen component, so glands that touch or are pressed together stay apart as GlaS
      annotates them; a gland without lumen is one object. No step merges cells back: on the synthetic validation
      ground truth (seeds 0-2, 90 images, 64 px) object Dice is 0.968 without a merge, 0.961 / 0.938 / 0.913 when
      cells meeting along at least 0.9 / 0.6 / 0.3 of the thinner one's thickness are merged, 0.905 for connected
      components of border U lumen; most of what is left is lumen-free glands touching another gland.
    - Segmentation metrics for every run that trains the pixel head (any of Ls, Lt, Lg), "-" else.
    - Real data (GlaS, 775x522) keeps its aspect ratio on a zero-padded canvas (--size 512); patches are cut
      inside each image's own pixels; metrics at the original resolution (P_t mapped back with
      common.from_canvas, then decoded); the border band is --border-width original pixels.
    - CPU-sized synthetic default: 64x64 images, width 16, 40 epochs, batch 8 (DATA_DEPENDENT; --help).
"""
import argparse
import functools
import json
import math
import time

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

matplotlib.use("Agg")

SCRIPT = "uncertainty_multiloss"
LOSS_NAMES = ("c", "s", "t", "g")  # classification, segmentation, topology, geometry
# Table 1: row, weights (lambda_c, lambda_s, lambda_t, lambda_g; 0 = loss off), learned uncertainty, and
# the paper's numbers on the Warwick-QU test set (accuracy, pixel accuracy, object Dice, Hausdorff)
TABLE1 = [
    ("Lc", (1, 0, 0, 0), False, (0.87, None, None, None)),
    ("Ls", (0, 1, 0, 0), False, (None, 0.79, 0.81, 8.2)),
    ("Lt", (0, 0, 1, 0), False, (None, 0.75, 0.77, 8.6)),
    ("Ls + Lt + Lg", (0, 1, 1, 1), False, (None, 0.83, 0.84, 7.3)),
    ("Lc + Ls", (0.5, 0.5, 0, 0), False, (0.90, 0.79, 0.80, 8.4)),
    ("Lc + Ls + Lt", (1 / 3, 1 / 3, 1 / 3, 0), False, (0.94, 0.78, 0.80, 8.4)),
    ("Lc + Ls + Lt + Lg", (0.25, 0.25, 0.25, 0.25), False, (0.91, 0.81, 0.83, 7.6)),
    ("Lc + Ls + Lt + Lg (tuned)", (0.1, 0.6, 0.22, 0.08), False, (0.95, 0.86, 0.85, 7.1)),
    ("Lc + Ls (uncertainty)", (1, 1, 0, 0), True, (0.95, 0.78, 0.80, 8.4)),
    ("Lc + Ls + Lt (uncertainty)", (1, 1, 1, 0), True, (0.94, 0.79, 0.81, 8.2)),
    ("Lc + Ls + Lt + Lg (uncertainty)", (1, 1, 1, 1), True, (0.95, 0.85, 0.87, 7.0)),
]
METRICS = ("accuracy", "pixel_accuracy", "object_dice", "object_hausdorff")  # Table 1's columns

# Defaults that depend on the data: (synthetic, real, --quick synthetic, --quick real). Real data (GlaS): 250x250
# patches (Sec. 3) of a 512 canvas, 100 epochs of 70 images ~ the paper's x100 augmentation, a wider network.
DATA_DEPENDENT = {
    "size": (64, 512, 32, 32),
    "epochs": (40, 100, 1, 1),
    "batch_size": (8, 8, 4, 4),
    "width": (16, 32, 4, 4),
    "depth": (4, 4, 2, 2),
    "patch": (0, 250, 0, 24),
    "elastic": (2.0, 8.0, 2.0, 8.0),
    "lambdas": ([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1],) * 2 + ([0, 0.5, 1],) * 2,
}


# ---- Arguments -----------------------------------------------------------------------------------

def build_parser():
    rows = [f"  --{k.replace('_', '-'):<11} {v[0]!s:>6} {v[1]!s:>6} {v[2]!s:>6} {v[3]!s:>6}"
            for k, v in DATA_DEPENDENT.items() if k != "lambdas"]
    epilog = ("defaults that depend on --data (a flag given on the command line always wins):\n"
              "  flag         synth   real  quick  quick-real\n" + "\n".join(rows)
              + "\n  --lambdas: 0,0.1,...,1 (0,0.5,1 with --quick)")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, size=64, epochs=40, batch_size=8, lr=1e-2, data="synthetic",
                           data_choices=["synthetic", "glas", "folder"])
    m = p.add_argument_group("method (paper: Sec. 2 and 3)")
    m.add_argument("--losses", default="c,s,t,g", help="terms to train: c (Eq. 3-5), s (Eq. 6), t (Eq. 7-8), g (Eq. 9)")
    m.add_argument("--weights", type=common.checked_list(float, low=0),
                   help="fixed lambda_i of Eq. 1 per entry of --losses (default 1); with --no-uncertainty")
    m.add_argument("--uncertainty", action=argparse.BooleanOptionalAction, default=True,
                   help="learn s_i = log sigma_i^2 per loss (Eq. 2-9); --no-uncertainty = fixed weights (Eq. 1)")
    m.add_argument("--init-log-sigma2", type=common.checked(float), default=0.0,
                   help="initial s_i = log sigma_i^2 (not given; 0 = sigma^2 1)")
    m.add_argument("--momentum", type=common.checked(float, low=0, high=0.999), default=0.9,
                   help="SGD momentum (the paper: SGD, lr 1e-2, momentum not given)")
    m.add_argument("--width", type=common.POSITIVE_INT, help="channels of the first level (not in the paper)")
    m.add_argument("--depth", type=common.POSITIVE_INT, help="number of 2x2 poolings (Fig. 1: 250 -> 16 is 4)")
    m.add_argument("--patch", type=common.NONNEGATIVE_INT,
                   help="side of random square training patches (Sec. 3: 250); 0 = whole images")
    m.add_argument("--elastic", type=common.NONNEGATIVE, help="elastic warp magnitude in pixels (Sec. 3)")
    m.add_argument("--rotate", type=common.checked(float, low=0, high=180), default=15.0,
                   help="affine augmentation: rotation in degrees (Sec. 3)")
    m.add_argument("--scale", type=common.checked(float, low=0, high=0.9), default=0.1,
                   help="affine augmentation: scale fraction (Sec. 3)")
    m.add_argument("--flip", action="store_true", help="also random flips (not in the paper; default off)")
    m.add_argument("--color-jitter", type=common.NONNEGATIVE, default=0.0,
                   help="colour jitter strength (not in the paper; 0 = off)")
    m.add_argument("--border-width", type=common.POSITIVE_INT,
                   help="GlaS: epithelial border band width, original pixels (common's 18)")
    m.add_argument("--connectivity", type=int, default=4, choices=[4, 8],
                   help="connectivity of the lumen components (markers) and of lumen-free glands")
    m.add_argument("--table1", action="store_true", help="train and evaluate every row of Table 1")
    m.add_argument("--sweep", action="store_true", help="Fig. 2: λ Lc + (1-λ) Ls, Ls + λ Lt + (1-λ) Lg")
    m.add_argument("--lambdas", type=common.checked_list(float, distinct=True, low=0, high=1),
                   help="lambda values of --sweep (Fig. 2; default 0,0.1,...,1)")
    p.set_defaults(**{key: None for key in DATA_DEPENDENT})  # filled by resolve_defaults
    return p


def resolve_defaults(args):
    """Fills the DATA_DEPENDENT flags left unset with the data's values; checks flags that depend on each other."""
    column = 2 * bool(args.quick) + (args.data != "synthetic")
    common.fill_defaults(args, {key: values[column] for key, values in DATA_DEPENDENT.items()})
    if args.table1 and args.sweep:
        raise common.UsageError("--table1 and --sweep are two separate runs: pass one of them")
    config_from_args(args)  # --losses, --weights, --uncertainty
    return args


def parse_args(argv=None):
    return common.parse_args(build_parser(), SCRIPT, argv, resolve_defaults)


def row_config(row, weights, uncertainty, losses=LOSS_NAMES):
    """One run's loss configuration: {"row", "weights": {i: lambda_i}, "uncertainty"}; lambda_i = 0 is off."""
    return {"row": row, "weights": {k: float(w) for k, w in zip(losses, weights) if w > 0}, "uncertainty": uncertainty}


def config_from_args(args):
    """The configuration of --losses, --weights and --uncertainty, named after its terms."""
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    if not losses or any(s not in LOSS_NAMES for s in losses) or len(set(losses)) != len(losses):
        raise common.UsageError(f"--losses takes distinct terms from {','.join(LOSS_NAMES)}, got {args.losses!r}")
    weights = [1.0] * len(losses) if args.weights is None else args.weights
    if len(weights) != len(losses):
        raise common.UsageError(f"--weights needs one value per loss in --losses ({len(losses)}), got {args.weights!r}")
    if args.weights is not None and args.uncertainty:
        raise common.UsageError("--weights are the fixed lambdas of Eq. 1: add --no-uncertainty")
    config = row_config("", weights, args.uncertainty, losses)
    if not config["weights"]:
        raise common.UsageError("--weights: at least one lambda must be positive")
    config["row"] = " + ".join("L" + k for k in config["weights"]) + (" (uncertainty)" if args.uncertainty else "")
    return config


# ======== The method (Sec. 2): model, losses, glands as objects; tensors and numbers in and out ========

# All 2^L label vectors S = (S^lumen, S^border, S^stroma), r = 1..L the channel order of f_s; row v is vector v.
LABEL_VECTORS = torch.tensor([
    [0, 0, 0],  # 0: no region                        V = 0
    [0, 0, 1],  # 1: stroma                           V = 1   (mask value 0)
    [0, 1, 0],  # 2: epithelial border                V = 1   (mask value 1)
    [0, 1, 1],  # 3: border and stroma                V = 0   (stroma excludes the gland)
    [1, 0, 0],  # 4: lumen outside any border         V = 0   (lumen must lie inside its border)
    [1, 0, 1],  # 5: lumen and stroma                 V = 0
    [1, 1, 0],  # 6: lumen inside its border          V = 1   (mask value 2)
    [1, 1, 1],  # 7: all three                        V = 0
], dtype=torch.float32)
VALID = torch.tensor([False, True, True, False, False, False, True, False])  # V(S) of each row
MASK_TO_VECTOR = torch.tensor([1, 2, 6])  # region mask value (0 stroma, 1 border, 2 lumen) -> its row


def level_block(in_ch, out_ch):
    """Two of Fig. 1's blocks, each in the legend's order: Conv 3x3 -> ReLU -> BN."""
    return nn.Sequential(*(nn.Sequential(nn.Conv2d(c, out_ch, 3, padding=1), nn.ReLU(inplace=True),
                                         nn.BatchNorm2d(out_ch)) for c in (in_ch, out_ch)))


class MultiLossFCN(nn.Module):
    """Fig. 1: an encoder (levels separated by 2x2 max pooling, ceil: 250 -> 125 -> 63 -> 32 -> 16) and a decoder
    with skips (2x2 up-sampling, a 1x1 convolution halving the channels, the skip, a level); f_c from the last
    encoder layer, f_s from the last decoder one; the learned s_i = log sigma_i^2 per loss (Implementation details)."""

    def __init__(self, width=16, depth=4, n_classes=2, n_labels=3, init_log_sigma2=0.0):
        super().__init__()
        channels = [width * 2 ** i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(level_block(i, o) for i, o in zip([3] + channels[:-1], channels))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.reduce, self.decoder = nn.ModuleList(), nn.ModuleList()
        for c in reversed(channels[:-1]):  # deepest level first
            self.reduce.append(nn.Conv2d(2 * c, c, 1))
            self.decoder.append(level_block(2 * c, c))
        self.class_head = nn.Conv2d(channels[-1], n_classes, 1)  # 1x1 conv -> f_c (averaged over space)
        self.pixel_head = nn.Conv2d(width, n_labels, 1)  # 1x1 conv -> f_s
        self.log_sigma2 = nn.ParameterDict({k: nn.Parameter(torch.tensor(float(init_log_sigma2))) for k in LOSS_NAMES})

    def forward(self, x):
        skips = []
        for i, level in enumerate(self.encoder):
            x = level(x if i == 0 else self.pool(x))
            skips.append(x)
        # f_c(x) from the last encoder layer  [B,K]
        class_logits = self.class_head(x).mean((2, 3))
        for reduce, level, skip in zip(self.reduce, self.decoder, reversed(skips[:-1])):
            x = reduce(F.interpolate(x, scale_factor=2, mode="nearest"))
            # ceil pooling pads at the bottom/right, so the extra row/column of the up-sampled map is the last
            x = level(torch.cat([skip, x[..., : skip.shape[-2], : skip.shape[-1]]], 1))
        # f_s(x) from the last decoder layer  [B,L,H,W]
        return class_logits, self.pixel_head(x)


def label_vector_targets(masks):
    """Ground truth S_p as (index of its label vector [B,H,W], binary maps S^r [B,L,H,W])."""
    vector = MASK_TO_VECTOR.to(masks.device)[masks.long()]
    return vector, LABEL_VECTORS.to(masks.device)[vector].permute(0, 3, 1, 2)


def uncertainty_weighted(loss, log_sigma2):
    """Eq. 5 (and the same form in Eq. 6, 8, 9): 1/sigma^2 L + log sigma^2, with s = log sigma^2."""
    return torch.exp(-log_sigma2) * loss + log_sigma2


def classification_loss(class_logits, labels):
    """Eq. 3-5 at sigma_c = 1: sum_k -C_k log P(C_k = 1 | x) (softmax of f_c), mean over images."""
    return F.cross_entropy(class_logits.float(), labels)


def segmentation_loss(pixel_logits, label_maps):
    """Eq. 6 at sigma_s = 1: sigmoid cross-entropy sum_r -[S^r log P^r + (1 - S^r) log(1 - P^r)],
    P^r = sigmoid(f_s^r(x_p)), summed over the L labels, mean over pixels and images."""
    return F.binary_cross_entropy_with_logits(pixel_logits.float(), label_maps, reduction="none").sum(1).mean()


def hierarchical_log_probabilities(pixel_logits):
    """Eq. 7: log P_t(S | x_p) for every label vector S (dim 1, rows of LABEL_VECTORS) [B,8,H,W].
    P~_t(S) = V(S) prod_r exp(f_r(x_p) S^r);  Z = sum_S P~_t(S);  invalid vectors get log 0 = -inf."""
    # log prod_r exp(f_r S^r) = sum_r f_r S^r
    energy = torch.einsum("blhw,vl->bvhw", pixel_logits.float(), LABEL_VECTORS.to(pixel_logits.device))
    # V(S) = 0 -> P~_t = 0
    energy = energy.masked_fill(~VALID.to(pixel_logits.device).view(1, -1, 1, 1), float("-inf"))
    # log P~_t - log Z
    return energy.log_softmax(1)


def region_log_probabilities(pixel_logits):
    """Eq. 7 on the valid vectors only: log P_t of (stroma, border, lumen) [B,3,H,W], channel = mask value."""
    return hierarchical_log_probabilities(pixel_logits)[:, MASK_TO_VECTOR.to(pixel_logits.device)]


def topology_loss(log_pt, vector):
    """Eq. 8 at sigma_t = 1: -log P_t(S_p | x_p) of the ground-truth vector, pixel mean (each once: Deviations)."""
    return -log_pt.gather(1, vector.unsqueeze(1)).mean()


def geometry_loss(log_pt, vector):
    """Eq. 9 at sigma_g = 1: sum_{q in N4(p)} B_pq |log P_t(S_p | x_p) / P_t(S_p | x_q)|, mean over
    pixels p; B_pq = 1 where p and q have the same ground-truth label vector (then S_q = S_p)."""
    # log P_t(S_p | x_p) of each pixel's own ground-truth vector  [B,H,W]
    log_p = log_pt.gather(1, vector.unsqueeze(1)).squeeze(1)
    # B_pq for q right of and below p (the other two N4 directions are the same pairs seen from q)
    b_right = (vector[:, :, 1:] == vector[:, :, :-1]).float()
    b_below = (vector[:, 1:, :] == vector[:, :-1, :]).float()
    # |log P_t(S_p|x_p) - log P_t(S_p|x_q)| over the pairs with B_pq = 1
    right = (b_right * (log_p[:, :, 1:] - log_p[:, :, :-1]).abs()).sum()
    below = (b_below * (log_p[:, 1:] - log_p[:, :-1]).abs()).sum()
    # each pair {p, q} is in N4(p) and in N4(q): counted twice; divided by the pixel count (pixel sums are means)
    return 2 * (right + below) / vector.numel()


def loss_terms(class_logits, pixel_logits, labels, masks, active):
    """{"c": Lc, "s": Ls, "t": Lt, "g": Lg} at sigma = 1, the terms in `active` (all cheap next to the network)."""
    vector, label_maps = label_vector_targets(masks)
    terms = {"c": classification_loss(class_logits, labels), "s": segmentation_loss(pixel_logits, label_maps)}
    log_pt = hierarchical_log_probabilities(pixel_logits)  # Eq. 7, shared by Lt and Lg
    terms.update(t=topology_loss(log_pt, vector), g=geometry_loss(log_pt, vector))
    return {k: loss for k, loss in terms.items() if k in active}


def combine_losses(terms, weights, uncertainty, log_sigma2):
    """L_total over the terms: Eq. 2, sum_i L_i / sigma_i^2 + log sigma_i^2 (uncertainty=True, s_i =
    log_sigma2[i]), or Eq. 1, sum_i lambda_i L_i with lambda_i = weights[i] (uncertainty=False)."""
    if uncertainty:
        return sum(uncertainty_weighted(loss, log_sigma2[k]) for k, loss in terms.items())
    return sum(weights[k] * loss for k, loss in terms.items())


def _neighbours(x, fill):
    """x's 8 neighbours [N,H,W] (`fill` outside): up, down, left, right, up-left, up-right, down-left, down-right."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    offsets = [(0, 1), (2, 1), (1, 0), (1, 2), (0, 0), (0, 2), (2, 0), (2, 2)]
    return [padded[:, dy:dy + h, dx:dx + w] for dy, dx in offsets]


def _grow_markers(markers, gland):
    """Every pixel of `gland` takes the label of the marker it reaches first when all markers grow at once inside
    the gland, alternating 4- and 8-neighbour steps (octagonal distance; diagonal steps only through a gland pixel,
    so no label jumps between glands touching at a corner). Ties take the larger label; no marker: 0."""
    inside = _neighbours(gland, False)
    # a diagonal neighbour (4..7 above) is reached through one of its two edge neighbours
    diagonal_open = [inside[a] | inside[b] for a, b in ((0, 2), (0, 3), (1, 2), (1, 3))]
    labels, step = markers, 0
    while True:
        near = _neighbours(labels, 0)
        grown = torch.stack([labels, *near[:4]]).amax(0)
        if step % 2:
            diagonal = [torch.where(open_, neighbour, 0) for open_, neighbour in zip(diagonal_open, near[4:])]
            grown = torch.stack([grown, *diagonal]).amax(0)
        grown = torch.where(gland & (labels == 0), grown, labels)
        step += 1
        if torch.equal(grown, labels):  # one host sync per step; evaluation only
            return labels
        labels = grown


def regions_to_instances(regions, connectivity=4):
    """Gland instances [N,H,W] int64 (0 background, 1..k per image) from region maps [N,H,W] or [H,W] (0 stroma,
    1 border, 2 lumen): one object per lumen component, every gland pixel to its geodesically nearest lumen (glands
    that touch or are pressed together stay apart), a gland without lumen one object; batched on the device."""
    single = regions.dim() == 2
    regions = regions.unsqueeze(0) if single else regions
    gland = regions >= 1
    # markers: the connected components of lumen (one lumen per gland in the GlaS annotation)
    markers = common.label_components(regions == 2, connectivity=connectivity).long()
    cells = _grow_markers(markers, gland)
    unreached = gland & (cells == 0)  # glands without any lumen: one object per component
    components = common.label_components(unreached, connectivity=connectivity).long()
    instances = torch.where(unreached, markers.flatten(1).amax(1).view(-1, 1, 1) + components, cells)
    return instances[0] if single else instances


# ---- Training and evaluation (Sec. 3): regions, glands as objects, the metrics ---------------------

def _patch_start(inside, length, side, u):
    """Per image, a uniform first row (or column) of a side-long patch inside its own rows (`inside` [B,length])."""
    first = inside.float().argmax(1).float()
    last = length - 1 - inside.flip(1).float().argmax(1)
    low = first.clamp(max=length - side)
    high = torch.maximum(first, (last - side + 1).float()).clamp(max=length - side)
    return (low + u * (high - low + 1)).long().clamp(max=length - side)


def random_patches(batch, side, generator):
    """Sec. 3: one random side x side patch per image, cut on the device; with a `valid` map (letterboxed images)
    it lies inside the image's own pixels where the image is at least `side` wide (padding only around smaller)."""
    images = batch["images"]
    b, _, h, w = images.shape
    if side >= min(h, w):
        return batch
    dev = images.device
    valid = batch["valid"] if batch.get("valid") is not None else torch.ones(b, h, w, dtype=torch.bool, device=dev)
    u = torch.rand(b, 2, device=dev, generator=generator)
    top, left = _patch_start(valid.any(2), h, side, u[:, 0]), _patch_start(valid.any(1), w, side, u[:, 1])
    rows = (top[:, None] + torch.arange(side, device=dev))[:, :, None]  # [B,P,1]
    cols = (left[:, None] + torch.arange(side, device=dev))[:, None, :]  # [B,1,P]
    n = torch.arange(b, device=dev)[:, None, None]
    cut = {key: batch[key][n, rows, cols] for key in ("masks", "instances", "valid") if batch.get(key) is not None}
    return dict(batch, images=images.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 3, 1, 2).contiguous(), **cut)


def training_batches(split, args, generator, stats, dist):
    """One epoch of augmented, normalised training batches (Sec. 3) drawn with `generator` (torchrun: this rank's)."""
    drop_last = len(split["names"]) > args.batch_size  # no batch of one image for BatchNorm
    for batch in common.iterate_batches(split, args.batch_size, shuffle=True, generator=generator, drop_last=drop_last):
        if args.patch:  # cut first, then warp the patch (reflection padding then reflects tissue)
            batch = random_patches(batch, args.patch, generator)
        batch = common.augment(batch, generator=generator, flip=args.flip, rotate=args.rotate, scale=args.scale,
                               elastic=args.elastic, color=args.color_jitter)
        batch = common.shard(batch, dist)
        batch["x"] = common.normalize(batch["images"], stats["mean"], stats["std"])
        yield batch


def learned_sigma2(model, keys):
    """sigma_i^2 = e^(s_i) of the terms `keys` (Eq. 2), as Python floats (inf where it overflows)."""
    return dict(zip(keys, torch.stack([model.log_sigma2[k].detach() for k in keys]).double().exp().tolist()))


def train(job, model, config, data, stats):
    """SGD (Sec. 3) from the job's last checkpoint (or the start) to --epochs; a log line per epoch (loss terms,
    sigma^2 and 1/sigma^2, validation metrics); last.pt every epoch, best.pt on the best score. Returns the speed."""
    run, args, started = job.run, job.run.args, time.perf_counter()
    net = common.unwrap(model)  # the plain module: log sigma^2, evaluation
    active = list(config["weights"])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)  # Sec. 3: SGD, lr 1e-2
    generator = torch.Generator(device=run.device).manual_seed(job.seed)  # batches, patches, augmentation
    start, best = common.resume(job, model, optimizer, generator=generator)  # the batches go on as they would have
    steps_per_epoch = max(1, len(data["train"]["names"]) // args.batch_size)  # the last partial batch is dropped
    progress = common.Progress(job, steps_per_epoch, args.epochs, start, every=args.log_every)
    extra = {"config": config, "norm": {"mean": stats["mean"].cpu(), "std": stats["std"].cpu()},
             "class_names": list(data["train"]["class_names"])}  # what --eval-only and --predict need
    for epoch in range(start, args.epochs):
        model.train()
        sums = torch.zeros(len(active) + 1, device=run.device)  # running sums on the device: total, each term
        for batch in progress.epoch(epoch, training_batches(data["train"], args, generator, stats, run.dist)):
            with common.autocast(run.device, args.amp):
                class_logits, pixel_logits = model(batch["x"])
            terms = loss_terms(class_logits, pixel_logits, batch["labels"], batch["masks"], active)
            loss = combine_losses(terms, config["weights"], config["uncertainty"], net.log_sigma2)  # Eq. 2 or Eq. 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach()] + [terms[k].detach() for k in active])
            progress.step(loss, batch["x"].shape[0])  # stops on a non-finite loss
        means = (sums / steps_per_epoch).tolist()  # one host sync per epoch
        record = {"epoch": epoch + 1, "loss": means[0], **{f"loss_{k}": v for k, v in zip(active, means[1:])}}
        if config["uncertainty"]:  # Eq. 2: the learned sigma_i^2 and the weight 1/sigma_i^2 it gives L_i
            sigma2 = learned_sigma2(net, active)
            overflow = [k for k, value in sigma2.items() if not math.isfinite(value)]
            if overflow:  # s_i ran away: the term's weight is gone
                raise common.NonFiniteLossError(
                    f"{job.name}: sigma2_{overflow[0]} = e^s overflows at epoch {epoch + 1} step {steps_per_epoch}; "
                    f"stopping (the checkpoints in {job.dir}, if any, are from before). Try a lower --lr.")
            record.update({f"sigma2_{k}": v for k, v in sigma2.items()})
            record.update({f"inv_sigma2_{k}": 1 / v for k, v in sigma2.items()})
        val = evaluate(net, data["val"], stats, config, args, objects=False)
        # model selection: the mean of the cheap validation metrics (accuracy, pixel accuracy, gland Dice)
        record.update({f"val_{k}": v for k, v in val.items()}, val_score=sum(val.values()) / len(val))
        job.log(**record)
        print(f"[{job.name}] epoch {epoch + 1}/{args.epochs} loss {means[0]:.4f} "
              + " ".join(f"{k} {v:.3f}" for k, v in val.items()), flush=True)
        best = common.save(job, epoch + 1, record["val_score"], best, model, optimizer, generator=generator, **extra)
    return {**progress.report(), "steps": steps_per_epoch * args.epochs, "seconds": time.perf_counter() - started}


@torch.no_grad()
def predict(model, split, stats, args):
    """Class probabilities [N,K] and P_t of (stroma, border, lumen) [N,3,H,W], on the device."""
    model.eval()
    classes, regions = [], []
    for batch in common.iterate_batches(split, args.batch_size, shuffle=False):
        with common.autocast(stats["device"], args.amp):
            class_logits, pixel_logits = model(common.normalize(batch["images"], stats["mean"], stats["std"]))
        classes.append(class_logits.float().softmax(1))  # sigma_c rescales f_c only: same argmax (Eq. 3)
        regions.append(region_log_probabilities(pixel_logits.float()).exp())
    return torch.cat(classes), torch.cat(regions)


def _object_scores(regions, truth, connectivity):
    """GlaS object Dice and object Hausdorff per image of the glands regions_to_instances finds."""
    glands = regions_to_instances(regions, connectivity)
    return common.object_dice(glands, truth), common.object_hausdorff(glands, truth)


@torch.no_grad()
def evaluate(model, split, stats, config, args, objects=True):
    """Sec. 3 metrics of the trained heads: classification accuracy, pixel accuracy of the 3-region map, and GlaS
    object Dice / Hausdorff of the glands (objects=True) or the gland mask's pixel Dice (model selection); at the
    original resolution when the split keeps it (GlaS: full_masks, full_instances), else at the model's size."""
    class_prob, region_prob = predict(model, split, stats, args)
    out = {}
    if "c" in config["weights"]:
        out["accuracy"] = common.accuracy(class_prob.argmax(1), split["labels"])
    if not any(k in config["weights"] for k in "stg"):  # Ls, Lt and Lg train f_s; else "-" as in Table 1
        return out
    if objects and split.get("full_instances") is not None and split.get("sizes") is not None:
        # back to each image's own pixels: P_t cropped out of the canvas and resized, then decoded
        scores = []
        for i, (h, w) in enumerate(split["sizes"].tolist()):
            regions = common.from_canvas(region_prob[i], h, w, "bilinear").argmax(0)[None]  # [1,h,w]
            truth = split["full_instances"][i][None].to(regions.device)
            scores.append((common.pixel_accuracy(regions, split["full_masks"][i][None].to(regions.device)),
                           *_object_scores(regions, truth, args.connectivity)))
        accuracy, dice, hausdorff = (torch.cat(s) for s in zip(*scores))
    else:
        regions = region_prob.argmax(1)
        valid = split.get("valid")  # letterboxed images: 1 on the image's own pixels
        valid = torch.ones_like(regions, dtype=torch.bool) if valid is None else valid.to(regions.device).bool()
        right = (regions == split["masks"].to(regions.device).long()) & valid
        accuracy = (right.flatten(1).sum(1).double() / valid.flatten(1).sum(1).clamp_min(1)).cpu()  # per image
        if objects:
            dice, hausdorff = _object_scores(regions, split["instances"].to(regions.device), args.connectivity)
    out["pixel_accuracy"] = accuracy.mean().item()
    if objects:
        finite = hausdorff[torch.isfinite(hausdorff)]
        out["object_dice"] = dice.mean().item()
        out["object_hausdorff"] = finite.mean().item() if len(finite) else math.inf
        out["hausdorff_undefined"] = int((~torch.isfinite(hausdorff)).sum())
    else:
        gland, truth = (regions >= 1) & valid, (split["masks"].to(regions.device) >= 1) & valid  # padding left out
        out["gland_dice"] = common.dice(gland, truth).mean().item()
    return out


# ---- One job = one row of a table for one seed ---------------------------------------------------

def load_data(args, seed, device=None):
    """One seed's data (synthetic: generated from it; real: its train/val split) on the device, and train mean/std."""
    name = "synthetic-glands" if args.data == "synthetic" else args.data
    options = {"n_train": 12, "n_val": 4, "n_test": 6} if args.quick and args.data == "synthetic" else {}
    if args.data == "synthetic":  # --n-train / --n-val / --n-test win over --quick's small set
        options.update(common.synthetic_split_sizes(args))
    elif args.data == "glas" and args.border_width:
        options["border_width"] = args.border_width
    data = common.load_dataset(name, root=args.root, size=args.size, seed=seed, cache=args.cache, **options)
    for split in ("train", "val", "test"):
        if split not in data or data[split].get("labels") is None:
            raise common.UsageError(f"--data {args.data}: needs train/val/test splits with benign/malignant labels")
        if int(data[split]["masks"].max()) > 2 or data[split]["masks"].dim() != 3:
            raise common.UsageError(f"--data {args.data}: masks must be [N,H,W] with 0 stroma, 1 border, 2 lumen")
        if data[split].get("instances") is None:  # e.g. --data folder: glands separated as predictions are
            data[split]["instances"] = regions_to_instances(data[split]["masks"], args.connectivity)
    device = device or common.choose_device(args.device)
    data = {k: common.to_device(v, device) for k, v in data.items()}
    mean, std = common.channel_stats(data["train"]["images"], data["train"]["valid"])
    return data, {"device": device, "mean": mean.to(device), "std": std.to(device)}


def train_and_test(job, config, data_for, checkpoint=None, draw=False):
    """One job: trains the configuration with the job's seed (data, initialisation, batches, augmentation), tests
    its best epoch (or `checkpoint`: --eval-only); returns this seed's row (lambdas, test metrics, sigma^2, speed)."""
    args = job.run.args
    data, stats = data_for(job.seed)
    model = common.prepare_model(MultiLossFCN(args.width, args.depth, init_log_sigma2=args.init_log_sigma2), job.run)
    if checkpoint is None:
        speed = train(job, model, config, data, stats)
        common.load_best(job, model)
    else:
        common.load_model_state(model, checkpoint["model"])
        speed = {}
    net = common.unwrap(model)
    row = {"uncertainty": config["uncertainty"], **{f"lambda_{k}": config["weights"].get(k, 0.0) for k in LOSS_NAMES},
           **evaluate(net, data["test"], stats, config, args)}
    if config["uncertainty"]:
        row.update({f"sigma2_{k}": v for k, v in learned_sigma2(net, list(config["weights"])).items()})
    print(f"[{job.name}] test " + " ".join(f"{k} {row[k]:.4g}" for k in METRICS if k in row), flush=True)
    if draw:
        figure_predictions(net, data["test"], stats, args, job.figures / "fig3_predictions.png")
    return {**row, **speed}


# ---- Predict: a trained model on one's own images (--predict, or load_model + predict_batch) ---

def load_model(checkpoint_path, device="cpu"):
    """A common.Predictor from a best.pt / last.pt of this script: the network as trained (its
    architecture from the checkpoint's arguments), the training normalisation and the class names."""
    state = common.load_checkpoint(checkpoint_path, SCRIPT)
    if "config" not in state or "norm" not in state:
        raise common.CheckpointError(f"{checkpoint_path} holds no loss configuration or normalisation")
    args = argparse.Namespace(**state["args"])
    device = torch.device(device)
    model = MultiLossFCN(args.width, args.depth, init_log_sigma2=args.init_log_sigma2)
    common.load_model_state(model, state["model"])
    norm = (state["norm"]["mean"].to(device), state["norm"]["std"].to(device))
    return common.Predictor(model=model.to(device).eval(), args=args, norm=norm, size=args.size, keep_aspect=True,
                            device=device, class_names=state.get("class_names") or ["benign", "malignant"],
                            mask_names=["stroma", "border", "lumen"], extra={"config": state["config"]})


@torch.no_grad()
def predict_batch(predictor, images_uint8):
    """uint8 [B,3,S,S] -> {"mask": regions (0 stroma, 1 border, 2 lumen), "instances": glands, "maps": {"entropy":
    H(P_t)}, "rows": per image the predicted class, probability per class name and number of glands}."""
    x = common.normalize(images_uint8.to(predictor.device), *predictor.norm)
    with common.autocast(predictor.device, getattr(predictor.args, "amp", True)):
        class_logits, pixel_logits = predictor.model(x)
    class_prob = class_logits.float().softmax(1)  # [B,K]
    log_p = region_log_probabilities(pixel_logits.float())  # [B,3,S,S]
    regions = log_p.argmax(1)  # the most probable valid label vector under P_t
    instances = regions_to_instances(regions, predictor.args.connectivity)
    entropy = -(log_p.exp() * log_p).sum(1)  # H(P_t) in nats; 0 <= H <= log 3
    rows = [{"predicted_class": predictor.class_names[int(p.argmax())],
             **{f"p_{name}": float(p[k]) for k, name in enumerate(predictor.class_names)}, "n_glands": int(g.max())}
            for p, g in zip(class_prob, instances)]
    return {"mask": regions, "instances": instances, "maps": {"entropy": entropy}, "rows": rows}


# ---- Report: tables and figures ------------------------------------------------------------------

def table_markdown(rows, title, digits=3):
    """Table 1's layout: the weights (1/sigma^2 of the seed mean of sigma^2 for learned ones) and the
    four metrics, 'mean ± SE' over seeds (the plain value for one seed), '–' for an untrained head."""
    seeds = rows[0].get("seeds", []) if rows else []
    lines = [f"## {title}", ""]
    if len(seeds) > 1:
        lines += [f"Mean ± standard error over {len(seeds)} seeds ({', '.join(map(str, seeds))}).", ""]
    lines += ["| Loss | λc | λs | λt | λg | Classification accuracy | Pixel accuracy | Object Dice "
              "| Hausdorff distance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["uncertainty"]:
            lam = [("0" if not r[f"lambda_{k}"] else f"1/σ²={1 / r[f'sigma2_{k}']:.2f}" if f"sigma2_{k}" in r
                    else "learned") for k in LOSS_NAMES]
        else:
            lam = [f"{r[f'lambda_{k}']:.2g}" for k in LOSS_NAMES]
        scores = [common.fmt_over_seeds(r, k, digits=1 if k == "object_hausdorff" else digits)
                  if r.get(k) is not None else "–" for k in METRICS]
        if r.get("hausdorff_undefined"):
            scores[-1] += f" ({r['hausdorff_undefined']:g} undefined)"
        lines.append(f"| {r['row']} | " + " | ".join(lam + scores) + " |")
    return "\n".join(lines) + "\n"


def figure_predictions(model, split, stats, args, path, n=4):
    """Fig. 3: image, ground truth, predicted regions and the glands regions_to_instances finds (a colour each)."""
    subset = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in split.items()}
    class_prob, region_prob = predict(model, subset, stats, args)
    regions = region_prob.argmax(1)
    glands = regions_to_instances(regions, args.connectivity).cpu()
    palette = torch.tensor([[0, 0, 0], [240, 220, 40], [130, 60, 170]], dtype=torch.uint8)
    objects = plt.get_cmap("tab20").with_extremes(bad="black")  # one colour per gland, stroma black
    k, names = subset["images"].shape[0], subset["class_names"]
    fig, axes = plt.subplots(4, k, figsize=(2.6 * k, 10.4), squeeze=False)
    for i in range(k):
        common.show_image(axes[0, i], subset["images"][i])
        axes[0, i].set_title(f"{names[int(subset['labels'][i])]} (predicted {names[int(class_prob[i].argmax())]})",
                             fontsize=8)
        axes[1, i].imshow(palette[subset["masks"][i].cpu().long()].numpy())
        axes[2, i].imshow(palette[regions[i].cpu().long()].numpy())
        axes[3, i].imshow(glands[i].float().masked_fill(glands[i] == 0, math.nan).numpy() % 20, cmap=objects,
                          vmin=0, vmax=20, interpolation="nearest")
        axes[3, i].set_title(f"{int(glands[i].max())} glands", fontsize=8)
    plt.setp(axes, xticks=[], yticks=[])
    for a, name in zip(axes[1:, 0], ("ground truth", "prediction", "predicted glands")):
        a.set_ylabel(name)
    fig.suptitle("Fig. 3: lumen (purple), epithelial border (yellow), stroma (black); glands as objects")
    common.save_figure(fig, path)


def figure_sigma2(run, rows, seed, path):
    """Eq. 2 per epoch, a panel per uncertainty row of `seed` (log.jsonl; a resumed epoch's last): 1/sigma_i^2 of
    each loss (solid) beside 1/L_i of its epoch-mean training loss (dashed), tracked by the optimum sigma_i^2 = L_i."""
    log = run.dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    learned = [r for r in records if r.get("seed") == seed and any(k.startswith("sigma2_") for k in r)]
    by_epoch = {(r["row"], r["epoch"]): r for r in learned}
    histories = [[by_epoch[key] for key in sorted(by_epoch) if key[0] == row] for row in rows]
    histories = [h for h in histories if h]
    if not histories:
        return
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.5), squeeze=False)
    for ax, history in zip(axes[0], histories):
        epochs = [r["epoch"] for r in history]
        for j, name in enumerate(k[len("sigma2_"):] for k in history[0] if k.startswith("sigma2_")):
            ax.plot(epochs, [1 / r[f"sigma2_{name}"] for r in history], marker="o", ms=3, color=f"C{j}",
                    label=f"1/σ²_{name}")
            ax.plot(epochs, [1 / max(r[f"loss_{name}"], 1e-12) for r in history], ls="--", color=f"C{j}",
                    label=f"1/L_{name}")
        ax.set(title=history[0]["row"], xlabel="epoch", ylabel="weight", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)


def figure_sweep(rows, lambdas, keys, title, path):
    """Fig. 2: test scores against lambda, with standard-error bars over seeds when there are several."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key in keys:
        points = [(lam, r[key], r.get(f"{key}_se", 0.0)) for lam, r in zip(lambdas, rows) if r.get(key) is not None]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=key.replace("_", " "))
    ax.set(xlabel="λ", ylabel="test score", title=title)
    ax.legend()
    common.save_figure(fig, path)


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.predict:
        common.run_predict(args, load_model, predict_batch, SCRIPT)
        return None
    checkpoint = None
    if args.eval_only:  # rows {name: loss configuration}: a checkpoint's own, rebuilt with its own architecture
        checkpoint = common.load_checkpoint(args.checkpoint, SCRIPT)
        if "config" not in checkpoint:
            raise common.CheckpointError(f"{args.checkpoint} holds no loss configuration (not this script's)")
        common.restore_architecture(args, checkpoint, ("width", "depth", "size", "connectivity", "init_log_sigma2"))
        rows = {checkpoint["config"]["row"]: checkpoint["config"]}
    elif args.table1:
        rows = {name: row_config(name, weights, uncertainty) for name, weights, uncertainty, _ in TABLE1}
    elif args.sweep:
        sweep = [(f"Fig. 2a: λ={lam:g}: λ Lc + (1-λ) Ls", (lam, 1 - lam, 0, 0)) for lam in args.lambdas]
        sweep += [(f"Fig. 2b: λ={lam:g}: Ls + λ Lt + (1-λ) Lg", (0, 1, lam, 1 - lam)) for lam in args.lambdas]
        rows = {name: row_config(name, weights, False) for name, weights in sweep}
    else:
        config = config_from_args(args)
        rows = {config["row"]: config}
    seeds = [args.seed] if checkpoint is not None else common.seed_list(args)
    main_row = None if args.sweep else list(rows)[-1]  # its first seed draws Fig. 3
    jobs = [(row, seed) for row in rows for seed in seeds]
    run = common.open_run(args, SCRIPT, n_jobs=len(jobs))
    data_for = functools.cache(lambda seed: load_data(args, seed, run.device))  # one dataset per seed
    table = common.run_jobs(run, jobs, lambda job: train_and_test(
        job, rows[job.row], data_for, checkpoint, draw=job.row == main_row and job.seed == seeds[0]))
    if table is None:  # torchrun: another process writes the results
        return None
    figure_sigma2(run, list(rows), seeds[0], run.figures / "sigma2.png")
    if args.sweep:  # the first half of the table sweeps Lc / Ls, the second Lt / Lg
        n = len(table) // 2
        figure_sweep(table[:n], args.lambdas, ["accuracy", "pixel_accuracy"], "λ Lc + (1-λ) Ls",
                     run.figures / "fig2_lambda_Lc_Ls.png")
        figure_sweep(table[n:], args.lambdas, ["pixel_accuracy", "object_dice"], "Ls + λ Lt + (1-λ) Lg",
                     run.figures / "fig2_lambda_Lt_Lg.png")
    main_entry = next((r for r in table if r["row"] == main_row), {})
    keys = list(METRICS) + [f"sigma2_{k}" for k in LOSS_NAMES]
    metrics = {key + s: main_entry[key + s] for key in keys if key in main_entry for s in ("", "_se")}
    title = "Fig. 2 sweeps" if args.sweep else ("Table 1" if args.table1 else "Test set")
    markdown = table_markdown(table, f"{title} ({args.data}, test split)")
    if not args.sweep:  # the paper's Table 1 (Fig. 2 has no numbers to compare with)
        paper = [{"row": name, "uncertainty": uncertainty, **{f"lambda_{k}": w for k, w in zip(LOSS_NAMES, weights)},
                  **dict(zip(METRICS, scores))} for name, weights, uncertainty, scores in TABLE1]
        markdown += "\n" + table_markdown(paper, "Paper, Table 1 (Warwick-QU test set)", digits=2)
    common.write_results(run, metrics, table, markdown)
    return run.dir


if __name__ == "__main__":
    common.cli(main)
