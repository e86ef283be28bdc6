"""Uncertainty driven multi-loss fully convolutional networks for gland analysis.

Reference: A. BenTaieb and G. Hamarneh, "Uncertainty Driven Multi-Loss Fully Convolutional Networks
for Histopathology", MICCAI 2017 workshops (LABELS), LNCS 10552 (../shared/papers/uncertainty_multiloss.txt).

Idea. One encoder-decoder FCN (Fig. 1) is trained with four losses at once: the benign/malignant
classification of the image (Lc, from the last encoder layer), a per-pixel sigmoid cross-entropy over
L = 3 region labels (Ls, from the last decoder layer), a topology loss (Lt) whose hierarchical
probabilities give zero mass to label assignments that break containment/exclusion, and a geometry
loss (Lg) that asks neighbouring pixels of the same region for the same log-probability. Instead of
hand-tuned weights (Eq. 1), each loss i is weighted by a learned uncertainty sigma_i^2 (Eq. 2-9):
L_i / sigma_i^2 + log sigma_i^2, with s_i = log sigma_i^2 trained with the network.

Region labels (r = 1..L, the channel order of f_s):  lumen, epithelial border, stroma. They are not
mutually exclusive: the "epithelial border" label marks the whole region the border encloses (the
gland), so a lumen pixel carries both lumen and border (containment), and stroma excludes both.
Every pixel has a label vector S_p = (S^lumen, S^border, S^stroma) in {0,1}^3; V(S) = 1 only for
    (0, 0, 1)  stroma                      (mask value 0)
    (0, 1, 0)  epithelial border            (mask value 1)
    (1, 1, 0)  lumen inside its border      (mask value 2)
and V(S) = 0 for the five others: (0,0,0) no region, (1,0,0) lumen outside any border (breaks
containment), (0,1,1), (1,0,1), (1,1,1) stroma together with gland labels (break exclusion). The same
vectors are the targets of Ls, so Ls and Lt see the same ground truth.

Equations -> code
    Fig. 1     MultiLossFCN: Encoder, Decoder (ConvReLUBN blocks, 2x2 pooling, 2x2 up-sampling,
               1x1 convolutions), class_head on the last encoder layer -> f_c, pixel_head on the last
               decoder layer -> f_s; log_sigma2 holds s_c, s_s, s_t, s_g (Implementation details)
    Eq. 1      combine_losses(..., uncertainty=False): sum_i lambda_i L_i
    Eq. 2      combine_losses(..., uncertainty=True): Lc + Ls + Lt + Lg, each uncertainty-weighted
    Eq. 3-5    classification_loss (the cross-entropy) + uncertainty_weighted (1/sigma^2 L + log sigma^2)
    Eq. 6      segmentation_loss (sigmoid cross-entropy over pixels and labels) + uncertainty_weighted
    Eq. 7      hierarchical_log_probabilities: log P_t(S_p | x_p) over all 2^L label vectors, V, Z
    Eq. 8      topology_loss + uncertainty_weighted
    Eq. 9      geometry_loss (4-neighbourhood, B_pq = same ground-truth region) + uncertainty_weighted
    Sec. 3     train (SGD, lr 1e-2, elastic + affine augmentation, 250x250 patches on GlaS),
               evaluate (classification accuracy, pixel accuracy, object Dice, object Hausdorff)
    Table 1    TABLE1 rows, --table1;   Fig. 2  --sweep;   Fig. 3  figure_predictions

Usage
    python uncertainty_multiloss.py                       # full model (Lc+Ls+Lt+Lg, learned sigma) on
                                                          # synthetic glands, CPU-sized (~3 min, 2 cores)
    python uncertainty_multiloss.py --table1              # the 11 rows of Table 1 (11 runs)
    python uncertainty_multiloss.py --sweep --epochs 20   # Fig. 2, both lambda sweeps (22 runs)
    python uncertainty_multiloss.py --losses c,s,t,g --weights 0.1,0.6,0.22,0.08 --no-uncertainty
    python uncertainty_multiloss.py --data glas --root GlaS/  # Warwick-QU: 512 px, 250x250 patches
    python uncertainty_multiloss.py --eval-only --checkpoint runs/<run>/best.pt

Deviations (ambiguities resolved, and why)
    - Eq. 6 prints only the positive term -S log P; the "sigmoid cross entropy" it names has both
      terms, and the positive term alone is minimised by P = 1 everywhere, so both are used.
    - Eq. 7-8: Z in the text sums "over r"; here P_t is a distribution over label vectors (the
      "modified softmax" of [4]), Z sums P~ over all 2^L vectors (only the V = 1 ones contribute),
      and Eq. 8's sum over r with S_p^r selects the ground-truth vector: Lt = -log P_t(S_p | x_p).
      Read instead as per-label marginals, Eq. 8 would never penalise a border pixel for the lumen
      vector (both have S^border = 1). Eq. 9 uses the same log P_t of the ground-truth vector.
    - Sums over pixels (Eq. 6, 8, 9) are means over pixels and images, so the fixed lambdas of
      Table 1 weigh terms of comparable size (a learned sigma^2 would absorb any constant anyway);
      Lg keeps the sum over the 4 neighbours of each pixel (each neighbouring pair counts twice).
    - Eq. 5 (the paper's approximation of Eq. 3-4) is what is trained, with + log sigma^2 and no
      factor 1/2, as the paper writes it for every term.
    - Not given by the paper, chosen here: two Conv3x3-ReLU-BN per level, max pooling with ceil
      (250 -> 125 -> 63 -> 32 -> 16 as Fig. 1), up-sampling = nearest 2x then a 1x1 convolution
      that halves the channels, cropped to the skip (Fig. 1's 1x1 convs also make both heads);
      class logits = 1x1 conv on the last encoder layer averaged over space; base width 16 on
      synthetic data (--width); SGD momentum 0.9 (--momentum; the paper says SGD only); s_i start
      at 0 (sigma^2 = 1). The best epoch is picked on the validation split by the mean of the
      cheap metrics (accuracy, pixel accuracy, pixel Dice of the gland mask) and tested.
    - Predicted regions: the most probable valid label vector under P_t (= the most probable valid
      assignment of the independent sigmoids, so Ls-only models are decoded the same way); glands
      = connected components (4-connected) of border U lumen, matched to the `instances`.
    - A head whose loss has weight 0 is untrained; its metrics are "-" as in Table 1.
    - CPU-sized synthetic default: 64x64 images, base width 16, 40 epochs, batch 8 (--data glas
      switches to 512 px images, 250x250 patches, width 32, 100 epochs: REAL_DATA_DEFAULTS).
"""
import argparse
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
LABELS = ("lumen", "border", "stroma")  # r = 1..L, channel order of f_s
# All 2^L label vectors S = (S^lumen, S^border, S^stroma); vector v has index 4 S^lumen + 2 S^border + S^stroma.
LABEL_VECTORS = torch.tensor([[(v >> 2) & 1, (v >> 1) & 1, v & 1] for v in range(8)], dtype=torch.float32)
# V(S): stroma (0,0,1) = 1, border (0,1,0) = 2, lumen inside the border (1,1,0) = 6
VALID = torch.zeros(8, dtype=torch.bool)
VALID[[1, 2, 6]] = True
MASK_TO_VECTOR = torch.tensor([1, 2, 6])  # mask value 0 stroma, 1 border, 2 lumen -> its vector
VECTOR_TO_MASK = torch.tensor([0, 0, 1, 0, 0, 0, 2, 0])  # only the valid entries are ever used

# Table 1: (row, weights lambda_c, lambda_s, lambda_t, lambda_g, uncertainty). Weight 0 = loss off.
TABLE1 = [
    ("Lc", (1, 0, 0, 0), False),
    ("Ls", (0, 1, 0, 0), False),
    ("Lt", (0, 0, 1, 0), False),
    ("Ls + Lt + Lg", (0, 1, 1, 1), False),
    ("Lc + Ls", (0.5, 0.5, 0, 0), False),
    ("Lc + Ls + Lt", (1 / 3, 1 / 3, 1 / 3, 0), False),
    ("Lc + Ls + Lt + Lg", (0.25, 0.25, 0.25, 0.25), False),
    ("Lc + Ls + Lt + Lg (tuned)", (0.1, 0.6, 0.22, 0.08), False),
    ("Lc + Ls (uncertainty)", (1, 1, 0, 0), True),
    ("Lc + Ls + Lt (uncertainty)", (1, 1, 1, 0), True),
    ("Lc + Ls + Lt + Lg (uncertainty)", (1, 1, 1, 1), True),
]
# The paper's Table 1 (Warwick-QU test set): accuracy, pixel accuracy, object Dice, Hausdorff.
PAPER_TABLE1 = [
    (0.87, None, None, None), (None, 0.79, 0.81, 8.2), (None, 0.75, 0.77, 8.6), (None, 0.83, 0.84, 7.3),
    (0.90, 0.79, 0.80, 8.4), (0.94, 0.78, 0.80, 8.4), (0.91, 0.81, 0.83, 7.6), (0.95, 0.86, 0.85, 7.1),
    (0.95, 0.78, 0.80, 8.4), (0.94, 0.79, 0.81, 8.2), (0.95, 0.85, 0.87, 7.0),
]


# Defaults for real data (GlaS): images resized to 512 (GlaS is 775x522), trained on 250x250
# patches (Sec. 3), 100 epochs of 70 images ~ the paper's x100 augmentation, a wider network.
REAL_DATA_DEFAULTS = {"size": 512, "patch": 250, "width": 32, "epochs": 100, "elastic": 8.0}


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, size=64, epochs=40, batch_size=8, lr=1e-2, data="synthetic",
                           data_choices=["synthetic", "glas", "folder"])
    m = p.add_argument_group("method (paper: Sec. 2 and 3)")
    m.add_argument("--losses", default="c,s,t,g",
                   help="loss terms to train, from c (Eq. 3-5), s (Eq. 6), t (Eq. 7-8), g (Eq. 9); Eq. 2 uses all four")
    m.add_argument("--weights", default=None,
                   help="fixed lambda_i of Eq. 1, one per entry of --losses (default 1 each); only with --no-uncertainty")
    m.add_argument("--uncertainty", action=argparse.BooleanOptionalAction, default=True,
                   help="learn s_i = log sigma_i^2 per loss (Eq. 2-9); --no-uncertainty = fixed weights (Eq. 1)")
    m.add_argument("--init-log-sigma2", type=float, default=0.0, help="initial s_i = log sigma_i^2 (not given; 0 = sigma^2 1)")
    m.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (the paper: SGD, lr 1e-2, momentum not given)")
    m.add_argument("--width", type=int, default=16, help="channels of the first level (not in the paper; CPU-sized)")
    m.add_argument("--depth", type=int, default=4, help="number of 2x2 poolings (Fig. 1: 250 -> 16 is 4)")
    m.add_argument("--patch", type=int, default=0,
                   help="train on random square patches of this side (Sec. 3: 250 on GlaS); 0 = whole images")
    m.add_argument("--elastic", type=float, default=2.0, help="elastic warp magnitude in pixels (Sec. 3: elastic transforms)")
    m.add_argument("--rotate", type=float, default=15.0, help="affine augmentation: rotation in degrees (Sec. 3)")
    m.add_argument("--scale", type=float, default=0.1, help="affine augmentation: scale fraction (Sec. 3)")
    m.add_argument("--connectivity", type=int, default=4, choices=[4, 8], help="connectivity of predicted gland objects")
    m.add_argument("--n-train", type=int, default=None, help="synthetic only: training images (default: common's)")
    m.add_argument("--table1", action="store_true", help="train and evaluate every row of Table 1")
    m.add_argument("--sweep", action="store_true",
                   help="Fig. 2: lambda Lc + (1 - lambda) Ls and Ls + lambda Lt + (1 - lambda) Lg over --lambdas")
    m.add_argument("--lambdas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="lambda values of --sweep (Fig. 2)")
    args = p.parse_args(argv)
    if args.data != "synthetic":  # real data: Sec. 3's 250x250 patches; defaults; explicit flags still win
        p.set_defaults(**REAL_DATA_DEFAULTS)
    if args.quick:  # tiny smoke run (patches still cut on real data)
        p.set_defaults(size=32, epochs=1, batch_size=4, width=4, depth=2, lambdas="0,0.5,1",
                       patch=0 if args.data == "synthetic" else 24)
    return p.parse_args(argv)


def config_from_args(args):
    """One run's loss configuration: {"row", "weights": {i: lambda_i}, "uncertainty"}."""
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    if not losses or any(s not in LOSS_NAMES for s in losses) or len(set(losses)) != len(losses):
        raise SystemExit(f"--losses takes distinct terms from {','.join(LOSS_NAMES)}, got {args.losses!r}")
    weights = [1.0] * len(losses) if args.weights is None else [float(w) for w in args.weights.split(",")]
    if len(weights) != len(losses):
        raise SystemExit(f"--weights needs one value per loss in --losses ({len(losses)}), got {args.weights!r}")
    if args.weights is not None and args.uncertainty:
        raise SystemExit("--weights are the fixed lambdas of Eq. 1: add --no-uncertainty")
    weights = dict((k, w) for k, w in zip(losses, weights) if w > 0)  # lambda_i = 0 switches L_i off
    if not weights:
        raise SystemExit("--weights: at least one lambda must be positive")
    name = " + ".join("L" + k for k in weights) + (" (uncertainty)" if args.uncertainty else "")
    return {"row": name, "weights": weights, "uncertainty": args.uncertainty}


def row_config(row, weights, uncertainty):
    return {"row": row, "weights": {k: float(w) for k, w in zip(LOSS_NAMES, weights) if w > 0}, "uncertainty": uncertainty}


# ----------------------------------------------------------------------------------------------
# Model (Fig. 1)
# ----------------------------------------------------------------------------------------------


class ConvReLUBN(nn.Sequential):
    """Fig. 1's building block, in the legend's order: Conv 3x3 -> ReLU -> BN."""

    def __init__(self, in_ch, out_ch):
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(out_ch))


def level_block(in_ch, out_ch):
    return nn.Sequential(ConvReLUBN(in_ch, out_ch), ConvReLUBN(out_ch, out_ch))


class Encoder(nn.Module):
    """Levels of two ConvReLUBN separated by 2x2 max pooling (ceil: 250 -> 125 -> 63 -> 32 -> 16)."""

    def __init__(self, in_ch, width, depth):
        super().__init__()
        self.channels = [width * 2 ** i for i in range(depth + 1)]
        ins = [in_ch] + self.channels[:-1]
        self.levels = nn.ModuleList(level_block(i, o) for i, o in zip(ins, self.channels))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        features = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else self.pool(x))
            features.append(x)
        return features  # [level 0 (full size), ..., last encoder layer (bottleneck)]


class UpStep(nn.Module):
    """2x2 up-sampling, 1x1 convolution halving the channels, crop to the skip, concatenate, block."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.reduce = nn.Conv2d(in_ch, out_ch, 1)
        self.block = level_block(2 * out_ch, out_ch)

    def forward(self, x, skip):
        x = self.reduce(F.interpolate(x, scale_factor=2, mode="nearest"))
        # ceil pooling pads at the bottom/right, so the extra row/column of the up-sampled map is the last one
        x = x[..., : skip.shape[-2], : skip.shape[-1]]
        return self.block(torch.cat([skip, x], 1))


class Decoder(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.steps = nn.ModuleList(UpStep(channels[i + 1], channels[i]) for i in reversed(range(len(channels) - 1)))

    def forward(self, features):
        x = features[-1]
        for step, skip in zip(self.steps, reversed(features[:-1])):
            x = step(x, skip)
        return x  # last decoder layer, full resolution


class MultiLossFCN(nn.Module):
    """Fig. 1: encoder-decoder with skips; f_c from the last encoder layer, f_s from the last
    decoder layer; plus the learned s_i = log sigma_i^2 of each loss (Implementation details)."""

    def __init__(self, width=16, depth=4, n_classes=2, n_labels=len(LABELS), init_log_sigma2=0.0):
        super().__init__()
        self.encoder = Encoder(3, width, depth)
        self.decoder = Decoder(self.encoder.channels)
        self.class_head = nn.Conv2d(self.encoder.channels[-1], n_classes, 1)  # 1x1 conv -> f_c (averaged)
        self.pixel_head = nn.Conv2d(width, n_labels, 1)  # 1x1 conv -> f_s
        self.log_sigma2 = nn.ParameterDict({k: nn.Parameter(torch.tensor(float(init_log_sigma2))) for k in LOSS_NAMES})

    def forward(self, x):
        features = self.encoder(x)
        class_logits = self.class_head(features[-1]).mean((2, 3))  # f_c(x)  [B,K]
        pixel_logits = self.pixel_head(self.decoder(features))  # f_s(x)  [B,L,H,W]
        return class_logits, pixel_logits


# ----------------------------------------------------------------------------------------------
# Losses (one function per term of the paper)
# ----------------------------------------------------------------------------------------------


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
    """Eq. 7: log P_t(S | x_p) for every label vector S (dim 1, index as LABEL_VECTORS) [B,8,H,W].
    P~_t(S) = V(S) prod_r exp(f_r(x_p) S^r);  Z = sum_S P~_t(S);  invalid vectors get log 0 = -inf."""
    vectors = LABEL_VECTORS.to(pixel_logits.device)
    # log prod_r exp(f_r S^r) = sum_r f_r S^r
    energy = torch.einsum("blhw,vl->bvhw", pixel_logits.float(), vectors)
    # V(S) = 0 -> P~_t = 0
    energy = energy.masked_fill(~VALID.to(pixel_logits.device).view(1, -1, 1, 1), float("-inf"))
    # log P~_t - log Z
    return energy.log_softmax(1)


def topology_loss(log_pt, vector):
    """Eq. 8 at sigma_t = 1: -log P_t(S_p | x_p) of the ground-truth label vector, mean over pixels."""
    return -log_pt.gather(1, vector.unsqueeze(1)).mean()


def geometry_loss(log_pt, vector):
    """Eq. 9 at sigma_g = 1: sum_{q in N4(p)} B_pq |log P_t(S_p | x_p) - log P_t(S_p | x_q)|, mean
    over pixels p; B_pq = 1 where p and q have the same ground-truth label vector, so S_q = S_p."""
    log_p = log_pt.gather(1, vector.unsqueeze(1)).squeeze(1)  # log P_t(S_p | x_p)  [B,H,W]
    same_h = (vector[:, :, 1:] == vector[:, :, :-1]).float()  # B_pq, q right of p
    same_v = (vector[:, 1:, :] == vector[:, :-1, :]).float()  # B_pq, q below p
    pairs = (same_h * (log_p[:, :, 1:] - log_p[:, :, :-1]).abs()).sum() + (same_v * (log_p[:, 1:] - log_p[:, :-1]).abs()).sum()
    return 2 * pairs / vector.numel()  # every pair lies in N4(p) and in N4(q)


def loss_terms(class_logits, pixel_logits, labels, masks, active):
    """The plain (sigma = 1) value of every active term: {"c": Lc, "s": Ls, "t": Lt, "g": Lg}."""
    terms = {}
    if "c" in active:
        terms["c"] = classification_loss(class_logits, labels)
    vector, label_maps = label_vector_targets(masks)
    if "s" in active:
        terms["s"] = segmentation_loss(pixel_logits, label_maps)
    if "t" in active or "g" in active:
        log_pt = hierarchical_log_probabilities(pixel_logits)
        if "t" in active:
            terms["t"] = topology_loss(log_pt, vector)
        if "g" in active:
            terms["g"] = geometry_loss(log_pt, vector)
    return terms


def combine_losses(terms, config, log_sigma2):
    """Eq. 2 (learned uncertainty) or Eq. 1 (fixed lambda_i) over the active terms."""
    if config["uncertainty"]:
        return sum(uncertainty_weighted(loss, log_sigma2[k]) for k, loss in terms.items())
    return sum(config["weights"][k] * loss for k, loss in terms.items())


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def random_patches(batch, side, generator):
    """Sec. 3: one random side x side patch per image, cut on the device (no per-sample Python)."""
    images = batch["images"]
    b, _, h, w = images.shape
    if side >= min(h, w):
        return batch
    dev = images.device
    top = (torch.rand(b, device=dev, generator=generator) * (h - side + 1)).long()
    left = (torch.rand(b, device=dev, generator=generator) * (w - side + 1)).long()
    rows = (top[:, None] + torch.arange(side, device=dev))[:, :, None]  # [B,P,1]
    cols = (left[:, None] + torch.arange(side, device=dev))[:, None, :]  # [B,1,P]
    n = torch.arange(b, device=dev)[:, None, None]
    out = dict(batch)
    out["images"] = images.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 3, 1, 2).contiguous()
    for key in ("masks", "instances"):
        if batch.get(key) is not None:
            out[key] = batch[key][n, rows, cols]
    return out


def make_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)


def checkpoint(model, optimizer, generator, epoch, best, args, config):
    """common's checkpoint (weights incl. log sigma^2, optimiser, RNGs, batch generator) + the loss config."""
    state = common.checkpoint_state(model, optimizer, None, epoch, best, args, generator=generator)
    return {**state, "config": config}


def train(model, optimizer, generator, data, stats, config, args, run, tag, start_epoch=0, best=-math.inf):
    """Trains from start_epoch to args.epochs; a log line per epoch; keeps `<tag>last.pt` / `<tag>best.pt`."""
    device, train_split = stats["device"], data["train"]
    active = list(config["weights"])
    n_train = len(train_split["names"])
    drop_last = n_train > args.batch_size  # no batch of one image for BatchNorm
    steps_per_epoch = n_train // args.batch_size if drop_last else 1
    progress = common.Progress(steps_per_epoch * (args.epochs - start_epoch), every=args.log_every)
    history = []
    for epoch in range(start_epoch, args.epochs):
        model.train()
        progress.set_epoch(epoch + 1)
        sums = torch.zeros(len(active) + 1, device=device)  # running sums on the device: total, each term
        steps = 0
        fetch = time.perf_counter()
        for batch in common.iterate_batches(train_split, args.batch_size, shuffle=True, generator=generator,
                                            drop_last=drop_last):
            batch = common.augment(batch, generator=generator, rotate=args.rotate, scale=args.scale,
                                   elastic=args.elastic)
            if args.patch:
                batch = random_patches(batch, args.patch, generator)
            x = common.normalize(batch["images"], stats["mean"], stats["std"])
            wait = time.perf_counter() - fetch
            with common.autocast(device, args.amp):
                class_logits, pixel_logits = model(x)
            terms = loss_terms(class_logits, pixel_logits, batch["labels"], batch["masks"], active)
            total = combine_losses(terms, config, model.log_sigma2)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            sums += torch.stack([total.detach()] + [terms[k].detach() for k in active])
            steps += 1
            shown = progress.step(loss=total.detach(), images=x.shape[0], wait_s=wait)  # syncs only when it prints
            if shown is not None:
                common.check_finite(shown, f"{tag}epoch {epoch + 1} step {steps}", run)
            fetch = time.perf_counter()
        means = (sums / max(steps, 1)).tolist()  # one host sync per epoch
        common.check_finite(means[0], f"{tag}epoch {epoch + 1} (end)", run)
        record = {"row": config["row"], "epoch": epoch + 1, "loss": means[0]}
        record.update({f"loss_{k}": v for k, v in zip(active, means[1:])})
        if config["uncertainty"]:
            record.update({f"sigma2_{k}": math.exp(model.log_sigma2[k].item()) for k in active})
        val = evaluate(model, data["val"], stats, config, args, objects=False)
        record.update({f"val_{k}": v for k, v in val.items()})
        record["val_score"] = selection_score(val)
        if record["val_score"] > best:
            best = record["val_score"]
            run.save(f"{tag}best.pt", checkpoint(model, optimizer, generator, epoch + 1, best, args, config))
        run.save(f"{tag}last.pt", checkpoint(model, optimizer, generator, epoch + 1, best, args, config))
        run.log(record)
        history.append(record)
        print(f"[{config['row']}] epoch {epoch + 1}/{args.epochs} loss {means[0]:.4f} "
              + " ".join(f"{k} {v:.3f}" for k, v in val.items()))
    return history, progress.summary()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def decode_regions(pixel_logits):
    """Region map (0 stroma, 1 border, 2 lumen): the most probable valid label vector under P_t."""
    vector = hierarchical_log_probabilities(pixel_logits).argmax(1)
    return VECTOR_TO_MASK.to(vector.device)[vector]


@torch.no_grad()
def predict(model, split, stats, args):
    model.eval()
    classes, regions = [], []
    for batch in common.iterate_batches(split, args.batch_size, shuffle=False):
        x = common.normalize(batch["images"], stats["mean"], stats["std"])
        with common.autocast(stats["device"], args.amp):
            class_logits, pixel_logits = model(x)
        classes.append(class_logits.argmax(1))  # sigma_c rescales f_c only: same argmax (Eq. 3)
        regions.append(decode_regions(pixel_logits.float()))
    return torch.cat(classes), torch.cat(regions)


@torch.no_grad()
def evaluate(model, split, stats, config, args, objects=True):
    """Sec. 3 metrics of the trained heads: classification accuracy, pixel accuracy of the 3-region
    map, and (objects=True) GlaS object Dice / Hausdorff of the gland components."""
    classes, regions = predict(model, split, stats, args)
    out = {}
    if "c" in config["weights"]:
        out["accuracy"] = common.accuracy(classes, split["labels"])
    if "s" in config["weights"] or "t" in config["weights"]:
        masks = split["masks"].to(regions.device)
        out["pixel_accuracy"] = common.pixel_accuracy(regions, masks).mean().item()
        if objects:
            glands = common.label_components(regions >= 1, connectivity=args.connectivity)
            truth = split["instances"].to(regions.device)
            out["object_dice"] = common.object_dice(glands, truth).mean().item()
            hd = common.object_hausdorff(glands, truth)
            finite = hd[torch.isfinite(hd)]
            out["object_hausdorff"] = finite.mean().item() if len(finite) else math.inf
            out["hausdorff_undefined"] = int((~torch.isfinite(hd)).sum())
        else:
            out["gland_dice"] = common.dice(regions >= 1, masks >= 1).mean().item()
    return out


def selection_score(metrics):
    keys = [k for k in ("accuracy", "pixel_accuracy", "gland_dice") if k in metrics]
    return sum(metrics[k] for k in keys) / len(keys)


# ----------------------------------------------------------------------------------------------
# One run = one row of a table
# ----------------------------------------------------------------------------------------------


def build_model(args, device):
    model = MultiLossFCN(args.width, args.depth, init_log_sigma2=args.init_log_sigma2)
    return common.prepare_model(model, device, compile=args.compile)


def unwrap(model):
    return getattr(model, "_orig_mod", model)  # the module inside a torch.compile wrapper


def test_row(model, split, stats, config, args):
    """One table row: the configuration (lambdas or learned sigma^2) and the test metrics."""
    row = {"row": config["row"], "uncertainty": config["uncertainty"],
           **{f"lambda_{k}": config["weights"].get(k, 0.0) for k in LOSS_NAMES},
           **evaluate(model, split, stats, config, args)}
    if config["uncertainty"]:
        row.update({f"sigma2_{k}": math.exp(model.log_sigma2[k].item()) for k in config["weights"]})
    return row


def run(config, args, data, stats, out, tag=""):
    """Trains one configuration, reloads its best epoch and tests it: one row of Table 1 / Fig. 2."""
    common.seed_everything(args.seed)
    model = build_model(args, stats["device"])
    optimizer = make_optimizer(model, args)
    generator = torch.Generator(device=stats["device"]).manual_seed(args.seed)  # batches, augmentation
    start, best = 0, -math.inf
    if args.resume and not tag:
        state = common.load_checkpoint(args.resume, SCRIPT)
        start, best = common.restore_state(state, model, optimizer, generator=generator)
        print(f"resumed from {args.resume} after epoch {start}")
    history, speed = train(model, optimizer, generator, data, stats, config, args, out, tag, start, best)
    if out.path(f"{tag}best.pt").exists():
        unwrap(model).load_state_dict(common.load_checkpoint(out.path(f"{tag}best.pt"), SCRIPT)["model"])
    row = test_row(model, data["test"], stats, config, args)
    metrics = {k: v for k, v in row.items() if k not in ("row", "uncertainty") and not k.startswith("lambda_")}
    row.update(speed)
    out.log({"row": config["row"], "test": metrics, **speed})
    print(f"[{config['row']}] test " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
          + f" | {speed['images_per_s']:.1f} img/s, data wait {100 * speed['data_wait_share']:.0f}%")
    return row, model, history


# ----------------------------------------------------------------------------------------------
# Report: tables and figures
# ----------------------------------------------------------------------------------------------


def fmt(value, digits=2):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_markdown(rows, title, digits=3):
    lines = [f"## {title}", "",
             "| Loss | λc | λs | λt | λg | Classification accuracy | Pixel accuracy | Object Dice | Hausdorff distance |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["uncertainty"]:  # learned weights: show the effective 1/sigma^2 when known
            lam = [("0" if not r[f"lambda_{k}"] else f"1/σ²={1 / r[f'sigma2_{k}']:.2f}" if f"sigma2_{k}" in r
                    else "learned") for k in LOSS_NAMES]
        else:
            lam = [f"{r[f'lambda_{k}']:.2g}" for k in LOSS_NAMES]
        hd = fmt(r.get("object_hausdorff"), 1)
        if r.get("hausdorff_undefined"):
            hd += f" ({r['hausdorff_undefined']} undefined)"
        scores = [fmt(r.get(k), digits) for k in ("accuracy", "pixel_accuracy", "object_dice")]
        lines.append(f"| {r['row']} | " + " | ".join(lam + scores) + f" | {hd} |")
    return "\n".join(lines) + "\n"


def paper_table_markdown():
    rows = [{"row": name, "uncertainty": uncertainty, **{f"lambda_{k}": w for k, w in zip(LOSS_NAMES, weights)},
             **dict(zip(("accuracy", "pixel_accuracy", "object_dice", "object_hausdorff"), paper))}
            for (name, weights, uncertainty), paper in zip(TABLE1, PAPER_TABLE1)]
    return table_markdown(rows, "Paper, Table 1 (Warwick-QU test set)", digits=2)


def figure_predictions(model, split, stats, args, path, n=4):
    """Fig. 3: image, ground truth and prediction; lumen purple, border yellow, stroma black."""
    subset = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in split.items()}
    classes, regions = predict(model, subset, stats, args)
    names = subset["class_names"]
    palette = torch.tensor([[0, 0, 0], [240, 220, 40], [130, 60, 170]], dtype=torch.uint8)
    k = subset["images"].shape[0]
    fig, axes = plt.subplots(3, k, figsize=(2.6 * k, 7.8), squeeze=False)
    for i in range(k):
        common.show_image(axes[0, i], subset["images"][i])
        axes[0, i].set_title(f"{names[int(subset['labels'][i])]} (predicted {names[int(classes[i])]})", fontsize=8)
        axes[1, i].imshow(palette[subset["masks"][i].cpu().long()].numpy())
        axes[2, i].imshow(palette[regions[i].cpu().long()].numpy())
        for a in axes[:, i]:
            a.set_xticks([]), a.set_yticks([])
    for a, name in zip(axes[1:, 0], ("ground truth", "prediction")):
        a.set_ylabel(name)
    fig.suptitle("Fig. 3: lumen (purple), epithelial border (yellow), stroma (black)")
    common.save_figure(fig, path)


def figure_sigma2(histories, path):
    """Learned sigma_i^2 of every loss over the epochs, one panel per uncertainty-trained run."""
    histories = [h for h in histories if h and any(k.startswith("sigma2_") for k in h[0])]
    if not histories:
        return
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.5), squeeze=False)
    for ax, history in zip(axes[0], histories):
        for key in [k for k in history[0] if k.startswith("sigma2_")]:
            ax.plot([r["epoch"] for r in history], [r[key] for r in history], marker="o", label=f"σ²_{key[-1]}")
        ax.set(title=history[0]["row"], xlabel="epoch", ylabel="learned σ²", yscale="log")
        ax.legend()
    fig.tight_layout()
    common.save_figure(fig, path)


def figure_sweep(rows, lambdas, keys, title, path):
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, label in keys:
        points = [(lam, r[key]) for lam, r in zip(lambdas, rows) if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set(xlabel="λ", ylabel="test score", title=title)
    ax.legend()
    common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def load_data(args):
    name = "synthetic-glands" if args.data == "synthetic" else args.data
    options = {}
    if args.data == "synthetic" and (args.quick or args.n_train):
        options = {"n_train": 12, "n_val": 4, "n_test": 6} if args.quick else {"n_train": args.n_train}
    data = common.load_dataset(name, root=args.root, size=args.size, seed=args.seed, cache=args.cache, **options)
    for split in ("train", "val", "test"):
        if split not in data or data[split].get("labels") is None:
            raise SystemExit(f"--data {args.data}: needs train/val/test splits with benign/malignant labels")
        if int(data[split]["masks"].max()) > 2 or data[split]["masks"].dim() != 3:
            raise SystemExit(f"--data {args.data}: masks must be [N,H,W] with 0 stroma, 1 border, 2 lumen")
        if data[split].get("instances") is None:  # e.g. --data folder: glands = components of border U lumen
            data[split]["instances"] = common.label_components(data[split]["masks"] >= 1, connectivity=args.connectivity)
    return data


def main(argv=None):
    args = parse_args(argv)
    if args.resume and (args.table1 or args.sweep):
        raise SystemExit("--resume continues a single run, not --table1 / --sweep")
    if args.eval_only and not args.checkpoint:
        raise SystemExit("--eval-only needs --checkpoint PATH (a best.pt or last.pt of this script)")
    config = config_from_args(args)
    common.seed_everything(args.seed)
    device = common.choose_device(args.device)
    out = common.Run(args, SCRIPT)
    data = load_data(args)
    data = {k: common.to_device(v, device) for k, v in data.items()}
    mean, std = common.channel_stats(data["train"]["images"])
    stats = {"device": device, "mean": mean.to(device), "std": std.to(device)}

    if args.eval_only:
        state = common.load_checkpoint(args.checkpoint, SCRIPT)
        if "config" not in state:
            raise SystemExit(f"{args.checkpoint} holds no loss configuration (not a checkpoint of this script's train())")
        trained, config = argparse.Namespace(**state["args"]), state["config"]
        model = build_model(trained, device)
        unwrap(model).load_state_dict(state["model"])
        rows, histories, main_model = [test_row(model, data["test"], stats, config, args)], [], model
    elif args.table1:
        rows, histories = [], []
        for i, (name, weights, uncertainty) in enumerate(TABLE1):
            last = i == len(TABLE1) - 1  # the proposed model keeps last.pt / best.pt
            row, model, history = run(row_config(name, weights, uncertainty), args, data, stats, out,
                                      tag="" if last else f"table1-{i + 1}-")
            rows.append(row)
            histories.append(history)
        main_model = model
    elif args.sweep:
        lambdas = [float(v) for v in args.lambdas.split(",")]
        sweep_cs, sweep_tg = [], []
        for lam in lambdas:
            row, _, _ = run(row_config(f"Fig. 2a: λ={lam:g}: λ Lc + (1-λ) Ls", (lam, 1 - lam, 0, 0), False),
                            args, data, stats, out, tag=f"sweep-cs-{lam:g}-")
            sweep_cs.append(row)
        for lam in lambdas:
            row, model, _ = run(row_config(f"Fig. 2b: λ={lam:g}: Ls + λ Lt + (1-λ) Lg", (0, 1, lam, 1 - lam), False),
                                args, data, stats, out, tag=f"sweep-tg-{lam:g}-")
            sweep_tg.append(row)
        figure_sweep(sweep_cs, lambdas, [("accuracy", "classification accuracy"), ("pixel_accuracy", "pixel accuracy")],
                     "λ Lc + (1-λ) Ls", out.figures / "fig2_lambda_Lc_Ls.png")
        figure_sweep(sweep_tg, lambdas, [("pixel_accuracy", "pixel accuracy"), ("object_dice", "object Dice")],
                     "Ls + λ Lt + (1-λ) Lg", out.figures / "fig2_lambda_Lt_Lg.png")
        rows, histories, main_model = sweep_cs + sweep_tg, [], None
    else:
        row, main_model, history = run(config, args, data, stats, out)
        rows, histories = [row], [history]

    if main_model is not None:
        figure_predictions(main_model, data["test"], stats, args, out.figures / "fig3_predictions.png")
    figure_sigma2(histories, out.figures / "sigma2.png")
    main_row = rows[-1] if not args.sweep else {}
    metric_keys = ["accuracy", "pixel_accuracy", "object_dice", "object_hausdorff"] + [f"sigma2_{k}" for k in LOSS_NAMES]
    metrics = {k: main_row[k] for k in metric_keys if k in main_row}
    title = "Fig. 2 sweeps" if args.sweep else ("Table 1" if args.table1 else "Test set")
    markdown = table_markdown(rows, f"{title} ({args.data}, test split)")
    if not args.sweep:  # Fig. 2 has no numbers to compare with
        markdown += "\n" + paper_table_markdown()
    common.write_results(out.dir, SCRIPT, args.data, "test", metrics, rows, vars(args), markdown)
    print(markdown)
    print(f"results in {out.dir}")
    return out.dir


if __name__ == "__main__":
    main()
