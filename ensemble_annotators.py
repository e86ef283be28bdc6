"""D-LEMA: an ensemble of Bayesian FCNs that learns skin lesion segmentation from multiple annotators.

Reference: Z. Mirikharaji*, K. Abhishek*, S. Izadi, G. Hamarneh, "D-LEMA: Deep Learning Ensembles from
Multiple Annotations - Application to Skin Lesion Segmentation", CVPR Workshops (ISIC) 2021
(../shared/papers/ensemble_annotators.txt).

Idea. An image may carry 2-5 disagreeing lesion outlines. Instead of fusing them into one mask before
training, every image's M_n annotations are dealt out to M non-contradictory subsets C_1..C_M (each
holds at most one annotation per image) and M base models are trained, one per subset, on the union U
of all annotations. Base model i trusts C_i: a meta-learning step (Ren et al. 2018, Mirikharaji et al.
2019) gives every pixel of every annotation in U a weight that is large where following that pixel
moves the model the way C_i's loss wants, and zero where it disagrees. Each base model is Bayesian in
Kendall & Gal's sense: it predicts logits and their variance (aleatoric uncertainty), trained with a
loss that samples logits. At test time the M predictions are fused with equal weights or weights from
the inverse aleatoric uncertainty (per pixel or per image).

Paper -> code
    Sec. 2.2 non-contradictory subsets C_i, union U .... non_contradictory_subsets, build_training_sets
    Sec. 3.2 base model, two output maps (f, log s^2) .. BayesianResidualFCN
    Eq. 5 U ~ N(f, s^2), 10 MC samples (Kendall & Gal) . aleatoric_loss
    Eq. 3 Y = sigmoid(U) ............................... aleatoric_loss (log_sigmoid), predict
    Eq. 1 W* = argmin_W sum_{n in C_i} L_ce(theta(W)) .. spatial_weight_maps (the meta objective)
    Eq. 2 L = -sum_q W_mnq Y_mnq log Y_nq .............. meta_train_step (the weighted real step)
    Eq. 4 Y = sum_i alpha_i Y_i (G, H, I) .............. fuse_predictions
    Sec. 3.3 MC dropout (5 layers, p 0.3, 15 passes) ... BayesianResidualFCN(dropout), predict(mc_passes)
    Eq. 6, 7 NLL and Brier score ....................... common.nll, common.brier (in evaluate)
    Table 1 rows A-J (+ MV, STAPLE, vs truth) .......... Row, table_rows, train_row, evaluate, table_markdown
    Table 2 (MC dropout vs deep ensemble) .............. evaluate (calibration), table_markdown
    "Less is more" (Ribeiro et al.): kappa >= 0.5 ...... mean_pairwise_kappa (row J)
    Beyond the paper: majority vote, STAPLE (Warfield) . majority_vote, staple (rows MV, STAPLE)
    Fig. 3-4 trusted annotations, INC and weight maps .. figure_weight_maps
    Fig. 3-4 in numbers (zero weights on INC pixels) ... weight_consistency
    Example test predictions and uncertainties ......... figure_predictions (beyond the paper)

Usage
    python ensemble_annotators.py                        # synthetic lesions, both tables, CPU-sized
    python ensemble_annotators.py --data isic-multi --root /data/ISIC-multi \
        --test isic2017=/data/ISIC2017,ph2=/data/PH2,dermofit=/data/DermoFit   # the paper's setting
    python ensemble_annotators.py --no-baselines         # only B-F, the fusions G-I and Table 2
    python ensemble_annotators.py --subsets first        # C_1..C_{M_n} instead of a uniform deal
    python ensemble_annotators.py --eval-only --checkpoint runs/<run>/best.pt
    python ensemble_annotators.py --quick                # smoke test of every path (seconds)
Both tables come from every run: Table 1 (Jaccard %) and Table 2 (NLL, Brier) per test set.

Deviations and resolved ambiguities
    - Subsets: Sec. 2.2 deals image n's M_n annotations to C_1..C_{M_n}; Sec. 3.1 says the training
      data are "randomly and uniformly partitioned into five groups". With ISIC's counts (94% of the
      images have 2 masks) the first reading leaves C_5 with 3 images (and often none on the synthetic
      set), yet model 4 scores like the others in Table 1, so the default follows Sec. 3.1: each image's
      annotations go to M_n distinct subsets drawn uniformly from the M. --subsets first gives Sec. 2.2.
    - M = the dataset's annotation slots (5 for ISIC and the synthetic set), not the largest count
      seen in the training split, so the ensemble has five members as in the paper.
    - Batch sizes: "64 and 2 for optimizing the spatial weight maps and network parameters" is read as
      64 clean images of C_i for the meta objective (Eq. 1) and 2 annotations of U for the weighted
      update (Eq. 2): --clean-batch-size, --batch-size.
    - The meta objective on C_i and the weighted loss on U both use the aleatoric loss (the network's
      training loss; it is the cross-entropy of Eq. 1-2 when sigma -> 0). The weights come from one
      virtual SGD step; since theta' = theta at eps = 0, -dL/deps_j = lr * grad L_C . grad l_j, so the
      virtual learning rate only scales w and the normalisation removes it.
    - Weight decay 5e-5 (the text's "5 x 10^5" is a typo). On the synthetic CPU default: lr 0.01,
      momentum 0.9, 48 px, width 8, depth 3, batches 8 / 8 and 4 epochs (~420 steps per model; the
      paper trains 100K iterations at lr 1e-4, momentum 0.99); real data get the paper's values.
      An epoch is one pass over U for every row, so rows A, J, MV and STAPLE take as many SGD steps
      as each base model.
    - Table 2 shares Table 1's base models: every model carries the five dropout layers (p = 0.3) during
      training; Table 1 and the deep ensemble use them off (weight scaling), the MC dropout rows keep
      them on for 15 passes. The paper does not say whether its MC dropout models were separate runs.
      The deep ensemble row is the main method (image-level fusion I).
    - Base prediction Y = sigmoid(f) (the mean logit); the aleatoric map is s^2 = exp(log-variance).
    - Model selection per model on the validation Jaccard against one random annotation per image
      (Sec. 3.1). Test sets: synthetic "test" stands in for ISIC, "test_shift" for PH2 / DermoFit; the
      synthetic test masks are scored against their first annotation and against the true mask.
    - Majority vote ties (even counts) go to background, so with two annotations MV is their
      intersection; STAPLE uses a per-image prior and 50 EM steps.
    - Network width and depth are not given (the paper cites [4]): 32 channels and 4 down-samplings on
      real data, 8 and 3 on the synthetic default.
    - Fig. 3-4 show the weights of the selected (best-validation) models, computed as in training
      (train mode, a batch of U), not those of iteration 100K; "Fig. 3-4 in numbers" adds the share of
      zero-weight pixels on inconsistent and on agreeing pixels over 8 random batches of U.
    - On-device flips / small rotations (common.augment) on the training batches; the paper is silent.
    - Images are normalised with the training set's channel mean and std; --normalize per-dataset uses
      each test set's own statistics (the other reading of Sec. 3.1).
    - --compile is not used: the meta step differentiates twice, which torch.compile does not support.
"""

import argparse
import math
import string
import time
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common

SCRIPT = "ensemble_annotators"
# CPU-sized defaults for the synthetic benchmark, and the paper's values (Sec. 3.1-3.2) for real data.
# Real data: 96 px, SGD lr 1e-4, momentum 0.99, batches 2 (U) and 64 (C_i); 54 epochs of one pass over
# U (~3,700 training annotations / 2) are the 100K iterations of Fig. 3; width and depth are not given.
SYNTHETIC_DEFAULTS = dict(size=48, epochs=4, batch_size=8, clean_batch_size=8, lr=0.01, momentum=0.9,
                          width=8, depth=3)
PAPER_DEFAULTS = dict(size=96, epochs=54, batch_size=2, clean_batch_size=64, lr=1e-4, momentum=0.99,
                      width=32, depth=4)
QUICK = dict(size=32, epochs=1, width=4, n_train=12, n_val=6, n_test=6)


# ==================================================================================================
# Arguments
# ==================================================================================================

def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left unset take the paper's values on real data (Sec. 3.1-3.2: "
               f"{PAPER_DEFAULTS}) and CPU-sized values on the synthetic default ({SYNTHETIC_DEFAULTS}).")
    common.add_common_args(parser, size=None, epochs=None, batch_size=None, lr=None,
                           data_choices=["synthetic", "isic-multi", "folder"])
    p = parser.add_argument_group("D-LEMA (defaults: the paper's on real data, CPU-sized on synthetic)")
    p.add_argument("--test", default="", metavar="NAME=ROOT,...",
                   help="extra test sets read with common.load_dataset, e.g. isic2017=/d/ISIC,ph2=/d/PH2,"
                        "dermofit=/d/DF (Sec. 3.1: ISIC, PH2, DermoFit)")
    p.add_argument("--clean-batch-size", type=int, default=None,
                   help="images of C_i per meta step, Eq. 1 (Sec. 3.2: 64; synthetic 8)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (Sec. 3.2: 0.99; synthetic 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-5, help="SGD weight decay (Sec. 3.2, typo fixed)")
    p.add_argument("--width", type=int, default=None, help="channels of the first level (32; synthetic 8)")
    p.add_argument("--depth", type=int, default=None, help="down-sampling steps of the encoder-decoder (4; synthetic 3)")
    p.add_argument("--mc-samples", type=int, default=10, help="logit samples of the aleatoric loss (Sec. 3.2)")
    p.add_argument("--dropout", type=float, default=0.3, help="MC dropout probability (Sec. 3.3)")
    p.add_argument("--dropout-layers", type=int, default=5, help="dropout layers in the centre (Sec. 3.3)")
    p.add_argument("--mc-passes", type=int, default=15, help="MC dropout forward passes (Sec. 3.3)")
    p.add_argument("--subsets", choices=["uniform", "first"], default="uniform",
                   help="deal image n's annotations to M_n random subsets of the M (Sec. 3.1) or to "
                        "C_1..C_{M_n} (Sec. 2.2); see Deviations")
    p.add_argument("--kappa-threshold", type=float, default=0.5,
                   help="row J keeps images whose mean pairwise Cohen's kappa reaches this (Ribeiro et al.)")
    p.add_argument("--staple-iterations", type=int, default=50, help="EM iterations of STAPLE (row STAPLE)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also train rows A, J, MV and STAPLE (off: only the ensemble B.. and its fusions)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="on-device flips and small rotations of training batches")
    p.add_argument("--normalize", choices=["train", "per-dataset"], default="train",
                   help="channel statistics for test sets: the training set's or each set's own (Sec. 3.1)")
    return parser


def resolve_defaults(args):
    """Fills the arguments left at None with the paper's values (real data) or the CPU-sized ones."""
    defaults = dict(SYNTHETIC_DEFAULTS if args.data == "synthetic" else PAPER_DEFAULTS)
    if args.quick:
        defaults.update(size=QUICK["size"], epochs=QUICK["epochs"], width=QUICK["width"])
        args.mc_samples, args.mc_passes, args.staple_iterations = 2, 2, 5
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ==================================================================================================
# Model: the Bayesian base FCN (Sec. 3.2, Sec. 3.3)
# ==================================================================================================

class BayesianResidualFCN(nn.Module):
    """Encoder-decoder with residual blocks and skip connections (Sec. 3.2, after [4]) whose last layer
    gives two maps: the logits f and the aleatoric log-variance log s^2 (Eq. 5). Like Bayesian SegNet,
    `dropout_layers` dropout layers sit after the blocks in the centre of the network (the deepest
    encoder blocks and the first decoder blocks); MC dropout turns them on at test time (Sec. 3.3)."""

    def __init__(self, width=32, depth=3, dropout=0.3, dropout_layers=5):
        super().__init__()
        ch = [width * 2 ** level for level in range(depth + 1)]
        self.encoder = nn.ModuleList([common.ResidualBlock(3, ch[0])] +
                                     [common.Down(ch[i], ch[i + 1], residual=True) for i in range(depth)])
        self.decoder = nn.ModuleList(common.Up(ch[i + 1], ch[i], ch[i], residual=True) for i in reversed(range(depth)))
        self.head = nn.Conv2d(ch[0], 2, 1)  # channel 0: f, channel 1: log s^2
        n_enc, n_dec = (dropout_layers + 1) // 2, dropout_layers // 2
        if n_enc > len(self.encoder) or n_dec > len(self.decoder):
            raise ValueError(f"{dropout_layers} dropout layers do not fit a depth-{depth} network")
        # dropout after the last n_enc encoder blocks (bottleneck included) and the first n_dec decoder blocks
        self.encoder_dropout = {len(self.encoder) - 1 - k for k in range(n_enc)}
        self.decoder_dropout = set(range(n_dec))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        features = []
        for k, block in enumerate(self.encoder):
            x = block(x)
            x = self.dropout(x) if k in self.encoder_dropout else x
            features.append(x)
        for k, (up, skip) in enumerate(zip(self.decoder, reversed(features[:-1]))):
            x = up(x, skip)
            x = self.dropout(x) if k in self.decoder_dropout else x
        return self.head(x)  # [B,2,H,W]


# ==================================================================================================
# Losses
# ==================================================================================================

def aleatoric_loss(logits, log_variance, target, n_samples, generator=None):
    """Per-pixel aleatoric loss of Kendall & Gal (2017) for a sigmoid output (Eq. 3, 5):
    U_t = f + s * z_t, z_t ~ N(0, 1), t = 1..T;  loss = -log (1/T) sum_t sigmoid((2y-1) U_t),
    computed as log T - logsumexp_t log_sigmoid((2y-1) U_t). As s -> 0 it is the binary cross-entropy.
    logits, log_variance [B,H,W] float; target [B,H,W] in {0,1}. Returns [B,H,W]."""
    sigma = torch.exp(0.5 * log_variance)
    noise = torch.randn((n_samples, *logits.shape), generator=generator, device=logits.device)  # z_t
    sampled = logits + sigma * noise                                         # U_t [T,B,H,W], Eq. 5
    sign = 2.0 * target.float() - 1.0
    log_prob = F.logsigmoid(sign * sampled)                                   # log p(y | U_t), Eq. 3
    return math.log(n_samples) - torch.logsumexp(log_prob, dim=0)


def pixel_loss(model, images, target, n_samples):
    """Forward pass and the per-pixel aleatoric loss [B,H,W] of a batch (losses in float32)."""
    out = model(images).float()
    return aleatoric_loss(out[:, 0], out[:, 1], target, n_samples)


# ==================================================================================================
# Non-contradictory subsets, consensus masks and annotator agreement
# ==================================================================================================

def non_contradictory_subsets(n_annotations, n_subsets, generator, mode="uniform"):
    """Sec. 2.2 / 3.1: subset index [N, n_subsets] of each annotation slot (-1 for unused slots).
    Image n's M_n annotations go to M_n distinct subsets, so each C_i holds at most one annotation of
    an image and every annotation lands in exactly one C_i. "uniform": M_n of the M subsets drawn at
    random (Sec. 3.1); "first": a random order of C_1..C_{M_n} (Sec. 2.2)."""
    n = n_annotations.shape[0]
    slot = torch.arange(n_subsets)
    keys = torch.rand(n, n_subsets, generator=generator)
    if mode == "first":  # subsets beyond M_n sort last, so the first M_n picks are a permutation of 0..M_n-1
        keys = keys + (slot >= n_annotations[:, None]).float() * 2
    subset = keys.argsort(dim=1)  # slot m of image n -> subset subset[n, m]
    return torch.where(slot < n_annotations[:, None], subset, torch.full_like(subset, -1))


def annotation_valid(masks, n_annotations):
    """[N,A] float: 1 for the slots that hold an annotation."""
    return (torch.arange(masks.shape[1], device=masks.device) < n_annotations[:, None]).float()


def majority_vote(masks, n_annotations):
    """Row MV: a pixel is lesion when more than half of the image's annotations say so. [N,H,W] uint8."""
    valid = annotation_valid(masks, n_annotations)[..., None, None]
    votes = (masks.float() * valid).sum(1)
    return (2 * votes > n_annotations.view(-1, 1, 1)).to(torch.uint8)


def staple(masks, n_annotations, iterations=50):
    """Row STAPLE (Warfield et al. 2004), EM for binary masks, batched over images and pixels.
    D_j: annotation j; T: the unknown true mask; p_j / q_j: sensitivity / specificity of annotation j;
    prior f = P(T = 1), here the image's mean foreground fraction over its annotations.
    E-step: W = f prod_j p_j^D_j (1-p_j)^(1-D_j) / (that + (1-f) prod_j q_j^(1-D_j) (1-q_j)^D_j)
    M-step: p_j = sum W D_j / sum W,  q_j = sum (1-W)(1-D_j) / sum (1-W).
    Returns W [N,H,W] (probability of lesion), p [N,A], q [N,A]."""
    d = masks.float().flatten(2)                                   # D [N,A,P]
    valid = annotation_valid(masks, n_annotations)[..., None]      # [N,A,1]
    tiny = 1e-6
    prior = ((d * valid).sum((1, 2)) / (valid.sum((1, 2)) * d.shape[2])).clamp(tiny, 1 - tiny)  # f [N]
    p = torch.full(masks.shape[:2], 0.9, device=masks.device)
    q = torch.full_like(p, 0.9)
    for _ in range(iterations):
        lp, lq = p.clamp(tiny, 1 - tiny)[..., None], q.clamp(tiny, 1 - tiny)[..., None]
        # E-step in log space; unused slots contribute log 1 = 0
        log_a = prior.log()[:, None] + (valid * (d * lp.log() + (1 - d) * (1 - lp).log())).sum(1)
        log_b = (1 - prior).log()[:, None] + (valid * ((1 - d) * lq.log() + d * (1 - lq).log())).sum(1)
        w = torch.sigmoid(log_a - log_b)[:, None]                  # W [N,1,P]
        # M-step
        p = (w * d).sum(2) / w.sum(2).clamp_min(tiny)
        q = ((1 - w) * (1 - d)).sum(2) / (1 - w).sum(2).clamp_min(tiny)
    return w[:, 0].view(masks.shape[0], *masks.shape[2:]), p, q


def mean_pairwise_kappa(masks, n_annotations):
    """Row J (Ribeiro et al.): mean over an image's annotation pairs of Cohen's kappa between the two
    binary masks, kappa = (p_o - p_e) / (1 - p_e), p_o the agreement, p_e = p1 p1' + p0 p0' the chance
    agreement (kappa = 1 for two identical constant masks). Images with one annotation get 1. [N]"""
    d = masks.float().flatten(2)                                    # [N,A,P]
    n_pix = d.shape[2]
    agree = (d @ d.transpose(1, 2) + (1 - d) @ (1 - d).transpose(1, 2)) / n_pix  # p_o [N,A,A]
    fg = d.mean(2)                                                  # [N,A]
    chance = fg[:, :, None] * fg[:, None, :] + (1 - fg)[:, :, None] * (1 - fg)[:, None, :]  # p_e
    kappa = torch.where(chance < 1, (agree - chance) / (1 - chance).clamp_min(1e-12), torch.ones_like(agree))
    valid = annotation_valid(masks, n_annotations)
    pair = valid[:, :, None] * valid[:, None, :] * torch.ones_like(agree).triu(1)  # a < b, both used
    count = pair.sum((1, 2))
    return torch.where(count > 0, (kappa * pair).sum((1, 2)) / count.clamp_min(1), torch.ones_like(count))


# ==================================================================================================
# Spatially adaptive weights by meta-learning (Eq. 1-2) and the training steps
# ==================================================================================================

def spatial_weight_maps(model, images_u, masks_u, images_c, masks_c, virtual_lr, n_samples):
    """Eq. 1: the weight of every pixel of a batch of U for base model i, from the gradient of C_i's
    loss after one virtual SGD step on the eps-weighted U loss (Ren et al. 2018):
        theta'(eps) = theta - lr * grad_theta sum_q eps_q l_q(theta),   eps = 0
        W = max(-dL_C(theta')/d eps, 0) / sum(...)   (all zero when no pixel helps C_i)
    Returns the weights [B,H,W] (detached) and the per-pixel U loss [B,H,W] with its graph, which the
    real step (Eq. 2) reuses."""
    params = dict(model.named_parameters())
    loss_u = pixel_loss(model, images_u, masks_u, n_samples)                       # l_q [B,H,W]
    eps = torch.zeros_like(loss_u, requires_grad=True)
    grads = torch.autograd.grad((eps * loss_u).sum(), list(params.values()), create_graph=True)
    virtual = {name: p - virtual_lr * g for (name, p), g in zip(params.items(), grads)}  # theta'
    # copies of the BatchNorm buffers: the virtual pass must not move the running statistics
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    out_c = functional_call(model, (virtual, buffers), (images_c,)).float()
    loss_c = aleatoric_loss(out_c[:, 0], out_c[:, 1], masks_c, n_samples).mean()   # L_C(theta'), Eq. 1
    grad_eps, = torch.autograd.grad(loss_c, eps, retain_graph=True)
    weights = (-grad_eps).clamp_min(0)                                              # max(-dL/deps, 0)
    total = weights.sum()
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))       # sum to 1 (no sync)
    return weights.detach(), loss_u


def meta_train_step(model, optimizer, batch_u, batch_c, args):
    """Eq. 2: one SGD step of base model i on the W-weighted aleatoric loss of a batch of U."""
    weights, loss_u = spatial_weight_maps(model, batch_u["x"], batch_u["y"], batch_c["x"], batch_c["y"],
                                          args.lr, args.mc_samples)
    loss = (weights * loss_u).sum()  # -sum_q W_q Y_q log Y_q (sampled), W sums to 1 over the batch
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def plain_train_step(model, optimizer, batch, args):
    """Rows A, J, MV, STAPLE: the mean aleatoric loss against one target mask per image."""
    loss = pixel_loss(model, batch["x"], batch["y"], args.mc_samples).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ==================================================================================================
# Training data of every row, and the training loop
# ==================================================================================================

def pairs_split(images, masks, image_index, slot):
    """A split of (image, annotation) pairs: images [P,3,H,W], their annotation [P,H,W] and where it
    comes from (image index and annotation slot, [P])."""
    return {"images": images[image_index], "masks": masks[image_index, slot], "image": image_index, "slot": slot}


def build_training_sets(train, n_models, args):
    """U, C_1..C_M (Sec. 2.2), the images row J keeps, and the MV / STAPLE consensus masks."""
    images, masks, n_ann = train["images"], train["masks"], train["n_annotations"]
    generator = torch.Generator().manual_seed(args.seed)
    subset = non_contradictory_subsets(n_ann.cpu(), n_models, generator, args.subsets).to(images.device)
    image_index, slot = (subset >= 0).nonzero(as_tuple=True)
    sets = {"subset": subset, "U": pairs_split(images, masks, image_index, slot), "C": []}
    for i in range(n_models):
        image_index, slot = (subset == i).nonzero(as_tuple=True)
        if len(image_index) == 0:
            raise ValueError(f"subset C_{i + 1} is empty: no training image has {i + 1} annotations; "
                             "use --subsets uniform")
        sets["C"].append(pairs_split(images, masks, image_index, slot))
    kept = mean_pairwise_kappa(masks, n_ann) >= args.kappa_threshold
    if not kept.any():
        raise ValueError(f"no training image reaches a mean pairwise kappa of {args.kappa_threshold} (row J)")
    sets["all"] = {"images": images, "masks": masks, "n_annotations": n_ann}
    sets["kept"] = {"images": images[kept], "masks": masks[kept], "n_annotations": n_ann[kept]}
    sets["MV"] = {"images": images, "masks": majority_vote(masks, n_ann)}
    sets["STAPLE"] = {"images": images, "masks": (staple(masks, n_ann, args.staple_iterations)[0] > 0.5).to(torch.uint8)}
    return sets


class Row(NamedTuple):
    """A trained row of Table 1. kind "meta": base model trusting C_source (Eq. 1-2); "random": a
    random annotation per image and batch from sets[source]; "fixed": one consensus mask per image."""
    name: str
    method: str
    kind: str
    source: object


def table_rows(n_models, baselines):
    """Table 1's trained rows; the base models B.. are the ensemble (the fusions follow them)."""
    letters = string.ascii_uppercase
    rows = [Row(letters[1 + i], f"model {i}", "meta", i) for i in range(n_models)]
    if baselines:
        rows = [Row("A", "baseline (random annotation)", "random", "all")] + rows + [
            Row(letters[4 + n_models], "less is more [30]", "random", "kept"),
            Row("MV", "majority vote (beyond the paper)", "fixed", "MV"),
            Row("STAPLE", "STAPLE (beyond the paper)", "fixed", "STAPLE")]
    return rows


def make_batch(batch, kind, args, generator, mean, std):
    """Target choice (a random annotation per image for rows A and J), augmentation, normalisation."""
    if kind == "random":  # row A: "for every image in the training batch, we randomly select" one annotation
        u = torch.rand(len(batch["index"]), generator=generator, device=generator.device)
        pick = (u * batch["n_annotations"]).long()
        batch = {"images": batch["images"], "masks": batch["masks"][torch.arange(len(pick), device=pick.device), pick]}
    if args.augment:
        batch = common.augment({"images": batch["images"], "masks": batch["masks"]}, generator, rotate=10.0,
                               scale=0.05, color=0.05)
    return {"x": common.normalize(batch["images"], mean, std), "y": batch["masks"]}


def endless(split, batch_size, generator):
    """Batches of a split for ever (reshuffled at each pass)."""
    drop_last = split["images"].shape[0] >= batch_size
    while True:
        yield from common.iterate_batches(split, batch_size, shuffle=True, generator=generator, drop_last=drop_last)


def train_row(row, model, sets, val, args, run, device, mean, std, progress, start_epoch=0, optimizer=None, best=None):
    """Trains one row's model; yields after each epoch and ends with the weights of the best validation
    Jaccard (Sec. 3.1). Every row takes the same number of SGD steps per epoch, one pass over U."""
    name, kind, source = row.name, row.kind, row.source
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                             weight_decay=args.weight_decay)
    best = best if best is not None else {"jaccard": -1.0, "state": None, "epoch": 0}
    steps = steps_per_epoch(sets, args)
    for epoch in range(start_epoch, args.epochs):
        # a generator per (row, epoch) makes the batches repeatable across --resume
        generator = torch.Generator(device).manual_seed(args.seed * 100003 + sum(map(ord, name)) * 1009 + epoch)
        batches = endless(sets["U"] if kind == "meta" else sets[source], args.batch_size, generator)
        clean = endless(sets["C"][source], args.clean_batch_size, generator) if kind == "meta" else None
        model.train()
        progress.set_epoch(f"{name} {epoch + 1}/{args.epochs}")
        running = torch.zeros((), device=device)
        waited = time.perf_counter()
        for step in range(1, steps + 1):
            batch = make_batch(next(batches), kind, args, generator, mean, std)
            batch_c = make_batch(next(clean), "meta", args, generator, mean, std) if clean else None
            wait = time.perf_counter() - waited
            with common.autocast(device, args.amp):
                if kind == "meta":
                    loss = meta_train_step(model, optimizer, batch, batch_c, args)
                else:
                    loss = plain_train_step(model, optimizer, batch, args)
            running = running + loss
            mean_loss = progress.step(loss, images=len(batch["x"]), wait_s=wait)
            if mean_loss is not None:
                common.check_finite(mean_loss, f"{name} epoch {epoch + 1} step {step}", run)
            waited = time.perf_counter()
        val_jaccard = float(common.jaccard(predict(model, val["images"], mean, std, device, args)[0] > 0.5,
                                           val["reference"]).mean()) * 100
        train_loss = common.check_finite(running / steps, f"{name} epoch {epoch + 1}", run)
        run.log({"row": name, "epoch": epoch + 1, "loss": train_loss, "val_jaccard": val_jaccard})
        if val_jaccard > best["jaccard"]:
            best = {"jaccard": val_jaccard, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        yield epoch + 1, optimizer, best
    model.load_state_dict(best["state"])


def steps_per_epoch(sets, args):
    return max(1, sets["U"]["images"].shape[0] // args.batch_size)


# ==================================================================================================
# Evaluation: prediction, fusion (Eq. 4), Tables 1 and 2
# ==================================================================================================

@torch.no_grad()
def predict(model, images, mean, std, device, args, mc_passes=0, chunk=64):
    """Foreground probability sigmoid(f) and log s^2 [N,H,W]. mc_passes > 0: MC dropout, the mean of
    sigmoid(f) over that many passes with dropout on (Sec. 3.3), all passes in one batched forward."""
    model.eval()
    if mc_passes:
        model.dropout.train()
    probs, log_vars = [], []
    chunk = max(1, chunk // max(mc_passes, 1))
    for start in range(0, images.shape[0], chunk):
        x = common.normalize(images[start:start + chunk].to(device), mean, std)
        passes = max(mc_passes, 1)
        with common.autocast(device, args.amp):
            out = model(x.repeat(passes, 1, 1, 1)).float()
        out = out.view(passes, x.shape[0], *out.shape[1:])
        probs.append(torch.sigmoid(out[:, :, 0]).mean(0))
        log_vars.append(out[:, :, 1].mean(0))
    model.eval()
    return torch.cat(probs), torch.cat(log_vars)


def fuse_predictions(probs, log_variances, rule):
    """Eq. 4: Y = sum_i alpha_i Y_i over the M base models. probs, log_variances [M,N,H,W].
    "equal" (row G): alpha_i = 1/M. "pixel" (row H): alpha_iq = (1/s_iq^2) / sum_j (1/s_jq^2).
    "image" (row I): u_i = mean_q s_iq^2, alpha_i = (1/u_i) / sum_j (1/u_j)."""
    if rule == "equal":
        alpha = torch.full_like(probs, 1.0 / probs.shape[0])
    elif rule == "pixel":
        alpha = torch.softmax(-log_variances, dim=0)  # exp(-log s^2) = 1/s^2, normalised over models
    elif rule == "image":
        inverse = 1.0 / torch.exp(log_variances).mean((2, 3), keepdim=True)  # 1/u_i [M,N,1,1]
        alpha = (inverse / inverse.sum(0, keepdim=True)).expand_as(probs)
    else:
        raise ValueError(f"unknown fusion rule {rule!r}")
    return (alpha * probs).sum(0)


def overlap_and_calibration(prob, reference):
    """Jaccard (%, threshold 0.5) and Eq. 6-7 NLL / Brier per image, as mean and standard error."""
    jac = common.mean_and_se(common.jaccard(prob > 0.5, reference) * 100)
    nll = common.mean_and_se(common.nll(prob, reference))
    brier = common.mean_and_se(common.brier(prob, reference))
    return dict(jaccard=jac[0], jaccard_se=jac[1], nll=nll[0], nll_se=nll[1], brier=brier[0], brier_se=brier[1])


def fusion_rows(n_models):
    """Rows G, H, I of Table 1 (the letters after the base models): (row, method, rule of Eq. 4)."""
    letters = string.ascii_uppercase
    return [(letters[1 + n_models], "equally weighted fusion (ours)", "equal"),
            (letters[2 + n_models], "pixel-level confidence (ours)", "pixel"),
            (letters[3 + n_models], "image-level confidence (ours)", "image")]


def evaluate(models, rows, test_sets, train_stats, args, device):
    """Every row of Tables 1 and 2 on every test set, against its annotation and, when known, the
    true mask. Returns the two tables (lists of dicts) and the ensemble's outputs per test set."""
    base = [row.name for row in rows if row.kind == "meta"]
    fusions = fusion_rows(len(base))
    main_row = fusions[2][0]  # image-level confidence fusion, the main method
    # paper order: A, the base models, the fusions, J; then MV and STAPLE
    methods = ([(r.name, r.method) for r in rows if r.name == "A"] + [(r.name, r.method) for r in rows if r.kind == "meta"]
               + [(name, method) for name, method, _ in fusions]
               + [(r.name, r.method) for r in rows if r.kind != "meta" and r.name != "A"])
    table1, table2, outputs = [], [], {}
    for set_name, split in test_sets.items():
        mean, std = train_stats if args.normalize == "train" else common.channel_stats(split["images"])
        predictions = {row.name: predict(models[row.name], split["images"], mean, std, device, args) for row in rows}
        probs = torch.stack([predictions[name][0] for name in base])      # Y_i [M,N,H,W]
        log_vars = torch.stack([predictions[name][1] for name in base])   # log s_i^2 [M,N,H,W]
        for name, _, rule in fusions:
            predictions[name] = (fuse_predictions(probs, log_vars, rule), None)
        # Table 2: each base model with MC dropout against the deep ensemble
        calibration = [(f"MC dropout model {i}",
                        predict(models[name], split["images"], mean, std, device, args, args.mc_passes)[0])
                       for i, name in enumerate(base)]
        calibration.append(("deep ensemble (ours, image-level fusion)", predictions[main_row][0]))
        outputs[set_name] = {"probs": probs, "log_vars": log_vars, "fused": predictions[main_row][0]}
        references = {"annotation": split["reference"].to(device)}
        if split.get("truth") is not None:
            references["truth"] = split["truth"].to(device)
        for ref_name, reference in references.items():
            where = {"test_set": set_name, "reference": ref_name}
            for name, method in methods:
                scores = overlap_and_calibration(predictions[name][0], reference)
                table1.append({"table": "1", "row": name, "method": method, **where,
                               "jaccard": scores["jaccard"], "jaccard_se": scores["jaccard_se"]})
            for letter, (method, prob) in zip(string.ascii_uppercase, calibration):
                scores = overlap_and_calibration(prob, reference)
                table2.append({"table": "2", "row": letter, "method": method, **where,
                               **{k: scores[k] for k in ("nll", "nll_se", "brier", "brier_se")}})
    return table1, table2, outputs


def table_markdown(rows, value, title):
    """One line per method, one column per (test set, reference), as the paper lays its tables out."""
    columns = list(dict.fromkeys((r["test_set"], r["reference"]) for r in rows))
    names = {c: c[0] + ("" if c[1] == "annotation" else " vs truth") for c in columns}
    lines = {}
    for r in rows:
        line = lines.setdefault(r["row"], {"row": r["row"], "method": r["method"]})
        line.update(value(r, names[(r["test_set"], r["reference"])]))
    header = ["row", "method"] + [k for k in next(iter(lines.values())) if k not in ("row", "method")]
    return common.markdown_table(list(lines.values()), header, title=title)


# ==================================================================================================
# Figures 3-4 and example predictions
# ==================================================================================================

def trusted_slots(sets, model_index):
    """For every training image, the slot of the annotation base model i trusts (its C_i), and whether
    the image has one in C_i at all."""
    in_subset = sets["subset"] == model_index
    return in_subset.float().argmax(1), in_subset.any(1)


def training_weights(model, images_u, masks_u, images_c, masks_c, args):
    """spatial_weight_maps as during training (train mode: batch statistics, dropout on), leaving the
    BatchNorm running statistics as they were."""
    saved = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    weights, _ = spatial_weight_maps(model, images_u, masks_u, images_c, masks_c, args.lr, args.mc_samples)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(saved[name])
    model.eval()
    return weights


def weight_consistency(model, sets, model_index, args, mean, std, n_batches=8):
    """Fig. 3-4 in numbers, on random batches of U weighted as in training: the share of zero-weight pixels among the pixels where an annotation disagrees with the annotation base
    model i trusts for the same image (INC) and among those where they agree, and the ratio of the
    mean weights (INC / agreeing). The paper's claim: INC pixels get zero or near-zero weight."""
    union, masks = sets["U"], sets["all"]["masks"]
    slot, has = trusted_slots(sets, model_index)
    clean = sets["C"][model_index]
    generator = torch.Generator().manual_seed(args.seed)
    totals = torch.zeros(6, device=masks.device)
    for _ in range(n_batches):
        u = torch.randperm(len(union["images"]), generator=generator)[:args.batch_size].to(masks.device)
        c = torch.randperm(len(clean["images"]), generator=generator)[:args.clean_batch_size].to(masks.device)
        weights = training_weights(model, common.normalize(union["images"][u], mean, std), union["masks"][u],
                                   common.normalize(clean["images"][c], mean, std), clean["masks"][c], args)
        image = union["image"][u]
        disagree = masks[image, slot[image]] != union["masks"][u]
        known = has[image].view(-1, 1, 1)
        zero = (weights == 0).float()
        for k, region in enumerate(((disagree & known).float(), (~disagree & known).float())):
            totals[3 * k:3 * k + 3] += torch.stack([(zero * region).sum(), (weights * region).sum(), region.sum()])
    zero_inc, weight_inc, n_inc, zero_agree, weight_agree, n_agree = totals.tolist()
    return {"zero_weight_inconsistent": zero_inc / max(n_inc, 1), "zero_weight_consistent": zero_agree / max(n_agree, 1),
            "mean_weight_ratio": (weight_inc / max(n_inc, 1)) / max(weight_agree / max(n_agree, 1), 1e-30)}


def figure_weight_maps(models, base_rows, sets, model_index, args, mean, std, path):
    """Fig. 3-4: a training image with the most annotations (one of them in C_k), the annotation each
    base model trusts, the inconsistency maps |Y_trusted(k) - Y_i| (INC), the zero weights model k
    learns for those annotations in cyan over INC (INC+WT), and the weight maps themselves."""
    train, subset = sets["all"], sets["subset"]
    _, has = trusted_slots(sets, model_index)
    n = int(torch.where(has, train["n_annotations"], torch.zeros_like(train["n_annotations"])).argmax())
    slots = list(range(int(train["n_annotations"][n])))
    trusted = {int(subset[n, s]): s for s in slots}  # model i -> slot of its trusted annotation
    # the image's annotations in a batch of U filled up with other annotations, weighted as in training
    union, clean = sets["U"], sets["C"][model_index]
    others = torch.randperm(len(union["images"]), generator=torch.Generator().manual_seed(args.seed))
    others = others[:max(args.batch_size - len(slots), 0)].to(union["images"].device)
    x_u = torch.cat([train["images"][n:n + 1].expand(len(slots), -1, -1, -1), union["images"][others]])
    y_u = torch.cat([train["masks"][n, slots], union["masks"][others]])
    weights = training_weights(models[base_rows[model_index].name], common.normalize(x_u, mean, std), y_u,
                               common.normalize(clean["images"][:args.clean_batch_size], mean, std),
                               clean["masks"][:args.clean_batch_size], args)
    reference = y_u[trusted[model_index]]
    n_models = len(base_rows)
    fig, axes = plt.subplots(4, n_models + 1, figsize=(2.2 * (n_models + 1), 9.2))
    for ax in axes.flat:
        ax.set_axis_off()
    common.show_image(axes[0, 0], train["images"][n])
    axes[0, 0].set_title("training image")
    for i in range(n_models):
        if i not in trusted:
            axes[0, i + 1].set_title(f"model {i}: none", fontsize=9)
            continue
        s = trusted[i]
        inconsistent = (reference != y_u[s]).cpu()
        w = weights[s].cpu()
        axes[0, i + 1].imshow(y_u[s].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[0, i + 1].set_title(f"model {i}: annotation {s}", fontsize=9)
        axes[1, i + 1].imshow(inconsistent.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, i + 1].set_title(f"INC model {model_index} vs {i}", fontsize=9)
        # as in the paper: zero-weight pixels in cyan over the inconsistency map
        overlay = torch.zeros(*w.shape, 4)
        overlay[w == 0] = torch.tensor([0.0, 1.0, 1.0, 0.7])
        axes[2, i + 1].imshow(inconsistent.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2, i + 1].imshow(overlay.numpy())
        share = f"{(w[inconsistent] == 0).float().mean().item():.0%}" if inconsistent.any() else "-"
        axes[2, i + 1].set_title(f"INC+WT: w=0 on {share} of INC", fontsize=8)
        axes[3, i + 1].imshow((w / w.max().clamp_min(1e-30)).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[3, i + 1].set_title("W (scaled to its max)", fontsize=8)
    fig.suptitle(f"Weights model {model_index} learns for this image's annotations (cyan: zero weight)", fontsize=9)
    common.save_figure(fig, path)


def figure_predictions(split, outputs, path, count=4):
    """Test images with the reference (green) and fused (red) outlines, the fused probability, the
    mean aleatoric variance and the spread of the base models (epistemic)."""
    fig, axes = plt.subplots(count, 4, figsize=(11, 2.6 * count), squeeze=False)
    for r in range(min(count, split["images"].shape[0])):
        common.show_image(axes[r, 0], split["images"][r])
        common.draw_contours(axes[r, 0], split["reference"][r].cpu() > 0, "lime", "reference" if r == 0 else None)
        common.draw_contours(axes[r, 0], outputs["fused"][r].cpu() > 0.5, "red", "fusion I" if r == 0 else None)
        axes[r, 1].imshow(outputs["fused"][r].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 1].set_axis_off()
        common.plot_uncertainty(axes[r, 2], torch.exp(outputs["log_vars"][:, r]).mean(0).cpu(),
                                "aleatoric s^2" if r == 0 else None)
        common.plot_uncertainty(axes[r, 3], outputs["probs"][:, r].std(0).cpu(), "model spread" if r == 0 else None)
    axes[0, 0].legend(loc="lower left", fontsize=7)
    axes[0, 1].set_title("fused probability")
    common.save_figure(fig, path)


# ==================================================================================================
# Data and main
# ==================================================================================================

def load_data(args):
    """Train / val and the test sets; every split with a single "reference" mask to score against."""
    if args.data == "synthetic":
        sizes = {k: QUICK[k] for k in ("n_train", "n_val", "n_test")} if args.quick else {}
        data = common.load_dataset("synthetic-lesions", size=args.size, seed=args.seed, annotators=True,
                                   domain_shift=True, **sizes)
    else:
        data = common.load_dataset(args.data, args.root, size=args.size, seed=args.seed, cache=args.cache)
    for spec in filter(None, args.test.split(",")):
        name, _, root = spec.partition("=")
        data[name] = common.load_dataset(name, root or None, size=args.size, seed=args.seed, cache=args.cache)["test"]
    for split in data.values():
        if split["masks"].dim() == 3:  # one annotation per image
            split["masks"], split["n_annotations"] = split["masks"][:, None], torch.ones(len(split["masks"]), dtype=torch.long)
    if "train" not in data or "val" not in data:
        raise ValueError(f"--data {args.data} gave the splits {sorted(data)}; training needs 'train' and 'val'")
    generator = torch.Generator().manual_seed(args.seed + 1)
    val = data["val"]  # model selection: one random annotation per validation image (Sec. 3.1)
    pick = (torch.rand(len(val["masks"]), generator=generator) * val["n_annotations"]).long()
    val["reference"] = val["masks"][torch.arange(len(pick)), pick]
    tests = {k: v for k, v in data.items() if k not in ("train", "val")}
    for split in tests.values():  # a test image is scored against its first annotation (ISIC: the only one)
        split["reference"] = split["masks"][:, 0]
    if not tests:
        print("no test set given (--test); scoring on the validation split")
        tests = {"val": val}
    return data["train"], val, tests


def build_models(rows, args, device):
    """One base network per trained row, each from its own seed (the deep ensemble's diversity)."""
    models = nn.ModuleDict()
    for k, row in enumerate(rows):
        torch.manual_seed(args.seed * 1000 + k)
        models[row.name] = common.prepare_model(
            BayesianResidualFCN(args.width, args.depth, args.dropout, args.dropout_layers), device)
    common.seed_everything(args.seed)
    return models


def train_all(models, rows, sets, val, args, run, device, mean, std):
    """Trains the rows one after the other. last.pt (after every epoch) holds all networks, the current
    row's optimiser and best weights and the rows already done; best.pt the selected weights."""
    done, resume = [], None
    if args.resume:
        resume = common.load_checkpoint(args.resume, SCRIPT)
        models.load_state_dict(resume["model"])
        done = list(resume["done"])
    todo = [row for row in rows if row.name not in done]
    progress = common.Progress(len(todo) * args.epochs * steps_per_epoch(sets, args), every=args.log_every)
    if args.compile:
        print("--compile is not used: the meta step differentiates twice, which torch.compile does not support")
    for row in todo:
        start, optimizer, best = 0, None, None
        if resume is not None and resume["row"] == row.name:
            optimizer = torch.optim.SGD(models[row.name].parameters(), lr=args.lr, momentum=args.momentum,
                                        weight_decay=args.weight_decay)
            start, _ = common.restore_state(resume, models, optimizer)
            best = {"jaccard": resume["best"], "epoch": resume["best_epoch"], "state": resume["best_state"]}
        for epoch, optimizer, best in train_row(row, models[row.name], sets, val, args, run, device, mean, std,
                                                progress, start, optimizer, best):
            state = common.checkpoint_state(models, optimizer, None, epoch, best["jaccard"], args)
            run.save("last.pt", {**state, "row": row.name, "done": done, "best_epoch": best["epoch"],
                                 "best_state": best["state"]})
        done.append(row.name)
        run.save("best.pt", {**common.checkpoint_state(models, None, None, args.epochs, None, args, rng=False),
                             "done": done})
    speed = progress.summary()
    print(f"training: {speed['images_per_s']:.1f} images/s, data wait {100 * speed['data_wait_share']:.0f}%")
    return speed


def main(argv=None):
    args = resolve_defaults(build_parser().parse_args(argv))
    common.seed_everything(args.seed)
    device = common.choose_device(args.device)
    train, val, tests = load_data(args)
    run = common.Run(args, SCRIPT, device)
    train, val = common.to_device(train, device), common.to_device(val, device)
    n_models = train["masks"].shape[1]  # M: the annotation slots of the dataset (5 for ISIC)
    rows = table_rows(n_models, args.baselines)
    models = build_models(rows, args, device)
    mean, std = common.channel_stats(train["images"])  # Sec. 3.1: per-channel mean and std
    sets = build_training_sets(train, n_models, args)
    if args.eval_only:
        models.load_state_dict(common.load_checkpoint(args.checkpoint, SCRIPT)["model"])
        speed = {"images_per_s": None, "data_wait_share": None}
    else:
        speed = train_all(models, rows, sets, val, args, run, device, mean, std)

    table1, table2, outputs = evaluate(models, rows, tests, (mean, std), args, device)
    first, main_row = next(iter(tests)), fusion_rows(n_models)[2][0]
    main1 = next(r for r in table1 if r["row"] == main_row and r["test_set"] == first and r["reference"] == "annotation")
    main2 = next(r for r in table2 if r["method"].startswith("deep ensemble") and r["test_set"] == first
                 and r["reference"] == "annotation")
    base_rows = [row for row in rows if row.kind == "meta"]
    weights = [{"table": "fig3-4", "row": row.name, "method": row.method,
                **weight_consistency(models[row.name], sets, i, args, mean, std)} for i, row in enumerate(base_rows)]
    metrics = {"jaccard": main1["jaccard"], "jaccard_se": main1["jaccard_se"], "nll": main2["nll"],
               "brier": main2["brier"], "images_per_s": speed["images_per_s"],
               "data_wait_share": speed["data_wait_share"],
               **{key: sum(r[key] for r in weights) / len(weights)
                  for key in ("zero_weight_inconsistent", "zero_weight_consistent")}}
    markdown = "\n".join([
        f"# D-LEMA on {args.data} ({args.size} px, {args.epochs} epochs, M = {n_models})\n",
        f"Main method: row {main_row} (image-level confidence fusion) on `{first}`; "
        "'vs truth': scored against the true mask instead of an annotation.\n",
        table_markdown(table1, lambda r, col: {col: common.fmt_mean_se(r["jaccard"] / 100, r["jaccard_se"] / 100, percent=True)},
                       "Table 1: Jaccard index (% ± standard error)"),
        table_markdown(table2, lambda r, col: {f"{col} NLL": f"{r['nll']:.3f}", f"{col} Br": f"{r['brier']:.3f}"},
                       "Table 2: NLL and Brier score (lower is better)"),
        common.markdown_table(weights, ["row", "method", "zero_weight_inconsistent", "zero_weight_consistent",
                                        "mean_weight_ratio"], dict.fromkeys(("zero_weight_inconsistent",
                                        "zero_weight_consistent", "mean_weight_ratio"), "{:.3f}"),
                              "Fig. 3-4 in numbers: share of zero-weight pixels where an annotation contradicts "
                              "the one the model trusts for that image (INC) and where it agrees; mean weight "
                              "INC / agreeing (training images; INC pixels lie on the boundary, where losses "
                              "and hence weights are large)")])
    common.write_results(run.dir, SCRIPT, args.data, first, metrics, table1 + table2 + weights, args, markdown)
    for index in sorted({0, min(3, n_models - 1)}):
        figure_weight_maps(models, base_rows, sets, index, args, mean, std,
                           run.figures / f"fig{3 if index == 0 else 4}_weight_maps_model{index}.png")
    figure_predictions(tests[first], outputs[first], run.figures / "predictions.png")
    print(markdown)
    print(f"results in {run.dir}")
    return run.dir


if __name__ == "__main__":
    main()
