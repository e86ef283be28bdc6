"""Uncertainty-informed Mutual Learning (UML) for joint medical image classification and segmentation.

Reference: K. Ren, K. Zou, X. Liu, Y. Chen, X. Yuan, X. Shen, M. Wang, H. Fu, "Uncertainty-Informed
Mutual Learning for Joint Medical Image Classification and Segmentation", MICCAI 2023
(../shared/papers/uml.txt). Authors' code: github.com/KarryRen/UML.

Idea. Two encoders read the image: a VGG-16-style one for the diagnosis (f_i^c) and a Res2Net-style
one for the segmentation (f_i^s). A Feature Mixer (Pairwise Channel Map Interaction, PCMI) mixes them
into mutual features f_i^m. Evidential deep learning turns network outputs into Dirichlet
distributions, which give a belief per class and one uncertainty mass, both for the image (the
diagnosis) and for every pixel. A Mutual Feature Decoder reads f^m and gives a first evidential
segmentation M = alpha^s with pixel-wise uncertainty U^s; the Uncertainty Navigator (UN) decodes the
segmentation features under the guidance of M and U^s (where the mutual view is unsure it is damped
by exp(-U^s)); the Uncertainty Instructor (UI) gates the classification features with the reliable
segmentation feature r^s; the diagnosis is evidential too.

Paper -> code
    Sec. 2 dual backbone ..................... VGGEncoder (f^c), Res2NetEncoder + Res2NetBottleneck (f^s)
    Sec. 2 Feature Mixer / PCMI .............. PolarizedSelfAttention, PairwiseChannelMapInteraction
    Eq. 1-2 belief b = e/S, uncertainty K/S .. evidential_opinion
    Sec. 2.3 Step 1, Mutual Feature Decoder .. MutualFeatureDecoder (M = alpha^s, U^s)
    Eq. 3 M^r = (s_1 + M) * exp(-U^s) ........ reliable_mask (used in UncertaintyNavigator)
    Eq. 4 r^s = Cat(Conv(M^r), Cat(f_1^s, f_2^b)) ... UncertaintyNavigator.forward
    Eq. 5 r^c = f_4^c + Conv(d^3(r^s)) * f_4^c  ... reliable_classification_feature, UncertaintyInstructor
    Eq. 6 L_mut = L_ice + l1 KL + l2 Dice ....... ice_loss, kl_loss, dice_loss, mutual_loss
    Eq. 7 L_cls = L_ace + l_c KL ................ ace_loss, kl_loss, classification_loss
    Eq. 8 L_seg = sum_i Dice(up(s_i), GT) ....... segmentation_loss
    Eq. 9 L = 0.1 L_mut + 0.5 L_cls + 0.4 L_seg . total_loss
    KL annealing min(1, epoch / T) (TBraTS) ..... annealing_coefficient
    Table 1 (EC, TBraTS, BCS, ECS, UML) ......... --method, --table1; model_spec
    Table 2 (Gaussian noise sigma) .............. --noise-sigmas, --table2; evaluate(sigma=...)
    Table 3 (BCS, +MD, +MD+UI, +MD+UI+UN) ....... --no-mutual-decoder/--no-uncertainty-instructor/
                                                  --no-uncertainty-navigator, --table3
    Fig. 3 (input+GT, belief+u, seg, pixel u; clean and noisy) ... figure_fig3 -> figures/fig3.png

What PCMI computes as implemented (the paper only cites [26]; this follows the authors' released
PairWiseFeatureMixer): at each level i, both maps are projected by 1x1 conv-BN-ReLU to the same C_i
channels; the two stacks are interleaved channel by channel (channel 2k = classification map k,
2k+1 = segmentation map k: the "pairs"); polarized self-attention (Liu et al. 2021) re-weights the
2C_i interleaved maps, first per channel (a channel weight computed from both branches jointly:
sigmoid(LN(W_z(W_v x . softmax(W_q x))))), then per pixel (sigmoid(softmax(GAP(W_q' x)) . W_v' x);
the softmax over channels is the PSA paper's, the authors' copy omits it);
a 1x1 conv-BN-ReLU fuses the 2C_i maps into the C_i mutual maps f_i^m. The interleaving is a fixed
permutation: the learned 1x1 convolutions that follow would do the same job on any channel order, so
the pairwise interaction itself is carried by the attention weights and the fusion conv.

Usage
    python uml.py                                   # UML on synthetic-fundus, CPU-sized, + noise rows
    python uml.py --data synthetic-breast           # I-SPY 1-like task (tumour + pCR)
    python uml.py --data refuge --root /data/REFUGE # the paper's setting: 256 px, 100 epochs, batch 8
    python uml.py --data ispy1 --root /data/ISPY1
    python uml.py --table1                          # EC, TBraTS, BCS, ECS, UML
    python uml.py --table2                          # BCS, ECS, UML at sigma 0, 0.01, 0.03, 0.05
    python uml.py --table3                          # BCS, +MD, +MD+UI, +MD+UI+UN
    python uml.py --method ecs                      # one baseline
    python uml.py --no-uncertainty-navigator        # one ablation
    python uml.py --eval-only --checkpoint runs/<run>/best.pt
    python uml.py --quick --table1 --table2 --table3   # smoke test of every path

Deviations and resolved ambiguities
    - No pretrained weights (the paper uses ImageNet VGG-16 / Res2Net-50): everything trains from
      scratch, widths scale with --width (paper-sized: --width 64, --res2net-blocks 3,4,6).
    - The paper names VGG-16 for classification and Res2Net for segmentation; the authors' released
      code swaps them (and later uses Res2Net for both). We follow the paper.
    - Fundus segmentation: the evidential heads use K = 3 mutually exclusive classes per pixel
      (background, rim, cup), one Dirichlet over K = 3; disc = rim + cup (mask >= 1) and cup are
      evaluated as in REFUGE. (The authors' released evaluation scores label 1, the rim, as "disc".)
    - s_1..s_4 are plain logits (softmax + Dice, Eq. 8), as in the authors' code; M is evidential.
      The Dice of an evidential output uses its expected probability alpha/S (the authors apply a
      softmax to the evidence). Dice losses average over all classes, background included, with
      sums pooled over the batch.
    - Eq. 8 is a sum over the four levels as printed (the authors' code averages them: /4).
    - Eq. 4 is taken literally: r^s concatenates Conv(M^r) with the raw Cat(f_1^s, f_2^b) (the input
      of the top decoder block); the segmentation itself is s_1. The same Eq. 3 gate is applied at
      the bottom level (with d^3(M), d^3(U^s)), and the bottom feature Cat(f_4^s, f_4^m) is multiplied
      by exp(-d^3(U^s)) ("U^s also guides the bottom feature"), as in the authors' code.
    - "Combine the last mutual layer with the original feature": Cat(f_4^c, f_4^m) -> conv block is the
      f_4^c of Eq. 5, and Cat(f_4^s, f_4^m) is the UN's bottom feature (authors' code).
    - KL weights l1 = l_c = 1 are annealed by min(1, epoch / T) with T = half the epochs (authors'
      config: 50 of 100); l2 = 1 (authors' code: L_ice + L_KL + L_Dice). Epochs count from 0.
    - Baselines (not specified in the paper beyond one sentence each): EC = VGG encoder + evidential
      head; TBraTS = Res2Net encoder + decoder with an evidential output (ice + KL + Dice); BCS = both
      encoders, the feature mixer, the segmentation decoder without UN and a softmax classifier
      (cross-entropy, Dice); ECS = BCS with both outputs evidential. Table 3's "+MD" rows are UML
      with UN and/or UI switched off, so the classifier is evidential from "+MD" on.
    - For non-evidential outputs (BCS) "belief" is the softmax probability and the image-level
      uncertainty is 1 - max probability (only for the uncertainty AUROC / ECE columns).
    - F1 is the positive (glaucoma / pCR) class's F1 (the authors' code reports a weighted F1).
    - Model selection: the epoch with the best validation mean of ACC, F1 and the Dice scores (as in
      the authors' code); test numbers are computed with those weights.
    - Learning rate: Adam, initial 1e-4 on real data (Sec. 3), 1e-3 on the synthetic benchmarks (a
      CPU-sized run has only ~1000 steps from scratch), with the authors' poly decay (power 0.9).
    - Augmentation (flips, small rotations/scaling, colour jitter) is on by default; the paper is
      silent. Noise of Table 2 is added on the [0, 1] scale before normalisation, not clipped.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "uml"
DATASETS = {"synthetic": "synthetic-fundus", "synthetic-fundus": "synthetic-fundus",
            "synthetic-breast": "synthetic-breast", "refuge": "refuge", "ispy1": "ispy1", "folder": "folder"}
METHODS = ("uml", "ec", "tbrats", "bcs", "ecs")
ARCHITECTURE_ARGS = ("method", "mutual_decoder", "uncertainty_instructor", "uncertainty_navigator", "width",
                     "res2net_blocks", "res2net_scale", "res2net_base_width", "size")

# ==================================================================================================
# Arguments
# ==================================================================================================


def build_parser():
    p = argparse.ArgumentParser(
        description="UML (Ren et al., MICCAI 2023): evidential joint classification and segmentation.",
        epilog="Defaults marked [real/synthetic] take the paper's value on real data (Sec. 3) and a "
               "CPU-sized value on the synthetic benchmarks.")
    common.add_common_args(p, size=None, epochs=None, batch_size=8, lr=None, data="synthetic",
                           data_choices=sorted(DATASETS))
    for action in p._actions:  # the shared flags whose default depends on the data (Sec. 3 vs CPU-sized)
        real_vs_synthetic = {"size": "256 / 64", "epochs": "100 / 40", "lr": "1e-4 / 1e-3"}.get(action.dest)
        if real_vs_synthetic:
            action.help = action.help.split(" (default")[0] + f" [real / synthetic: {real_vs_synthetic}]"
    p.add_argument("--method", choices=METHODS, default="uml",
                   help="Table 1 row: uml, ec (evidential classification only), tbrats (evidential "
                        "segmentation only), bcs (plain joint baseline), ecs (evidential joint)")
    p.add_argument("--mutual-decoder", action=argparse.BooleanOptionalAction, default=True,
                   help="MD of Table 3: Mutual Feature Decoder supervised by L_mut (Eq. 6); uml only")
    p.add_argument("--uncertainty-instructor", action=argparse.BooleanOptionalAction, default=True,
                   help="UI of Table 3 (Eq. 5); uml only")
    p.add_argument("--uncertainty-navigator", action=argparse.BooleanOptionalAction, default=True,
                   help="UN of Table 3 (Eq. 3-4; needs the mutual decoder); uml only")
    p.add_argument("--table1", action="store_true", help="train and report every row of Table 1")
    p.add_argument("--table2", action="store_true", help="Table 2: BCS, ECS, UML under input noise")
    p.add_argument("--table3", action="store_true", help="Table 3: the ablation BCS, +MD, +MD+UI, +MD+UI+UN")
    p.add_argument("--noise-sigmas", default="0,0.01,0.03,0.05",
                   help="Gaussian noise std on the [0,1] input scale for Table 2 (Sec. 3); the main run "
                        "is evaluated at every sigma (cheap: no training)")
    p.add_argument("--width", type=int, default=None,
                   help="base channel width of both encoders (VGG-16: 64) [real 64 / synthetic 8]")
    p.add_argument("--res2net-blocks", default=None,
                   help="bottleneck blocks in the three Res2Net stages (Res2Net-50: 3,4,6) "
                        "[real 3,4,6 / synthetic 1,1,1]")
    p.add_argument("--res2net-scale", type=int, default=4, help="Res2Net scale s (26w x 4s)")
    p.add_argument("--res2net-base-width", type=int, default=26, help="Res2Net base width w (26w x 4s)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="Adam regulariser scale (Sec. 3)")
    p.add_argument("--lr-power", type=float, default=0.9,
                   help="poly decay lr (1 - step/steps)^power of the authors' code (the paper: 'initial "
                        "learning rate'); 0 = constant")
    p.add_argument("--loss-weights", type=float, nargs=3, default=(0.1, 0.5, 0.4),
                   metavar=("W_MUT", "W_CLS", "W_SEG"), help="w^m, w^c, w^s of Eq. 9")
    p.add_argument("--lambda-kl-mut", type=float, default=1.0, help="lambda_1^m of Eq. 6 (annealed)")
    p.add_argument("--lambda-dice-mut", type=float, default=1.0, help="lambda_2^m of Eq. 6")
    p.add_argument("--lambda-kl-cls", type=float, default=1.0, help="lambda^c of Eq. 7 (annealed)")
    p.add_argument("--annealing-epochs", type=float, default=None,
                   help="T of the KL annealing min(1, epoch/T) (TBraTS); default half of --epochs "
                        "(authors' config: 50 of 100)")
    p.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction, default=True,
                   help="Dice on all four UN outputs s_1..s_4 (Eq. 8); off = s_1 only")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="on-device flips, rotation, scaling, colour jitter (the paper is silent)")
    p.add_argument("--n-train", type=int, default=None, help="synthetic sets: training images")
    p.add_argument("--n-val", type=int, default=None, help="synthetic sets: validation images")
    p.add_argument("--n-test", type=int, default=None, help="synthetic sets: test images")
    p.add_argument("--figure-images", type=int, default=3, help="test images shown in Fig. 3")
    return p


def resolve_defaults(args):
    """Fills the [real/synthetic] defaults; --quick shrinks everything to a smoke test."""
    args.dataset = DATASETS[args.data]
    synthetic = args.dataset.startswith("synthetic")
    if args.quick:
        args.size = args.size or 32
        args.epochs = args.epochs or 1
        args.width = args.width or 4
        args.res2net_blocks = args.res2net_blocks or "1,1,1"
        args.n_train, args.n_val, args.n_test = args.n_train or 16, args.n_val or 8, args.n_test or 8
        args.figure_images = min(args.figure_images, 2)
    args.size = args.size or (64 if synthetic else 256)
    args.epochs = args.epochs or (40 if synthetic else 100)
    args.lr = args.lr or (1e-3 if synthetic else 1e-4)  # from scratch, a few hundred CPU steps need more
    args.width = args.width or (8 if synthetic else 64)
    args.res2net_blocks = args.res2net_blocks or ("1,1,1" if synthetic else "3,4,6")
    if args.annealing_epochs is None:
        args.annealing_epochs = max(args.epochs / 2, 1.0)
    if args.res2net_scale < 2:
        raise SystemExit("--res2net-scale must be at least 2 (one split passes through, the others are convolved)")
    if args.size % 8:
        raise SystemExit(f"--size must be a multiple of 8 (three 2x down-samplings), not {args.size}")
    if args.method == "uml" and args.uncertainty_navigator and not args.mutual_decoder:
        raise SystemExit("--uncertainty-navigator needs the mutual decoder (M and U^s come from it)")
    args.sigmas = [float(s) for s in str(args.noise_sigmas).split(",")]
    return args


# ==================================================================================================
# Model: dual backbone
# ==================================================================================================


def conv_bn_relu(in_ch, out_ch, kernel=3):
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class VGGEncoder(nn.Module):
    """First four VGG-16 blocks (2, 2, 3, 3 conv-BN-ReLU; widths w, 2w, 4w, 8w) -> f_1^c..f_4^c at
    H, H/2, H/4, H/8 (the fifth block and the FC layers are not used, as in the authors' vgg16)."""

    def __init__(self, width):
        super().__init__()
        self.channels = [width, 2 * width, 4 * width, 8 * width]
        stages, in_ch = [], 3
        for i, (n_convs, ch) in enumerate(zip((2, 2, 3, 3), self.channels)):
            layers = [nn.MaxPool2d(2)] if i else []
            for _ in range(n_convs):
                layers.append(conv_bn_relu(in_ch, ch))
                in_ch = ch
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features  # f_1^c .. f_4^c


class Res2NetBottleneck(nn.Module):
    """Res2Net bottleneck (Gao et al. 2019): 1x1 conv to s splits of w' channels, hierarchical 3x3
    convs y_1 = K_1(x_1), y_i = K_i(x_i + y_{i-1}), the last split passed through (pooled in the
    first block of a stage, where the convs stride and there is no hierarchy), 1x1 conv to 4 planes,
    residual."""

    expansion = 4

    def __init__(self, in_ch, planes, stride=1, base_width=26, scale=4, first=False):
        super().__init__()
        self.split = max(1, planes * base_width // 64)
        self.scale, self.first = scale, first
        out_ch = planes * self.expansion
        self.reduce = nn.Sequential(nn.Conv2d(in_ch, self.split * scale, 1, bias=False),
                                    nn.BatchNorm2d(self.split * scale), nn.ReLU(inplace=True))
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(self.split, self.split, 3, stride, 1, bias=False),
                          nn.BatchNorm2d(self.split), nn.ReLU(inplace=True)) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, stride, 1) if first else nn.Identity()
        self.expand = nn.Sequential(nn.Conv2d(self.split * scale, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                                          nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        splits = torch.split(self.reduce(x), self.split, dim=1)
        ys = []
        for i, conv in enumerate(self.convs):
            xi = splits[i] if (i == 0 or self.first) else splits[i] + ys[-1]
            ys.append(conv(xi))
        ys.append(self.pool(splits[-1]))
        return F.relu(self.expand(torch.cat(ys, dim=1)) + self.shortcut(x))


class Res2NetEncoder(nn.Module):
    """Res2Net-50-v1b-style encoder: a 3-conv stem at full resolution (f_1^s, w channels), max-pool,
    then three stages of bottlenecks (planes w, 2w, 4w; strides 1, 2, 2) -> f_2^s..f_4^s with 4w, 8w,
    16w channels at H/2, H/4, H/8 (the authors drop layer4 too)."""

    def __init__(self, width, blocks=(3, 4, 6), base_width=26, scale=4):
        super().__init__()
        half = max(width // 2, 1)
        self.stem = nn.Sequential(conv_bn_relu(3, half), conv_bn_relu(half, half), conv_bn_relu(half, width))
        self.channels = [width]
        stages, in_ch = [], width
        for i, (n_blocks, planes) in enumerate(zip(blocks, (width, 2 * width, 4 * width))):
            stride = 1 if i == 0 else 2
            layers = [nn.MaxPool2d(3, 2, 1)] if i == 0 else []
            for b in range(n_blocks):
                layers.append(Res2NetBottleneck(in_ch, planes, stride if b == 0 else 1, base_width, scale,
                                                first=b == 0))
                in_ch = planes * Res2NetBottleneck.expansion
            stages.append(nn.Sequential(*layers))
            self.channels.append(in_ch)
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features  # f_1^s .. f_4^s


# ==================================================================================================
# Model: Feature Mixer (PCMI)
# ==================================================================================================


class PolarizedSelfAttention(nn.Module):
    """Sequential polarized self-attention (Liu et al. 2021), as in the authors' feature mixer."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.channel_value, self.channel_query = nn.Conv2d(channels, half, 1), nn.Conv2d(channels, 1, 1)
        self.channel_up, self.channel_norm = nn.Conv2d(half, channels, 1), nn.LayerNorm(channels)
        self.spatial_value, self.spatial_query = nn.Conv2d(channels, half, 1), nn.Conv2d(channels, half, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        # channel-only branch: one weight per channel from a softmax-pooled summary of all pixels
        value = self.channel_value(x).flatten(2)                            # [B, C/2, HW]
        query = self.channel_query(x).flatten(2).softmax(-1)                # [B, 1, HW]
        z = torch.bmm(value, query.transpose(1, 2)).unsqueeze(-1)           # [B, C/2, 1, 1]
        channel_weight = torch.sigmoid(self.channel_norm(self.channel_up(z).flatten(1))).view(b, c, 1, 1)
        x = channel_weight * x
        # spatial-only branch: one weight per pixel from a softmax over the pooled channel query
        value = self.spatial_value(x).flatten(2)                            # [B, C/2, HW]
        query = self.spatial_query(x).mean((2, 3)).softmax(-1).unsqueeze(1)  # [B, 1, C/2]
        spatial_weight = torch.sigmoid(torch.bmm(query, value)).view(b, 1, h, w)
        return x + spatial_weight * x


class PairwiseChannelMapInteraction(nn.Module):
    """One level of the Feature Mixer: (f_i^c, f_i^s) -> f_i^m (see the module docstring)."""

    def __init__(self, cls_ch, seg_ch, out_ch):
        super().__init__()
        self.project_cls, self.project_seg = conv_bn_relu(cls_ch, out_ch, 1), conv_bn_relu(seg_ch, out_ch, 1)
        self.attention = PolarizedSelfAttention(2 * out_ch)
        self.fuse = conv_bn_relu(2 * out_ch, out_ch, 1)

    def forward(self, f_cls, f_seg):
        pairs = torch.stack((self.project_cls(f_cls), self.project_seg(f_seg)), dim=2)  # [B, C, 2, H, W]
        pairs = pairs.flatten(1, 2)  # channel 2k = classification map k, 2k+1 = segmentation map k
        return self.fuse(self.attention(pairs))


# ==================================================================================================
# Model: evidential heads, decoders, UN, UI
# ==================================================================================================


def evidential_opinion(logits, dim=1):
    """Eq. 1-2: evidence e = softplus(logits), alpha = e + 1, S = sum alpha, b = e / S, u = K / S."""
    evidence = F.softplus(logits)
    alpha = evidence + 1
    strength = alpha.sum(dim, keepdim=True)                                  # S
    belief = evidence / strength                                             # b_k
    uncertainty = logits.shape[dim] / strength                               # u = K / S
    return alpha, belief, uncertainty


def down(x, times):
    """d^n of Eq. 5: n 2x2 average-poolings."""
    return F.avg_pool2d(x, 2 ** times) if times else x


def reliable_mask(s, m, u):
    """Eq. 3: M^r = (s + M) * exp(-U^s); U^s [B,1,H,W] broadcasts over the K classes."""
    return (s + m) * torch.exp(-u)


def reliable_classification_feature(f_cls, eta):
    """Eq. 5: r^c = f_4^c + eta * f_4^c, with eta = Conv(d^3(r^s))."""
    return f_cls + eta * f_cls


class MutualFeatureDecoder(nn.Module):
    """Step 1: U-Net decoder over f_1^m..f_4^m -> per-pixel evidential output M = alpha^s and U^s."""

    def __init__(self, channels, n_classes):
        super().__init__()
        self.ups = nn.ModuleList(common.Up(channels[i + 1], channels[i], channels[i], mode="bilinear")
                                 for i in reversed(range(3)))
        self.head = nn.Conv2d(channels[0], n_classes, 1)

    def forward(self, mutual):
        x = mutual[3]
        for up, skip in zip(self.ups, reversed(mutual[:3])):
            x = up(x, skip)
        alpha, _, uncertainty = evidential_opinion(self.head(x).float())
        return alpha, uncertainty  # M [B,K,H,W], U^s [B,1,H,W]


class UncertaintyNavigator(nn.Module):
    """Step 2: U-Net-like segmentation decoder giving s_1..s_4 and r^s. With navigate=False it is
    the plain decoder of the baselines (no M / U^s; r^s = Cat(f_1^s, f_2^b))."""

    def __init__(self, seg_ch, mutual_bottom_ch, n_classes, navigate):
        super().__init__()
        w1, w2, w3, w4 = seg_ch[0], seg_ch[0] * 2, seg_ch[0] * 4, seg_ch[0] * 8
        self.navigate = navigate
        self.bottom = conv_bn_relu(seg_ch[3] + mutual_bottom_ch, w4, 1)
        self.up3 = common.Up(w4, seg_ch[2], w3, mode="bilinear")
        self.up2 = common.Up(w3, seg_ch[1], w2, mode="bilinear")
        self.top = common.DoubleConv(seg_ch[0] + w2, w1)                     # Conv(Cat(f_1^s, f_2^b))
        self.heads = nn.ModuleList(nn.Conv2d(c, n_classes, 1) for c in (w1, w2, w3, w4))
        if navigate:
            self.mask_conv_bottom = conv_bn_relu(n_classes, w4, 1)
            self.fuse_bottom = conv_bn_relu(2 * w4, w4, 1)
            self.mask_conv_top = conv_bn_relu(n_classes, w1, 1)
        self.rs_channels = (w1 if navigate else 0) + seg_ch[0] + w2

    def forward(self, seg, mutual_bottom=None, m=None, u=None):
        x = seg[3] if mutual_bottom is None else torch.cat([seg[3], mutual_bottom], 1)
        if self.navigate:
            x = x * torch.exp(-down(u, 3))                     # U^s guides the bottom feature
        x = self.bottom(x)
        s4 = self.heads[3](x)
        if self.navigate:                                      # Eq. 3-4 at the bottom level
            m_r4 = reliable_mask(s4, down(m, 3), down(u, 3))
            x = self.fuse_bottom(torch.cat([self.mask_conv_bottom(m_r4), x], 1))
        x = self.up3(x, seg[2])
        s3 = self.heads[2](x)
        x = self.up2(x, seg[1])
        s2 = self.heads[1](x)
        f_2b = F.interpolate(x, size=seg[0].shape[-2:], mode="bilinear", align_corners=False)
        top_in = torch.cat([seg[0], f_2b], 1)                 # Cat(f_1^s, f_2^b)
        s1 = self.heads[0](self.top(top_in))
        m_r = None
        if self.navigate:
            m_r = reliable_mask(s1, m, u)                      # Eq. 3
            r_s = torch.cat([self.mask_conv_top(m_r), top_in], 1)  # Eq. 4
        else:
            r_s = top_in
        return [s1, s2, s3, s4], r_s, m_r


class UncertaintyInstructor(nn.Module):
    """Eq. 5: gates the classification feature with the reliable segmentation feature r^s."""

    def __init__(self, rs_ch, cls_ch):
        super().__init__()
        self.conv = common.DoubleConv(rs_ch, cls_ch)

    def forward(self, f_cls, r_s):
        eta = self.conv(down(r_s, 3))                                        # Conv(d^3(r^s))
        return reliable_classification_feature(f_cls, eta)


def model_spec(method, mutual_decoder=True, instructor=True, navigator=True):
    """Which components a Table 1 / Table 3 row uses (one model class, switched by flags)."""
    if method == "ec":
        return dict(cls=True, seg=False, evidential_cls=True, evidential_seg=False, md=False, ui=False, un=False)
    if method == "tbrats":
        return dict(cls=False, seg=True, evidential_cls=False, evidential_seg=True, md=False, ui=False, un=False)
    if method in ("bcs", "ecs"):
        ev = method == "ecs"
        return dict(cls=True, seg=True, evidential_cls=ev, evidential_seg=ev, md=False, ui=False, un=False)
    return dict(cls=True, seg=True, evidential_cls=True, evidential_seg=False,
                md=mutual_decoder, ui=instructor, un=navigator and mutual_decoder)


class UMLNet(nn.Module):
    """Dual backbone -> Feature Mixer -> Mutual Feature Decoder -> UN (segmentation) -> UI
    (classification). Components absent from `spec` are not built (baselines, ablations)."""

    def __init__(self, spec, n_classes, n_seg_classes, width, res2net_blocks, base_width=26, scale=4):
        super().__init__()
        self.spec = spec
        joint = spec["cls"] and spec["seg"]
        self.cls_encoder = VGGEncoder(width) if spec["cls"] else None
        self.seg_encoder = Res2NetEncoder(width, res2net_blocks, base_width, scale) if spec["seg"] else None
        mix_ch = [width, 2 * width, 4 * width, 8 * width]
        self.mixer = None
        if joint:
            self.mixer = nn.ModuleList(PairwiseChannelMapInteraction(c, s, m) for c, s, m in
                                       zip(self.cls_encoder.channels, self.seg_encoder.channels, mix_ch))
        self.mutual_decoder = MutualFeatureDecoder(mix_ch, n_seg_classes) if spec["md"] else None
        if spec["seg"]:
            self.navigator = UncertaintyNavigator(self.seg_encoder.channels, mix_ch[3] if joint else 0,
                                                  n_seg_classes, spec["un"])
        if spec["cls"]:
            cls_ch = self.cls_encoder.channels[3]
            self.cls_mix = common.DoubleConv(cls_ch + (mix_ch[3] if joint else 0), cls_ch)
            self.instructor = UncertaintyInstructor(self.navigator.rs_channels, cls_ch) if spec["ui"] else None
            self.classifier = nn.Linear(cls_ch, n_classes)

    def forward(self, x):
        out = {}
        f_cls = self.cls_encoder(x) if self.cls_encoder is not None else None
        f_seg = self.seg_encoder(x) if self.seg_encoder is not None else None
        f_mut = [mix(c, s) for mix, c, s in zip(self.mixer, f_cls, f_seg)] if self.mixer is not None else None
        m = u = None
        if self.mutual_decoder is not None:
            m, u = self.mutual_decoder(f_mut)                                    # Step 1
            out["mutual_alpha"], out["mutual_uncertainty"] = m, u
        r_s = None
        if f_seg is not None:                                                    # Step 2
            out["seg"], r_s, out["reliable_mask"] = self.navigator(
                f_seg, f_mut[3] if f_mut is not None else None, m, u)
        if f_cls is not None:                                                    # Step 3
            f4 = f_cls[3] if f_mut is None else torch.cat([f_cls[3], f_mut[3]], 1)
            f4 = self.cls_mix(f4)
            if self.instructor is not None:
                f4 = self.instructor(f4, r_s)
            out["cls_logits"] = self.classifier(f4.mean((2, 3)))                 # GAP -> FC
        return out


# ==================================================================================================
# Losses (Eq. 6-9)
# ==================================================================================================


def ace_loss(alpha, labels):
    """Eq. 7, L_ace: adjusted cross-entropy sum_k y_k (psi(S) - psi(alpha_k)), mean over images."""
    y = F.one_hot(labels, alpha.shape[1]).to(alpha.dtype)
    strength = alpha.sum(1, keepdim=True)
    return (y * (torch.digamma(strength) - torch.digamma(alpha))).sum(1).mean()


def ice_loss(alpha, masks):
    """Eq. 6, L_ice: the same digamma form per pixel (alpha [B,K,H,W], masks [B,H,W]), pixel mean."""
    y = F.one_hot(masks.long(), alpha.shape[1]).permute(0, 3, 1, 2).to(alpha.dtype)
    strength = alpha.sum(1, keepdim=True)
    return (y * (torch.digamma(strength) - torch.digamma(alpha))).sum(1).mean()


def kl_to_uniform_dirichlet(alpha, dim=1):
    """KL(Dir(alpha) || Dir(1)) = ln G(S) - ln G(K) - sum ln G(alpha_k) + sum (alpha_k - 1)(psi(alpha_k) - psi(S))."""
    k = alpha.shape[dim]
    strength = alpha.sum(dim, keepdim=True)
    return (torch.lgamma(strength).squeeze(dim) - math.lgamma(k) - torch.lgamma(alpha).sum(dim)
            + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(strength))).sum(dim))


def kl_loss(alpha, y):
    """L_KL of Eq. 6-7: KL(Dir(alpha~) || Dir(1)) with the target's evidence removed,
    alpha~ = y + (1 - y) * alpha (y one-hot along dim 1); mean over images / pixels."""
    alpha_tilde = y + (1 - y) * alpha
    return kl_to_uniform_dirichlet(alpha_tilde, dim=1).mean()


def annealing_coefficient(epoch, annealing_epochs):
    """min(1, epoch / T): the KL term grows from 0 so that early training is not pushed to ignorance."""
    return min(1.0, epoch / annealing_epochs)


def dice_loss(prob, masks, eps=1e-5):
    """Soft Dice loss 1 - mean_k 2 sum(p y) / (sum p + sum y) (prob [B,K,H,W], masks [B,H,W])."""
    y = F.one_hot(masks.long(), prob.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    intersection = (prob * y).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + y.sum((0, 2, 3))
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


def evidential_segmentation_loss(alpha, masks, kl_weight, dice_weight):
    """L_ice + kl_weight * L_KL + dice_weight * Dice(alpha / S), the TBraTS loss (Eq. 6's form)."""
    y = F.one_hot(masks.long(), alpha.shape[1]).permute(0, 3, 1, 2).to(alpha.dtype)
    prob = alpha / alpha.sum(1, keepdim=True)
    return ice_loss(alpha, masks) + kl_weight * kl_loss(alpha, y) + dice_weight * dice_loss(prob, masks)


def mutual_loss(m, masks, kl_weight, dice_weight):
    """Eq. 6: L_mut = L_ice(M, GT) + l1 L_KL(M) + l2 L_Dice(M, GT), with M = alpha^s."""
    return evidential_segmentation_loss(m, masks, kl_weight, dice_weight)


def classification_loss(logits, labels, evidential, kl_weight):
    """Eq. 7: L_cls = L_ace(alpha^c, label) + l_c L_KL(alpha^c); cross-entropy for BCS."""
    if not evidential:
        return F.cross_entropy(logits, labels)
    alpha, _, _ = evidential_opinion(logits)
    y = F.one_hot(labels, alpha.shape[1]).to(alpha.dtype)
    return ace_loss(alpha, labels) + kl_weight * kl_loss(alpha, y)


def segmentation_loss(seg, masks, evidential, deep_supervision, kl_weight, dice_weight):
    """Eq. 8: L_seg = sum_i Dice(v^{i-1}(s_i), GT). With an evidential output (TBraTS, ECS) the
    s_1 term is the evidential loss of Eq. 6's form instead of a plain Dice."""
    size = masks.shape[-2:]
    if evidential:
        alpha, _, _ = evidential_opinion(seg[0])
        loss = evidential_segmentation_loss(alpha, masks, kl_weight, dice_weight)
    else:
        loss = dice_loss(seg[0].softmax(1), masks)
    for s in (seg[1:] if deep_supervision else []):
        loss = loss + dice_loss(F.interpolate(s, size=size, mode="bilinear", align_corners=False).softmax(1), masks)
    return loss


def total_loss(out, masks, labels, spec, args, epoch):
    """Eq. 9: L = w^m L_mut + w^c L_cls + w^s L_seg (terms of absent components dropped).
    Returns (L, [L_mut, L_cls, L_seg]) with absent terms as zeros."""
    w_mut, w_cls, w_seg = args.loss_weights
    anneal = annealing_coefficient(epoch, args.annealing_epochs)
    zero = masks.new_zeros((), dtype=torch.float32)
    l_mut = l_cls = l_seg = zero
    if spec["md"]:
        l_mut = mutual_loss(out["mutual_alpha"], masks, anneal * args.lambda_kl_mut, args.lambda_dice_mut)
    if spec["cls"]:
        l_cls = classification_loss(out["cls_logits"].float(), labels, spec["evidential_cls"],
                                    anneal * args.lambda_kl_cls)
    if spec["seg"]:
        l_seg = segmentation_loss([s.float() for s in out["seg"]], masks, spec["evidential_seg"],
                                  args.deep_supervision, anneal * args.lambda_kl_mut, args.lambda_dice_mut)
    return w_mut * l_mut + w_cls * l_cls + w_seg * l_seg, torch.stack([l_mut, l_cls, l_seg])


# ==================================================================================================
# Training
# ==================================================================================================


def row_specs():
    """Paper row name -> (slug, model spec). Table 3's last row is the full UML."""
    return {
        "EC": ("ec", model_spec("ec")), "TBraTS": ("tbrats", model_spec("tbrats")),
        "BCS": ("bcs", model_spec("bcs")), "ECS": ("ecs", model_spec("ecs")),
        "UML": ("uml", model_spec("uml")),
        "+MD": ("uml-md", model_spec("uml", True, False, False)),
        "+MD+UI": ("uml-md-ui", model_spec("uml", True, True, False)),
    }


def main_row(args):
    """The row named by --method and the ablation flags (the run's headline metrics)."""
    spec = model_spec(args.method, args.mutual_decoder, args.uncertainty_instructor, args.uncertainty_navigator)
    for name, (slug, s) in row_specs().items():
        if s == spec:
            return name, slug, spec
    slug = "uml" + "".join(f"-no-{k}" for k in ("md", "ui", "un") if not spec[k])
    return slug.upper(), slug, spec


def build_model(spec, args, n_classes, n_seg_classes):
    blocks = tuple(int(b) for b in str(args.res2net_blocks).split(","))
    if len(blocks) != 3:
        raise SystemExit(f"--res2net-blocks needs three numbers, got {args.res2net_blocks!r}")
    return UMLNet(spec, n_classes, n_seg_classes, args.width, blocks, args.res2net_base_width, args.res2net_scale)


def model_input(images, norm, device, sigma=0.0, generator=None):
    """uint8 -> [0,1] (+ Gaussian noise of std sigma, Table 2) -> normalised float, channels_last on CUDA."""
    x = common.to_float(images)
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    x = (x - norm[0].view(1, -1, 1, 1)) / norm[1].view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def train_row(model, slug, spec, args, data, norm, run, device, is_main, resume_state=None):
    """Trains one row's model; returns it with the best-validation weights loaded."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    train, val = data["train"], data["val"]
    n_train = train["images"].shape[0]
    drop_last = n_train >= args.batch_size
    steps = n_train // args.batch_size if drop_last else 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # poly decay, one scheduler step per batch
        optimizer, lambda step: max(1 - step / (steps * args.epochs), 0.0) ** args.lr_power)
    last_name, best_name = ("last.pt", "best.pt") if is_main else (f"{slug}-last.pt", f"{slug}-best.pt")
    start, best = 0, -math.inf
    if resume_state is not None:
        start, best = common.restore_state(resume_state, model, optimizer, scheduler)
        best = -math.inf if best is None else best
        print(f"[{slug}] resumed after epoch {start}")
    progress = common.Progress(steps * (args.epochs - start), every=args.log_every)
    generator = torch.Generator(device=device)
    step = 0
    for epoch in range(start, args.epochs):
        model.train()
        progress.set_epoch(epoch)
        generator.manual_seed(args.seed * 1000 + epoch)  # the shuffle of an epoch does not depend on resume
        sums = torch.zeros(4, device=device)             # L, L_mut, L_cls, L_seg summed over the epoch
        batches = common.iterate_batches(train, args.batch_size, shuffle=True, generator=generator,
                                         drop_last=drop_last)
        while True:
            tick = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            if args.augment:
                batch = common.augment(batch, generator, flip=True, rotate=10.0, scale=0.05, color=0.05)
            wait = time.perf_counter() - tick
            with common.autocast(device, args.amp):
                out = model(model_input(batch["images"], norm, device))
            masks = batch["masks"].long()
            labels = batch["labels"] if spec["cls"] else None
            loss, parts = total_loss(out, masks, labels, spec, args, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += torch.cat([loss.detach()[None], parts.detach()])
            step += 1
            mean = progress.step(loss, images=batch["images"].shape[0], wait_s=wait)
            if mean is not None:
                common.check_finite(mean, f"{slug} epoch {epoch} step {step}", run)
        epoch_means = (sums / steps).tolist()                # one host sync per epoch
        common.check_finite(epoch_means[0], f"{slug} epoch {epoch}", run)
        val_metrics = evaluate(model, val, spec, data, norm, args, device, surface=False)["metrics"]
        score = selection_score(val_metrics)
        record = {"row": slug, "epoch": epoch + 1, "loss": epoch_means[0], "loss_mut": epoch_means[1],
                  "loss_cls": epoch_means[2], "loss_seg": epoch_means[3], "val_score": score,
                  **{f"val_{k}": v for k, v in val_metrics.items()}}
        run.log(record)
        state = common.checkpoint_state(model, optimizer, scheduler, epoch + 1, max(best, score), args)
        state.update(row=slug, normalization=[norm[0].cpu(), norm[1].cpu()])
        if score > best:
            best = score
            run.save(best_name, state)
        run.save(last_name, state)
        print(f"[{slug}] epoch {epoch + 1}/{args.epochs} loss {epoch_means[0]:.4f} val score {score:.4f}")
    speed = progress.summary()
    run.log({"row": slug, "event": "speed", **speed})
    print(f"[{slug}] {speed['images_per_s']:.1f} img/s, data wait {100 * speed['data_wait_share']:.0f}% "
          "(step time spent waiting for batches)")
    plain_module(model).load_state_dict(common.load_checkpoint(run.path(best_name), SCRIPT, device)["model"])
    return model


def plain_module(model):
    return getattr(model, "_orig_mod", model)  # torch.compile keeps the original module here


def selection_score(metrics):
    """Validation mean of ACC, F1 and the Dice scores (the authors' model selection)."""
    values = [v for k, v in metrics.items() if (k in ("acc", "f1") or k.startswith("dice_")) and v is not None
              and math.isfinite(v)]
    return sum(values) / len(values) if values else -math.inf


# ==================================================================================================
# Evaluation
# ==================================================================================================


def structures(mask_names):
    """Evaluated structure -> function of the class-index mask. Fundus: disc = mask >= 1, cup."""
    names = [n.lower() for n in mask_names]
    if "cup" in names:
        cup = names.index("cup")
        return {"disc": lambda m: m >= 1, "cup": lambda m: m == cup}
    if len(names) == 2:
        name = "tumor" if any(t in names[1] for t in ("tumo", "lesion", "foreground")) else names[1]
        return {name: lambda m: m == 1}
    return {n.replace(" ", "_"): (lambda m, k=k: m == k) for k, n in enumerate(names) if k > 0}


@torch.no_grad()
def predict(model, split, spec, norm, args, device, sigma=0.0):
    """Batched forward pass over a split. Returns CPU tensors: class probability / belief /
    image-level uncertainty, predicted labels, segmentation and pixel-wise uncertainty."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed + 7919 + int(round(sigma * 1e4)))
    keys = ("prob", "belief", "uncertainty", "seg", "pixel_uncertainty")
    collected = {k: [] for k in keys}
    for batch in common.iterate_batches(split, args.batch_size, shuffle=False):
        with common.autocast(device, args.amp):
            out = model(model_input(batch["images"], norm, device, sigma, generator))
        if spec["cls"]:
            logits = out["cls_logits"].float()
            if spec["evidential_cls"]:
                alpha, belief, u = evidential_opinion(logits)                   # Eq. 1
                prob, u = alpha / alpha.sum(1, keepdim=True), u[:, 0]
            else:
                prob = belief = logits.softmax(1)
                u = 1 - prob.max(1).values
            collected["prob"].append(prob.cpu())
            collected["belief"].append(belief.cpu())
            collected["uncertainty"].append(u.cpu())
        if spec["seg"]:
            s1 = out["seg"][0].float()
            collected["seg"].append(s1.argmax(1).to(torch.uint8).cpu())
            if spec["md"]:
                pixel_u = out["mutual_uncertainty"][:, 0]                         # U^s (Eq. 2)
            elif spec["evidential_seg"]:
                pixel_u = evidential_opinion(s1)[2][:, 0]
            else:
                pixel_u = 1 - s1.softmax(1).max(1).values
            collected["pixel_uncertainty"].append(pixel_u.float().cpu())
    return {k: torch.cat(v) if v else None for k, v in collected.items()}


def evaluate(model, split, spec, data, norm, args, device, sigma=0.0, surface=True):
    """Metrics of one split: acc, f1, uncertainty_auroc, ece; dice_/assd_ per structure."""
    pred = predict(model, split, spec, norm, args, device, sigma)
    metrics, undefined, extra = {}, {}, {}
    if spec["cls"]:
        labels = split["labels"].cpu()
        predicted = pred["prob"].argmax(1)
        correct = predicted == labels
        metrics["acc"] = common.accuracy(predicted, labels)
        metrics["f1"] = common.f1_score(predicted, labels, n_classes=data["n_classes"], positive=1)
        metrics["uncertainty_auroc"] = common.auroc(pred["uncertainty"], ~correct)
        confidence = pred["belief"].gather(1, predicted[:, None])[:, 0]  # belief of the predicted class
        metrics["ece"] = common.expected_calibration_error(confidence, correct)
        extra.update(confidence=confidence, correct=correct)
    if spec["seg"]:
        masks = split["masks"].cpu()
        for name, select in data["structures"].items():
            p, t = select(pred["seg"]), select(masks)
            metrics[f"dice_{name}"] = common.dice(p, t).mean().item()
            if surface:
                distances = common.assd(p, t)
                finite = torch.isfinite(distances)
                metrics[f"assd_{name}"] = distances[finite].mean().item() if finite.any() else math.nan
                undefined[f"assd_{name}"] = int((~finite).sum())
    return {"metrics": metrics, "undefined": undefined, **extra}


# ==================================================================================================
# Report: Tables 1-3 and Fig. 3
# ==================================================================================================

TABLE_ROWS = {1: ["EC", "TBraTS", "BCS", "ECS", "UML"], 2: ["BCS", "ECS", "UML"], 3: ["BCS", "+MD", "+MD+UI", "UML"]}


def metric_columns(data):
    cols = ["acc", "f1"] + [f"{m}_{name}" for name in data["structures"] for m in ("dice", "assd")]
    return cols + ["uncertainty_auroc", "ece"]


def column_title(key):
    titles = {"acc": "ACC", "f1": "F1", "uncertainty_auroc": "AUROC(u, error)", "ece": "ECE"}
    return titles.get(key) or key.replace("dice_", "DI_").replace("assd_", "ASSD_")


def markdown_cell(row, key):
    """3 decimals as in the paper; '\\' where the method has no such output; undefined ASSD counted."""
    value = row.get(key)
    if value is None:
        return "\\"
    n_undefined = row["undefined"].get(key, 0)
    return (f"{value:.3f}" if math.isfinite(value) else "n/a") + (f" ({n_undefined} undef.)" if n_undefined else "")


def results_markdown(table, data, args):
    columns = metric_columns(data)
    parts = [f"# UML results: {args.dataset}, test split\n",
             "Dice as a fraction, ASSD in pixels (mean over the images where both masks are non-empty; "
             "'undef.' counts the others), as in the paper. AUROC(u, error) and ECE go beyond the paper: "
             "how well the image-level uncertainty flags wrong diagnoses, and the calibration of the belief.\n"]

    def add(rows, lead, title):
        cells = [{**{c: r[c] for c in lead}, **{column_title(k): markdown_cell(r, k) for k in columns}} for r in rows]
        parts.append(common.markdown_table(cells, lead + [column_title(k) for k in columns], title=title))

    add([r for r in table if r["table"] == 1], ["Method"], "Table 1: classification and segmentation")
    for sigma in sorted({r["sigma"] for r in table if r["table"] == 2}):
        add([r for r in table if r["table"] == 2 and r["sigma"] == sigma], ["Method"],
            f"Table 2: Gaussian noise sigma = {sigma:.2f}")
    if any(r["table"] == 3 for r in table):
        add([r for r in table if r["table"] == 3], ["MD", "UI", "UN"], "Table 3: ablation")
    parts.append(f"Command: `{args.command}`\n")
    return "\n".join(parts)


def build_table(results, args, data, main_name):
    """results.json "table": one dict per row of Tables 1-3 that this run produced."""
    clean = min(args.sigmas, key=abs)

    def record(name, table_no, sigma):
        evaluation, spec = results[name][sigma], results[name]["spec"]
        return {"row": name if table_no != 2 else f"{name} sigma={sigma:.2f}", "table": table_no, "sigma": sigma,
                "Method": "UML (ours)" if name == "UML" else name,
                **({k.upper(): "✓" if spec[k] else "-" for k in ("md", "ui", "un")} if table_no == 3 else {}),
                **{k: evaluation["metrics"].get(k) for k in metric_columns(data)}, "undefined": evaluation["undefined"]}

    chosen = {t: TABLE_ROWS[t] if getattr(args, f"table{t}") else ([main_name] if t < 3 else []) for t in (1, 2, 3)}
    table = [record(n, 1, clean) for n in chosen[1] if n in results]
    table += [record(n, 2, s) for s in args.sigmas for n in chosen[2] if n in results]
    return table + [record(n, 3, clean) for n in chosen[3]]


def figure_fig3(model, split, spec, data, norm, args, device, path):
    """Fig. 3: per image, a clean row and a noisy row (largest sigma): input + GT, belief and
    image-level uncertainty, segmentation, pixel-wise uncertainty."""
    labels, n = split["labels"], split["images"].shape[0]
    first_of_class = [int((labels == c).nonzero()[0]) for c in range(data["n_classes"])
                      if labels is not None and (labels == c).any()]
    picks = list(dict.fromkeys(first_of_class + list(range(n))))[:args.figure_images]
    subset = {k: (v[picks] if torch.is_tensor(v) else v) for k, v in split.items()}
    sigmas = (0.0, max(args.sigmas))
    colours = ["yellow", "cyan", "magenta", "lime"]
    fig, axes = plt.subplots(2 * len(picks), 4, figsize=(13, 6.2 * len(picks)), squeeze=False)
    for j, sigma in enumerate(sigmas):
        pred = predict(model, subset, spec, norm, args, device, sigma)
        generator = torch.Generator(device=device).manual_seed(args.seed + 7919 + int(round(sigma * 1e4)))
        shown = model_input(subset["images"], (torch.zeros_like(norm[0]), torch.ones_like(norm[1])), device,
                            sigma, generator).float().cpu().clamp(0, 1)   # what the model saw, on [0, 1]
        for i, index in enumerate(picks):
            ax = axes[2 * i + j]
            common.show_image(ax[0], shown[i])
            for (name, select), colour in zip(data["structures"].items(), colours):
                common.draw_contours(ax[0], select(subset["masks"][i].cpu()), colour, label=f"GT {name}")
            truth = f", {data['class_names'][int(labels[index])]}" if labels is not None else ""
            ax[0].set_title(f"{split['names'][index]}, sigma={sigma:.2f}{truth}", fontsize=9)
            ax[0].legend(loc="lower right", fontsize=7)
            for a in ax[1:]:
                a.set_axis_off()
            if spec["cls"]:
                ax[1].set_axis_on()
                values = pred["belief"][i].tolist() + [float(pred["uncertainty"][i])]
                ax[1].bar(range(len(values)), values, color=["tab:blue"] * data["n_classes"] + ["tab:red"])
                ax[1].set_xticks(range(len(values)), list(data["class_names"]) + ["uncertainty"], fontsize=8)
                ax[1].set_ylim(0, 1)
                ax[1].set_title("belief b_k and uncertainty u (Eq. 1)", fontsize=9)
            if spec["seg"]:
                common.show_image(ax[2], shown[i])
                for (name, select), colour in zip(data["structures"].items(), colours):
                    common.draw_contours(ax[2], select(pred["seg"][i]), colour, label=name)
                ax[2].set_title("segmentation s_1", fontsize=9)
                common.plot_uncertainty(ax[3], pred["pixel_uncertainty"][i],
                                        title="pixel-wise uncertainty" + (" U^s" if spec["md"] else ""))
    fig.tight_layout()
    common.save_figure(fig, path)


def plot_row_curves(run, slug):
    """Loss and validation curves of one row (log.jsonl holds the records of every row)."""
    lines = [line for line in run.path("log.jsonl").read_text().splitlines() if json.loads(line).get("row") == slug]
    filtered = run.path(f".curves-{slug}.jsonl")
    filtered.write_text("\n".join(lines) + "\n")
    try:
        common.plot_curves(filtered, ["loss", "loss_mut", "loss_cls", "loss_seg", "val_score"],
                           run.figures / f"curves_{slug}.png")
    finally:
        filtered.unlink()


# ==================================================================================================
# main
# ==================================================================================================


def load_data(args, device):
    counts = (("n_train", args.n_train), ("n_val", args.n_val), ("n_test", args.n_test))
    options = {k: v for k, v in counts if v is not None} if args.dataset.startswith("synthetic") else {}
    splits = common.load_dataset(args.dataset, root=args.root, size=args.size, seed=args.seed,
                                 cache=args.cache, **options)
    if "test" not in splits or ("train" not in splits and not args.eval_only):
        raise SystemExit(f"{args.dataset}: uml.py needs a test split and, to train, a training split "
                         f"(found {sorted(splits)}); a test-only set works with --eval-only --checkpoint")
    if "val" not in splits and "train" in splits:
        print("no validation split: model selection on the training split")
        splits["val"] = splits["train"]
    reference = splits.get("train", splits["test"])
    if reference["masks"].dim() != 3:
        raise SystemExit(f"{args.dataset}: uml.py needs one mask per image, got {tuple(reference['masks'].shape)}")
    data = {k: common.to_device(v, device) for k, v in splits.items() if k in ("train", "val", "test")}
    data.update(n_classes=len(reference["class_names"]), n_seg_classes=len(reference["mask_names"]),
                class_names=reference["class_names"], structures=structures(reference["mask_names"]))
    return data


def main(argv=None):
    args = resolve_defaults(build_parser().parse_args(argv))
    args.command = "python uml.py " + " ".join(sys.argv[1:] if argv is None else argv)
    common.seed_everything(args.seed)
    device = common.choose_device(args.device)
    resume_state = common.load_checkpoint(args.resume, SCRIPT, device) if args.resume else None
    if resume_state is not None and args.out is None:
        args.out = str(Path(args.resume).parent)  # keep best.pt and log.jsonl of the interrupted run
    checkpoint = None
    if args.eval_only:
        if not args.checkpoint:
            raise SystemExit("--eval-only needs --checkpoint PATH")
        checkpoint = common.load_checkpoint(args.checkpoint, SCRIPT, device)
        for key in ARCHITECTURE_ARGS:  # the architecture comes from the checkpoint
            setattr(args, key, checkpoint["args"][key])
    run = common.Run(args, SCRIPT, device)
    data = load_data(args, device)
    if checkpoint is not None:
        norm = tuple(t.float().to(device) for t in checkpoint["normalization"])
    else:
        norm = tuple(t.to(device) for t in common.channel_stats(data["train"]["images"]))

    main_name, main_slug, main_spec = main_row(args)
    rows = {**row_specs(), main_name: (main_slug, main_spec)}
    wanted = [main_name] + [n for t in (1, 2, 3) if getattr(args, f"table{t}") for n in TABLE_ROWS[t]]
    wanted = list(dict.fromkeys(wanted)) if checkpoint is None else [main_name]
    if data["test"]["labels"] is None and any(rows[n][1]["cls"] for n in wanted):
        raise SystemExit(f"{args.dataset} has no image labels; only --method tbrats can run on it")

    results = {}
    for name in wanted:
        slug, spec = rows[name]
        common.seed_everything(args.seed)  # every row starts from the same initialisation RNG
        model = common.prepare_model(build_model(spec, args, data["n_classes"], data["n_seg_classes"]), device,
                                     args.compile)
        if checkpoint is not None:
            plain_module(model).load_state_dict(checkpoint["model"])
        else:
            resume = resume_state if resume_state is not None and resume_state.get("row") == slug else None
            model = train_row(model, slug, spec, args, data, norm, run, device, slug == main_slug, resume)
            plot_row_curves(run, slug)
        results[name] = {s: evaluate(model, data["test"], spec, data, norm, args, device, s) for s in args.sigmas}
        results[name]["spec"] = spec
        if slug == main_slug:
            figure_fig3(model, data["test"], spec, data, norm, args, device, run.figures / "fig3.png")
            if spec["cls"]:
                clean = results[name][min(args.sigmas, key=abs)]
                common.plot_reliability(clean["confidence"], clean["correct"], run.figures / "reliability.png")

    table = build_table(results, args, data, main_name)
    markdown = results_markdown(table, data, args)
    metrics = results[main_name][min(args.sigmas, key=abs)]["metrics"]  # the main row on clean input
    common.write_results(run.dir, SCRIPT, args.dataset, "test", metrics, table, args, markdown)
    print(markdown + f"\nresults in {run.dir}")
    return run.dir


if __name__ == "__main__":
    main()
