"""Multi-task U-Net for skin lesion segmentation and 3-class diagnosis (joint_unet.py).

Paper: MSc thesis (extended abstract), Instituto Superior Tecnico (../shared/papers/joint_unet.txt: the sections,
equations and tables cited below); the author's code: https://github.com/franciscosenae/Tese.

Idea. A U-Net (Ronneberger et al. 2015) segments the lesion in ISIC 2017's dermoscopy images and a small fully
connected head on its encoder's lowest-resolution features classifies it (nevus, melanoma, seborrheic keratosis),
trained separately (task `seg` switches the head off, `cls` the decoder) or jointly (`joint`, one loss, Eq. 4):
does sharing the encoder help either task? Hypothesis 1 (Sec. XVI.B): a frozen segmentation network, only the
head trained. ISIC 2017 test set: separate JAC 70.6 / BACC 64.1, joint 66.3 / 59.6: no gain, half the compute.

Paper -> code
    Sec. V, Fig. 2      original U-Net (no BatchNorm), valid (572 -> 388) or same  thesis_unet(), network_geometry()
    Sec. VI, Tab. VII   max pool, flatten, dropout, FC, dropout, FC 3             ClassificationHead
    Sec. VII, Fig. 4    fused model; seg / cls switch a branch off                MultiTaskUNet, BRANCHES
    Eq. 2; 3 and 12     binary cross-entropy; class-weighted cross-entropy        segmentation_loss(); class_weights(),
                                                                                  classification_loss()
    Eq. 4               L = a L_seg + (1 - a) L_cls; seg: a = 1, cls: a = 0        joint_loss(), task_alpha()
    Sec. VIII; IX       scale, border padding, normalise; threshold, closing,     preprocess(), network_geometry();
                        largest component, hole filling, resolution               postprocess(), restore_resolution()
    Eq. 1; 5, 7-11      softmax; JAC, sensitivity, specificity, BACC, acc., MP    infer(); evaluate()
    Sec. X, XV.A        Adam 1e-3, lr x0.8 after 5 epochs without a lower loss    train(), keras_reduce_lr_on_plateau()
    Tables V, VIII      data augmentation                                         flips_and_right_angle_rotations()
    Tables VI, IX, XIV  task tables, with Table XIII (per class)                  task_table()
    Tables XI, XII      the a sweep and its best row; Sec. XVI.B transfer         --alpha-sweep; --transfer
    Figs. 5-12          image, true and predicted contours, class probabilities   figure_examples()

Usage (--seeds 0,1,2, --eval-only, --resume and torchrun as in every script of the project: README.md)
    python joint_unet.py                  # synthetic lesions, CPU: separate seg and cls vs joint at a = 0.8
    python joint_unet.py --task seg       # Table VI; --task cls: IX; --task joint: XIV (--alpha 0.5: X's baseline)
    python joint_unet.py --alpha-sweep 0.1,0.3,0.5,0.7,0.8,0.9       # Table XI (and XII: its best row)
    python joint_unet.py --task seg --out runs/seg && python joint_unet.py --transfer runs/seg/seg-seed0/best.pt
    python joint_unet.py --data isic2017 --root /data/ISIC2017 --device cuda  # the thesis' settings (--help)
    python joint_unet.py --predict images/ --checkpoint runs/x/joint-seed0/best.pt  # masks, entropy, classes

Deviations (ambiguities resolved, and why)
    - Eq. 4 is printed L = a L1 + (a - 1) L2, a sign typo (a < 1 would maximise L2); the text ("a = 1 trains
      segmentation only, 0.5 gives both the same relevance") reads L = a L1 + (1 - a) L2. a defaults to 0.8, the
      thesis' final joint model (Tables XI, XII, XIV), so that the default comparison sets like beside like.
    - No BatchNorm (seg trains at batch 2; --batchnorm adds it) and He normal init, biases 0 (unprinted), as the
      original U-Net: torch's default shrinks the signal ~six-fold per layer through 18 ReLU convolutions; the head
      keeps torch's. Every task's model holds both branches (--transfer reads a seg model's U-Net).
    - Head: the thesis tuned pool and stride (7..14 outputs of the 28x28 bottom), winner unprinted. Table X's 50M
      parameters = 7.8M (U-Net, width 32) + 42.5M (9x9x512 -> 1024): a 3x3 pool, stride 3, FC 1024, the default
      (Table VII's "10...42M": FC 256...1024). First FC with ReLU (unprinted). Dropout ("true"): one (--dropout 0.5)
      ends the contracting path, as in the original U-Net; the head reads the bottleneck before it, with its own two.
    - Eq. 3 weighted by Eq. 12 as Keras' class_weight: the batch mean of W_{y_i} CE_i (torch divides by the sum of
      weights). Eq. 2: mean BCE over pixels (the thesis: a sum). Augmentation (Tables V, VIII: "used"): the author's
      random flips and right-angle rotations. Normalisation (unspecified): the training images' per-channel mean
      and std (the author's: / 255).
    - Sec. VIII: letterbox to a square, "extra padding for the lesion border" (unprinted), resize to 572: the image
      is scaled to the valid U-Net's output side and padded by (in - out) / 2 per side (mirrored as the overlap-tile,
      or the mean: --border-mode constant) so that the output covers it; masks are scaled to the output side.
      Synthetic images of side S: the smallest valid input whose output >= S (64 -> 252 in, 68 out).
    - Sec. IX (sizes unprinted): a --closing-size square (5 px) closing, 8-connected largest component,
      4-connected hole filling. "Original resolution restore": --predict maps the mask back to each image's own
      size; evaluation measures JAC on the canvas over the image's own pixels (true masks exist only at --size).
    - lr: Keras' ReduceLROnPlateau on the epoch's mean training loss (the thesis used Keras): it drops after the
      5th stale epoch in a row (torch's patience=5 waits a sixth), "lower" by > min_delta 1e-4.
    - Best epoch: validation JAC after post-processing (Table V); joint: Mean Performance with that JAC (Table XIV:
      70.8 = (67.5 + 74.0) / 2). Table XII is the a sweep's best row by it, whose test numbers are the run's.
    - Epochs ("a fixed number"): 100 on real data (Table XI's best epochs reach 90); CPU-sized synthetic defaults.
"""
import argparse

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "joint_unet"
TASKS = ("seg", "cls", "joint")
THESIS = {"seg": {"jaccard_post": 70.6}, "cls": {"balanced_accuracy": 64.1},  # ISIC 2017 test set, percent
          "joint": {"jaccard_post": 66.3, "balanced_accuracy": 59.6}}          # (Tables VI, IX, XIV)
SELECTION = {"seg": "jaccard_post", "cls": "balanced_accuracy", "joint": "mean_performance"}  # best epoch, Sec. X
UNIT = common.checked(float, low=0, high=1)  # a weight or a dropout probability in [0, 1]


# =========================================== Arguments ============================================

def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shared flags left unset depend on the data: --size 64 synthetic, 388 real (valid U-Net 572 -> 388, "
               "Sec. V/VIII); --epochs 40 synthetic, 100 real (Table XI's best epochs reach 90); --batch-size 16 "
               "synthetic, the thesis' 2 / 8 / 8 for seg / cls / joint (Tables V, VIII, X) real.")
    common.add_common_args(parser, size=None, epochs=None, batch_size=None, lr=1e-3)
    add = parser.add_argument
    add("--task", choices=TASKS + ("compare",), help="seg (Table VI), cls (Table IX), joint (Table XIV) or compare: "
        "all three side by side (Sec. XVI), the default (joint with --alpha-sweep / --transfer)")
    add("--alpha", type=UNIT, default=0.8, help="a of Eq. 4, the segmentation loss' weight: 0.8, the thesis' final "
        "joint model (Tables XI, XII, XIV); Table X's baseline: 0.5")
    add("--alpha-sweep", type=common.checked_list(float, distinct=True, low=0, high=1), metavar="A,A,...",
        help="one joint model per a (Table XI: 0.1,0.3,0.5,0.7,0.8,0.9)")
    add("--transfer", metavar="CHECKPOINT", help="hypothesis 1 (Sec. XVI.B): freeze a seg model's U-Net, train a head")
    # model (Sec. V, VI, Table VII); None = the data's default (DATA_DEFAULTS)
    add("--width", type=common.POSITIVE_INT, help="first U-Net block's filters (Table V: 32, Table IV's "
        "baseline: 64; synthetic: 8)")
    add("--depth", type=common.POSITIVE_INT, default=4, help="down-sampling steps of the U-Net (Sec. V: 4)")
    add("--unet-padding", choices=("same", "valid"), help="valid: the original U-Net, 572 in -> 388 out (Sec. V), "
        "default on real data; same: output = input, default on synthetic data")
    add("--input-size", type=common.POSITIVE_INT, help="valid U-Net input (default: the least covering --size)")
    add("--border-mode", choices=("reflect", "constant"), default="reflect", help="Sec. VIII border: mirror or mean")
    add("--batchnorm", action=argparse.BooleanOptionalAction, default=False,
        help="BatchNorm after every U-Net convolution (the thesis' original U-Net has none)")
    add("--dropout", type=UNIT, default=0.5, help="dropout at the end of the contracting path (Table V)")
    add("--pool", type=common.POSITIVE_INT, help="max-pool size = stride of the head (Table VII: 7..14 outputs of "
        "28); default 3, Table X's 50M parameters (--quick: 2); Table VIII baseline: 2")
    add("--fc", type=common.POSITIVE_INT, help="units of the first FC layer (Table VII: 256-1024; default 1024, "
        "--quick: 32)")
    add("--head-dropout", type=UNIT, default=0.5, help="both dropouts of the head (Table VII)")
    # training (Sec. X, XV.A) and post-processing (Sec. IX)
    add("--class-weights", action=argparse.BooleanOptionalAction, default=True, help="weigh Eq. 3 by Eq. 12's W_c")
    add("--lr-factor", type=common.POSITIVE, default=0.8, help="lr multiplier on a plateau, below 1 (Sec. XV.A)")
    add("--lr-patience", type=common.POSITIVE_INT, default=5, help="epochs without a lower loss before the lr drops")
    add("--augment", choices=("flips-rot90", "affine", "none"), default="flips-rot90", help="Tables V, VIII: "
        "flips and right-angle rotations (the author's code) or common.augment's flips, +-15 deg, +-10%% scale, colour")
    add("--closing-size", type=common.POSITIVE_INT, default=5, help="odd side of the closing's square (Sec. IX)")
    return parser


# the values of the flags left unset: --quick's (every code path in seconds), then (synthetic, real data)
QUICK = dict(size=32, width=4, epochs=1, batch_size=8, fc=32, pool=2, n_train=24, n_val=12, n_test=12)
DATA_DEFAULTS = {"unet_padding": ("same", "valid"), "width": (8, 32), "epochs": (40, 100),
                 "pool": (3, 3), "fc": (1024, 1024)}
# the flags that shape the network and its input and output, a checkpoint's for --eval-only, --predict, --transfer
UNET_ARCHITECTURE = ("width", "depth", "unet_padding", "input_size", "size", "batchnorm", "dropout",
                     "border_mode", "closing_size")
ARCHITECTURE = UNET_ARCHITECTURE + ("pool", "fc", "head_dropout")


def trained_args(state):
    """The arguments a checkpoint's model was trained with: the run's, with its row's task and a."""
    return {**state["args"], **state["spec"]}


def resolve_defaults(args):
    """Data- and --quick-dependent defaults (the epilog), a checkpoint's network, checks across flags."""
    experiment = args.alpha_sweep or args.transfer
    args.task = args.task or ("joint" if experiment else "compare")
    if experiment and args.task != "joint":
        raise common.UsageError("--alpha-sweep and --transfer train joint models; drop --task or use --task joint")
    if args.alpha_sweep and args.transfer:
        raise common.UsageError("--alpha-sweep and --transfer are separate experiments; run them one at a time")
    if args.eval_only and (args.alpha_sweep or len(common.seed_list(args)) > 1):
        raise common.UsageError("--eval-only tests one model: drop --alpha-sweep and --seeds")
    if args.closing_size % 2 == 0:
        raise common.UsageError("--closing-size must be odd (a centred square structuring element)")
    if args.lr_factor >= 1:
        raise common.UsageError(f"--lr-factor must be below 1 (it lowers the lr on a plateau), not {args.lr_factor}")
    real = args.data != "synthetic"
    common.fill_defaults(args, QUICK if args.quick else {}, {key: value[real] for key, value in DATA_DEFAULTS.items()})
    if args.size is None:
        args.size = (388 if args.unet_padding == "valid" else 384) if real else 64
    if args.batch_size is None and (not real or args.predict):  # real data trains with each task's own (Tables)
        args.batch_size = 16
    if args.eval_only:  # the checkpoint's architecture and task over the command line's
        trained = trained_args(common.load_checkpoint(args.checkpoint, SCRIPT))
        common.restore_architecture(args, {"args": trained}, ARCHITECTURE + ("task", "data"))
    if args.transfer:
        trained = trained_args(common.load_checkpoint(args.transfer, SCRIPT))
        if trained["task"] == "cls":
            raise common.UsageError(f"--transfer needs a segmentation (or joint) checkpoint; {args.transfer} is cls")
        common.restore_architecture(args, {"args": trained}, UNET_ARCHITECTURE)
    if not args.predict:  # (--predict builds the checkpoint's network)
        try:
            geometry = network_geometry(args.size, args.depth, args.unet_padding, args.input_size)
            ClassificationHead(1, geometry["bottleneck"], 1, args.pool, fc=1)  # refuses a pool > bottleneck
        except ValueError as error:
            raise common.UsageError(str(error)) from None
    return args


def batch_size_for(args, task):
    """The batch size of a task: --batch-size (16 on synthetic data by default), else Tables V / VIII / X."""
    return args.batch_size if args.batch_size is not None else {"seg": 2, "cls": 8, "joint": 8}[task]


# ======== The method: model, losses (Sec. V-VII), pre- and post-processing (Sec. VIII, IX) ========

def network_geometry(size, depth, padding, input_size=None):
    """Input, output and bottleneck sides of the U-Net (Sec. V, Fig. 2) for images of side `size`; ValueError if it
    does not fit. Valid padding: two 3x3 convolutions remove 4 pixels, a 2x2 pooling halves, a 2x2 up-convolution
    doubles; down from the input n, level k's block ends at (n + 4) / 2^k - 8, up from the bottleneck b at
    2^k (b - 4) + 4: n = 2^d (b + 8) - 4, o = 2^d (b - 4) + 4, n - o = 12 * 2^d - 8 (split evenly; d = depth), e.g.
    572 -> 388 (d = 4, b = 28). Whole b: even sides before every pooling; it fits while o >= 1 (b >= 4 from d = 2)."""
    if padding == "same":
        if size % 2 ** depth:
            raise ValueError(f"--size {size} must be divisible by 2^depth = {2 ** depth} with same padding")
        return {"input": size, "output": size, "bottleneck": size // 2 ** depth}
    # b: --input-size's, or the least whose output covers the image (Sec. VIII), o >= size: 4 + ceil((size - 4) / 2^d)
    b = (input_size + 4) // 2 ** depth - 8 if input_size is not None else 4 + -(-(size - 4) // 2 ** depth)
    geometry = {"input": 2 ** depth * (b + 8) - 4, "output": 2 ** depth * (b - 4) + 4, "bottleneck": b}
    if input_size is not None and (geometry["input"] != input_size or geometry["output"] < 1):
        raise ValueError(f"--input-size {input_size} does not fit the valid U-Net of depth {depth}: not 2^{depth} "
                         f"(b + 8) - 4 for a whole b with output 2^{depth} (b - 4) + 4 >= 1 (depth 4: 572)")
    return geometry


class ClassificationHead(nn.Module):
    """Sec. VI, Table VII: max pool, flatten, dropout, FC + ReLU, dropout, FC (logits; Eq. 1's softmax in infer())."""

    def __init__(self, channels, side, n_classes, pool=3, fc=1024, dropout=0.5):
        super().__init__()
        if not 1 <= pool <= side:  # refused rather than clamped (a clamp would change the head silently)
            raise ValueError(f"--pool {pool} does not fit the {side}x{side} bottleneck of this --size, --unet-padding "
                             f"and --depth; use --pool 1..{side} or a larger --size")
        pooled = side // pool  # Table X: 28 // 3 = 9 -> 9 * 9 * 512 inputs to the first FC
        self.pool = nn.MaxPool2d(pool, stride=pool)
        self.layers = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * pooled * pooled, fc),
                                    nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(fc, n_classes))

    def forward(self, bottom):                # [B, 16 width, b, b]
        return self.layers(self.pool(bottom))  # [B, classes] logits


def thesis_unet(width, depth, padding, batchnorm):
    """Sec. V: common.UNet (RGB in, one lesion logit), the original's init, and its blocks unless batchnorm."""
    unet = common.UNet(3, 1, width=width, depth=depth, padding=padding)
    if not batchnorm:  # swap common.UNet's conv-BN-ReLU blocks for conv-ReLU blocks of the same shape
        ch = unet.feature_channels
        unet.inc = common.DoubleConv(3, ch[0], padding=padding, norm=False)
        for level, down in enumerate(unet.downs):  # Down = [MaxPool2d, block]
            down[1] = common.DoubleConv(ch[level], ch[level + 1], padding=padding, norm=False)
        for level, up in zip(reversed(range(depth)), unet.ups):  # input: skip + half the channels below
            up.block = common.DoubleConv(ch[level] + ch[level + 1] // 2, ch[level], padding=padding, norm=False)
    for module in unet.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # std = sqrt(2 / fan_in)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return unet


# The branches each task runs (Sec. VII): seg = the U-Net alone, cls = encoder + head, joint = both.
BRANCHES = {"seg": ("seg",), "cls": ("cls",), "joint": ("seg", "cls")}


class MultiTaskUNet(nn.Module):
    """Fig. 4: a U-Net whose bottleneck also feeds the classification head; `branches` (BRANCHES) switches them on."""

    def __init__(self, n_classes, width, depth, padding, dropout, bottleneck, pool, fc, head_dropout,
                 batchnorm=False, branches=("seg", "cls")):
        super().__init__()
        self.branches = branches
        self.unet = thesis_unet(width, depth, padding, batchnorm)
        self.contracting_dropout = nn.Dropout(dropout)  # end of the contracting path (U-Net paper)
        self.classifier = ClassificationHead(self.unet.feature_channels[-1], bottleneck, n_classes,
                                             pool, fc, head_dropout)

    def forward(self, x):
        """-> {"cls": class logits [B,C], "seg": lesion logits [B,o,o]}, for the branches switched on."""
        *skips, bottom = self.unet.encode(x)  # skip features of levels 0..d-1; bottleneck [B, 16 w, b, b]
        outputs = {}
        if "cls" in self.branches:  # the head reads the bottleneck as it is (its own two dropouts, Table VII)
            outputs["cls"] = self.classifier(bottom)
        if "seg" in self.branches:  # the decoder reads it through the U-Net's dropout
            outputs["seg"] = self.unet.decode(skips + [self.contracting_dropout(bottom)])[:, 0]
        return outputs

    def branch_parameters(self):
        """The parameters of the branches switched on (Table V counts the U-Net, Table X the U-Net and the head)."""
        modules = [self.unet] if "seg" in self.branches else [self.unet.inc, self.unet.downs]
        modules += [self.classifier] if "cls" in self.branches else []
        return [p for module in modules for p in module.parameters()]


def segmentation_loss(seg_logits, masks):
    """Eq. 2: binary cross-entropy between the lesion probability and the mask (mean over pixels)."""
    return F.binary_cross_entropy_with_logits(seg_logits.float(), masks)


def class_weights(labels, n_classes):
    """Eq. 12: W_c = N / (n_classes n_c) from the training set's class counts; an absent class counts one image."""
    counts = torch.bincount(labels.cpu(), minlength=n_classes).double()
    return (labels.numel() / (n_classes * counts.clamp_min(1))).float()


def classification_loss(cls_logits, labels, weights):
    """Eq. 3 with the weights of Eq. 12: L = -1/N sum_i W_{y_i} log p_model[y_i] (Keras class_weight)."""
    cross_entropy = F.cross_entropy(cls_logits.float(), labels, reduction="none")  # -log p[y_i], [B]
    return (weights[labels] * cross_entropy).mean()


def branch_losses(outputs, masks, labels, weights):
    """The loss of each branch that ran: {"seg": L_seg (Eq. 2), "cls": L_cls (Eq. 3 with Eq. 12's weights)}."""
    losses = {}
    if "seg" in outputs:
        losses["seg"] = segmentation_loss(outputs["seg"], masks)
    if "cls" in outputs:
        losses["cls"] = classification_loss(outputs["cls"], labels, weights)
    return losses


def task_alpha(task, alpha):
    """The a of Eq. 4 a task trains with: 1 segmentation only, 0 classification only."""
    return {"seg": 1.0, "cls": 0.0}.get(task, alpha)


def joint_loss(loss_seg, loss_cls, alpha):
    """Eq. 4 (sign corrected, see Deviations): L = a L_seg + (1 - a) L_cls."""
    return alpha * loss_seg + (1.0 - alpha) * loss_cls

def mirror_pad(x, pad, mode="reflect"):
    """Pads [B,C,H,W] by `pad` per side: "reflect" as np.pad, also wider than the map (the overlap-tile mirrors the
    mirror: the reflection repeats every 2 (n - 1) pixels); "constant" pads 0, the mean colour after normalising."""
    if mode == "constant":
        return F.pad(x, (pad,) * 4)
    for axis in (-1, -2):
        period = 2 * (x.shape[axis] - 1)
        index = torch.arange(-pad, x.shape[axis] + pad, device=x.device) % period  # 0 .. period - 1
        x = x.index_select(axis, torch.minimum(index, period - index))  # i and period - i mirror each other
    return x


def resize(x, side, mode):
    """[B,H,W] or [B,C,H,W] -> side x side (unchanged when already that side)."""
    if x.shape[-1] == side:
        return x
    flat = x.dim() == 3
    x = F.interpolate(x[:, None] if flat else x, size=(side, side), mode=mode)  # bilinear: align_corners False
    return x[:, 0] if flat else x


def preprocess(images, mean, std, geometry, border_mode):
    """Sec. VIII: uint8 [B,3,S,S] -> input [B,3,in,in]: normalise; valid U-Net: scale to the output, pad the border."""
    x = common.normalize(images, mean, std)
    if geometry["input"] != geometry["output"]:
        x = mirror_pad(resize(x, geometry["output"], "bilinear"), (geometry["input"] - geometry["output"]) // 2,
                       border_mode)
    return x


def morphological_closing(mask, size):
    """Sec. IX step 2: closing (dilation, then erosion) with a size x size square, on [N,H,W] bool, as OpenCV's
    MORPH_CLOSE and scipy's binary_erosion(binary_dilation(m, s), s, border_value=1): outside the image neither
    grows nor erodes the lesion (scipy's binary_closing erodes a lesion touching the border)."""
    x = mask[:, None].float()
    # dilation = max over the window (the -inf padding never wins: outside adds no lesion)
    dilated = F.max_pool2d(x, size, stride=1, padding=size // 2)
    # erosion = min over the window = -max(-x) (-x padded with -inf: outside never erodes)
    eroded = -F.max_pool2d(-dilated, size, stride=1, padding=size // 2)
    return eroded[:, 0] > 0.5


def largest_connected_component(mask):
    """Sec. IX step 3: the largest 8-connected component of each mask [N,H,W] (one lesion per image), as
    scipy's ndimage.label(m, np.ones((3, 3))) and the largest area; ties go to the first in raster order."""
    labels = common.label_components(mask, connectivity=8).long()  # [N,H,W], 0 = background
    n, k = labels.shape[0], int(labels.max()) + 1
    # one bincount for the whole batch: image i's labels are shifted to i*k .. i*k + k - 1
    offset = torch.arange(n, device=labels.device).view(n, 1, 1) * k
    areas = torch.bincount((labels + offset).flatten(), minlength=n * k).view(n, k)  # [N, k] pixel counts
    areas[:, 0] = 0                        # the background is never the lesion
    keep = areas.argmax(1).view(n, 1, 1)  # 0 when the mask is empty -> stays empty
    return mask.bool() & (labels == keep)


def fill_holes(mask):
    """Sec. IX step 4, flood filling: background not 4-connected to the image border becomes lesion, as scipy's
    binary_fill_holes: the holes are the background's 4-connected components that touch no border."""
    labels = common.label_components(~mask.bool(), connectivity=4).long()  # [N,H,W], 0 = lesion
    n, k = labels.shape[0], int(labels.max()) + 1
    border = torch.cat([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], 1)  # [N, 2H + 2W]
    offset = torch.arange(n, device=labels.device).view(n, 1) * k  # image i's labels: i*k .. i*k + k - 1
    reaches_border = torch.zeros(n * k, dtype=torch.bool, device=labels.device)
    reaches_border[(border + offset).flatten()] = True
    return mask.bool() | ~reaches_border[labels + offset.view(n, 1, 1)]  # lesion, or background that is a hole


def restore_resolution(mask, size):
    """Sec. IX step 5: an output-side mask [N,h,w] to the image side, nearest (pixel floor(i h / size), cv2's too)."""
    return resize(mask.float(), size, "nearest") > 0.5


def postprocess(prob, closing_size):
    """Sec. IX steps 1-4 on lesion probabilities [N,o,o] -> bool masks (step 5 is the caller's)."""
    mask = prob > 0.5  # step 1, rounding to 0 / 1: np.round(p) for p in [0, 1] (0.5 rounds to even: 0) is p > 0.5
    mask = morphological_closing(mask, closing_size)  # step 2: remove noise, join nearby lesion parts
    mask = largest_connected_component(mask)          # step 3: one lesion per image
    return fill_holes(mask)                           # step 4: flood fill the interior


# ==================================== Training and evaluation =====================================

def build_model(args, n_classes):
    """The task's MultiTaskUNet from the flags, and its geometry (input, output and bottleneck sides)."""
    geometry = network_geometry(args.size, args.depth, args.unet_padding, args.input_size)
    model = MultiTaskUNet(n_classes, args.width, args.depth, args.unet_padding, args.dropout, geometry["bottleneck"],
                          args.pool, args.fc, args.head_dropout, args.batchnorm, BRANCHES[args.task])
    return model, geometry


def flips_and_right_angle_rotations(batch, generator):
    """The author's augmentation: image and mask get one of the square's 8 symmetries, uniformly (3 fair coins)."""
    b = batch["images"].shape[0]
    coins = torch.rand((b, 3), generator=generator, device=generator.device).to(batch["images"].device) < 0.5
    out = dict(batch)
    for key in [k for k in ("images", "masks", "valid") if batch.get(k) is not None]:  # valid: the padding too
        x = batch[key]                                       # [B,3,S,S] or [B,S,S]
        heads = [c.view((b,) + (1,) * (x.dim() - 1)) for c in coins.unbind(1)]
        x = torch.where(heads[0], x.transpose(-1, -2), x)
        x = torch.where(heads[1], x.flip(-1), x)
        out[key] = torch.where(heads[2], x.flip(-2), x)
    return out


def keras_reduce_lr_on_plateau(optimizer, factor, patience):
    """Sec. XV.A as Keras' ReduceLROnPlateau(monitor="loss"): a flat loss drops the lr after epochs 6, 11, 16, where
    torch's drops when its count of stale epochs *exceeds* patience (7, 13, 19): Keras' p is torch's p - 1."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience - 1,
                                                      threshold=1e-4, threshold_mode="abs")


def infer(model, images, args, geometry, mean, std, device):
    """uint8 images [B,3,S,S] -> what evaluation and --predict see of the branches the model runs: {"prob": lesion
    probability [B,o,o], "pred_raw" / "pred_post": masks before / after Sec. IX [B,S,S], "probs": softmax [B,C]}."""
    with common.autocast(device, args.amp):
        outputs = model(preprocess(images, mean, std, geometry, args.border_mode))
    out = {}
    if "seg" in outputs:
        out["prob"] = torch.sigmoid(outputs["seg"].float())                                        # [B, o, o]
        out["pred_raw"] = restore_resolution(out["prob"] > 0.5, args.size)  # before post-processing (Table VI)
        out["pred_post"] = restore_resolution(postprocess(out["prob"], args.closing_size), args.size)
    if "cls" in outputs:
        out["probs"] = torch.softmax(outputs["cls"].float(), dim=1)                               # Eq. 1, [B, C]
    return out


def class_key(name):
    return name.lower().replace(" ", "_").replace("-", "_")


@torch.no_grad()
def evaluate(model, split, args, geometry, mean, std, device):
    """Sec. XII metrics (percent) of the branches the model runs, on one split -> (metrics, per-image outputs)."""
    model.eval()
    parts = []
    for batch in common.iterate_batches(split, batch_size_for(args, args.task) * 2, shuffle=False):
        parts.append(infer(model, batch["images"], args, geometry, mean, std, device))
        parts[-1].pop("prob", None)  # the masks are kept, not the lesion probabilities
    outputs = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    metrics = {}
    if "pred_post" in outputs:
        truth, valid = split["masks"] > 0, split.get("valid")
        # letterboxed real images: JAC over the image's own pixels (the padding is not the image; truth is 0 there)
        for key in ("pred_raw", "pred_post"):
            outputs[key] = outputs[key] & (valid.bool() if valid is not None else True)
        outputs["jaccard_post"] = common.jaccard(outputs["pred_post"], truth)      # Eq. 5 per image
        metrics["jaccard"] = 100 * common.jaccard(outputs["pred_raw"], truth).mean().item()
        metrics["jaccard_post"] = 100 * outputs["jaccard_post"].mean().item()
    if "probs" in outputs:
        outputs["probs"] = outputs["probs"].cpu()
        predicted, labels, n = outputs["probs"].argmax(1), split["labels"].cpu(), len(split["class_names"])
        sensitivity, specificity = common.sensitivity_specificity(predicted, labels, n)  # Eq. 7, 8
        metrics["balanced_accuracy"] = 100 * common.balanced_accuracy(predicted, labels, n)  # Eq. 9
        metrics["accuracy"] = 100 * common.accuracy(predicted, labels)                   # Eq. 10
        for c, name in enumerate(split["class_names"]):
            metrics[f"sensitivity_{class_key(name)}"] = 100 * sensitivity[c].item()
            metrics[f"specificity_{class_key(name)}"] = 100 * specificity[c].item()
    if "pred_post" in outputs and "probs" in outputs:  # Eq. 11, with the post-processed JAC (Table XIV)
        metrics["mean_performance"] = (metrics["balanced_accuracy"] + metrics["jaccard_post"]) / 2
    return metrics, outputs


def train(job, model, net, data, args, geometry, mean, std):
    """Sec. X / XV.A: Adam, shuffled augmented batches, the lr schedule, validation and checkpoint every epoch, the
    best kept; an interrupted job resumes. `model` trains (maybe compiled), `net` is the plain module inside it."""
    run, task, train_split = job.run, args.task, data["train"]
    n = len(train_split["class_names"])
    weights = (class_weights(train_split["labels"], n) if args.class_weights else torch.ones(n)).to(run.device)
    alpha = 0.0 if args.transfer else task_alpha(task, args.alpha)  # Eq. 4's a; transfer trains the head alone
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = keras_reduce_lr_on_plateau(optimizer, args.lr_factor, args.lr_patience)
    start, best = common.resume(job, model, optimizer, scheduler)
    batch_size = batch_size_for(args, task)
    steps = -(-train_split["images"].shape[0] // batch_size)
    progress = common.Progress(job, steps, args.epochs, start, every=args.log_every)
    generator = torch.Generator(device=run.device)
    for epoch in range(start, args.epochs):
        model.train()
        if args.transfer:
            net.unet.eval()  # frozen: keep its BatchNorm statistics and no dropout
        generator.manual_seed(args.seed * 1000 + epoch)  # repeatable epochs, also after --resume
        totals = torch.zeros(1 + len(net.branches), device=run.device)  # sums of L and each branch's loss
        batches = common.iterate_batches(train_split, batch_size, shuffle=True, generator=generator)
        if args.augment == "flips-rot90":  # the author's code (Tables V, VIII)
            batches = (flips_and_right_angle_rotations(b, generator) for b in batches)
        elif args.augment == "affine":  # +-15 deg rotation, +-10 % scale, flips, colour jitter
            batches = (common.augment(b, generator=generator) for b in batches)
        for batch in progress.epoch(epoch, batches):
            batch = common.shard(batch, run.dist)  # this process's slice (torchrun data mode)
            x = preprocess(batch["images"], mean, std, geometry, args.border_mode)
            with common.autocast(run.device, args.amp):
                outputs = model(x)  # the task's branches: {"cls": [B,C], "seg": [B,o,o]}
                masks = resize(batch["masks"].float(), geometry["output"], "nearest")  # at the output side (Sec. VIII)
                losses = branch_losses(outputs, masks, batch["labels"], weights)
                # Eq. 4: L = a L_seg + (1 - a) L_cls; a branch switched off adds nothing (seg: a = 1, cls: a = 0)
                loss = joint_loss(losses.get("seg", 0.0), losses.get("cls", 0.0), alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += torch.stack([loss, *losses.values()]).detach()
            progress.step(loss, x.shape[0])
        totals = common.mean_over_ranks(totals, run.dist)  # torchrun data mode: every process steps the same lr
        loss, *branch_means = (totals / steps).tolist()
        scheduler.step(loss)  # Sec. XV.A: x0.8 after 5 epochs in a row without a lower loss
        val_metrics, _ = evaluate(model, data["val"], args, geometry, mean, std, run.device)
        score = val_metrics[SELECTION[task]]
        job.log(epoch=epoch + 1, train_loss=loss, **{f"train_loss_{b}": v for b, v in zip(net.branches, branch_means)},
                lr=optimizer.param_groups[0]["lr"], **{f"val_{k}": v for k, v in val_metrics.items()})
        print(f"[{job.name}] epoch {epoch + 1}/{args.epochs} loss {loss:.4f} val {SELECTION[task]} {score:.1f}"
              + (" (best)" if score > best else ""), flush=True)
        # with the weights what --eval-only, --transfer and --predict need: the row's task and a, input statistics
        best = common.save(job, epoch + 1, score, best, model, optimizer, scheduler, norm_mean=mean.cpu(),
                           norm_std=std.cpu(), spec={"task": task, "alpha": args.alpha},
                           class_names=train_split["class_names"])
    progress.report()


def load_data(args):
    """The dataset of a run; synthetic data is generated from args.seed (one draw per seed)."""
    synthetic = args.data == "synthetic"
    name, sizes = ("synthetic-lesions", common.synthetic_split_sizes(args)) if synthetic else (args.data, {})
    data = common.load_dataset(name, root=args.root, size=args.size, seed=args.seed, cache=args.cache, **sizes)
    if "train" not in data or "val" not in data:
        raise common.UsageError(f"{name}: training needs train and val splits, found {sorted(data)}")
    return data


def train_and_test(job, changes, datasets):
    """One job, row x seed: trains (--eval-only: loads) and tests the row's model; its first seed draws the figures."""
    run = job.run
    args = argparse.Namespace(**{**vars(run.args), "seed": job.seed, **changes})
    if job.seed not in datasets:  # the synthetic data is drawn from the seed: one draw per seed
        datasets[job.seed] = load_data(args)
    data = {k: common.to_device(v, run.device) for k, v in datasets[job.seed].items()}
    class_names = data["train"]["class_names"]
    mean, std = (s.to(run.device) for s in common.channel_stats(data["train"]["images"], data["train"]["valid"]))
    net, geometry = build_model(args, len(class_names))
    if args.transfer:  # hypothesis 1 (Sec. XVI.B): the U-Net of a segmentation checkpoint, frozen
        weights = common.load_checkpoint(args.transfer, SCRIPT)["model"]
        net.unet.load_state_dict({k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.")})
        net.unet.requires_grad_(False)
    print(f"[{job.name}] {sum(p.numel() for p in net.branch_parameters()) / 1e6:.2f}M parameters; network "
          f"{geometry['input']} -> {geometry['output']} px (images {args.size} px)", flush=True)
    model = common.prepare_model(net, run)
    if args.eval_only:
        state = common.load_checkpoint(args.checkpoint, SCRIPT, map_location=run.device)
        common.load_model_state(model, state["model"])
    else:
        train(job, model, net, data, args, geometry, mean, std)
        state = common.load_best(job, model)
    mean, std = state["norm_mean"].to(run.device), state["norm_std"].to(run.device)  # the model's own statistics
    results = {}
    for split in ("val", "test") if "test" in data else ("val",):  # the figures show the last one
        results[split], outputs = evaluate(model, data[split], args, geometry, mean, std, run.device)
    if job.seed == common.seed_list(run.args)[0]:  # the row's figures: its first seed's model
        figure_examples(data[split], outputs, job.figures / f"examples_{job.row}.png")
        if not args.eval_only:
            keys = [f"val_{k}" for k in SELECTION.values() if k in results[split]]
            common.plot_curves(job, ["train_loss"] + keys, job.figures / f"training_curves_{job.row}.png")
    flat = {**{f"val_{k}": v for k, v in results["val"].items()}, **results.get("test", {})}
    return {**flat, "best_epoch": state["epoch"], "class_names": list(class_names)}


# ========================== Report: tables (Markdown + JSON) and figures ==========================

def _short(name):
    return "".join(w[0] for w in name.split("_")).upper() if "_" in name else name[:1].upper()


def _cell(row, key):
    """One table cell of a flat metrics row: the value, or mean ± SE over seeds (common.fmt_over_seeds)."""
    return common.fmt_over_seeds(row, key, digits=1) if row.get(key) is not None else None


TASK_TABLES = {  # Tables VI (seg), IX (cls), XIV (joint): title, (header, metric) columns
    "seg": ("Table VI: segmentation, validation and test (%)",
            [("JAC", "jaccard"), ("Post-processing JAC", "jaccard_post")]),
    "cls": ("Table IX: classification, BACC and sensitivity per class (%)", [("BACC", "balanced_accuracy")]),
    "joint": ("Table XIV: multi-task model, validation and test (%)", [("Post-p. JAC", "jaccard_post"),
              ("BACC", "balanced_accuracy"), ("Mean Performance", "mean_performance")])}


def task_table(task, row, class_names):
    """Tables VI / IX / XIV and XIII (per class), in percent, of a flat row (test: <name>, validation: val_<name>)."""
    keys, (title, columns) = [class_key(n) for n in class_names], TASK_TABLES[task]
    sets = [(name, prefix) for name, prefix in (("Validation", "val_"), ("Test", ""))
            if row.get(prefix + columns[-1][1]) is not None]
    columns = columns + ([(f"SE {_short(k)}", f"sensitivity_{k}") for k in keys] if task != "seg" else [])
    lines = [{"Set": name, **{h: _cell(row, prefix + k) for h, k in columns}} for name, prefix in sets]
    text = common.markdown_table(lines, ["Set"] + [h for h, _ in columns], title=title)
    if task != "seg":  # Table XIII
        lines = [{"Set": name, "Measure": measure.capitalize(),
                  **{n: _cell(row, f"{prefix}{measure}_{k}") for n, k in zip(class_names, keys)}}
                 for name, prefix in sets for measure in ("sensitivity", "specificity")]
        text += "\n\n" + common.markdown_table(lines, ["Set", "Measure"] + list(class_names),
                                               title="Table XIII: sensitivity and specificity per class (%)")
    return text


def figure_examples(split, outputs, path, n_each=3):
    """Figs. 5-12: true (green) and predicted (red) contours, class probabilities; right, wrong (seg: best, worst)."""
    names, probs = split["class_names"], outputs.get("probs")
    if "probs" in outputs:
        correct = probs.argmax(1) == split["labels"].cpu()
        picks = [(i, kind) for kind, hit in (("correct", correct), ("wrong", ~correct))
                 for i in hit.nonzero()[:n_each, 0].tolist()]
    else:
        order = outputs["jaccard_post"].argsort(descending=True).tolist()
        picks = [(i, "best JAC") for i in order[:n_each]] + [(i, "worst JAC") for i in order[::-1][:n_each]]
    rows, cols = (2 if "probs" in outputs else 1), max(len(picks), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for col, (i, title) in enumerate(picks):
        ax = axes[0, col]
        common.show_image(ax, split["images"][i].cpu())
        if "pred_post" in outputs:
            common.draw_contours(ax, split["masks"][i].cpu() > 0, "lime", label="truth")
            common.draw_contours(ax, outputs["pred_post"][i].cpu(), "red", label="predicted")
            title += f"\nJAC {100 * outputs['jaccard_post'][i].item():.0f}%"
        if "probs" in outputs:
            title += f"\ntrue {names[split['labels'][i].item()]}\npredicted {names[probs[i].argmax().item()]}"
            axes[1, col].barh(range(len(names)), probs[i].numpy(), color="tab:blue")
            axes[1, col].set_yticks(range(len(names)), [_short(n.lower()) for n in names])
            axes[1, col].set(xlim=(0, 1), xlabel="probability")
        ax.set_title(title, fontsize=8)
    common.save_figure(fig, path)


def report(run, table):
    """results.md, results.json and figures: the a sweep (Tables XI, XII), separate vs joint (Sec. XVI) or one task."""
    args, class_names = run.args, table[-1]["class_names"]
    if args.alpha_sweep:  # Table XI; Table XII, the main row, is its best by validation Mean Performance
        for row, alpha in zip(table, args.alpha_sweep):
            row["alpha"] = alpha
        heading, main = "a sweep", max(table, key=lambda r: r["val_mean_performance"])
        columns = [("Epoch", "best_epoch"), ("Mean Performance", "val_mean_performance"),
                   ("JAC", "val_jaccard_post"), ("BACC", "val_balanced_accuracy"), ("Test MP", "mean_performance"),
                   ("Test JAC", "jaccard_post"), ("Test BACC", "balanced_accuracy")]
        lines = [{"a": r["alpha"], **{h: _cell(r, k) for h, k in columns}} for r in table]
        title = "Table XI: values tested for a (validation at the best epoch; test alongside) (%)"
        best = f"Table XII (best multi-task model): a = {main['alpha']:g}, the highest validation Mean Performance."
        body = common.markdown_table(lines, ["a"] + [h for h, _ in columns], {"a": "{:g}"}, title=title) + "\n" + best
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for header, key in columns[1:4]:  # validation Mean Performance, JAC, BACC
            ax.errorbar(args.alpha_sweep, [r[key] for r in table], yerr=[r.get(f"{key}_se", 0.0) for r in table],
                        marker="o", capsize=3, label=header)
        ax.set(xlabel="a (Eq. 4)", ylabel="validation (%)")
        ax.legend()
        common.save_figure(fig, run.figures / "alpha_sweep.png")
    elif args.task == "compare":  # the main row: the joint model
        labels = {"seg": "separate segmentation", "cls": "separate classification", "joint": "joint"}
        lines = [{"Model": labels[task] + (f" (a = {args.alpha:g})" if task == "joint" else ""),
                  "JAC": _cell(r, "jaccard_post"), "BACC": _cell(r, "balanced_accuracy"),
                  "Thesis JAC": THESIS[task].get("jaccard_post"), "Thesis BACC": THESIS[task].get("balanced_accuracy")}
                 for r, task in zip(table, TASKS)]
        title = (f"Test set, JAC after post-processing (%); this run's joint model: a = {args.alpha:g}; "
                 "thesis: ISIC 2017, its joint model at a = 0.8 (Tables XI, XIV)")
        body = (common.markdown_table(lines, ["Model", "JAC", "BACC", "Thesis JAC", "Thesis BACC"],
                                      {"Thesis JAC": "{:.1f}", "Thesis BACC": "{:.1f}"}, title=title) + "\n\n"
                + "\n\n".join(task_table(task, r, class_names) for r, task in zip(table, TASKS)))
        for row, task in zip(table, TASKS):
            row["task"], row["row"] = task, labels[task]
        heading, main = "separate vs joint models", table[-1]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))  # test JAC and BACC beside the thesis' ISIC 2017 numbers
        for ax, (metric, key) in zip(axes, (("JAC", "jaccard_post"), ("BACC", "balanced_accuracy"))):
            shown = [r for r in table if r.get(key) is not None]
            positions = range(len(shown))
            ax.bar([p - 0.2 for p in positions], [r[key] for r in shown], 0.4, label="this run",
                   yerr=[r.get(f"{key}_se", 0.0) for r in shown], capsize=3)
            ax.bar([p + 0.2 for p in positions], [THESIS[r["task"]][key] for r in shown], 0.4,
                   label="thesis (ISIC 2017)")
            ax.set_xticks(list(positions), [r["row"].replace("separate ", "separate\n") for r in shown])
            ax.set(ylabel=f"test {metric} (%)", ylim=(0, 100))
        axes[0].legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        common.save_figure(fig, run.figures / "separate_vs_joint.png")
    else:
        heading, (main,) = f"task {args.task}", table
        body = task_table(args.task, main, class_names)
    numbers = {k: v for k, v in common.row_metrics(main).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("best_epoch")}
    split = "test" if any(not k.startswith("val_") for k in numbers) else "val"
    metrics = {k.removeprefix("val_"): v for k, v in numbers.items() if k.startswith("val_") == (split == "val")}
    seeds = common.seed_list(args)
    note = (f"Mean ± standard error over {len(seeds)} seeds ({', '.join(map(str, seeds))}).\n\n"
            if len(seeds) > 1 else "")
    common.write_results(run, metrics, table, f"# {SCRIPT}: {heading}\n\n{note}{body}\n", split)


# ========== Predict: a trained model on a user's own images (--predict, or from Python) ===========

def load_model(checkpoint_path, device="cpu"):
    """A common.Predictor for a best.pt / last.pt: the model rebuilt from the checkpoint's arguments, in eval mode."""
    device = torch.device(device)
    state = common.load_checkpoint(checkpoint_path, SCRIPT, map_location=device)
    args = argparse.Namespace(**trained_args(state))
    model, geometry = build_model(args, len(state["class_names"]))
    common.load_model_state(model, state["model"])
    return common.Predictor(model=model.to(device).eval(), args=args, size=args.size, keep_aspect=True, device=device,
                            norm=(state["norm_mean"].to(device), state["norm_std"].to(device)),
                            class_names=state["class_names"], mask_names=["skin", "lesion"],
                            extra={"geometry": geometry})


@torch.no_grad()
def predict_batch(predictor, images):
    """uint8 [B,3,S,S] -> {"mask": the post-processed lesion [B,S,S], "maps": {"entropy": of the lesion probability,
    bits}, "rows": predicted class, probability per class}. A cls model does not segment: empty mask, no map."""
    args, n = predictor.args, images.shape[0]
    out = infer(predictor.model, images, args, predictor.extra["geometry"], *predictor.norm, predictor.device)
    empty = torch.zeros(n, args.size, args.size, dtype=torch.bool, device=images.device)
    result = {"mask": out.get("pred_post", empty).long(), "maps": {}, "rows": [{} for _ in range(n)]}
    if "prob" in out:  # H(p) = -p log2 p - (1 - p) log2 (1 - p): 0 where the model is sure, 1 bit at p = 0.5
        p = out["prob"].clamp(1e-7, 1 - 1e-7)
        result["maps"]["entropy"] = resize(-(p * p.log2() + (1 - p) * (1 - p).log2()), args.size, "bilinear")
    for row, p in zip(result["rows"], out.get("probs", torch.empty(0)).cpu()):
        row["predicted_class"] = predictor.class_names[int(p.argmax())]
        row.update({f"p_{class_key(name)}": float(v) for name, v in zip(predictor.class_names, p)})
    return result


# ============================================== main ==============================================

def main(argv=None):
    args = common.parse_args(build_parser(), SCRIPT, argv, resolve_defaults)  # every flag checked here
    if args.predict:  # a trained model on a user's images
        common.run_predict(args, load_model, predict_batch, SCRIPT)
        return
    if args.alpha_sweep:  # the table's rows, {name (its jobs' folder name): changes to the arguments}; Table XI
        rows = {f"alpha={a:g}": {"task": "joint", "alpha": a} for a in args.alpha_sweep}
    elif args.task == "compare":  # Sec. XVI
        rows = {task: {"task": task} for task in TASKS}
    else:
        rows = {args.task: {}}
    jobs = [(row, seed) for row in rows for seed in common.seed_list(args)]
    run = common.open_run(args, SCRIPT, n_jobs=len(jobs))
    datasets = {}  # seed -> dataset, shared by the rows
    table = common.run_jobs(run, jobs, lambda job: train_and_test(job, rows[job.row], datasets))
    if table is None:  # torchrun: another process writes the report
        return
    report(run, table)


if __name__ == "__main__":
    common.cli(main)
