"""Uncertainty-informed Mutual Learning (UML) for joint medical image classification and segmentation.

Reference: K. Ren, K. Zou, X. Liu, Y. Chen, X. Yuan, X. Shen, M. Wang, H. Fu, "Uncertainty-Informed Mutual
Learning for Joint Medical Image Classification and Segmentation", MICCAI 2023 (../shared/papers/uml.txt).
Authors' code: github.com/KarryRen/UML.

Idea. A VGG-16 encoder (diagnosis, f_i^c) and a Res2Net encoder (segmentation, f_i^s) are mixed into mutual
features f_i^m. Evidential deep learning turns outputs into Dirichlet distributions: a belief per class and
one uncertainty mass, per image and per pixel. A first evidential mask M with pixel-wise uncertainty U^s
guides the segmentation decoder, whose reliable feature r^s in turn gates the (evidential) diagnosis.

Paper -> code
    Sec. 2 dual backbone ..... VGGEncoder, Res2NetEncoder (the ImageNet files' layouts: load_imagenet_weights)
    Sec. 2 Feature Mixer ..... PairwiseChannelMapInteraction, PolarizedSelfAttention (the authors' mixer)
    Eq. 1-2 b = e/S, u = K/S . evidential_opinion
    Step 1 ................... MutualFeatureDecoder (M = alpha^s, U^s)
    Eq. 3 M^r = (s_1 + M) exp(-U^s), Eq. 4 r^s = Cat(Conv(M^r), Cat(f_1^s, f_2^b)) ... UncertaintyNavigator
    Eq. 5 r^c = f_4^c + Conv(d^3(r^s)) f_4^c ... reliable_classification_feature, UncertaintyInstructor
    Eq. 6 L_mut = L_ice + l1 KL + l2 Dice ...... ice_loss, kl_loss, dice_loss, mutual_loss
    Eq. 7 L_cls = L_ace + l_c KL ............... ace_loss, kl_loss, classification_loss
    Eq. 8 L_seg = sum_i Dice(up(s_i), GT) ...... segmentation_loss (--eq8 sum | mean: the authors')
    Eq. 9 L = 0.1 L_mut + 0.5 L_cls + 0.4 L_seg  total_loss;  KL annealing: annealing_coefficient
    Baselines, ablations ... ECNet, TBraTSNet; in UMLNet: NoMutualDecoder, SegmentationDecoder (no UN), NoInstructor
    Tables 1-3 ... ROWS (one ModelSpec per row; build_model), TABLES, --table1/2/3;  Fig. 3 ... figure_fig3
    Metrics in two forms, both in results.json: the authors' evaluation code's and ours (FORMS_NOTE; their
    F1 is support-weighted: 0.857 at ACC 0.853 with ~10 % glaucoma cannot be a positive-class F1).

Usage
    python uml.py                                   # UML on synthetic-fundus, CPU-sized, + noise rows
    python uml.py --data synthetic-breast           # I-SPY 1-like task (tumour + pCR)
    python uml.py --data refuge --root /data/REFUGE --pretrained-vgg vgg16-397923af.pth \\
        --pretrained-res2net res2net50_v1b_26w_4s-3cf99910.pth   # the paper's setting
    python uml.py --table1 --seeds 0,1,2            # also --table2 (noise), --table3 (ablation)
    python uml.py --method ecs ; python uml.py --no-uncertainty-navigator   # a baseline, an ablation
    python uml.py --eval-only --checkpoint runs/<run>/UML-seed0/best.pt   # files: <out>/<row>-seed<seed>/
    python uml.py --resume runs/<run>               # continue an interrupted run (finished rows are kept)

Deviations and resolved ambiguities
    - From scratch by default (widths scale with --width); ImageNet weights with --pretrained-* (batch norms
      then trained; the authors freeze them). VGG has batch norm (vgg16_bn) unless --no-vgg-batch-norm or a
      plain vgg16 file. Res2Net's first stem conv has stride 1 (the file's: 2), as the authors', so f_1^s is
      at full resolution like f_1^c. VGG-16 classifies, Res2Net segments, as the paper says (the code swaps).
    - Dice loss = 1 - Dice (class mean, background included, batch sums; authors: -log Dice), on alpha/S when
      evidential (authors: softmax of the evidence). Eq. 8 sums the four levels as printed: L_seg weighs 4x
      the authors' (--eq8 mean divides by 4).
    - Eq. 4 literally: r^s = Cat(Conv(M^r), Cat(f_1^s, f_2^b)); the segmentation is s_1. Eq. 3 also applies
      at the bottom level, where Cat(f_4^s, f_4^m) is multiplied by exp(-d^3(U^s)) (text, code). "Combine the
      last mutual layer with the original feature": Cat(f_4^c, f_4^m) -> conv is Eq. 5's f_4^c (authors').
    - PCMI pairs c_k with s_k (the authors' shuffle orders c0, c4, ..., s0, s4, ...: equal up to the learned
      1x1 convs that follow); PSA keeps its paper's channel softmax in the spatial branch (authors omit it).
    - KL weights l1 = l_c = 1 annealed by min(1, epoch / T), T = half the epochs (authors: 50 of 100). Adam
      1e-4 on real data (Sec. 3), 1e-3 on synthetic sets (from scratch, few CPU steps); authors' adjust_lr:
      held for the first 30 % of the epochs (their 30/100), then poly decay (0.9) per step, floor 1e-5.
    - Baselines (a sentence each in the paper): EC = VGG + evidential head; TBraTS = Res2Net encoder-decoder,
      evidential output (ice + KL + Dice), no deep supervision (TBraTS has none); BCS = both encoders, mixer,
      decoder without UN, softmax classifier, plain Dice; ECS = BCS with both outputs evidential; Table 3's
      "+MD" rows: UML with UN and/or UI off. A softmax output's image-level uncertainty is 1 - max prob.
    - Model selection on the validation mean of ACC, F1 and Dice (authors). Augmentation (flips, small
      rotation and scale, colour jitter) on; the paper is silent. Table 2 noise is added on the [0, 1] scale,
      clipped to [0, 1] before normalisation (authors). Real images are letterboxed into the --size canvas
      (paper: resized to 256 x 256); metrics are taken on the canvas, padding ignored.
"""
import argparse
import math
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


SCRIPT = "uml"
DATASETS = {"synthetic": "synthetic-fundus", "synthetic-fundus": "synthetic-fundus",
            "synthetic-breast": "synthetic-breast", "refuge": "refuge", "ispy1": "ispy1", "folder": "folder"}
REAL_DEFAULTS = dict(size=256, epochs=100, lr=1e-4, width=64, res2net_blocks=[3, 4, 6])
SYNTHETIC_DEFAULTS = dict(size=64, epochs=40, lr=1e-3, width=8, res2net_blocks=[1, 1, 1])
QUICK_DEFAULTS = dict(size=32, epochs=1, width=4, res2net_blocks=[1, 1, 1], n_train=16, n_val=8, n_test=8)
ARCHITECTURE_ARGS = ("method", "mutual_decoder", "uncertainty_instructor", "uncertainty_navigator", "width",
                     "res2net_blocks", "res2net_scale", "res2net_base_width", "vgg_batch_norm", "size")

# ========================================== Arguments =============================================

def build_parser():
    p = argparse.ArgumentParser(
        description="UML (Ren et al., MICCAI 2023): evidential joint classification and segmentation.",
        epilog=f"--size, --epochs, --lr, --width and --res2net-blocks default to the paper's values on real "
               f"data {REAL_DEFAULTS} and to CPU-sized ones on the synthetic sets {SYNTHETIC_DEFAULTS}.")
    common.add_common_args(p, size=None, epochs=None, batch_size=8, lr=None, data="synthetic",
                           data_choices=sorted(DATASETS))
    add, on_off = p.add_argument, argparse.BooleanOptionalAction
    add("--method", choices=("uml", "ec", "tbrats", "bcs", "ecs"), default="uml", help="Table 1 row: uml, ec "
        "(evidential classifier), tbrats (evidential segmenter), bcs (plain joint), ecs (evidential joint)")
    add("--mutual-decoder", action=on_off, default=True, help="MD of Table 3 (Eq. 6); uml only")
    add("--uncertainty-instructor", action=on_off, default=True, help="UI of Table 3 (Eq. 5); uml only")
    add("--uncertainty-navigator", action=on_off, default=True, help="UN of Table 3 (Eq. 3-4; needs MD)")
    for t, what in ((1, "EC, TBraTS, BCS, ECS, UML"), (2, "BCS, ECS, UML under noise"), (3, "BCS, +MD, +MD+UI, UML")):
        add(f"--table{t}", action="store_true", help=f"Table {t}: train and report {what}")
    add("--noise-sigmas", type=common.checked_list(float, distinct=True, low=0), default=[0.0, 0.01, 0.03, 0.05],
        help="Table 2 Gaussian noise std on the [0,1] scale; every trained row is evaluated at each")
    add("--width", type=common.POSITIVE_INT, default=None, help="base width of both encoders (VGG-16, Res2Net-50: 64)")
    add("--res2net-blocks", type=common.checked_list(int, low=1), default=None,
        help="bottlenecks of Res2Net stages 1-3 (Res2Net-50: 3,4,6)")
    add("--res2net-scale", type=common.checked(int, low=2), default=4,
        help="Res2Net scale s (26w x 4s; at least 2: one split passes through, the others are convolved)")
    add("--res2net-base-width", type=common.POSITIVE_INT, default=26, help="Res2Net base width w (26w x 4s)")
    add("--vgg-batch-norm", action=on_off, default=None,
        help="batch norm in the VGG encoder (vgg16_bn layout); default on, or as the --pretrained-vgg file")
    add("--pretrained-vgg", metavar="PATH", help="ImageNet VGG weights: torchvision's vgg16-397923af.pth "
        "(or vgg16_bn-6c64b313.pth); inputs then use the ImageNet mean and std")
    add("--pretrained-res2net", metavar="PATH", help="ImageNet Res2Net weights: res2net50_v1b_26w_4s-3cf99910.pth")
    add("--weight-decay", type=common.NONNEGATIVE, default=1e-5, help="Adam regulariser scale (Sec. 3)")
    add("--lr-power", type=common.NONNEGATIVE, default=0.9, help="poly decay power (authors' code); 0 = constant")
    add("--lr-hold-epochs", type=common.NONNEGATIVE,
        help="epochs at the initial rate (default 30%% of --epochs, authors')")
    add("--lr-floor", type=common.NONNEGATIVE, default=1e-5, help="lower bound of the rate (authors' code)")
    add("--loss-weights", type=common.NONNEGATIVE, nargs=3, default=(0.1, 0.5, 0.4),
        metavar=("W_MUT", "W_CLS", "W_SEG"), help="w^m, w^c, w^s of Eq. 9")
    add("--lambda-kl-mut", type=common.NONNEGATIVE, default=1.0, help="lambda_1^m of Eq. 6 (annealed)")
    add("--lambda-dice-mut", type=common.NONNEGATIVE, default=1.0, help="lambda_2^m of Eq. 6")
    add("--lambda-kl-cls", type=common.NONNEGATIVE, default=1.0, help="lambda^c of Eq. 7 (annealed)")
    add("--annealing-epochs", type=common.POSITIVE,
        help="T of the KL annealing min(1, epoch/T) (default epochs/2, authors')")
    add("--deep-supervision", action=on_off, default=True, help="Eq. 8 over s_1..s_4; off = s_1 only")
    add("--eq8", choices=("sum", "mean"), default="sum", help="Eq. 8: sum (the paper) or mean (authors' code)")
    add("--augment", action=on_off, default=True, help="on-device flips, rotation, scaling, colour jitter")
    add("--figure-images", type=common.POSITIVE_INT, default=3, help="test images shown in Fig. 3")
    return p


def resolve_defaults(args):
    """Fills the data-dependent defaults; --quick shrinks everything to a smoke test."""
    args.dataset = DATASETS[args.data]
    common.fill_defaults(args, QUICK_DEFAULTS if args.quick else {},
                         SYNTHETIC_DEFAULTS if args.dataset.startswith("synthetic") else REAL_DEFAULTS)
    args.figure_images = min(args.figure_images, 2) if args.quick else args.figure_images
    common.fill_defaults(args, dict(annealing_epochs=max(args.epochs / 2, 1.0), lr_hold_epochs=0.3 * args.epochs))
    if args.vgg_batch_norm is None:  # follow the file: torchvision's vgg16_bn has running statistics
        args.vgg_batch_norm = not args.pretrained_vgg or (
            "features.1.running_var" in read_state_dict(args.pretrained_vgg, "--pretrained-vgg"))
    if len(args.res2net_blocks) != 3:
        raise common.UsageError(f"--res2net-blocks takes three block counts (stages 1-3), not {args.res2net_blocks}")
    if args.size % 8:
        raise common.UsageError(f"--size must be a multiple of 8 (three 2x down-samplings), not {args.size}")
    if args.method == "uml" and args.uncertainty_navigator and not args.mutual_decoder:
        raise common.UsageError("--uncertainty-navigator needs the mutual decoder (M and U^s come from it)")
    paper_size = (args.width, args.res2net_blocks, args.res2net_scale, args.res2net_base_width)
    if (args.pretrained_vgg or args.pretrained_res2net) and paper_size != (64, [3, 4, 6], 4, 26):
        raise common.UsageError("--pretrained-vgg/--pretrained-res2net need the paper-size encoders: --width 64 "
                         f"--res2net-blocks 3,4,6 --res2net-scale 4 --res2net-base-width 26 (got {paper_size})")
    return args


# ============ Model: dual backbone (VGG-16, Res2Net-50 v1b) in their ImageNet files' layout ============

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what ImageNet weights expect


class VGGEncoder(nn.Module):
    """VGG-16's blocks 1-4 (2, 2, 3, 3 convs of w, 2w, 4w, 8w; max-pools between) -> f_1^c..f_4^c at H..H/8
    (conv1_2, conv2_2, conv3_3, conv4_3) as torchvision's `features`; block 5, classifier unused (UML's)."""

    def __init__(self, width, batch_norm=True):
        super().__init__()
        self.channels, layers, in_ch = [width, 2 * width, 4 * width, 8 * width], [], 3
        for block, (n_convs, ch) in enumerate(zip((2, 2, 3, 3), self.channels)):
            layers += [nn.MaxPool2d(2)] if block else []
            for _ in range(n_convs):  # conv [-> batch norm] -> ReLU, as torchvision's make_layers
                conv, in_ch = nn.Conv2d(in_ch, ch, 3, padding=1), ch
                layers += [conv, nn.BatchNorm2d(ch)] if batch_norm else [conv]
                layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.unused_keys = ("classifier.",) + tuple(f"features.{n}." for n in range(len(layers), 64))

    def forward(self, x):
        levels = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):  # a block ends: its output is one level
                levels.append(x)
            x = layer(x)
        return levels + [x]  # f_1^c .. f_4^c


class Res2NetBottleneck(nn.Module):
    """Res2Net bottleneck (Gao et al. 2019): 1x1 conv to s splits x_1..x_s of w' channels, hierarchical 3x3
    convs y_1 = K_1(x_1), y_i = K_i(x_i + y_{i-1}), x_s passed through (average-pooled in a stage's first
    block, whose convs stride and have no hierarchy), 1x1 conv, residual (v1b: average pool then 1x1 conv
    on the first block's shortcut). Names as in res2net_v1b.py (conv1, convs, bns, conv3, downsample)."""

    def __init__(self, in_ch, planes, stride=1, base_width=26, scale=4, first=False):
        super().__init__()
        self.split, self.first, out_ch = max(1, planes * base_width // 64), first, planes * 4
        self.conv1 = nn.Conv2d(in_ch, self.split * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.split * scale)
        self.convs = nn.ModuleList(nn.Conv2d(self.split, self.split, 3, stride, 1, bias=False)
                                   for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(self.split) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, stride, 1) if first else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(self.split * scale, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        self.downsample = nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                                        nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
                                        ) if first else nn.Identity()

    def forward(self, x):
        splits = torch.split(F.relu(self.bn1(self.conv1(x))), self.split, dim=1)   # x_1 .. x_s
        ys = []
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            ys.append(F.relu(bn(conv(splits[i] if (i == 0 or self.first) else splits[i] + ys[-1]))))  # y_i
        ys.append(self.pool(splits[-1]))
        return F.relu(self.bn3(self.conv3(torch.cat(ys, dim=1))) + self.downsample(x))


class Res2NetEncoder(nn.Module):
    """Res2Net-50 v1b as res2net_v1b.py: deep stem (3x3 convs of w/2, w/2, w), max-pool, layer1-3 (planes
    w, 2w, 4w; strides 1, 2, 2) -> f_1^s (stem, H), f_2^s..f_4^s (4w..16w, H/2..H/8); layer4 unused."""

    unused_keys = ("layer4.", "fc.")

    def __init__(self, width, blocks=(3, 4, 6), base_width=26, scale=4):
        super().__init__()
        half = max(width // 2, 1)
        self.conv1 = nn.Sequential(  # the deep stem (the file's first conv has stride 2: Deviations)
            nn.Conv2d(3, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, 1, 1, bias=False))
        self.bn1, self.maxpool = nn.BatchNorm2d(width), nn.MaxPool2d(3, 2, 1)
        self.channels = [width]
        for i, (n_blocks, planes) in enumerate(zip(blocks, (width, 2 * width, 4 * width))):
            stride = 2 if i else 1  # a stage's first block strides (except in stage 1)
            first = Res2NetBottleneck(self.channels[-1], planes, stride, base_width, scale, first=True)
            rest = [Res2NetBottleneck(planes * 4, planes, 1, base_width, scale) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(first, *rest))
            self.channels.append(planes * 4)

    def forward(self, x):
        f_1 = F.relu(self.bn1(self.conv1(x)))
        f_2 = self.layer1(self.maxpool(f_1))
        f_3 = self.layer2(f_2)
        return [f_1, f_2, f_3, self.layer3(f_3)]  # f_1^s .. f_4^s


def read_state_dict(path, flag):
    """The tensors of a weights file (or of its {"state_dict": ...}); UsageError naming `flag` if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, corrupt, or not a plain tensor file
        raise common.UsageError(f"{flag} {path}: cannot read it as a PyTorch state dict ({error})") from error
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise common.UsageError(f"{flag} {path}: not a state dict of tensors")
    return state


def load_imagenet_weights(model, vgg_path=None, res2net_path=None):
    """ImageNet weights (--pretrained-vgg / --pretrained-res2net) into whichever encoders the row has, by the
    files' own keys (the layers after f_4 left out); a missing, unexpected or misshapen key stops with its name."""
    for flag, path, name in (("--pretrained-vgg", vgg_path, "cls_encoder"),
                             ("--pretrained-res2net", res2net_path, "seg_encoder")):
        encoder = getattr(model, name, None)  # EC has no Res2Net, TBraTS no VGG
        if path and encoder is not None:
            state = {k: v for k, v in read_state_dict(path, flag).items() if not k.startswith(encoder.unused_keys)}
            try:
                encoder.load_state_dict(state, strict=True)
            except RuntimeError as error:  # torch names every missing, unexpected and misshapen key
                keys = " ".join(str(error).split())
                raise common.UsageError(f"{flag} {path} does not fit the encoder (another file, or a layout option "
                                        f"such as batch norm): {keys[:600]}") from None
            print(f"{flag}: loaded {len(state)} tensors from {path} (the layers after f_4 are not used)")


# =============== Model: Feature Mixer (PCMI), evidential heads, decoders, UN, UI ==================

def pointwise(in_ch, out_ch):
    """1x1 conv -> batch norm -> ReLU: the mixer's and the navigator's projections."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


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
        channel_weighted = torch.sigmoid(self.channel_norm(self.channel_up(z).flatten(1))).view(b, c, 1, 1) * x
        # spatial-only branch: one weight per pixel from a softmax over the pooled channel query
        value = self.spatial_value(channel_weighted).flatten(2)                         # [B, C/2, HW]
        query = self.spatial_query(channel_weighted).mean((2, 3)).softmax(-1).unsqueeze(1)  # [B, 1, C/2]
        spatial_weight = torch.sigmoid(torch.bmm(query, value)).view(b, 1, h, w)
        return channel_weighted + spatial_weight * channel_weighted


class PairwiseChannelMapInteraction(nn.Module):
    """One level of the Feature Mixer: (f_i^c, f_i^s) -> f_i^m."""

    def __init__(self, cls_ch, seg_ch, out_ch):
        super().__init__()
        self.project_cls, self.project_seg = pointwise(cls_ch, out_ch), pointwise(seg_ch, out_ch)
        self.attention = PolarizedSelfAttention(2 * out_ch)
        self.fuse = pointwise(2 * out_ch, out_ch)

    def forward(self, f_cls, f_seg):
        pairs = torch.stack((self.project_cls(f_cls), self.project_seg(f_seg)), dim=2)  # [B, C, 2, H, W]
        pairs = pairs.flatten(1, 2)  # channel 2k = classification map k, 2k+1 = segmentation map k
        return self.fuse(self.attention(pairs))


def evidential_opinion(logits, dim=1):
    """Eq. 1-2: evidence e = softplus(logits), alpha = e + 1, S = sum alpha, b = e / S, u = K / S."""
    evidence = F.softplus(logits)
    alpha = evidence + 1
    strength = alpha.sum(dim, keepdim=True)                                  # S
    belief = evidence / strength                                             # b_k
    uncertainty = logits.shape[dim] / strength                               # u = K / S
    return alpha, belief, uncertainty


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
        for up, skip in zip(self.ups, [mutual[2], mutual[1], mutual[0]]):
            x = up(x, skip)
        alpha, _, uncertainty = evidential_opinion(self.head(x).float())
        return {"mutual_alpha": alpha, "mutual_uncertainty": uncertainty}  # M [B,K,H,W], U^s [B,1,H,W]


class NoMutualDecoder(nn.Module):
    """The rows without MD (BCS, ECS): no M and no U^s."""

    def forward(self, mutual):
        return {}


class SegmentationDecoder(nn.Module):
    """U-Net-like over f_1^s..f_4^s from the bottom input Cat(f_4^s, f_4^m) (TBraTS: f_4^s) -> s_1..s_4 and
    r^s = Cat(f_1^s, f_2^b); plain, as in the baselines (the Uncertainty Navigator adds M and U^s)."""

    def __init__(self, seg_ch, mutual_bottom_ch, n_classes):
        super().__init__()
        w1, w2, w3, w4 = seg_ch[0], seg_ch[0] * 2, seg_ch[0] * 4, seg_ch[0] * 8
        self.bottom = pointwise(seg_ch[3] + mutual_bottom_ch, w4)
        self.up3 = common.Up(w4, seg_ch[2], w3, mode="bilinear")
        self.up2 = common.Up(w3, seg_ch[1], w2, mode="bilinear")
        self.top = common.DoubleConv(seg_ch[0] + w2, w1)                     # Conv(Cat(f_1^s, f_2^b))
        self.heads = nn.ModuleDict({f"s{i}": nn.Conv2d(w, n_classes, 1) for i, w in enumerate((w1, w2, w3, w4), 1)})
        self.rs_channels = seg_ch[0] + w2

    def forward(self, f_seg, bottom, mutual):
        f_1, f_2, f_3, _ = f_seg
        d_4, s_4 = self.bottom_level(bottom, mutual)
        d_3 = self.up3(d_4, f_3)
        s_3 = self.heads["s3"](d_3)
        d_2 = self.up2(d_3, f_2)
        s_2 = self.heads["s2"](d_2)
        f_2_b = F.interpolate(d_2, size=f_1.shape[-2:], mode="bilinear", align_corners=False)  # f_2^b
        skip_top = torch.cat([f_1, f_2_b], 1)                                 # Cat(f_1^s, f_2^b)
        # s_1 comes from Cat(f_1^s, f_2^b) alone: the top-level M^r is made FROM s_1 (Eq. 3) and only
        # flows into r^s, i.e. to the classifier through the UI; M and U^s reach s_1 via the bottom only.
        s_1 = self.heads["s1"](self.top(skip_top))
        return [s_1, s_2, s_3, s_4], self.reliable_feature(s_1, skip_top, mutual)

    def bottom_level(self, bottom, mutual):
        d_4 = self.bottom(bottom)
        return d_4, self.heads["s4"](d_4)

    def reliable_feature(self, s_1, skip_top, mutual):
        return skip_top


class UncertaintyNavigator(SegmentationDecoder):
    """Step 2 (Eq. 3-4): the decoder guided by M and U^s at the top and (text, authors' code) bottom level."""

    def __init__(self, seg_ch, mutual_bottom_ch, n_classes):
        super().__init__(seg_ch, mutual_bottom_ch, n_classes)
        self.mask_conv_bottom = pointwise(n_classes, seg_ch[0] * 8)
        self.fuse_bottom = pointwise(2 * seg_ch[0] * 8, seg_ch[0] * 8)
        self.mask_conv_top = pointwise(n_classes, seg_ch[0])
        self.rs_channels += seg_ch[0]

    def bottom_level(self, bottom, mutual):
        """Eq. 3-4 at H/8, after Cat(f_4^s, f_4^m) is damped by exp(-U^s) where the mutual view is unsure."""
        m_4 = F.avg_pool2d(mutual["mutual_alpha"], 8)                        # d^3(M): M at H/8
        u_4 = F.avg_pool2d(mutual["mutual_uncertainty"], 8)                  # d^3(U^s)
        d_4 = self.bottom(bottom * torch.exp(-u_4))
        s_4 = self.heads["s4"](d_4)
        m_r_4 = reliable_mask(s_4, m_4, u_4)                                 # Eq. 3
        return self.fuse_bottom(torch.cat([self.mask_conv_bottom(m_r_4), d_4], 1)), s_4   # Eq. 4's Cat

    def reliable_feature(self, s_1, skip_top, mutual):
        """Eq. 4: r^s = Cat(Conv(M^r), Cat(f_1^s, f_2^b)), with Eq. 3's M^r = (s_1 + M) exp(-U^s)."""
        m_r = reliable_mask(s_1, mutual["mutual_alpha"], mutual["mutual_uncertainty"])
        return torch.cat([self.mask_conv_top(m_r), skip_top], 1)


class UncertaintyInstructor(nn.Module):
    """Step 3, Eq. 5: gates the classification feature with the reliable segmentation feature r^s."""

    def __init__(self, rs_ch, cls_ch):
        super().__init__()
        self.conv = common.DoubleConv(rs_ch, cls_ch)

    def forward(self, f_cls, r_s):
        eta = self.conv(F.avg_pool2d(r_s, 8))          # Conv(d^3(r^s)), d^n = n 2x2 average-poolings
        return reliable_classification_feature(f_cls, eta)


class NoInstructor(nn.Module):
    """The rows without UI: the classification feature is not gated."""

    def forward(self, f_cls, r_s):
        return f_cls


class UMLNet(nn.Module):
    """The joint rows: dual backbone -> Feature Mixer -> Mutual Feature Decoder (Step 1) -> UN (Step 2) -> UI
    (Step 3); a component `spec` switches off is replaced by its plain counterpart (BCS, ECS, Table 3)."""

    def __init__(self, spec, n_classes, n_seg_classes, width, res2net_blocks, base_width=26, scale=4,
                 vgg_batch_norm=True):
        super().__init__()
        self.cls_encoder = VGGEncoder(width, vgg_batch_norm)
        self.seg_encoder = Res2NetEncoder(width, res2net_blocks, base_width, scale)
        mix_ch, cls_ch = [width, 2 * width, 4 * width, 8 * width], self.cls_encoder.channels[3]
        # f_1^m..f_3^m only feed the mutual decoder; f_4^m also the UN and the classifier
        self.mixer = nn.ModuleDict({str(i): PairwiseChannelMapInteraction(
            self.cls_encoder.channels[i], self.seg_encoder.channels[i], mix_ch[i])
            for i in (range(4) if spec.mutual_decoder else [3])})
        self.mutual_decoder = MutualFeatureDecoder(mix_ch, n_seg_classes) if spec.mutual_decoder else NoMutualDecoder()
        decoder = UncertaintyNavigator if spec.navigator else SegmentationDecoder
        self.decoder = decoder(self.seg_encoder.channels, mix_ch[3], n_seg_classes)
        self.cls_mix = common.DoubleConv(cls_ch + mix_ch[3], cls_ch)          # Cat(f_4^c, f_4^m) -> f_4^c
        self.instructor = UncertaintyInstructor(self.decoder.rs_channels, cls_ch) if spec.instructor else NoInstructor()
        self.classifier = nn.Linear(cls_ch, n_classes)

    def forward(self, x):
        f_cls, f_seg = self.cls_encoder(x), self.seg_encoder(x)
        f_mut = {int(i): mix(f_cls[int(i)], f_seg[int(i)]) for i, mix in self.mixer.items()}  # f_i^m
        out = self.mutual_decoder(f_mut)                                     # Step 1: M, U^s
        out["seg"], r_s = self.decoder(f_seg, torch.cat([f_seg[3], f_mut[3]], 1), out)  # Step 2: s_1..s_4, r^s
        f_4 = self.cls_mix(torch.cat([f_cls[3], f_mut[3]], 1))
        out["cls_logits"] = self.classifier(self.instructor(f_4, r_s).mean((2, 3)))  # Step 3: r^c, GAP -> FC
        return out


class ECNet(nn.Module):
    """EC of Table 1: the VGG encoder and the classification head alone."""

    def __init__(self, n_classes, width, vgg_batch_norm=True):
        super().__init__()
        self.cls_encoder = VGGEncoder(width, vgg_batch_norm)
        cls_ch = self.cls_encoder.channels[3]
        self.cls_mix = common.DoubleConv(cls_ch, cls_ch)
        self.classifier = nn.Linear(cls_ch, n_classes)

    def forward(self, x):
        return {"cls_logits": self.classifier(self.cls_mix(self.cls_encoder(x)[3]).mean((2, 3)))}


class TBraTSNet(nn.Module):
    """TBraTS of Table 1: the Res2Net encoder and the plain segmentation decoder alone."""

    def __init__(self, n_seg_classes, width, res2net_blocks, base_width=26, scale=4):
        super().__init__()
        self.seg_encoder = Res2NetEncoder(width, res2net_blocks, base_width, scale)
        self.decoder = SegmentationDecoder(self.seg_encoder.channels, 0, n_seg_classes)

    def forward(self, x):
        f_seg = self.seg_encoder(x)
        return {"seg": self.decoder(f_seg, f_seg[3], {})[0]}


@dataclass(frozen=True)
class ModelSpec:
    """What one row of Tables 1/3 is made of: its network (ECNet, TBraTSNet or UMLNet) and its losses."""
    classify: bool = True            # VGG branch + classifier (absent in TBraTS)
    segment: bool = True             # Res2Net branch + decoder (absent in EC)
    evidential_cls: bool = True      # Dirichlet classifier (Eq. 1, 7); else softmax + cross-entropy
    evidential_s1: bool = False      # the decoder's s_1 is evidential (TBraTS, ECS); UML's s_1 is plain
    mutual_decoder: bool = True      # MD: evidential first mask M and U^s from f^m (Eq. 2, 6)
    instructor: bool = True          # UI (Eq. 5)
    navigator: bool = True           # UN guidance by M and U^s (Eq. 3-4)
    deep_supervision: bool = True    # Eq. 8 over s_1..s_4 (TBraTS has none)


_OFF = dict(mutual_decoder=False, instructor=False, navigator=False)
ROWS = {  # paper row name (jobs: <out>/<row>-seed<seed>/) -> (--method of a Table 1 row, spec)
    "EC": ("ec", ModelSpec(segment=False, deep_supervision=False, **_OFF)),
    "TBraTS": ("tbrats", ModelSpec(classify=False, evidential_cls=False, evidential_s1=True,
                                   deep_supervision=False, **_OFF)),
    "BCS": ("bcs", ModelSpec(evidential_cls=False, **_OFF)),
    "ECS": ("ecs", ModelSpec(evidential_s1=True, **_OFF)),
    "UML": ("uml", ModelSpec()),
    "+MD": ("uml-md", ModelSpec(instructor=False, navigator=False)),
    "+MD+UI": ("uml-md-ui", ModelSpec(navigator=False)),
}
COMPONENTS = {"MD": "mutual_decoder", "UI": "instructor", "UN": "navigator"}  # Table 3's columns
# The paper's tables: the rows of --tableN (without it the main row, in Tables 1-2), the lead columns and the
# sections of results.md (title, metric form); Table 2 has its rows and a section per noise level.
TABLES = {
    1: (["EC", "TBraTS", "BCS", "ECS", "UML"], ["Method"],
        [("Table 1 (paper's metric forms)", "paper"), ("Table 1, our metric forms", "ours")]),
    2: (["BCS", "ECS", "UML"], ["Method"],
        [("Table 2: Gaussian noise sigma = {:.2f} (paper's forms)", "paper")]),
    3: (["BCS", "+MD", "+MD+UI", "UML"], list(COMPONENTS), [("Table 3: ablation (paper's forms)", "paper")]),
}


# ======================================= Losses (Eq. 6-9) =========================================

def one_hot(labels, like):
    """Class indices [B] or [B,H,W] -> one-hot y with the classes along dim 1 (K and dtype of `like`)."""
    return F.one_hot(labels.long(), like.shape[1]).movedim(-1, 1).to(like.dtype)


def ace_loss(alpha, labels):
    """Eq. 7, L_ace: adjusted cross-entropy sum_k y_k (psi(S) - psi(alpha_k)), mean over images (and pixels)."""
    strength = alpha.sum(1, keepdim=True)
    return (one_hot(labels, alpha) * (torch.digamma(strength) - torch.digamma(alpha))).sum(1).mean()


def ice_loss(alpha, masks):
    """Eq. 6, L_ice: L_ace per pixel (alpha [B,K,H,W], masks [B,H,W]), pixel mean."""
    return ace_loss(alpha, masks)


def kl_to_uniform_dirichlet(alpha, dim=1):
    """KL(Dir(alpha) || Dir(1)) = ln G(S) - ln G(K) - sum ln G(alpha_k) + sum (alpha_k - 1)(psi(alpha_k) - psi(S))."""
    k = alpha.shape[dim]
    strength = alpha.sum(dim, keepdim=True)
    return (torch.lgamma(strength).squeeze(dim) - math.lgamma(k) - torch.lgamma(alpha).sum(dim)
            + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(strength))).sum(dim))


def kl_loss(alpha, y):
    """L_KL of Eq. 6-7: KL(Dir(alpha~) || Dir(1)) with the target's evidence removed,
    alpha~ = y + (1 - y) * alpha (y one-hot along dim 1); mean over images / pixels."""
    return kl_to_uniform_dirichlet(y + (1 - y) * alpha, dim=1).mean()


def annealing_coefficient(epoch, annealing_epochs):
    """min(1, epoch / T): the KL term grows from 0 so that early training is not pushed to ignorance."""
    return min(1.0, epoch / annealing_epochs)


def dice_loss(prob, masks, eps=1e-5):
    """Soft Dice loss 1 - mean_k 2 sum(p y) / (sum p + sum y) (prob [B,K,H,W], masks [B,H,W])."""
    y = one_hot(masks, prob)
    intersection = (prob * y).sum((0, 2, 3))
    total = prob.sum((0, 2, 3)) + y.sum((0, 2, 3))
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()


def mutual_loss(alpha, masks, kl_weight, dice_weight):
    """Eq. 6: L_mut = L_ice(M, GT) + l1 L_KL(M) + l2 L_Dice(M / S, GT), with M = alpha^s (also the loss of
    the evidential s_1 of TBraTS and ECS)."""
    prob = alpha / alpha.sum(1, keepdim=True)                                # alpha / S
    return (ice_loss(alpha, masks) + kl_weight * kl_loss(alpha, one_hot(masks, alpha))
            + dice_weight * dice_loss(prob, masks))


def classification_loss(logits, labels, evidential, kl_weight):
    """Eq. 7: L_cls = L_ace(alpha^c, label) + l_c L_KL(alpha^c); cross-entropy for BCS."""
    if not evidential:
        return F.cross_entropy(logits, labels)
    alpha = evidential_opinion(logits)[0]
    return ace_loss(alpha, labels) + kl_weight * kl_loss(alpha, one_hot(labels, alpha))


def segmentation_loss(seg, masks, evidential, deep_supervision, kl_weight, dice_weight, reduction="sum"):
    """Eq. 8: L_seg = sum_i Dice(v^{i-1}(s_i), GT) (reduction "mean": the authors' / 4). With an
    evidential s_1 (TBraTS, ECS) its term is the evidential loss of Eq. 6's form."""
    s_1 = seg[0]
    terms = [mutual_loss(evidential_opinion(s_1)[0], masks, kl_weight, dice_weight) if evidential
             else dice_loss(s_1.softmax(1), masks)]
    for s in (seg[1:] if deep_supervision else []):                           # v^{i-1}(s_i)
        terms.append(dice_loss(F.interpolate(s, size=masks.shape[-2:], mode="bilinear",
                                             align_corners=False).softmax(1), masks))
    return sum(terms) / (len(terms) if reduction == "mean" else 1)


def total_loss(out, masks, labels, spec, anneal, loss_weights=(0.1, 0.5, 0.4), lambda_kl_mut=1.0,
               lambda_dice_mut=1.0, lambda_kl_cls=1.0, eq8="sum"):
    """Eq. 9: L = w^m L_mut + w^c L_cls + w^s L_seg (defaults: the paper's); an absent component's term is 0;
    `anneal` = annealing_coefficient(epoch, T) scales the KL terms. Returns (L, [L_mut, L_cls, L_seg])."""
    w_mut, w_cls, w_seg = loss_weights
    l_mut = l_cls = l_seg = masks.new_zeros((), dtype=torch.float32)
    if spec.mutual_decoder:
        l_mut = mutual_loss(out["mutual_alpha"], masks, anneal * lambda_kl_mut, lambda_dice_mut)
    if spec.classify:
        l_cls = classification_loss(out["cls_logits"].float(), labels, spec.evidential_cls, anneal * lambda_kl_cls)
    if spec.segment:
        seg = [s.float() for s in out["seg"]]
        l_seg = segmentation_loss(seg, masks, spec.evidential_s1, spec.deep_supervision,
                                  anneal * lambda_kl_mut, lambda_dice_mut, eq8)
    return w_mut * l_mut + w_cls * l_cls + w_seg * l_seg, torch.stack([l_mut, l_cls, l_seg])


# =================================== Training and evaluation ======================================

def build_model(spec, args, n_classes, n_seg_classes):
    """The network of a row: one branch for EC and TBraTS, UMLNet for the joint rows."""
    if not spec.segment:
        return ECNet(n_classes, args.width, args.vgg_batch_norm)
    if not spec.classify:
        return TBraTSNet(n_seg_classes, args.width, args.res2net_blocks, args.res2net_base_width, args.res2net_scale)
    return UMLNet(spec, n_classes, n_seg_classes, args.width, args.res2net_blocks, args.res2net_base_width,
                  args.res2net_scale, args.vgg_batch_norm)


def model_input(images, norm, device, sigma=0.0, generator=None):
    """uint8 -> [0,1] (+ Gaussian noise of std sigma, clipped to [0,1]: Table 2) -> normalised float."""
    x = images.float() / 255
    if sigma > 0:
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        x = (x + sigma * noise).clamp(0, 1)                  # the authors clip the noisy image
    x = (x - norm[0].view(1, -1, 1, 1)) / norm[1].view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def poly_lr_factor(step, total, hold, power, floor):
    """The authors' adjust_lr as a factor of the initial rate (for LambdaLR): 1 for the first `hold`
    steps, then (1 - (step - hold) / (total - hold))^power, never below `floor` (= 1e-5 / lr)."""
    return max(max(1 - max(step - hold, 0) / max(total - hold, 1), 0.0) ** power, floor)


def train_row(job, model, spec, data, norm):
    """Trains one job (table row x seed; from its last.pt on --resume); loads its best-validation weights."""
    args, device = job.run.args, job.run.device
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n_train = data["train"]["images"].shape[0]
    steps = max(n_train // args.batch_size, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_lr_factor(  # per batch
        step, steps * args.epochs, steps * args.lr_hold_epochs, args.lr_power, args.lr_floor / args.lr))
    start, best = common.resume(job, model, optimizer, scheduler)
    progress = common.Progress(job, steps, args.epochs, start, every=args.log_every)
    generator = torch.Generator(device=device)
    for epoch in range(start, args.epochs):
        model.train()
        anneal = annealing_coefficient(epoch, args.annealing_epochs)  # the KL terms' weight this epoch
        generator.manual_seed(job.seed * 1000 + epoch)   # the shuffle of an epoch does not depend on resume
        sums = torch.zeros(4, device=device)             # L, L_mut, L_cls, L_seg summed over the epoch
        batches = common.iterate_batches(data["train"], args.batch_size, shuffle=True, generator=generator,
                                         drop_last=n_train >= args.batch_size)
        if args.augment:                                 # on the device, image and mask together
            batches = (common.augment(b, generator, flip=True, rotate=10.0, scale=0.05, color=0.05) for b in batches)
        for batch in progress.epoch(epoch, batches):
            batch = common.shard(batch, job.run.dist)    # torchrun data mode: this rank's slice
            with common.autocast(device, args.amp):
                out = model(model_input(batch["images"], norm, device))
            loss, parts = total_loss(out, batch["masks"].long(), batch.get("labels"), spec, anneal,  # Eq. 9
                                     args.loss_weights, args.lambda_kl_mut, args.lambda_dice_mut,
                                     args.lambda_kl_cls, args.eq8)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += torch.cat([loss.detach()[None], parts.detach()])
            progress.step(loss, batch["images"].shape[0])  # a line every --log-every steps; stops on NaN
        epoch_means = (sums / steps).tolist()            # one host sync per epoch
        val_metrics, _ = evaluate(model, data["val"], spec, data, norm, args, device, seed=job.seed, surface=False)
        # the authors' model selection: the validation mean of ACC, F1 and the Dice scores
        values = [v for k, v in val_metrics.items() if (k in ("acc", "f1") or k.startswith("dice_"))
                  and v is not None and math.isfinite(v)]
        score = sum(values) / len(values) if values else -math.inf
        job.log(epoch=epoch + 1, **dict(zip(("loss", "loss_mut", "loss_cls", "loss_seg"), epoch_means)),
                lr=scheduler.get_last_lr()[0], val_score=score, **{f"val_{k}": v for k, v in val_metrics.items()})
        best = common.save(job, epoch + 1, score, best, model, optimizer, scheduler, spec=asdict(spec),
                           class_names=list(data["class_names"]), mask_names=list(data["mask_names"]),
                           normalization=[norm[0].cpu(), norm[1].cpu()])   # what load_model needs
        print(f"[{job.name}] epoch {epoch + 1}/{args.epochs} loss {epoch_means[0]:.4f} val score {score:.4f}")
    progress.report()
    common.load_best(job, model)
    return model


@torch.no_grad()
def forward_split(model, split, spec, norm, args, device, sigma=0.0, seed=0):
    """The outputs over a split (batched; noise of std sigma: Table 2) as CPU tensors: expected class
    probability (alpha/S or softmax), belief, image uncertainty u, segmentation s_1 (argmax), pixel-wise u."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed + 7919 + int(round(sigma * 1e4)))
    collected = {}
    for batch in common.iterate_batches(split, args.batch_size, shuffle=False):
        with common.autocast(device, args.amp):
            out = model(model_input(batch["images"], norm, device, sigma, generator))
        result = {}
        if spec.classify and spec.evidential_cls:
            alpha, belief, u = evidential_opinion(out["cls_logits"].float())    # Eq. 1
            result.update(prob=alpha / alpha.sum(1, keepdim=True), belief=belief, uncertainty=u[:, 0])
        elif spec.classify:
            prob = out["cls_logits"].float().softmax(1)
            result.update(prob=prob, belief=prob, uncertainty=1 - prob.max(1).values)
        if spec.segment:
            s_1 = out["seg"][0].float()
            result["seg"] = s_1.argmax(1)
            result["pixel_uncertainty"] = (out["mutual_uncertainty"][:, 0].float() if spec.mutual_decoder
                                           else evidential_opinion(s_1)[2][:, 0] if spec.evidential_s1
                                           else 1 - s_1.softmax(1).max(1).values)  # U^s (Eq. 2), u, 1 - max
        for key, value in result.items():
            collected.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in collected.items()}


def evaluate(model, split, spec, data, norm, args, device, sigma=0.0, seed=0, surface=True):
    """Flat metrics of one split in both forms (module docstring), and what the reliability figure needs."""
    pred = forward_split(model, split, spec, norm, args, device, sigma, seed)
    metrics, extra = {}, {}
    if spec.classify:  # ECE on the expected probability alpha/S (softmax), ece_belief on the belief
        labels = split["labels"].cpu()
        metrics.update(common.classification_metrics(pred["prob"], labels, pred["uncertainty"],
                                                     pred["belief"] if spec.evidential_cls else None, positive=1))
        extra = dict(confidence=pred["prob"].max(1).values, correct=pred["prob"].argmax(1) == labels)
    if spec.segment:
        masks = split["masks"].cpu()
        if split.get("valid") is not None:  # letterboxed real images: what is predicted on the padding does not count
            pred["seg"] = pred["seg"] * split["valid"].cpu()
        for name, select in data["structures"].items():
            p, t = select(pred["seg"]), select(masks)
            metrics[f"dice_{name}"] = common.dice(p, t).mean().item()
            if surface:
                mean, undefined = common.finite_mean(common.assd(p, t))      # inf where one mask is empty
                metrics.update({f"assd_{name}": mean, f"assd_{name}_undefined_images": undefined})
                metrics[f"assd_{name}_authors"] = common.assd_medpy(p, t, empty=10.0).mean().item()
    return metrics, extra


# ================================ Report: Tables 1-3 and Fig. 3 ===================================

FORMS_NOTE = (
    "Dice as a fraction, ASSD in pixels; mean ± standard error over seeds when there are several. "
    "**Paper's forms** (the authors' evaluation code): F1 = support-weighted F1; for the fundus, DI_disc / "
    "ASSD_disc = label 1, the rim (what their code scores as \"disc\"); ASSD = medpy's (mean of the two "
    "directed mean distances), 10 px for an image where either mask is empty, mean over all images. "
    "**Our forms**: F1+ = the positive class's F1; DI_disc = rim + cup (REFUGE's disc); ASSD = MONAI's "
    "(both directions pooled), mean over the images where both masks are non-empty, 'undef.' counting "
    "the others; AUROC(u, error) = how well the image-level uncertainty flags wrong diagnoses; ECE on "
    "the expected probability (alpha/S or softmax) of the predicted class, ECE(belief) on its belief.\n")


def markdown_cell(row, key):
    """3 decimals as in the paper (± SE over seeds); '\\' where the row has no such output."""
    if row.get(key) is None:
        return "\\"
    undefined = row.get(key + "_undefined_images") or 0  # a mean over seeds when there are several
    per_seed = " per seed" if len(row.get("seeds") or []) > 1 else ""
    return common.fmt_over_seeds(row, key, digits=3) + (f" ({undefined:.3g} undef.{per_seed})" if undefined else "")


def at_sigma(metrics, prefix):
    """The metrics at one noise level, unprefixed ("sigma=0.05/acc" -> "acc"; prefix "" = the clean ones)."""
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and (prefix or "/" not in k)}


def write_report(run, summary, main_name, specs):
    """results.json ("metrics": the main row's on clean inputs; "table": one dict per row of Tables 1-3 that
    this run produced, with the means ± SE over seeds and `per_seed` at the row's sigma) and results.md."""
    args, by_name, table = run.args, {r["row"]: r for r in summary}, []
    clean = min(args.noise_sigmas, key=abs)
    for table_no, (names, _, _) in TABLES.items():
        names = names if getattr(args, f"table{table_no}") else [main_name] if table_no < 3 else []
        for sigma in args.noise_sigmas if table_no == 2 else [clean]:
            prefix = "" if sigma == clean else f"sigma={sigma:.2f}/"
            for row in [by_name[n] for n in names if n in by_name]:
                flags = ({k: "✓" if getattr(specs[row["row"]], a) else "-" for k, a in COMPONENTS.items()}
                         if table_no == 3 else {})
                per_seed = [{"seed": e["seed"], "rank": e["rank"], **at_sigma(e, prefix)} for e in row["per_seed"]]
                table.append({"row": row["row"] + (f" sigma={sigma:.2f}" if table_no == 2 else ""), "table": table_no,
                              "sigma": sigma, "Method": row["row"], "seeds": row["seeds"], **flags,
                              **at_sigma(common.row_metrics(row), prefix), "per_seed": per_seed})
    # results.md: each section of TABLES with the columns ({metric key: title}) of its metric form
    structures = list(dict.fromkeys(k[5:] for r in table for k in r if k.startswith("dice_")
                                    and not k.endswith(("_se", "_undefined"))))  # disc, cup, rim / tumor
    forms = {"paper": {"acc": "ACC", "f1_weighted": "F1"}, "ours": {"acc": "ACC", "f1": "F1+"}}
    shown = {"disc": "rim", "cup": "cup"} if "rim" in structures else {s: s for s in structures}
    for title, s in shown.items():
        forms["paper"].update({f"dice_{s}": f"DI_{title}", f"assd_{s}_authors": f"ASSD_{title}"})
    for s in structures:
        forms["ours"].update({f"dice_{s}": f"DI_{s}", f"assd_{s}": f"ASSD_{s}"})
    forms["ours"].update(uncertainty_auroc="AUROC(u, error)", ece="ECE", ece_belief="ECE(belief)")
    parts = [f"# UML results: {args.dataset}, test split\n", FORMS_NOTE]
    for table_no, (_, lead, sections) in TABLES.items():
        for title, form in sections:
            columns, header = forms[form], [*lead, *forms[form].values()]
            for sigma in sorted({r["sigma"] for r in table if r["table"] == table_no}):
                cells = [{**{c: r[c] for c in lead}, **{t: markdown_cell(r, k) for k, t in columns.items()}}
                         for r in table if r["table"] == table_no and r["sigma"] == sigma]
                parts.append(common.markdown_table(cells, header, title=title.format(sigma)))
    metrics = at_sigma(common.row_metrics(by_name[main_name]), "")  # clean inputs
    common.write_results(run, metrics, table, "\n".join(parts) + f"\nCommand: `{args.command}`\n")


def figure_fig3(model, split, spec, data, norm, args, device, path):
    """Fig. 3: per image a clean and a noisy row (largest sigma): input + GT, b and u, s_1, pixel-wise u."""
    labels, structures = split["labels"], data["structures"]
    picks = common.pick_examples(split["images"].shape[0], args.figure_images, labels)
    subset = {k: (v[picks] if torch.is_tensor(v) else v) for k, v in split.items()}
    identity = (torch.zeros_like(norm[0]), torch.ones_like(norm[1]))
    fig, axes = common.blank_grid(2 * len(picks), 4, figsize=(13, 6.2 * len(picks)))  # panels a row lacks stay blank
    for j, sigma in enumerate((0.0, max(args.noise_sigmas))):
        pred = forward_split(model, subset, spec, norm, args, device, sigma, args.seed)
        generator = torch.Generator(device=device).manual_seed(args.seed + 7919 + int(round(sigma * 1e4)))
        shown = model_input(subset["images"], identity, device, sigma, generator).float().cpu()  # what the model saw
        for i, (index, ax) in enumerate(zip(picks, axes[j::2])):           # image i: rows 2i (clean), 2i + 1
            truth = f", {data['class_names'][int(labels[index])]}" if labels is not None else ""
            common.show_with_contours(ax[0], shown[i], {f"GT {n}": select(subset["masks"][i].cpu())
                                                        for n, select in structures.items()},
                                      f"{split['names'][index]}, sigma={sigma:.2f}{truth}", legend=True)
            if spec.classify:
                common.plot_bars(ax[1], list(data["class_names"]) + ["uncertainty"],
                                 pred["belief"][i].tolist() + [float(pred["uncertainty"][i])],
                                 ["tab:blue"] * data["n_classes"] + ["tab:red"], "belief b_k and uncertainty u (Eq. 1)")
            if spec.segment:
                segmentation = {n: select(pred["seg"][i]) for n, select in structures.items()}
                common.show_with_contours(ax[2], shown[i], segmentation, "segmentation s_1")
                common.plot_uncertainty(ax[3], pred["pixel_uncertainty"][i],
                                        title="pixel-wise uncertainty" + (" U^s" if spec.mutual_decoder else ""))
    fig.tight_layout()
    common.save_figure(fig, path)


# ============================================= main ===============================================

def mask_structures(mask_names):
    """{structure: class-index mask -> bool mask}. Fundus: disc = rim + cup (REFUGE's), cup, rim = label 1
    (the authors' "disc"); binary: the foreground ("tumor" for a tumour or lesion); else each foreground."""
    names = [n.lower() for n in mask_names]
    if "cup" in names:
        cup = names.index("cup")
        return {"disc": lambda m: m >= 1, "cup": lambda m: m == cup, "rim": lambda m: (m >= 1) & (m != cup)}
    if len(names) == 2:
        name = "tumor" if any(t in names[1] for t in ("tumo", "lesion", "foreground")) else names[1]
        return {name: lambda m: m == 1}
    return {n.replace(" ", "_"): (lambda m, k=k: m == k) for k, n in enumerate(names) if k > 0}


def load_data(args, device, seed):
    """The run's train / val / test splits on `device` (without a val split, selection on train; a
    test-only set only with --eval-only), with class and mask names and the scored structures."""
    options = common.synthetic_split_sizes(args) if args.dataset.startswith("synthetic") else {}
    splits = common.load_dataset(args.dataset, root=args.root, size=args.size, seed=seed, cache=args.cache, **options)
    if "test" not in splits or ("train" not in splits and not args.eval_only):
        raise common.UsageError(f"{args.dataset}: uml.py needs a test split and, to train, a training split "
                                f"(found {sorted(splits)}); a test-only set works with --eval-only --checkpoint")
    if "val" not in splits and "train" in splits:
        print("no validation split: model selection on the training split")
        splits["val"] = splits["train"]
    reference = splits.get("train", splits["test"])
    if reference["masks"].dim() != 3:
        raise common.UsageError(f"{args.dataset}: uml.py needs one mask per image, "
                                f"got {tuple(reference['masks'].shape)}")
    data = {k: common.to_device(v, device) for k, v in splits.items() if k in ("train", "val", "test")}
    data.update(n_classes=len(reference["class_names"]), n_seg_classes=len(reference["mask_names"]),
                class_names=reference["class_names"], mask_names=reference["mask_names"],
                structures=mask_structures(reference["mask_names"]))
    return data


def load_model(checkpoint_path, device="cpu"):
    """A trained row of any table, from its checkpoint, for predict_batch (library use and --predict)."""
    device = torch.device(device)
    checkpoint = common.load_checkpoint(checkpoint_path, SCRIPT, device)
    spec, args = ModelSpec(**checkpoint["spec"]), argparse.Namespace(**checkpoint["args"])
    model = build_model(spec, args, len(checkpoint["class_names"]), len(checkpoint["mask_names"]))
    common.load_model_state(model, checkpoint["model"])
    norm = tuple(t.float().to(device) for t in checkpoint["normalization"])
    return common.Predictor(model=model.to(device).eval(), args=args, norm=norm, size=args.size, keep_aspect=True,
                            device=device, class_names=checkpoint["class_names"], mask_names=checkpoint["mask_names"],
                            extra={"spec": spec})  # letterboxed, as in training


def predict_batch(predictor, images):
    """uint8 [B,3,S,S] -> {"mask": s_1's classes (all background for EC, which does not segment),
    "maps": {"uncertainty": pixel-wise U^s}, "rows": predicted class, belief per class and u}."""
    spec, device = predictor.extra["spec"], torch.device(predictor.device)
    out = forward_split(predictor.model, {"images": images}, spec, predictor.norm, predictor.args, device)
    rows = [{"class": predictor.class_names[int(p.argmax())], "uncertainty": float(u),
             **{f"belief_{n}": float(v) for n, v in zip(predictor.class_names, belief)}}
            for p, belief, u in zip(out["prob"], out["belief"], out["uncertainty"])] if spec.classify else None
    mask = out["seg"] if spec.segment else torch.zeros(images[:, 0].shape, dtype=torch.long)
    return {"mask": mask, "maps": {"uncertainty": out["pixel_uncertainty"]} if spec.segment else {}, "rows": rows}


def main(argv=None):
    args = common.parse_args(build_parser(), SCRIPT, argv, resolve_defaults)
    vars(args).setdefault("command", "python uml.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.predict:
        return common.run_predict(args, load_model, predict_batch, SCRIPT)
    seeds = common.seed_list(args)
    if args.eval_only:  # any row's checkpoint (e.g. BCS-seed0/best.pt) says which row it is
        checkpoint = common.load_checkpoint(args.checkpoint, SCRIPT)
        common.restore_architecture(args, checkpoint, ARCHITECTURE_ARGS)
        main_name, main_spec, seeds = checkpoint["row"], ModelSpec(**checkpoint["spec"]), [checkpoint["seed"]]
    else:  # --method's row; an ablation is the Table 3 row with the same components, if any
        main_name, main_spec = next((n, spec) for n, (slug, spec) in ROWS.items() if slug == args.method)
        if args.method == "uml":
            main_spec = replace(main_spec, mutual_decoder=args.mutual_decoder,
                                instructor=args.uncertainty_instructor, navigator=args.uncertainty_navigator)
            off = "".join(f" -{k}" for k, part in COMPONENTS.items() if not getattr(main_spec, part))
            main_name = next((n for n, (_, r) in ROWS.items() if r == main_spec), "UML" + off)
        if not args.deep_supervision and main_spec.segment:
            main_spec, main_name = replace(main_spec, deep_supervision=False), main_name + " (s_1 only)"
    specs = {**{name: spec for name, (_, spec) in ROWS.items()}, main_name: main_spec}
    wanted = [main_name] if args.eval_only else list(dict.fromkeys(
        [main_name] + [n for t, (rows, _, _) in TABLES.items() if getattr(args, f"table{t}") for n in rows]))
    jobs = [(name, seed) for name in wanted for seed in seeds]
    run, datasets = common.open_run(args, SCRIPT, n_jobs=len(jobs)), {}

    def train_and_test(job):
        """One row of a table for one seed (data, initialisation and shuffling from the seed)."""
        spec, device = specs[job.row], run.device
        data = datasets[job.seed] = datasets.get(job.seed) or load_data(args, device, job.seed)
        if data["test"]["labels"] is None and spec.classify:
            raise common.UsageError(f"{args.dataset} has no image labels; only --method tbrats can run on it")
        if args.eval_only:  # the checkpoint's network, weights and normalisation
            predictor = load_model(args.checkpoint, device)
            model, norm = common.prepare_model(predictor.model, run), predictor.norm
        else:
            model = build_model(spec, args, data["n_classes"], data["n_seg_classes"])
            if args.pretrained_vgg or args.pretrained_res2net:  # ImageNet weights expect its statistics
                norm = (torch.tensor(IMAGENET_MEAN, device=device), torch.tensor(IMAGENET_STD, device=device))
                load_imagenet_weights(model, args.pretrained_vgg, args.pretrained_res2net)
            else:  # the training images' channel means and standard deviations
                train = data["train"]
                norm = tuple(t.to(device) for t in common.channel_stats(train["images"], train["valid"]))
            model = train_row(job, common.prepare_model(model, run), spec, data, norm)
        clean, metrics = min(args.noise_sigmas, key=abs), {}
        for sigma in args.noise_sigmas:  # Table 2: the same model under noise; its metrics keyed "sigma=0.05/..."
            values, extra = evaluate(model, data["test"], spec, data, norm, args, device, sigma, job.seed)
            metrics.update({(k if sigma == clean else f"sigma={sigma:.2f}/{k}"): v for k, v in values.items()})
            if job.row == main_name and job.seed == seeds[0] and sigma == clean:
                figure_fig3(model, data["test"], spec, data, norm, args, device, job.figures / "fig3.png")
                if spec.classify:
                    common.plot_reliability(extra["confidence"], extra["correct"], job.figures / "reliability.png")
        return metrics

    summary = common.run_jobs(run, jobs, train_and_test)
    if summary is None:  # torchrun: another process writes the results
        return None
    write_report(run, summary, main_name, specs)
    return run.dir


if __name__ == "__main__":
    common.cli(main)
