"""D-LEMA: an ensemble of Bayesian FCNs that learns skin lesion segmentation from multiple annotators.

Reference: Z. Mirikharaji*, K. Abhishek*, S. Izadi, G. Hamarneh, "D-LEMA: Deep Learning Ensembles from
Multiple Annotations - Application to Skin Lesion Segmentation", CVPR Workshops (ISIC) 2021
(../shared/papers/ensemble_annotators.txt).

Idea. An image may carry 2-5 disagreeing lesion outlines. Instead of fusing them before training, every
image's M_n annotations are dealt out to M non-contradictory subsets C_1..C_M (at most one annotation per
image each) and M base models are trained on the union U of all annotations. Base model i trusts C_i: a
meta-learning step (Ren et al. 2018) weighs every pixel of U, large where following it moves the model the
way C_i's loss wants, zero where it disagrees. Each base model is Bayesian (Kendall & Gal): it predicts
logits and their variance (aleatoric uncertainty), trained with a loss that samples logits. At test time
the M predictions are fused with equal weights or by inverse aleatoric uncertainty (per pixel or image).

Paper -> code (the method is one block, BayesianResidualFCN .. fuse_predictions)
    Sec. 3.2 base model, two output maps (f, log s^2) .. BayesianResidualFCN
    Eq. 5, 3 U ~ N(f, s^2), Y = sigmoid(U), 10 samples . aleatoric_loss
    Eq. 1 W* = argmin_W sum_{n in C_i} L(theta(W)) ..... spatial_weight_maps (one virtual SGD step)
    Eq. 2 L = -sum_q W_mnq Y_mnq log Y_nq .............. meta_weighted_loss; the step in train_row
    Sec. 2.2 / 3.1 non-contradictory subsets C_i, U .... non_contradictory_subsets, build_training_sets
    Row J, "less is more" (Ribeiro et al.): kappa >= 0.5 mean_pairwise_kappa
    Rows MV and STAPLE (beyond the paper) .............. majority_vote, staple
    Sec. 3.3 MC dropout (5 layers, p 0.3, 15 passes) ... BayesianResidualFCN(dropout), predict(mc_passes)
    Eq. 4 Y = sum_i alpha_i Y_i (rows G, H, I) ......... fusion_weights, fuse_predictions
    Eq. 6, 7 NLL and Brier score ....................... common.nll, common.brier (in scores)
    Tables 1 and 2 ..................................... table_rows, train_row, evaluate, report_markdown
    Fig. 3-4, and in numbers (zero weight on INC) ...... figure_weight_maps, weight_statistics
    The meta step's BatchNorm / dropout mode (measured)  weight_statistics (beyond the paper)
    Sec. 3.1 protocol: ISIC / PH2 / DermoFit test sets . load_data (overlap removed and counted)
    --predict: fused lesion, aleatoric and epistemic maps load_model, predict_batch

Usage
    python ensemble_annotators.py                        # synthetic lesions, both tables, CPU-sized
    python ensemble_annotators.py --data isic-multi --root /data/ISIC-Archive \
        --test ph2=/data/PH2,dermofit=/data/DermoFit[,isic2017=/data/ISIC2017] [--splits DIR]  # Sec. 3.1
    python ensemble_annotators.py --seeds 0,1,2          # every row per seed: mean ± SE over seeds
    torchrun --nproc_per_node 4 ensemble_annotators.py   # the trained rows shared out over processes
    python ensemble_annotators.py --resume runs/<run>    # continue an interrupted run (finished jobs kept)
    python ensemble_annotators.py --no-baselines         # only B-F, the fusions G-I and Table 2
    python ensemble_annotators.py --eval-only --checkpoint runs/<run>/ensemble-seed0/best.pt
    python ensemble_annotators.py --predict images/ --checkpoint runs/<run>/ensemble-seed0/best.pt
    python ensemble_annotators.py --quick                # smoke test of every path (seconds)
A run writes results.md / .json, figures/, <row>-seed<seed>/ per trained row and ensemble-seed<seed>/ per
seed's tables; the first seed's ensemble best.pt holds every seed's rows (Python: predict_batch(load_model(
path), images_uint8)).

Deviations and resolved ambiguities
    - Subsets: Sec. 2.2 deals image n's M_n annotations to C_1..C_{M_n}, leaving ISIC's C_5 with 3 images
      (often none on synthetic data), yet model 4 scores like the others in Table 1; the default follows Sec.
      3.1 ("randomly and uniformly": M_n of the M subsets), --subsets first Sec. 2.2. M = the dataset's
      annotation slots (5): five members.
    - "64 and 2 for optimizing the spatial weight maps and network parameters": 64 images of C_i for Eq. 1,
      2 annotations of U for Eq. 2, both with the aleatoric loss (the paper's cross-entropy as s -> 0). At
      eps = 0, -dL/deps_j = lr grad L_C . grad l_j: the virtual lr only scales W, which is normalised.
    - Weight decay 5e-5 (the text's "5 x 10^5" is a typo). Width and depth are not given (the paper cites
      [4]): 32 and 4 on real data (96 px). Synthetic CPU default: 48 px, width 8, depth 3, lr 0.01, momentum
      0.9, batches 8 / 8, 4 epochs (~420 steps per model; the paper: 100K iterations at lr 1e-4, momentum
      0.99). An epoch is one pass over U for every row: all rows take as many steps.
    - Table 2 uses Table 1's base models (five dropout layers, p = 0.3), with dropout off for Table 1 and the
      deep ensemble (fusion I), on for 15 passes in the MC dropout rows (the paper does not say whether its MC
      dropout models were separate runs).
    - Y = sigmoid(f) at the mean logit; the aleatoric map is s^2 = exp(log s^2). Fusions H and I are computed
      in log space (exact, and finite where 1 / mean(exp(log s^2)) overflows to NaN).
    - Every logit bias starts at the log-odds of U's lesion share (as in Lin et al.'s focal loss; the paper is
      silent): at sigmoid(f) = 0.5 the background dominates the clean loss's gradient, so the first meta steps
      weigh mostly background pixels of U, which can lock a model into "all skin" (synthetic seed 0, model 0,
      validation Jaccard after epochs 1 and 2: 42 and 58 with the prior, 22 and 37 with a zero bias). Rows
      A, J, MV and STAPLE start alike.
    - Model selection per model on the validation Jaccard against one random annotation per image (Sec. 3.1).
      Synthetic "test" stands in for ISIC, "test_shift" for PH2 / DermoFit; synthetic test images are scored
      against their first annotation and against the true mask.
    - Majority vote ties go to background (two annotations: their intersection); STAPLE: a per-image prior, 50
      EM steps. Row J is retrained with the same network and steps (the paper's row J has no SE and is most
      likely quoted from Ribeiro et al. [30]).
    - BatchNorm after every convolution of the residual blocks (the paper is silent): in training mode an
      image's output, and its meta weights, depend on its batch. The meta step runs in training mode (batch
      statistics, dropout on) because Eq. 2 reuses its forward pass of U; the parent code has neither layer.
      weight_statistics measures what this changes ("meta-mode"), on every run.
    - Fig. 3-4 show the selected models' weights, computed as in training (train mode, a batch of U), not
      iteration 100K's; "in numbers": zero-weight pixels on INC and on agreeing pixels over --weight-samples
      annotations of U per base model, ± SE over batches or seeds.
    - On-device flips, small rotations, colour jitter (paper silent) on the training batches and, each its own
      draw, on the clean C_i batches (--no-augment-clean: not those).
    - Normalisation with the training split's per-channel mean and std (Sec. 3.1, "across the entire
      dataset"), --predict included (from the checkpoint); --normalize per-dataset: each test set's own. Real
      images keep their aspect ratio (letterboxed, zero padding; the paper resizes): metrics, channel
      statistics and fusion I's u_i count the image's own pixels; training sees the padding as background;
      --predict maps back to each image's size, finding the image in its canvas as the non-zero span.
    - --seeds: each seed re-draws the data (or the real train/val split), the subsets, the initialisations and
      the batches; cells are the mean over seeds ± SE (one seed: ± SE over test images, as in the paper).
      torchrun shares the trained rows out; --parallel data is refused (Eq. 1 normalises W over the whole
      batch); --compile is not used (torch.compile cannot differentiate twice).
"""

import argparse
import math
import string
import types
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common

SCRIPT = "ensemble_annotators"
# CPU-sized defaults for the synthetic benchmark, and the paper's values (Sec. 3.1-3.2) for real data:
# 54 epochs of one pass over U (~3,700 training annotations / 2) are the 100K iterations of Fig. 3.
SYNTHETIC_DEFAULTS = dict(size=48, epochs=4, batch_size=8, clean_batch_size=8, lr=0.01, momentum=0.9, width=8, depth=3)
PAPER_DEFAULTS = dict(size=96, epochs=54, batch_size=2, clean_batch_size=64, lr=1e-4, momentum=0.99, width=32, depth=4)
QUICK = dict(size=32, epochs=1, width=4, n_train=12, n_val=6, n_test=6)
TEST_ONLY = ("ph2", "dermofit", "isic2017")  # --test NAME=ROOT; isic2017: only its test split


# ==================== Arguments ====================================================================

def below_one(text):
    """argparse type of a probability or momentum: a finite number in [0, 1)."""
    value = common.checked(float, low=0)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be < 1, not {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left unset take the paper's values on real data (Sec. 3.1-3.2: "
               f"{PAPER_DEFAULTS}) and CPU-sized values on the synthetic default ({SYNTHETIC_DEFAULTS}).")
    common.add_common_args(parser, size=None, epochs=None, batch_size=None, lr=None,
                           data_choices=["synthetic", "isic-multi", "folder"])
    count = common.POSITIVE_INT
    add = parser.add_argument_group("D-LEMA (defaults: the paper's on real data, CPU-sized on synthetic)").add_argument
    add("--test", default="", metavar="NAME=ROOT,...", help="test-only sets (Sec. 3.1) ph2=/d/PH2,dermofit=/d/DF; "
        "beyond the paper isic2017=/d/ISIC2017; images that sit in the training pool are removed")
    add("--splits", metavar="DIR", help="folder with Ribeiro et al.'s split lists (*_isic_titans_*.txt, "
        "test_ph2.txt, test_dermofit.txt); found under --root when not given")
    add("--fusion", choices=["equal", "pixel", "image"], default="image",
        help="fusion rule of the main metrics, Table 2's deep ensemble and --predict (Eq. 4; row I)")
    add("--clean-batch-size", type=count, help="images of C_i per meta step, Eq. 1 (64; synthetic 8)")
    add("--momentum", type=below_one, help="SGD momentum (Sec. 3.2: 0.99; synthetic 0.9)")
    add("--weight-decay", type=common.NONNEGATIVE, default=5e-5, help="SGD weight decay (Sec. 3.2, typo fixed)")
    add("--width", type=count, help="channels of the first level (32; synthetic 8)")
    add("--depth", type=count, help="down-sampling steps of the encoder-decoder (4; synthetic 3)")
    add("--mc-samples", type=count, default=10, help="logit samples of the aleatoric loss (Sec. 3.2)")
    add("--dropout", type=below_one, default=0.3, help="MC dropout probability (Sec. 3.3)")
    add("--dropout-layers", type=common.NONNEGATIVE_INT, default=5, help="dropout layers in the centre (Sec. 3.3)")
    add("--mc-passes", type=count, default=15, help="MC dropout forward passes (Sec. 3.3)")
    add("--subsets", choices=["uniform", "first"], default="uniform",
        help="deal image n's annotations to M_n random subsets (Sec. 3.1) or to C_1..C_{M_n} (Sec. 2.2)")
    add("--kappa-threshold", type=common.checked(float, low=-1, high=1), default=0.5,
        help="row J keeps images whose mean pairwise Cohen's kappa reaches this (Ribeiro et al.)")
    add("--staple-iterations", type=count, default=50, help="EM iterations of STAPLE (row STAPLE)")
    add("--baselines", action=argparse.BooleanOptionalAction, default=True,
        help="also train rows A, J, MV and STAPLE (off: only the ensemble B.. and its fusions)")
    add("--augment", action=argparse.BooleanOptionalAction, default=True,
        help="on-device flips, small rotations, colour jitter of training batches (paper silent)")
    add("--augment-clean", action=argparse.BooleanOptionalAction, default=True,
        help="augment the clean C_i batches of Eq. 1 too (needs --augment; paper silent)")
    add("--weight-samples", type=count, default=512, metavar="N",
        help="annotations of U sampled per base model for 'Fig. 3-4 in numbers'")
    add("--normalize", choices=["train", "per-dataset"], default="train",
        help="channel statistics for test sets: the training set's or each set's own (Sec. 3.1)")
    return parser


def resolve_defaults(args):
    """Fills unset flags (the paper's values on real data, else CPU-sized) and checks them together."""
    if args.quick:  # every code path on tiny data, networks and samples
        common.fill_defaults(args, QUICK)
        args.mc_samples, args.mc_passes, args.staple_iterations, args.weight_samples = 2, 2, 5, 16
    common.fill_defaults(args, SYNTHETIC_DEFAULTS if args.data == "synthetic" else PAPER_DEFAULTS)
    if args.dropout_layers > 2 * args.depth + 1:
        raise common.UsageError(f"--dropout-layers {args.dropout_layers} do not fit a network of --depth "
                                f"{args.depth} (at most {2 * args.depth + 1})")
    if args.size < 2 ** args.depth:
        raise common.UsageError(f"--size {args.size} is smaller than the 2^{args.depth} = {2 ** args.depth} pixels "
                                f"that --depth {args.depth} down-samples by; lower --depth or raise --size")
    parse_test_sets(args.test)
    if args.parallel == "data":
        raise common.UsageError("--parallel data is not supported: Eq. 1 normalises W over the whole batch, which "
                                "a split batch would not; torchrun shares out the trained rows (--parallel rows)")
    args.parallel = "rows"  # torchrun: one job (row x seed) per process at a time, even for a single job
    if args.compile:  # common.prepare_model would compile the network
        print("--compile is not used: the meta step differentiates twice, which torch.compile does not support")
        args.compile = False
    return args


def parse_test_sets(text):
    """--test "ph2=/d/PH2,dermofit=/d/DF" -> [("ph2", "/d/PH2"), ...]; UsageError for anything else."""
    specs = []
    for spec in filter(None, (part.strip() for part in text.split(","))):
        name, _, root = spec.partition("=")
        if name not in TEST_ONLY or not root:
            raise common.UsageError(f"--test takes NAME=ROOT pairs with NAME in {', '.join(TEST_ONLY)}, not {spec!r}")
        specs.append((name, root))
    return specs


# ==================== The method: base network, losses, meta weights, consensus, fusion ============

class BayesianResidualFCN(nn.Module):
    """Residual encoder-decoder with skip connections (Sec. 3.2, after [4]) giving the logits f and the
    aleatoric log-variance log s^2 (Eq. 5). As in Bayesian SegNet, `dropout_layers` dropout layers sit in
    the centre (the deepest encoder and first decoder blocks); MC dropout uses them at test time (Sec. 3.3)."""

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


def aleatoric_loss(logits, log_variance, target, n_samples, generator=None):
    """Per-pixel aleatoric loss of Kendall & Gal (2017) for a sigmoid output (Eq. 3, 5):
    U_t = f + s * z_t, z_t ~ N(0, 1), t = 1..T;  loss = -log (1/T) sum_t sigmoid((2y-1) U_t),
    computed as log T - logsumexp_t log_sigmoid((2y-1) U_t). As s -> 0 it is the binary cross-entropy.
    logits, log_variance [B,H,W] float; target [B,H,W] in {0,1}. Returns [B,H,W]."""
    sigma = torch.exp(0.5 * log_variance)
    noise = torch.randn((n_samples, *logits.shape), generator=generator, device=logits.device)  # z_t
    sampled = logits + sigma * noise                                         # U_t [T,B,H,W], Eq. 5
    log_prob = F.logsigmoid((2.0 * target.float() - 1.0) * sampled)         # log p(y | U_t), Eq. 3
    return math.log(n_samples) - torch.logsumexp(log_prob, dim=0)


def spatial_weight_maps(model, images_u, masks_u, images_c, masks_c, virtual_lr, n_samples):
    """Eq. 1: the weight of every pixel of a batch of U for base model i, from the gradient of C_i's
    loss after one virtual SGD step on the eps-weighted U loss (Ren et al. 2018):
        theta'(eps) = theta - lr * grad_theta sum_q eps_q l_q(theta),   eps = 0
        W = max(-dL_C(theta')/d eps, 0) / sum(...)   (all zero when no pixel helps C_i)
    Returns the weights [B,H,W] (detached) and the per-pixel U loss [B,H,W] with its graph, which the
    real step (Eq. 2) reuses."""
    params = dict(model.named_parameters())
    out_u = model(images_u).float()
    loss_u = aleatoric_loss(out_u[:, 0], out_u[:, 1], masks_u, n_samples)          # l_q [B,H,W]
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


def meta_weighted_loss(model, images_u, masks_u, images_c, masks_c, virtual_lr, n_samples):
    """Eq. 2: the W-weighted aleatoric loss of a batch of U, W from Eq. 1 on a batch of C_i (sums to 1)."""
    weights, loss_u = spatial_weight_maps(model, images_u, masks_u, images_c, masks_c, virtual_lr, n_samples)
    return (weights * loss_u).sum()  # -sum_q W_q Y_q log Y_q (sampled)


def non_contradictory_subsets(n_annotations, n_subsets, generator, mode="uniform"):
    """Sec. 2.2 / 3.1: subset_of [N, M], the subset id (0 is C_1) of image n's annotation slot a, or -1
    for an empty slot (a >= M_n). Image n's M_n annotations go to M_n distinct subsets (so each C_i holds
    at most one annotation per image): the image draws a priority per subset and slot a goes to the
    subset with the a-th lowest priority. "uniform" (Sec. 3.1): all M subsets compete. "first" (Sec.
    2.2): C_{M_n+1}..C_M get priority +inf, so the annotations go to a random order of C_1..C_{M_n}.
    Example, M = 5, M_n = 2, priorities (0.7, 0.1, 0.9, 0.4, 0.3): uniform -> (1, 4, -1, -1, -1);
    first -> priorities (0.7, 0.1, inf, inf, inf) -> (1, 0, -1, -1, -1)."""
    slot = torch.arange(n_subsets)  # subset ids (columns of `priority`) and annotation slots alike
    priority = torch.rand(n_annotations.shape[0], n_subsets, generator=generator)               # [N, M]
    if mode == "first":
        priority = priority.masked_fill(slot[None, :] >= n_annotations[:, None], float("inf"))  # C_i, i > M_n
    subsets_by_priority = priority.argsort(dim=1)  # [n, a]: the subset id with the a-th lowest priority
    return torch.where(slot[None, :] < n_annotations[:, None], subsets_by_priority,
                       torch.full_like(subsets_by_priority, -1))


def used_slots(masks, n_annotations):
    """[N,A] float: 1 for the slots of masks [N,A,H,W] that hold an annotation."""
    return (torch.arange(masks.shape[1], device=masks.device) < n_annotations[:, None]).float()


def majority_vote(masks, n_annotations):
    """Row MV: lesion where more than half of the image's annotations say so. [N,H,W] uint8."""
    votes = (masks.float() * used_slots(masks, n_annotations)[..., None, None]).sum(1)
    return (2 * votes > n_annotations.view(-1, 1, 1)).to(torch.uint8)


def staple(masks, n_annotations, iterations=50):
    """Row STAPLE (Warfield et al. 2004), EM for binary masks, batched over images and pixels.
    D_j: annotation j; T: the unknown true mask; p_j / q_j: sensitivity / specificity of annotation j;
    prior f = P(T = 1), here the image's mean foreground fraction over its annotations.
    E-step: W = f prod_j p_j^D_j (1-p_j)^(1-D_j) / (that + (1-f) prod_j q_j^(1-D_j) (1-q_j)^D_j)
    M-step: p_j = sum W D_j / sum W,  q_j = sum (1-W)(1-D_j) / sum (1-W).
    Returns W [N,H,W] (probability of lesion), p [N,A], q [N,A]."""
    d = masks.float().flatten(2)                                   # D [N,A,P]
    valid = used_slots(masks, n_annotations)[..., None]            # [N,A,1]
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
    agree = (d @ d.transpose(1, 2) + (1 - d) @ (1 - d).transpose(1, 2)) / d.shape[2]  # p_o [N,A,A]
    fg = d.mean(2)                                                  # [N,A]
    chance = fg[:, :, None] * fg[:, None, :] + (1 - fg)[:, :, None] * (1 - fg)[:, None, :]  # p_e
    kappa = torch.where(chance < 1, (agree - chance) / (1 - chance).clamp_min(1e-12), torch.ones_like(agree))
    valid = used_slots(masks, n_annotations)
    pair = valid[:, :, None] * valid[:, None, :] * torch.ones_like(agree).triu(1)  # a < b, both used
    count = pair.sum((1, 2))
    return torch.where(count > 0, (kappa * pair).sum((1, 2)) / count.clamp_min(1), torch.ones_like(count))


@torch.no_grad()
def predict(model, images, mean, std, amp, mc_passes=0, chunk=64):
    """Y = sigmoid(f) and log s^2 [N,H,W] of uint8 images [N,3,H,W]; mc_passes > 0: MC dropout (Sec. 3.3),
    Y the mean over that many passes with dropout on, batched in one forward. Leaves the model in eval mode."""
    device = next(model.parameters()).device
    model.eval()
    model.dropout.train(mc_passes > 0)
    probs, log_vars = [], []
    passes = max(mc_passes, 1)
    chunk = max(1, chunk // passes)
    for start in range(0, images.shape[0], chunk):
        x = common.normalize(images[start:start + chunk].to(device), mean, std)
        with common.autocast(device, amp):
            out = model(x.repeat(passes, 1, 1, 1)).float()
        out = out.view(passes, x.shape[0], *out.shape[1:])
        probs.append(torch.sigmoid(out[:, :, 0]).mean(0))
        log_vars.append(out[:, :, 1].mean(0))
    model.eval()
    return torch.cat(probs), torch.cat(log_vars)


def fusion_weights(log_variances, rule, valid=None):
    """Eq. 4's weights alpha [M,N,H,W] (summing to 1 over the M models) from log s^2 [M,N,H,W].
    "equal" (row G): alpha_i = 1/M. "pixel" (row H): alpha_iq = (1/s_iq^2) / sum_j (1/s_jq^2).
    "image" (row I): u_i = mean_q s_iq^2 over the image's own pixels q (valid [N,H,W]: not the letterbox
    padding; None: all), alpha_i = (1/u_i) / sum_j (1/u_j). Both confidence rules work in log space
    (softmax of -log s^2, log u_i by logsumexp), exact for any finite log-variance, where exp(log s^2)
    overflows float32 above ~88 (and the naive 1/u gives NaN)."""
    if rule == "equal":
        return torch.full_like(log_variances, 1.0 / log_variances.shape[0])
    if rule == "pixel":
        return torch.softmax(-log_variances, dim=0)  # exp(-log s^2) = 1/s^2, normalised over models
    if rule != "image":
        raise ValueError(f"unknown fusion rule {rule!r}")
    valid = torch.ones_like(log_variances[0], dtype=torch.bool) if valid is None else valid.bool()
    own_pixels = log_variances.masked_fill(~valid, -math.inf).flatten(2)            # padding: s^2 = 0 [M,N,P]
    # log u_i = log (1/|Q|) sum_{q in Q} exp(log s_iq^2), Q the image's own pixels           [M,N]
    log_u = torch.logsumexp(own_pixels, dim=2) - valid.flatten(1).sum(1).log()
    return torch.softmax(-log_u, dim=0)[..., None, None].expand_as(log_variances)   # (1/u_i) / sum_j (1/u_j)


def fuse_predictions(probs, log_variances, rule, valid=None):
    """Eq. 4: Y = sum_i alpha_i Y_i over the M base models; probs, log_variances [M,N,H,W]."""
    return (fusion_weights(log_variances, rule, valid) * probs).sum(0)


# ==================== Data, Table 1's rows and their training sets =================================

def load_data(args, seed):
    """(train, val, tests, removed) of one seed, each split with a "reference" mask; removed: {test set: names
    also in train/val}. Sec. 3.1: isic-multi's images with 2+ masks are the training pool (seeded 80/20, or
    Ribeiro et al.'s --splits), its single-mask images the "isic" test set; --test adds PH2, DermoFit and,
    beyond the paper, ISIC 2017's test split."""
    if args.data == "synthetic":
        data = common.load_dataset("synthetic-lesions", size=args.size, seed=seed, annotators=True,
                                   domain_shift=True, **common.synthetic_split_sizes(args))
    else:
        options = {"splits": args.splits} if args.splits and args.data == "isic-multi" else {}
        data = common.load_dataset(args.data, args.root, size=args.size, seed=seed, cache=args.cache, **options)
        if "test" in data:
            data["isic" if args.data == "isic-multi" else args.data] = data.pop("test")
    if "train" not in data or "val" not in data:
        raise common.UsageError(f"--data {args.data} gave the splits {sorted(data)}; training needs 'train' and 'val'")
    training_ids = [name for split in ("train", "val") for name in data[split]["names"]]
    for name, root in parse_test_sets(args.test):
        options = {"splits": args.splits} if args.splits and name in ("ph2", "dermofit") else {}
        data[name] = common.load_dataset(name, root, size=args.size, seed=seed, cache=args.cache,
                                         exclude=training_ids, need_labels=False, **options)["test"]
    for split in data.values():
        if split["masks"].dim() == 3:  # one annotation per image
            split["masks"] = split["masks"][:, None]
            split["n_annotations"] = torch.ones(len(split["masks"]), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed + 1)
    val = data["val"]  # model selection: one random annotation per validation image (Sec. 3.1)
    pick = (torch.rand(len(val["masks"]), generator=generator) * val["n_annotations"]).long()
    val["reference"] = val["masks"][torch.arange(len(pick)), pick]
    tests = {k: v for k, v in data.items() if k not in ("train", "val")}
    for split in tests.values():  # a test image is scored against its first annotation (ISIC: the only one)
        split["reference"] = split["masks"][:, 0]
    if not tests:
        print("no test set given (--test); scoring on the validation split")
        tests = {"val": val}
    removed = {name: list(split["removed_overlap"] or []) for name, split in tests.items()
               if split.get("removed_overlap") is not None}
    return data["train"], val, tests, removed


class Row(NamedTuple):
    """A row of Table 1 and how it learns. kind "meta": base model i on U weighted for C_i (source "C_<i+1>",
    Eq. 1-2); "random annotation" (A, J): split "all" / "kept", one annotation per image drawn per batch;
    "consensus": split "MV" / "STAPLE"; "fusion" (G, H, I): not trained, Eq. 4 with rule `source`."""
    name: str
    method: str
    kind: str
    source: str
    trusted_subset: int = -1


def table_rows(n_models, baselines):
    """Table 1's rows in the paper's order: A, the base models B.., the fusions G-I, J; beyond the paper
    MV and STAPLE. Without baselines: the base models and the fusions."""
    letters = string.ascii_uppercase
    base = [Row(letters[1 + i], f"model {i}", "meta", f"C_{i + 1}", trusted_subset=i) for i in range(n_models)]
    fusions = [Row(letters[1 + n_models + k], f"{what} (ours)", "fusion", rule) for k, (what, rule) in enumerate(
        [("equally weighted fusion", "equal"), ("pixel-level confidence", "pixel"),
         ("image-level confidence", "image")])]
    if not baselines:
        return base + fusions
    return ([Row("A", "baseline (random annotation)", "random annotation", "all")] + base + fusions
            + [Row(letters[4 + n_models], "less is more [30], retrained here", "random annotation", "kept"),
               Row("MV", "majority vote (beyond the paper)", "consensus", "MV"),
               Row("STAPLE", "STAPLE (beyond the paper)", "consensus", "STAPLE")])


def trained(rows):
    """The rows that train a network (all but the fusions); the index seeds the network."""
    return [row for row in rows if row.kind != "fusion"]


def main_fusion_row(rows, rule):
    """The Table 1 row of the run's fusion rule (--fusion; the paper's main method is I, "image")."""
    return next(row.name for row in rows if row.kind == "fusion" and row.source == rule)


def build_training_sets(train, n_models, seed, subsets="uniform", kappa_threshold=0.5, staple_iterations=50,
                        need_kept=True):
    """Every row's training data, as a dict of splits: "U", the union of all annotations, and "C_1".."C_M",
    the non-contradictory subsets (Sec. 2.2), each of (image, annotation) pairs: "images" [P,3,H,W],
    "masks" [P,H,W] and their "image" index [P]; "all" (row A) and "kept" (row J, kappa >= kappa_threshold):
    images with all their annotations [N,A,H,W]; "MV", "STAPLE": images with their consensus mask [N,H,W];
    "subset_of": [N,A] the subset id of every annotation slot."""
    images, masks, n_ann = train["images"], train["masks"], train["n_annotations"]
    generator = torch.Generator().manual_seed(seed)
    subset_of = non_contradictory_subsets(n_ann.cpu(), n_models, generator, subsets).to(images.device)
    sets = {"subset_of": subset_of}
    for key, member in [("U", subset_of >= 0)] + [(f"C_{i + 1}", subset_of == i) for i in range(n_models)]:
        image_index, slot = member.nonzero(as_tuple=True)
        if len(image_index) == 0 and key != "U":
            raise common.UsageError(f"subset {key} is empty: no training image has {key[2:]} annotations; "
                                    "use --subsets uniform")
        sets[key] = {"images": images[image_index], "masks": masks[image_index, slot], "image": image_index}
    kept = mean_pairwise_kappa(masks, n_ann) >= kappa_threshold
    if not kept.any() and need_kept:
        raise common.UsageError(f"no training image reaches a mean pairwise kappa of {kappa_threshold} "
                                "(row J); lower --kappa-threshold or use --no-baselines")
    sets["all"] = {"images": images, "masks": masks, "n_annotations": n_ann}
    sets["kept"] = {"images": images[kept], "masks": masks[kept], "n_annotations": n_ann[kept]}
    sets["MV"] = {"images": images, "masks": majority_vote(masks, n_ann)}
    sets["STAPLE"] = {"images": images, "masks": (staple(masks, n_ann, staple_iterations)[0] > 0.5).to(torch.uint8)}
    return sets


def seed_data(args, seed, device, cache):
    """What the rows of `seed` train and evaluate on, read once per process (cache: a dict)."""
    if seed not in cache:
        train, val, tests, removed = load_data(args, seed)
        train, val = common.to_device(train, device), common.to_device(val, device)
        n_models = train["masks"].shape[1]  # M: the annotation slots of the dataset (5 for ISIC)
        mean, std = common.channel_stats(train["images"], train.get("valid"))  # Sec. 3.1: per-channel mean, std
        sets = build_training_sets(train, n_models, seed, args.subsets, args.kappa_threshold, args.staple_iterations,
                                   need_kept=args.baselines)
        foreground = float(sets["U"]["masks"].float().mean().clamp(0.01, 0.99))  # lesion share of U
        cache[seed] = types.SimpleNamespace(val=val, tests=tests, removed=removed, sets=sets, mean=mean, std=std,
                                            n_models=n_models, foreground=foreground)
    return cache[seed]


def build_model(row_index, args, seed, foreground=None):
    """The network of trained row `row_index`, from its own seed; the logit's bias starts at the log-odds
    of `foreground`, U's lesion share (Deviations)."""
    torch.manual_seed(seed * 1000 + row_index)
    model = BayesianResidualFCN(args.width, args.depth, args.dropout, args.dropout_layers)
    if foreground is not None:
        with torch.no_grad():  # sigmoid(f) starts at the prior foreground share, not at 0.5
            model.head.bias[0] = math.log(foreground / (1 - foreground))
    return model


# ==================== Training ====================================================================

def make_batch(batch, generator, mean, std, *, pick_annotation, augment):
    """A training batch {"x": normalised images, "y": masks [B,H,W]}. pick_annotation: one of each image's
    annotations [B,A,H,W] at random (rows A, J: "for every image in the training batch, we randomly select
    which ground truth to use", Sec. 3.3). augment: on-device flips / small rotations / colour jitter."""
    images, masks = batch["images"], batch["masks"]
    if pick_annotation:
        u = torch.rand(len(images), generator=generator, device=generator.device)
        pick = (u * batch["n_annotations"]).long()
        masks = masks[torch.arange(len(pick), device=pick.device), pick]
    if augment:
        augmented = common.augment({"images": images, "masks": masks}, generator, rotate=10.0, scale=0.05, color=0.05)
        images, masks = augmented["images"], augmented["masks"]
    return {"x": common.normalize(images, mean, std), "y": masks}


def training_batches(row, data, args, steps, generator):
    """One epoch (`steps`, a pass over U): a base model's batches of U and C_i (Eq. 1-2), or a batch of
    the row's own split (A, J, MV, STAPLE)."""
    def endless(split, batch_size):  # reshuffled at each pass
        drop_last = split["images"].shape[0] >= batch_size
        while True:
            yield from common.iterate_batches(split, batch_size, shuffle=True, generator=generator, drop_last=drop_last)

    meta = row.kind == "meta"
    batches = endless(data.sets["U" if meta else row.source], args.batch_size)
    clean_batches = endless(data.sets[row.source], args.clean_batch_size)
    for _ in range(steps):
        batch = make_batch(next(batches), generator, data.mean, data.std,
                           pick_annotation=row.kind == "random annotation", augment=args.augment)
        clean = make_batch(next(clean_batches), generator, data.mean, data.std, pick_annotation=False,
                           augment=args.augment and args.augment_clean) if meta else None
        yield batch, clean


def train_row(job, cache):
    """run_jobs' job: trains row job.row for one seed; best.pt keeps the best validation Jaccard (Sec. 3.1)."""
    run, args = job.run, job.run.args
    data = seed_data(args, job.seed, run.device, cache)
    row_index, row = next((k, row) for k, row in enumerate(trained(table_rows(data.n_models, args.baselines)))
                          if row.name == job.row)
    model = common.prepare_model(build_model(row_index, args, job.seed, data.foreground), run)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    start, best = common.resume(job, model, optimizer)
    steps = max(1, data.sets["U"]["images"].shape[0] // args.batch_size)  # every row: one pass over U
    progress = common.Progress(job, steps, args.epochs, start, every=args.log_every)
    for epoch in range(start, args.epochs):
        # a generator per (row, epoch) makes the batches repeatable across --resume
        generator = torch.Generator(run.device).manual_seed(job.seed * 100003 + sum(map(ord, row.name)) * 1009 + epoch)
        model.train()
        running = torch.zeros((), device=run.device)
        for batch, clean in progress.epoch(epoch, training_batches(row, data, args, steps, generator)):
            with common.autocast(run.device, args.amp):
                if row.kind == "meta":  # Eq. 1-2: U's pixels weighted for C_i, the weighted loss of U
                    loss = meta_weighted_loss(model, batch["x"], batch["y"], clean["x"], clean["y"],
                                              args.lr, args.mc_samples)
                else:  # rows A, J, MV, STAPLE: the mean aleatoric loss (Eq. 5) against one mask per image
                    out = model(batch["x"]).float()
                    loss = aleatoric_loss(out[:, 0], out[:, 1], batch["y"], args.mc_samples).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running = running + loss.detach()
            progress.step(loss, len(batch["x"]))
        # model selection: the validation Jaccard against one random annotation per image (Sec. 3.1)
        val_prob, _ = predict(model, data.val["images"], data.mean, data.std, args.amp)
        val_jaccard = float(common.jaccard(val_prob > 0.5, data.val["reference"]).mean()) * 100
        job.log(epoch=epoch + 1, loss=float(running / steps), val_jaccard=val_jaccard)
        best = common.save(job, epoch + 1, val_jaccard, best, model, optimizer,
                           normalization=[data.mean.cpu(), data.std.cpu()])
    speed = progress.report()
    selected = common.load_best(job, model)
    return {"val_jaccard": selected["score"], "best_epoch": selected["epoch"], **speed}


# ==================== Evaluation: Tables 1 and 2, Fig. 3-4 in numbers, the meta step's mode ==========

def base_predictions(models, images, mean, std, amp):
    """The base models' Y_i and log s_i^2, each [M,N,H,W]."""
    outputs = [predict(model, images, mean, std, amp) for model in models]
    return torch.stack([prob for prob, _ in outputs]), torch.stack([log_var for _, log_var in outputs])


def scores(prob, reference, valid, metrics):
    """`metrics` of "jaccard" (%, threshold 0.5), "nll" and "brier" (Eq. 6-7) per image, as their mean and
    SE over images (<metric>_image_se); valid [N,H,W]: the image's own pixels (not the letterbox padding)."""
    valid = torch.ones_like(reference, dtype=torch.bool) if valid is None else valid.bool()
    result = {}
    for key in metrics:
        if key == "jaccard":
            values = common.jaccard((prob > 0.5) & valid, reference.bool() & valid) * 100
        else:  # the pixel mean of Eq. 6 or 7 over each image's own pixels: [1,P] is one image of P pixels
            metric = {"nll": common.nll, "brier": common.brier}[key]
            values = torch.cat([metric(p[v][None], r[v][None]) for p, r, v in zip(prob, reference, valid)])
        result[key], result[f"{key}_image_se"] = common.mean_and_se(values)
    return result


def evaluate(models, rows, test_sets, train_norm, args):
    """Tables 1 and 2 on every test set, against its annotation and, when known, the true mask (Table 2:
    the base models with MC dropout, then the deep ensemble). Returns the entries and, per test set, the
    base models' outputs and the fusion."""
    base = [row.name for row in rows if row.kind == "meta"]
    main_row = main_fusion_row(rows, args.fusion)
    table1, table2, outputs = [], [], {}
    for set_name, split in test_sets.items():
        norm = train_norm if args.normalize == "train" else common.channel_stats(split["images"], split.get("valid"))
        mean, std = (t.to(train_norm[0].device) for t in norm)
        probs, log_vars = base_predictions([models[name] for name in base], split["images"], mean, std, args.amp)
        valid = split["valid"].to(probs.device) if split.get("valid") is not None else None
        prob = dict(zip(base, probs))                                              # Y_i [N,H,W]
        for row in rows:
            if row.kind in ("random annotation", "consensus"):
                prob[row.name] = predict(models[row.name], split["images"], mean, std, args.amp)[0]
            elif row.kind == "fusion":
                prob[row.name] = fuse_predictions(probs, log_vars, row.source, valid)  # Eq. 4
        calibration = [(f"MC dropout model {i}", predict(models[name], split["images"], mean, std, args.amp,
                                                         args.mc_passes)[0]) for i, name in enumerate(base)]
        calibration.append((f"deep ensemble (ours, fusion {main_row})", prob[main_row]))
        outputs[set_name] = {"probs": probs, "log_vars": log_vars, "fused": prob[main_row]}
        for ref_name, key in (("annotation", "reference"), ("truth", "truth")):
            if split.get(key) is None:
                continue
            reference, where = split[key].to(probs.device), {"test_set": set_name, "reference": ref_name}
            for row in rows:
                table1.append({"table": "1", "row": row.name, "method": row.method, **where,
                               **scores(prob[row.name], reference, valid, ["jaccard"])})
            for letter, (method, calibrated) in zip(string.ascii_uppercase, calibration):
                table2.append({"table": "2", "row": letter, "method": method, **where,
                               **scores(calibrated, reference, valid, ["nll", "brier"])})
    return table1 + table2, outputs


def training_weights(model, images_u, masks_u, images_c, masks_c, virtual_lr, n_samples, mode="train"):
    """spatial_weight_maps outside training, running statistics untouched: "train" mode as training
    computes them (batch statistics, dropout on), "eval" with running statistics and dropout off."""
    saved = {name: b.clone() for name, b in model.named_buffers()}
    model.train(mode == "train")
    weights, _ = spatial_weight_maps(model, images_u, masks_u, images_c, masks_c, virtual_lr, n_samples)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(saved[name])
    model.eval()
    return weights


def ratio_and_se(numerators, denominators):
    """R = sum a_b / sum n_b over batches b, and its SE: sqrt(sum (a_b - R n_b)^2 / (B (B - 1))) / mean n_b."""
    total = denominators.sum()
    if total <= 0:
        return float("nan"), float("nan")
    ratio, n_batches = numerators.sum() / total, len(numerators)
    if n_batches < 2:
        return float(ratio), float("nan")
    spread = ((numerators - ratio * denominators) ** 2).sum() / (n_batches * (n_batches - 1))
    return float(ratio), float(spread.sqrt() / denominators.mean())


def weight_statistics(model, row, sets, args, mean, std):
    """Base model i's weights on random unaugmented batches of U and C_i, as training computes them.
    "fig3-4" (the paper: INC pixels get zero or near-zero weight), over args.weight_samples annotations of U:
    the zero-weight share on INC pixels (where an annotation disagrees with the one model i trusts for that
    image; zero_weight_inconsistent) and on agreeing ones (zero_weight_consistent), with *_batch_se, and
    mean_weight_ratio, INC / agreeing. "meta-mode", train mode (batch statistics, dropout on) against eval
    mode on the first batch: tv_* the weight mass that moves, 1/2 sum_q |W - W'|, between the modes and
    between two draws of one mode (dropout, MC samples); zero_flip the share of pixels with zero weight in
    one mode only; zero_train, zero_eval the zero-weight share in each."""
    union, clean, device = sets["U"], sets[row.source], sets["U"]["images"].device
    in_subset = sets["subset_of"] == row.trusted_subset  # [N,A]: the slot of the one annotation model i trusts
    trusted_slot, has_trusted = in_subset.float().argmax(1), in_subset.any(1)
    generator = torch.Generator().manual_seed(args.seed)
    n_batches = max(1, math.ceil(args.weight_samples / args.batch_size))
    first, sums = None, []  # per batch: pixels, zero-weight pixels and weight, on INC and on agreeing pixels
    for _ in range(n_batches):
        u = torch.randperm(len(union["images"]), generator=generator)[:args.batch_size].to(device)
        c = torch.randperm(len(clean["images"]), generator=generator)[:args.clean_batch_size].to(device)
        batch = (common.normalize(union["images"][u], mean, std), union["masks"][u],
                 common.normalize(clean["images"][c], mean, std), clean["masks"][c])
        first = batch if first is None else first  # the meta step's mode is measured on the first batch
        weights = training_weights(model, *batch, args.lr, args.mc_samples)                     # W [B,H,W]
        image = union["image"][u]
        trusted_mask = sets["all"]["masks"][image, trusted_slot[image]]  # the annotation model i trusts [B,H,W]
        known = has_trusted[image].view(-1, 1, 1)
        inconsistent = ((trusted_mask != union["masks"][u]) & known).float()    # INC
        agreeing = ((trusted_mask == union["masks"][u]) & known).float()
        zero = (weights == 0).float()
        sums.append(torch.stack([value for region in (inconsistent, agreeing)
                                 for value in (region.sum(), (zero * region).sum(), (weights * region).sum())]))
    inc_pixels, inc_zero, inc_weight, agree_pixels, agree_zero, agree_weight = torch.stack(sums).double().cpu().T
    zero_inc, zero_inc_se = ratio_and_se(inc_zero, inc_pixels)
    zero_agree, zero_agree_se = ratio_and_se(agree_zero, agree_pixels)
    mean_inc = inc_weight.sum() / inc_pixels.sum().clamp_min(1)
    mean_agree = agree_weight.sum() / agree_pixels.sum().clamp_min(1)
    modes = {}
    for mode, draw in (("train", 0), ("train", 1), ("eval", 0), ("eval", 1)):
        torch.manual_seed(args.seed * 7919 + draw)  # dropout masks and the MC samples of the loss
        modes[mode, draw] = training_weights(model, *first, args.lr, args.mc_samples, mode)
    w_train, w_eval = modes["train", 0], modes["eval", 0]
    moved = {"train_vs_eval": (w_train, w_eval), "train_redraw": (w_train, modes["train", 1]),
             "eval_redraw": (w_eval, modes["eval", 1])}
    return {"fig3-4": {"zero_weight_inconsistent": zero_inc, "zero_weight_inconsistent_batch_se": zero_inc_se,
                       "zero_weight_consistent": zero_agree, "zero_weight_consistent_batch_se": zero_agree_se,
                       "mean_weight_ratio": float(mean_inc / mean_agree.clamp_min(1e-30)),
                       "annotations": n_batches * args.batch_size,
                       "inconsistent_pixels": int(inc_pixels.sum())},
            "meta-mode": {**{f"tv_{key}": float(0.5 * (a - b).abs().sum()) for key, (a, b) in moved.items()},
                          "zero_flip": float(((w_train == 0) != (w_eval == 0)).float().mean()),
                          "zero_train": float((w_train == 0).float().mean()),
                          "zero_eval": float((w_eval == 0).float().mean())}}


def ensemble_of(weights, rows, args, seeds):
    """The trained rows of `seeds`, a ModuleDict {"seed<s>": {row name: network}} in eval mode, loaded from
    `weights` (an ensemble checkpoint's "model", seed<s>.<row>.<parameter>; other seeds are left out)."""
    models = nn.ModuleDict({f"seed{seed}": nn.ModuleDict({row.name: build_model(k, args, seed)
                                                          for k, row in enumerate(trained(rows))})
                            for seed in seeds})
    common.load_model_state(models, {key: value for key, value in weights.items()
                                     if key.split(".")[0] in models})
    return models.eval()


def best_weights(run, rows, seeds):
    """The trained rows' best.pt of `seeds`: ensemble_of's weights and each seed's normalisation."""
    weights, norm = {}, {}
    for seed in seeds:
        for row in trained(rows):
            best = common.load_checkpoint(common.job_folder(run, row.name, seed) / "best.pt", SCRIPT)
            weights.update({f"seed{seed}.{row.name}.{key}": value for key, value in best["model"].items()})
            norm[str(seed)] = best["normalization"]
    return weights, norm


def evaluate_seed(job, cache, checkpoint=None):
    """run_jobs' job for one seed's tables, from the rows' best.pt (or an --eval-only checkpoint). The first
    seed's job draws the figures and, after training, writes the ensemble (every seed's rows) to best.pt."""
    run, seeds = job.run, common.seed_list(job.run.args)
    data = seed_data(run.args, job.seed, run.device, cache)
    rows = table_rows(data.n_models, run.args.baselines)
    args = argparse.Namespace(**{**vars(run.args), "seed": job.seed})  # the sampling of Fig. 3-4 in numbers
    weights = best_weights(run, rows, [job.seed])[0] if checkpoint is None else checkpoint["model"]
    models = common.prepare_model(ensemble_of(weights, rows, args, [job.seed])[f"seed{job.seed}"], run)
    entries, outputs = evaluate(models, rows, data.tests, (data.mean, data.std), args)
    base_rows = [row for row in rows if row.kind == "meta"]
    for row in base_rows:
        where = {"row": row.name, "method": row.method, "test_set": "train", "reference": "U"}
        statistics = weight_statistics(models[row.name], row, data.sets, args, data.mean, data.std)
        for table, values in statistics.items():  # "fig3-4", "meta-mode"
            entries.append({"table": table, **where, **values})
    for name, removed in data.removed.items():  # Sec. 3.1 protocol: test images also in train/val
        entries.append({"table": "overlap", "row": name, "method": "removed from the test set", "test_set": name,
                        "reference": "-", "removed": len(removed), "removed_names": removed})
    if job.seed == seeds[0]:
        for index in sorted({0, min(3, data.n_models - 1)}):  # the paper shows models 0 (Fig. 3) and 3 (Fig. 4)
            row = base_rows[index]
            figure_weight_maps(models[row.name], row, data.n_models, data.sets, args, data.mean, data.std,
                               run.figures / f"fig{3 if index == 0 else 4}_weight_maps_model{index}.png")
        first_test = list(data.tests)[0]
        figure_predictions(data.tests[first_test], outputs[first_test], run.figures / "predictions.png")
        if checkpoint is None:  # the ensemble: one module holding every seed's trained rows
            weights, norm = best_weights(run, rows, seeds)
            common.save(job, args.epochs, math.nan, -math.inf, ensemble_of(weights, rows, args, seeds),
                        seeds=seeds, n_models=data.n_models, norm=norm)
    return {"entries": entries}


# ==================== Report: Tables 1-2 and the analyses as Markdown, Fig. 3-4, predictions =======

def report_markdown(args, seeds, rows, first_test, table):
    """results.md: Tables 1 and 2 in the paper's layout (a column per test set and reference), Fig. 3-4 in
    numbers, the meta step's mode and the overlap removed. ± SE over seeds, or over test images or batches."""
    over_seeds = len(seeds) > 1

    def share(entry, key, one_seed, percent_points=1):  # % ± SE over seeds, or the one seed's own SE
        se = entry[f"{key}_se" if over_seeds else f"{key}_{one_seed}_se"]
        return common.fmt_mean_se(entry[key] / percent_points, se / percent_points, percent=True)

    def column(entry, metric=""):  # Tables 1 and 2: a column per test set and reference
        return entry["test_set"] + ("" if entry["reference"] == "annotation" else " vs truth") + metric

    annotations = next(int(e["annotations"]) for e in table if e["table"] == "fig3-4")
    spread = (f"mean ± standard error over the seeds {', '.join(map(str, seeds))}" if over_seeds else
              f"seed {seeds[0]}; ± standard error over the test images as in the paper")
    row_j = [row.name for row in rows if row.source == "kept"]
    tables = {  # table: (title, the cells of one entry)
        "1": ("Table 1: Jaccard index (% ± standard error)",
              lambda e: {column(e): share(e, "jaccard", "image", percent_points=100)}),
        "2": ("Table 2: NLL and Brier score (lower is better)",
              lambda e: {column(e, f" {short}"): common.fmt_over_seeds(e, key, digits=3)
                         for key, short in (("nll", "NLL"), ("brier", "Br"))}),
        "fig3-4": (f"Fig. 3-4 in numbers, over {annotations} annotations of U per base model (batches of "
                   f"{args.batch_size}, weighted as in training): zero-weight pixels where an annotation "
                   f"contradicts the one the model trusts (INC) and where it agrees (± SE over "
                   f"{'seeds' if over_seeds else 'batches'}); mean weight on INC / agreeing (INC lies on the "
                   "boundary)",
                   lambda e: {"w = 0 on INC (%)": share(e, "zero_weight_inconsistent", "batch"),
                              "w = 0 where agreeing (%)": share(e, "zero_weight_consistent", "batch"),
                              "mean w, INC / agreeing": common.fmt_over_seeds(e, "mean_weight_ratio",
                                                                              digits=2)}),
        "meta-mode": ("The meta step's mode, one batch of U and of C_i: weight mass moved (total variation) "
                      "between train mode (batch statistics, dropout on) and eval mode, and between two "
                      "draws of one mode; pixels with zero weight in one mode only, and in each mode",
                      lambda e: {label: common.fmt_over_seeds(e, key, percent=True) for key, label in (
                          ("tv_train_vs_eval", "moved, train vs eval (%)"),
                          ("tv_train_redraw", "moved, train redrawn (%)"),
                          ("tv_eval_redraw", "moved, eval redrawn (%)"),
                          ("zero_flip", "w = 0 in one mode only (%)"),
                          ("zero_train", "w = 0, train (%)"), ("zero_eval", "w = 0, eval (%)"))}),
        "overlap": ("Test images removed because they sit in the training pool (names in results.json)",
                    lambda e: {"images removed (also in train/val)": int(e["removed"])})}
    markdown = [
        f"# D-LEMA on {args.data} ({args.size} px, {args.epochs} epochs, M = {sum(r.kind == 'meta' for r in rows)})\n",
        f"Main method: row {main_fusion_row(rows, args.fusion)} (fusion rule `{args.fusion}`) on `{first_test}`; "
        "'vs truth': scored against the true mask instead of an annotation. "
        + (f"Row {row_j[0]} is retrained here with the same network and number of steps as the other rows; "
           "the paper's row J carries no ± SE and is most likely quoted from Ribeiro et al. [30]. " if row_j else "")
        + f"Every number: {spread}.\n"]
    for name, (title, cells) in tables.items():  # a line per row, its cells from each of its entries
        lines, header = {}, ["row", "method"]
        for entry in (e for e in table if e["table"] == name):
            line = cells(entry)
            lines.setdefault(entry["row"], {"row": entry["row"], "method": entry["method"]}).update(line)
            header += [key for key in line if key not in header]
        markdown.append(common.markdown_table(list(lines.values()), header, title=title) if lines else "")
    return "\n".join(markdown)


def figure_weight_maps(model, row, n_models, sets, args, mean, std, path):
    """Fig. 3-4: a training image with the most annotations (one of them in C_k, k = row's trusted subset);
    per base model i, the annotation it trusts, the inconsistency map |Y_k - Y_i| (INC), in cyan over INC
    the pixels of that annotation to which model k gives zero weight (INC+WT), and the weight map W."""
    k, train, subset_of = row.trusted_subset, sets["all"], sets["subset_of"]
    n = int((train["n_annotations"] * (subset_of == k).any(1)).argmax())  # most annotations, one of them in C_k
    slots = list(range(int(train["n_annotations"][n])))
    slot_trusted_by = {int(subset_of[n, s]): s for s in slots}  # model i -> slot of the annotation it trusts
    # the image's annotations in a batch of U filled up with other annotations, weighted as in training
    union, clean = sets["U"], sets[row.source]
    others = torch.randperm(len(union["images"]), generator=torch.Generator().manual_seed(args.seed))
    others = others[:max(args.batch_size - len(slots), 0)].to(union["images"].device)
    x_u = torch.cat([train["images"][n:n + 1].expand(len(slots), -1, -1, -1), union["images"][others]])
    y_u = torch.cat([train["masks"][n, slots], union["masks"][others]])
    weights = training_weights(model, common.normalize(x_u, mean, std), y_u,
                               common.normalize(clean["images"][:args.clean_batch_size], mean, std),
                               clean["masks"][:args.clean_batch_size], args.lr, args.mc_samples)
    fig, axes = common.blank_grid(4, n_models + 1, figsize=(2.2 * (n_models + 1), 9.2))
    common.show_image(axes[0, 0], train["images"][n])
    axes[0, 0].set_title("training image")
    for i in range(n_models):
        axes[0, i + 1].set_title(f"model {i}: none", fontsize=8)  # no annotation of this image in C_i
    for i, s in slot_trusted_by.items():
        inconsistent, w = (y_u[slot_trusted_by[k]] != y_u[s]).cpu(), weights[s].cpu()
        share = f"{(w[inconsistent] == 0).float().mean().item():.0%}" if inconsistent.any() else "-"
        panels = [(y_u[s].cpu(), f"model {i}: annotation {s}"), (inconsistent, f"INC model {k} vs {i}"),
                  (inconsistent, f"INC+WT: w=0 on {share} of INC"), (w / w.max().clamp_min(1e-30), "W / max W")]
        for ax, (image, title) in zip(axes[:, i + 1], panels):
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
        zero_weight = torch.zeros(*w.shape, 4)
        zero_weight[w == 0] = torch.tensor([0.0, 1.0, 1.0, 0.7])  # cyan, as in the paper
        axes[2, i + 1].imshow(zero_weight.numpy())
    fig.suptitle(f"Weights model {k} learns for this image's annotations (cyan: zero weight)", fontsize=9)
    common.save_figure(fig, path)


def figure_predictions(split, outputs, path, count=4):
    """Test images with reference (green) and fused (red) outlines, the fused probability, the mean
    aleatoric variance and the base models' spread (epistemic)."""
    fig, axes = plt.subplots(count, 4, figsize=(11, 2.6 * count), squeeze=False)
    for r in range(min(count, split["images"].shape[0])):
        common.show_image(axes[r, 0], split["images"][r])
        common.draw_contours(axes[r, 0], split["reference"][r].cpu() > 0, "lime", "reference" if r == 0 else None)
        common.draw_contours(axes[r, 0], outputs["fused"][r].cpu() > 0.5, "red", "fusion" if r == 0 else None)
        axes[r, 1].imshow(outputs["fused"][r].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 1].set_axis_off()
        common.plot_uncertainty(axes[r, 2], torch.exp(outputs["log_vars"][:, r]).mean(0).cpu(),
                                "aleatoric s^2" if r == 0 else None)
        common.plot_uncertainty(axes[r, 3], outputs["probs"][:, r].std(0).cpu(), "model spread" if r == 0 else None)
    axes[0, 0].legend(loc="lower left", fontsize=7)
    axes[0, 1].set_title("fused probability")
    common.save_figure(fig, path)


# ==================== --predict and --eval-only: the ensemble checkpoint ===========================

ARCHITECTURE = ("data", "size", "width", "depth", "dropout", "dropout_layers", "baselines", "fusion", "normalize")


def load_ensemble_checkpoint(path):
    """A run's ensemble-seed<first seed>/best.pt: every seed's rows ("model"), "norm", "seeds", "n_models"."""
    state = common.load_checkpoint(path, SCRIPT)
    if not all(key in state for key in ("norm", "seeds", "n_models")):
        raise common.CheckpointError(f"{path} holds no trained ensemble (pass the ensemble-seed<first seed>/best.pt "
                                     "of a finished run; a row's own best.pt holds one network)")
    return state


def load_model(checkpoint_path, device="cpu"):
    """A common.Predictor of the checkpoint's first seed: its base models (a ModuleDict), size, norm, fusion."""
    state = load_ensemble_checkpoint(checkpoint_path)
    args = common.restore_architecture(resolve_defaults(build_parser().parse_args([])), state, ARCHITECTURE)
    seed, device = state["seeds"][0], torch.device(device)
    rows = table_rows(state["n_models"], args.baselines)
    trained_rows = ensemble_of(state["model"], rows, args, [seed])[f"seed{seed}"]
    models = nn.ModuleDict({row.name: trained_rows[row.name] for row in rows if row.kind == "meta"})
    norm = tuple(t.to(device) for t in state["norm"][str(seed)])
    return common.Predictor(model=models.to(device), args=args, norm=norm, size=args.size, keep_aspect=True,
                            device=device, class_names=[], mask_names=["background", "lesion"],
                            extra={"fusion": args.fusion})


def canvas_content(images):
    """bool [B,S,S]: each canvas's letterbox box, the span of rows and columns with a non-zero pixel
    (padding is exactly zero; an image's own all-black border rows count as padding)."""
    nonzero = images.amax(1) > 0                                    # [B,S,S]

    def span(hit):  # [B,S]: from the first to the last index that is hit; the whole side when none is
        return (hit.cumsum(1) > 0) & (hit.flip(1).cumsum(1).flip(1) > 0) | ~hit.any(1, keepdim=True)
    return span(nonzero.any(2))[:, :, None] & span(nonzero.any(1))[:, None, :]


@torch.no_grad()
def predict_batch(predictor, images_uint8):
    """common.predict_images_in's callback on canvases uint8 [B,3,S,S]: the fused lesion (Eq. 4, the run's
    fusion rule, threshold 0.5), the maps "aleatoric" (sum_i alpha_i s_i^2) and "epistemic" (the std of
    the base models' Y_i), and rows: lesion area fraction and both maps' means over the image's pixels."""
    probs, log_vars = base_predictions(predictor.model.values(), images_uint8, *predictor.norm, predictor.args.amp)
    content = canvas_content(images_uint8)                                       # the image in its canvas
    alpha = fusion_weights(log_vars, predictor.extra.get("fusion", "image"), content)             # [M,B,S,S]
    fused = (alpha * probs).sum(0)                                                                 # Eq. 4
    aleatoric = torch.logsumexp(torch.log(alpha.clamp_min(1e-45)) + log_vars, dim=0).exp()  # sum_i alpha_i s_i^2
    epistemic = probs.std(0, unbiased=False)
    mask = (fused > 0.5).long()
    content = content.float()
    pixels = content.sum((1, 2)).clamp_min(1)
    rows = [{name: float((value[b] * content[b]).sum() / pixels[b])
             for name, value in (("lesion_area_fraction", mask), ("mean_aleatoric", aleatoric),
                                 ("mean_epistemic", epistemic))} for b in range(len(mask))]
    return {"mask": mask, "maps": {"aleatoric": aleatoric, "epistemic": epistemic}, "rows": rows}


# ==================== main =========================================================================

def main(argv=None):
    args = common.parse_args(build_parser(), SCRIPT, argv, resolve_defaults)
    if args.predict:  # --predict PATH --checkpoint RUN/ensemble-seed0/best.pt: masks, uncertainty maps, CSV
        return common.run_predict(args, load_model, predict_batch, SCRIPT)
    checkpoint = None
    if args.eval_only:  # the checkpoint's ensemble, architecture and seeds; no training
        checkpoint = load_ensemble_checkpoint(args.checkpoint)
        common.restore_architecture(args, checkpoint, ARCHITECTURE)
        args.seeds = [int(seed) for seed in checkpoint["seeds"]]
    seeds = common.seed_list(args)
    # the jobs of step 1 (their count only names the torchrun mode: M = 5 annotation slots, ISIC and synthetic)
    run = common.open_run(args, SCRIPT, n_jobs=len(seeds) * (5 + 4 * args.baselines))
    cache = {}
    first = seed_data(args, seeds[0], run.device, cache)
    rows = table_rows(first.n_models, args.baselines)

    # 1. every trained row of every seed: one job each, shared out across processes under torchrun
    training = []
    if checkpoint is None:
        results = common.run_jobs(run, [(row.name, seed) for seed in seeds for row in trained(rows)],
                                  lambda job: train_row(job, cache))
        training = [{"table": "training", "test_set": "val", "reference": "annotation", **row}
                    for row in results or []]  # None on torchrun's other processes
    # 2. every seed's tables from the trained rows' best.pt (Table 1, Table 2, Fig. 3-4 in numbers, meta mode)
    evaluated = common.run_jobs(run, [("ensemble", seed) for seed in seeds],
                                lambda job: evaluate_seed(job, cache, checkpoint))
    if evaluated is None:  # torchrun: the other processes
        return None
    grouped = {}  # every seed's entries by (table, row, test set, reference): mean, <metric>_se, "per_seed"
    for result in evaluated[0]["per_seed"]:  # the "ensemble" jobs' results, one per seed
        for entry in result["entries"]:
            key = (entry["table"], entry["row"], entry["test_set"], entry["reference"])
            grouped.setdefault(key, []).append({**entry, "seed": result["seed"], "rank": result["rank"]})
    summary = {key: common.summarize_rows({key[1]: entries})[0] for key, entries in grouped.items()}
    table = list(summary.values()) + training

    # the main metrics: the run's fusion row (Table 1) and the deep ensemble (Table 2) on ISIC (synthetic: "test")
    first_test = list(first.tests)[0]
    main1 = summary["1", main_fusion_row(rows, args.fusion), first_test, "annotation"]
    main2 = summary["2", string.ascii_uppercase[first.n_models], first_test, "annotation"]
    metrics = {**{key: main1[key] for key in ("jaccard", "jaccard_se", "jaccard_image_se")},
               **{key: main2[key] for key in ("nll", "nll_se", "brier", "brier_se")}}
    for key in ("zero_weight_inconsistent", "zero_weight_consistent", "tv_train_vs_eval"):  # mean over base models
        values = [e[key] for e in table if e["table"] in ("fig3-4", "meta-mode") and key in e]
        metrics[key] = sum(values) / len(values) if values else None
    metrics.update({f"removed_overlap_{e['row']}": e["removed"] for e in table if e["table"] == "overlap"})
    speeds = [e["images_per_s"] for e in training if e.get("images_per_s") is not None]
    metrics["images_per_s"] = sum(speeds) / len(speeds) if speeds else None
    markdown = report_markdown(args, seeds, rows, first_test, table)
    common.write_results(run, metrics, table, markdown, split=first_test)
    return run.dir


if __name__ == "__main__":
    common.cli(main)
