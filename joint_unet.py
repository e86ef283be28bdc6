"""Multi-task U-Net for skin lesion segmentation and 3-class diagnosis (joint_unet.py).

Paper: MSc thesis (extended abstract), Instituto Superior Tecnico, on a multi-task U-Net for the
segmentation and classification of skin lesions in dermoscopy images of ISIC 2017; the author's
code is cited as https://github.com/franciscosenae/Tese. Numbers below refer to its sections,
equations and tables (../shared/papers/joint_unet.txt).

Idea. A U-Net (Ronneberger et al. 2015) segments the lesion; the same encoder, with a small fully
connected head on its lowest-resolution features, classifies the lesion as nevus, melanoma or
seborrheic keratosis. Trained separately (task `seg`, task `cls`) or jointly with one loss that
weighs the two tasks (task `joint`, Eq. 4), the thesis asks whether sharing the encoder helps
either task. It also tests transfer: freeze a segmentation network and train only the
classification layers (hypothesis 1, Sec. XVI.B). On ISIC 2017 the separate models reach JAC 70.6 /
BACC 64.1 and the joint model JAC 66.3 / BACC 59.6 (test set): no gain, half the compute.

Paper -> code
    Sec. V, Fig. 2      U-Net with RGB input, valid (572 -> 388) or same padding   MultiTaskUNet
    Sec. VI, Table VII  max pool, flatten, dropout 0.5, FC, dropout 0.5, FC 3      ClassificationHead
    Eq. 1               softmax over the three class logits                         evaluate()
    Sec. VII, Fig. 4    fused model: head on the encoder's bottom                  MultiTaskUNet.forward
    Sec. VIII           pre-processing: scale, extra border padding, normalise     preprocess(), network_geometry()
    Sec. IX             post-processing: threshold, closing, LCC, hole filling,     postprocess() and the
                        original resolution                                         functions above it
    Eq. 2               binary cross-entropy (segmentation)                         segmentation_loss()
    Eq. 3 + Eq. 12      class-weighted categorical cross-entropy                    classification_loss(),
                                                                                    class_weights()
    Eq. 4               L = a L_seg + (1 - a) L_cls                                 joint_loss()
    Eq. 5               Jaccard index, mean over images                             common.jaccard in evaluate()
    Eq. 7-10            sensitivity, specificity, BACC, categorical accuracy        evaluate()
    Eq. 11              Mean Performance = (BACC + JAC) / 2                         evaluate()
    Sec. X              shuffled mini-batches, validate and checkpoint every epoch, train()
                        keep the best epoch (JAC, BACC or Mean Performance)
    Sec. XV.A           Adam 1e-3, lr x0.8 after 5 epochs without a lower loss     train()
    Sec. XVI.B          hypothesis 1: transfer from a segmentation checkpoint      --transfer
    Tables VI/IX/XIV    validation/test table of the task run                      task_table()
    Table XI            the a sweep                                                 --alpha-sweep
    Table XIII          sensitivity and specificity per class                      task_table()
    Figs. 5-12          image, true and predicted contours, class probabilities   figure_examples()

Usage
    python joint_unet.py                        # synthetic lesions, CPU: separate seg and cls vs
                                                # joint (the thesis' comparison), ~4-5 min, 2 cores
    python joint_unet.py --task joint           # one joint model (Table XIV layout)
    python joint_unet.py --task seg             # Table VI;  --task cls: Table IX
    python joint_unet.py --alpha-sweep 0.1,0.3,0.5,0.7,0.8,0.9      # Table XI
    python joint_unet.py --task seg --out runs/seg && \\
        python joint_unet.py --transfer runs/seg/best.pt             # hypothesis 1 (Sec. XVI.B)
    python joint_unet.py --data isic2017 --root /data/ISIC2017 --device cuda --task compare
        # ISIC 2017 with the thesis' settings: valid U-Net 572 -> 388, width 32, batch 2/8/8,
        # 100 epochs per model
    python joint_unet.py --eval-only --checkpoint runs/x/best.pt

Deviations (ambiguities resolved, and why)
    - Eq. 4 is printed L = a L1 + (a - 1) L2: a sign typo (a < 1 would then maximise L2); the text's
      reading ("a = 1 trains segmentation only, 0.5 gives both the same relevance") is
      L = a L1 + (1 - a) L2, which is what joint_loss() computes.
    - Pooling of the head: the thesis tuned pool and stride (7..14 outputs from the 28x28 bottom)
      but does not print the winner. Table X's 50M parameters = 7.8M (U-Net, width 32) + 42.5M
      (9x9x512 -> 1024), i.e. a 3x3 pool with stride 3 and FC 1024, the default here (Table VII's
      "10...42M" is the same 9x9x512 for FC 256...1024). The baseline of Table VIII is --pool 2.
      On tiny inputs the pool is clamped to the bottleneck side. The first FC uses ReLU (not printed).
    - Dropout: the thesis says only "dropout: true". As in the original U-Net it is one dropout
      layer (--dropout, 0.5) at the end of the contracting path (the decoder's input); the head reads
      the bottleneck before it and has its own two dropout layers (Table VII, p = 0.5).
    - Eq. 3 with Eq. 12's weights is computed as Keras' class_weight does: mean over the batch of
      W_{y_i} * CE_i (not divided by the sum of the weights, as torch's weighted mean would).
      Eq. 2 is the mean BCE over pixels (the thesis writes a sum; only the scale differs).
    - Pre-processing for the valid U-Net (Sec. VIII): the thesis pads to a square, adds "extra
      padding for the lesion border" of an unprinted amount and resizes to 572. Here the extra
      padding is exactly what makes the 388 output cover the whole image: the image is scaled to
      the output side and padded by (in - out) / 2 on each side (mirror padding, as the original
      U-Net's overlap-tile strategy; --border-mode constant pads with the mean). The mask is scaled
      to the output side (= the padded mask cropped to the output). With --size 388 this is 572 ->
      388; on synthetic images of side S the input is the smallest valid one whose output >= S
      (S = 64 -> 252 in, 68 out). common.load_dataset resizes every image to --size x --size once
      (aspect ratio not kept, cached), which stands in for the thesis' pad-to-square step, and
      "the original resolution" restored by post-processing is --size, where JAC is measured.
    - Post-processing kernel sizes are not printed: closing with a --closing-size square (5 px),
      8-connected largest component, 4-connected flood fill of the background from the border.
    - The learning-rate schedule (x0.8 after 5 epochs without decrease) watches the epoch's mean
      training loss (the task's total loss), like Keras' ReduceLROnPlateau on "loss".
    - The thesis picks the best epoch on validation JAC after post-processing (Table V) and on
      Mean Performance with that JAC (Table XIV: 70.8 = (67.5 + 74.0) / 2); so do we.
    - Synthetic defaults are CPU-sized (size 64, width 8, batch 16, 40 epochs, same padding) and
      say so in --help; the thesis' values are the defaults on real data. Metrics are in percent.
"""
import argparse
import copy
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "joint_unet"
TASKS = ("seg", "cls", "joint")
THESIS = {  # ISIC 2017 test set, percent (Tables VI, IX, XIV)
    "seg": {"jaccard_post": 70.6},
    "cls": {"balanced_accuracy": 64.1},
    "joint": {"jaccard_post": 66.3, "balanced_accuracy": 59.6},
}
PAPER_BATCH = {"seg": 2, "cls": 8, "joint": 8}  # Tables V, VIII, X


# ==================================================================================================
# Arguments
# ==================================================================================================

def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shared flags left unset take data-dependent defaults: --size 64 on synthetic data, 388 "
               "on real data (the valid U-Net then maps 572 -> 388, Sec. V/VIII); --epochs 40 on "
               "synthetic, 100 on real data (Table XI's best epochs reach 90); --batch-size 16 on "
               "synthetic, the thesis' 2 (seg, Table V), 8 (cls, Table VIII), 8 (joint, Table X) on "
               "real data.")
    common.add_common_args(parser, size=None, epochs=None, batch_size=None, lr=1e-3)
    parser.add_argument("--task", choices=TASKS + ("compare",), default=None,
                        help="seg (Table VI), cls (Table IX), joint (Table XIV), or compare: train seg, "
                             "cls and joint and set them side by side (Sec. XVI). Default: compare, or "
                             "joint with --alpha-sweep / --transfer")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="a of Eq. 4, weight of the segmentation loss (Table X: 0.5; best 0.8)")
    parser.add_argument("--alpha-sweep", default=None,
                        help="comma-separated a values, one joint model each (Table XI: "
                             "0.1,0.3,0.5,0.7,0.8,0.9)")
    parser.add_argument("--transfer", default=None, metavar="CHECKPOINT",
                        help="hypothesis 1 (Sec. XVI.B): load this segmentation checkpoint, freeze the "
                             "U-Net, train only the classification layers with a = 0")
    # model (Sec. V, VI, Table VII)
    parser.add_argument("--width", type=int, default=None,
                        help="filters of the first U-Net block (Table V: 32, ~7M parameters; Table IV "
                             "baseline 64). Default 32 on real data, 8 on synthetic (CPU-sized)")
    parser.add_argument("--depth", type=int, default=4, help="down-sampling steps of the U-Net (Sec. V: 4)")
    parser.add_argument("--unet-padding", choices=("same", "valid"), default=None,
                        help="valid: the original unpadded U-Net, 572 in -> 388 out (Sec. V), default on "
                             "real data; same: output = input, default on synthetic data")
    parser.add_argument("--input-size", type=int, default=None,
                        help="valid U-Net input side; default: the smallest whose output covers --size "
                             "(572 for --size 388, Sec. VIII)")
    parser.add_argument("--border-mode", choices=("reflect", "constant"), default="reflect",
                        help="extra border padding of Sec. VIII (valid U-Net): mirror or mean value")
    parser.add_argument("--dropout", type=float, default=0.5,
                        help="dropout at the end of the U-Net's contracting path (Table V: dropout on)")
    parser.add_argument("--pool", type=int, default=3,
                        help="max-pool size = stride of the head (Table VII: 7..14 outputs of 28; 3 "
                             "matches Table X's 50M parameters; Table VIII baseline: 2)")
    parser.add_argument("--fc", type=int, default=1024, help="units of the first FC layer (Table VII: 256-1024)")
    parser.add_argument("--head-dropout", type=float, default=0.5, help="both dropouts of the head (Table VII)")
    # training (Sec. X, XV.A)
    parser.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=True,
                        help="weigh Eq. 3 by W_c = N / (n_classes n_c) from the training counts (Eq. 12)")
    parser.add_argument("--lr-factor", type=float, default=0.8, help="lr multiplier on a plateau (Sec. XV.A)")
    parser.add_argument("--lr-patience", type=int, default=5,
                        help="epochs without a lower training loss before the lr drops (Sec. XV.A)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="flips, rotation, scaling, colour jitter on the device (Tables VIII, V)")
    # post-processing (Sec. IX)
    parser.add_argument("--closing-size", type=int, default=5,
                        help="side of the square structuring element of the closing, pixels (Sec. IX)")
    # synthetic data size
    parser.add_argument("--n-train", type=int, default=None, help="synthetic training images")
    parser.add_argument("--n-val", type=int, default=None, help="synthetic validation images")
    parser.add_argument("--n-test", type=int, default=None, help="synthetic test images")
    return parser


def resolve_defaults(args):
    """Fills the data-dependent defaults (see the parser's epilog) and the --quick overrides."""
    synthetic = args.data == "synthetic"
    if args.task is None:
        args.task = "joint" if (args.alpha_sweep or args.transfer) else "compare"
    if (args.alpha_sweep or args.transfer) and args.task != "joint":
        raise SystemExit("--alpha-sweep and --transfer train joint models; drop --task or use --task joint")
    if args.alpha_sweep and args.transfer:
        raise SystemExit("--alpha-sweep and --transfer are separate experiments; run them one at a time")
    if args.quick:  # every code path in seconds; flags given explicitly still win
        args.fc = 32
        for key, value in (("size", 32), ("width", 4), ("epochs", 1), ("batch_size", 8),
                           ("n_train", 24), ("n_val", 12), ("n_test", 12)):
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.closing_size < 1 or args.closing_size % 2 == 0:
        raise SystemExit("--closing-size must be odd (a centred square structuring element)")
    if args.unet_padding is None:
        args.unet_padding = "same" if synthetic else "valid"
    if args.size is None:
        args.size = 64 if synthetic else (388 if args.unet_padding == "valid" else 384)
    if args.width is None:
        args.width = 8 if synthetic else 32
    if args.epochs is None:
        args.epochs = 40 if synthetic else 100
    return args


def batch_size_for(args, task):
    """The batch size of a task: --batch-size, else 16 on synthetic data, else Tables V/VIII/X."""
    if args.batch_size is not None:
        return args.batch_size
    return 16 if args.data == "synthetic" else PAPER_BATCH[task]


# ==================================================================================================
# Model (Sec. V-VII)
# ==================================================================================================

def valid_output_size(input_size, depth):
    """Output side of the unpadded U-Net for an input side (None if the maps do not fit): each
    block of two 3x3 convolutions removes 4 pixels, each pooling halves (Sec. V: 572 -> 388)."""
    side = input_size - 4
    for _ in range(depth):
        if side <= 0 or side % 2:
            return None
        side = side // 2 - 4
    if side <= 0:
        return None
    for _ in range(depth):
        side = 2 * side - 4
    return side if side > 0 else None


def bottleneck_side(input_size, depth, padding):
    side = input_size if padding == "same" else input_size - 4
    for _ in range(depth):
        side = side // 2 if padding == "same" else side // 2 - 4
    return side


def network_geometry(args):
    """Input side, output side and bottleneck side of the network for images of side --size."""
    size, depth = args.size, args.depth
    if args.unet_padding == "same":
        if size % 2 ** depth:
            raise SystemExit(f"--size {size} must be divisible by 2^depth = {2 ** depth} with same padding")
        return {"input": size, "output": size, "bottleneck": size // 2 ** depth}
    if args.input_size is not None:
        n = args.input_size
        if valid_output_size(n, depth) is None:
            raise SystemExit(f"--input-size {n} does not fit the valid U-Net of depth {depth} (e.g. 572)")
    else:  # the smallest valid input whose output covers the image (Sec. VIII)
        n = 1
        while (valid_output_size(n, depth) or 0) < size:
            n += 1
    return {"input": n, "output": valid_output_size(n, depth), "bottleneck": bottleneck_side(n, depth, "valid")}


class ClassificationHead(nn.Module):
    """The layers added on the U-Net encoder for classification (Sec. VI, Table VII): max pooling,
    flatten, dropout (0.5), fully connected (256..1024, ReLU), dropout (0.5), fully connected to the
    classes. The softmax of Eq. 1 is applied by the loss and at evaluation."""

    def __init__(self, channels, side, n_classes, pool=3, fc=1024, dropout=0.5):
        super().__init__()
        pool = max(1, min(pool, side))  # a pool larger than the map would leave nothing
        pooled = side // pool
        self.pool = nn.MaxPool2d(pool, stride=pool)
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(channels * pooled * pooled, fc), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(fc, n_classes))

    def forward(self, bottom):                # [B, 16 width, b, b]
        return self.layers(self.pool(bottom))  # [B, classes] logits


class MultiTaskUNet(nn.Module):
    """The fused model of Fig. 4: a U-Net (Sec. V) whose encoder also feeds the classification head
    (Sec. VI). `segment` / `classify` skip the branch a task does not use."""

    def __init__(self, n_classes, width, depth, padding, dropout, bottleneck, pool, fc, head_dropout):
        super().__init__()
        self.unet = common.UNet(3, 1, width=width, depth=depth, padding=padding)
        self.contracting_dropout = nn.Dropout(dropout)  # end of the contracting path (U-Net paper)
        self.classifier = ClassificationHead(self.unet.feature_channels[-1], bottleneck, n_classes,
                                             pool, fc, head_dropout)

    def forward(self, x, segment=True, classify=True):
        features = self.unet.encode(x)
        cls_logits = self.classifier(features[-1]) if classify else None              # [B, C]
        seg_logits = None
        if segment:
            features = features[:-1] + [self.contracting_dropout(features[-1])]
            seg_logits = self.unet.decode(features)[:, 0]                               # [B, H', W']
        return seg_logits, cls_logits


def build_model(args, n_classes, geometry):
    return MultiTaskUNet(n_classes, args.width, args.depth, args.unet_padding, args.dropout,
                         geometry["bottleneck"], args.pool, args.fc, args.head_dropout)


# ==================================================================================================
# Pre-processing (Sec. VIII) and post-processing (Sec. IX)
# ==================================================================================================

def mirror_pad(x, pad, mode="reflect"):
    """Pads [B,C,H,W] by `pad` on every side; mirror padding wider than the map is done in steps
    (a mirror of the mirror), as the overlap-tile strategy of the original U-Net needs."""
    if mode == "constant":
        return F.pad(x, (pad,) * 4)
    for axis in (-1, -2):  # (numpy's np.pad(mode="reflect") does the same, axis by axis)
        remaining = pad
        while remaining > 0:
            step = min(remaining, x.shape[axis] - 1)
            x = F.pad(x, (step, step, 0, 0) if axis == -1 else (0, 0, step, step), mode="reflect")
            remaining -= step
    return x


def preprocess(images, mean, std, geometry, border_mode):
    """Sec. VIII on a batch of uint8 images [B,3,S,S] -> float network input [B,3,in,in]:
    normalise; for the valid U-Net also scale to the output side and add the border padding so that
    the output (in - 184 for depth 4) covers the whole image."""
    x = common.normalize(images, mean, std)
    if geometry["input"] != geometry["output"]:
        out = geometry["output"]
        if x.shape[-1] != out:
            x = F.interpolate(x, size=(out, out), mode="bilinear", align_corners=False)
        x = mirror_pad(x, (geometry["input"] - out) // 2, border_mode)
    return x


def target_masks(masks, geometry):
    """Masks [B,S,S] -> float targets at the output side (the padded mask cropped to the output)."""
    m = masks.float()
    if m.shape[-1] != geometry["output"]:
        m = F.interpolate(m[:, None], size=(geometry["output"],) * 2, mode="nearest")[:, 0]
    return m


def morphological_closing(mask, size):
    """Dilation then erosion with a size x size square, as max pooling (Sec. IX: closes speckles and
    joins nearby lesion parts). Outside the image counts as neither (no erosion from the border)."""
    x = mask[:, None].float()
    dilated = F.max_pool2d(x, size, stride=1, padding=size // 2)
    eroded = -F.max_pool2d(-dilated, size, stride=1, padding=size // 2)
    return eroded[:, 0] > 0.5


def largest_connected_component(mask):
    """Keeps the largest 8-connected component of each mask [N,H,W] (Sec. IX: one lesion per image)."""
    labels = common.label_components(mask, connectivity=8).long()  # [N,H,W], 0 = background
    n, k = labels.shape[0], int(labels.max()) + 1
    offset = torch.arange(n, device=labels.device).view(n, 1, 1) * k
    areas = torch.bincount((labels + offset).flatten(), minlength=n * k).view(n, k)
    areas[:, 0] = 0
    keep = areas.argmax(1).view(n, 1, 1)  # 0 when the mask is empty -> stays empty
    return mask.bool() & (labels == keep)


def _dilate_cross(x):
    """One 4-connected dilation step of a bool [N,H,W]."""
    y = x.clone()
    y[:, 1:] |= x[:, :-1]
    y[:, :-1] |= x[:, 1:]
    y[:, :, 1:] |= x[:, :, :-1]
    y[:, :, :-1] |= x[:, :, 1:]
    return y


def fill_holes(mask, check_every=16):
    """Flood fill from the border (Sec. IX): background pixels not 4-connected to the image border
    are holes and become lesion. The fill grows from the border pixels by dilation constrained to
    the background until it stops changing; all images of the batch at once."""
    background = ~mask.bool()
    reached = torch.zeros_like(background)
    reached[:, 0], reached[:, -1], reached[:, :, 0], reached[:, :, -1] = True, True, True, True
    reached &= background
    while True:
        before = reached
        for _ in range(check_every):
            reached = _dilate_cross(reached) & background
        if torch.equal(before, reached):
            break
    return mask.bool() | (background & ~reached)


def restore_resolution(mask, size):
    """Brings an output-side mask [N,h,w] back to the image side (Sec. IX, last step)."""
    if mask.shape[-1] == size:
        return mask.bool()
    return F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")[:, 0] > 0.5


def postprocess(prob, closing_size):
    """Sec. IX: rounding to a binary mask, closing, largest connected component, hole filling.
    (Restoring the resolution is done by the caller for both the raw and the processed mask.)"""
    mask = prob > 0.5
    mask = morphological_closing(mask, closing_size)
    mask = largest_connected_component(mask)
    return fill_holes(mask)


# ==================================================================================================
# Losses (Sec. X)
# ==================================================================================================

def segmentation_loss(seg_logits, masks):
    """Eq. 2: binary cross-entropy between the lesion probability and the mask (mean over pixels)."""
    return F.binary_cross_entropy_with_logits(seg_logits.float(), masks)


def class_weights(labels, n_classes):
    """Eq. 12: W_c = N / (n_classes * n_c), from the class counts of the training set."""
    counts = torch.bincount(labels.cpu(), minlength=n_classes).double()
    # W_c = N / (n_classes n_c); a class absent from training gets the weight of a single image
    return (labels.numel() / (n_classes * counts.clamp_min(1))).float()


def classification_loss(cls_logits, labels, weights):
    """Eq. 3 with the weights of Eq. 12: L = -1/N sum_i W_{y_i} log p_model[y_i] (Keras class_weight)."""
    cross_entropy = F.cross_entropy(cls_logits.float(), labels, reduction="none")  # -log p[y_i], [B]
    return (weights[labels] * cross_entropy).mean()


def joint_loss(loss_seg, loss_cls, alpha):
    """Eq. 4 (sign corrected, see Deviations): L = a L_seg + (1 - a) L_cls."""
    return alpha * loss_seg + (1.0 - alpha) * loss_cls


def task_alpha(task, alpha):
    """The a of Eq. 4 a task trains with: 1 segmentation only, 0 classification only."""
    return {"seg": 1.0, "cls": 0.0}.get(task, alpha)


# ==================================================================================================
# Training and evaluation
# ==================================================================================================

def training_step(model, images, masks, labels, task, alpha, weights, geometry):
    """Forward and losses of one batch; returns (L, L_seg, L_cls) as tensors (no host sync)."""
    segment, classify = task != "cls", task != "seg"
    seg_logits, cls_logits = model(images, segment, classify)
    zero = images.new_zeros(())
    loss_seg = segmentation_loss(seg_logits, target_masks(masks, geometry)) if segment else zero
    loss_cls = classification_loss(cls_logits, labels, weights) if classify else zero
    return joint_loss(loss_seg, loss_cls, task_alpha(task, alpha)), loss_seg, loss_cls


@torch.no_grad()
def evaluate(model, split, args, task, geometry, mean, std, device):
    """Sec. XII metrics on one split (percent). Returns (metrics, per-image outputs for figures)."""
    model.eval()
    segment, classify = task != "cls", task != "seg"
    class_names = split["class_names"]
    raw, post, probs = [], [], []
    for batch in common.iterate_batches(split, batch_size_for(args, task) * 2, shuffle=False):
        x = preprocess(batch["images"], mean, std, geometry, args.border_mode)
        with common.autocast(device, args.amp):
            seg_logits, cls_logits = model(x, segment, classify)
        if segment:
            prob = torch.sigmoid(seg_logits.float())                                  # [B, out, out]
            raw.append(restore_resolution(prob > 0.5, args.size))
            post.append(restore_resolution(postprocess(prob, args.closing_size), args.size))
        if classify:
            probs.append(torch.softmax(cls_logits.float(), dim=1))                    # Eq. 1, [B, C]
    metrics, outputs = {}, {}
    if segment:
        truth = split["masks"] > 0
        outputs["pred_raw"], outputs["pred_post"] = torch.cat(raw), torch.cat(post)
        outputs["jaccard_post"] = common.jaccard(outputs["pred_post"], truth)      # Eq. 5 per image
        metrics["jaccard"] = 100 * common.jaccard(outputs["pred_raw"], truth).mean().item()
        metrics["jaccard_post"] = 100 * outputs["jaccard_post"].mean().item()
    if classify:
        outputs["probs"] = torch.cat(probs).cpu()
        predicted, labels, n = outputs["probs"].argmax(1), split["labels"].cpu(), len(class_names)
        sensitivity, specificity = common.sensitivity_specificity(predicted, labels, n)  # Eq. 7, 8
        metrics["balanced_accuracy"] = 100 * common.balanced_accuracy(predicted, labels, n)  # Eq. 9
        metrics["accuracy"] = 100 * common.accuracy(predicted, labels)                   # Eq. 10
        for c, name in enumerate(class_names):
            key = name.lower().replace(" ", "_").replace("-", "_")
            metrics[f"sensitivity_{key}"] = 100 * sensitivity[c].item()
            metrics[f"specificity_{key}"] = 100 * specificity[c].item()
    if segment and classify:  # Eq. 11, with the post-processed JAC (Table XIV: 70.8 = (67.5 + 74.0) / 2)
        metrics["mean_performance"] = (metrics["balanced_accuracy"] + metrics["jaccard_post"]) / 2
    return metrics, outputs


SELECTION = {"seg": "jaccard_post", "cls": "balanced_accuracy", "joint": "mean_performance"}  # Sec. X


def load_transfer_weights(model, path):
    """Hypothesis 1 (Sec. XVI.B): the U-Net of a segmentation checkpoint, frozen."""
    state = common.load_checkpoint(path, SCRIPT)
    unet = {k[len("unet."):]: v for k, v in state["model"].items() if k.startswith("unet.")}
    model.unet.load_state_dict(unet)
    model.unet.requires_grad_(False)


def train(model, data, args, task, geometry, mean, std, device, run):
    """Sec. X / XV.A: Adam, shuffled augmented mini-batches, lr x0.8 on a 5-epoch plateau of the
    training loss, validation and checkpoint every epoch, the best epoch kept as best.pt."""
    train_split, val_split = data["train"], data["val"]
    n_classes = len(train_split["class_names"])
    weights = (class_weights(train_split["labels"], n_classes) if args.class_weights
               else torch.ones(n_classes)).to(device)
    alpha = 0.0 if args.transfer else args.alpha
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=args.lr_factor,
                                                           patience=args.lr_patience)
    start_epoch, best = 0, -math.inf
    if args.resume:
        start_epoch, best = common.restore_state(common.load_checkpoint(args.resume, SCRIPT),
                                                 model, optimizer, scheduler)
        best = -math.inf if best is None else best
    batch_size = batch_size_for(args, task)
    n = train_split["images"].shape[0]
    steps = (n + batch_size - 1) // batch_size
    progress = common.Progress(steps * (args.epochs - start_epoch), every=args.log_every)
    generator = torch.Generator(device=device)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if args.transfer:
            model.unet.eval()  # frozen: keep its BatchNorm statistics and no dropout
        generator.manual_seed(args.seed * 1000 + epoch)  # repeatable epochs, also after --resume
        progress.set_epoch(epoch + 1)
        totals = torch.zeros(3, device=device)           # sums of L, L_seg, L_cls over the epoch
        tick = time.perf_counter()
        for step, batch in enumerate(common.iterate_batches(train_split, batch_size, shuffle=True,
                                                            generator=generator)):
            if args.augment:
                batch = common.augment(batch, generator=generator)
            x = preprocess(batch["images"], mean, std, geometry, args.border_mode)
            wait = time.perf_counter() - tick
            with common.autocast(device, args.amp):
                loss, loss_seg, loss_cls = training_step(model, x, batch["masks"], batch["labels"], task,
                                                         alpha, weights, geometry)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += torch.stack([loss, loss_seg, loss_cls]).detach()
            running = progress.step(loss=loss, images=x.shape[0], wait_s=wait)  # syncs every --log-every
            if running is not None:
                common.check_finite(running, f"epoch {epoch + 1} step {step + 1}", run)
            tick = time.perf_counter()
        mean_losses = (totals / steps).tolist()
        common.check_finite(mean_losses[0], f"epoch {epoch + 1}", run)
        scheduler.step(mean_losses[0])  # Sec. XV.A: x0.8 when the training loss stalls for 5 epochs
        val_metrics, _ = evaluate(model, val_split, args, task, geometry, mean, std, device)
        score = val_metrics[SELECTION[task]]
        record = {"epoch": epoch + 1, "train_loss": mean_losses[0], "train_loss_seg": mean_losses[1],
                  "train_loss_cls": mean_losses[2], "lr": optimizer.param_groups[0]["lr"],
                  **{f"val_{k}": v for k, v in val_metrics.items()}}
        improved = score > best
        if improved:
            best = score
        run.log(record)
        state = common.checkpoint_state(model, optimizer, scheduler, epoch + 1, best, args)
        run.save("last.pt", state)
        if improved:
            run.save("best.pt", state)
        print(f"epoch {epoch + 1}/{args.epochs} loss {mean_losses[0]:.4f} val {SELECTION[task]} "
              f"{score:.1f}{' (best)' if improved else ''}")
    speed = progress.summary()
    run.log({"event": "speed", **speed})
    print(f"training: {speed['images_per_s']:.1f} images/s, data wait {100 * speed['data_wait_share']:.0f}%")
    return speed


# ==================================================================================================
# Report: tables (Markdown + JSON) and figures
# ==================================================================================================

def _short(name):
    return "".join(w[0] for w in name.split("_")).upper() if "_" in name else name[:1].upper()


def task_table(task, results, class_names, title):
    """Tables VI (seg), IX (cls), XIV (joint) and XIII (sensitivity/specificity), in percent."""
    keys = [n.lower().replace(" ", "_").replace("-", "_") for n in class_names]
    columns = {"seg": ["JAC", "Post-processing JAC"], "cls": ["BACC"],
               "joint": ["Post-p. JAC", "BACC", "Mean Performance"]}[task]
    source = {"JAC": "jaccard", "Post-processing JAC": "jaccard_post", "Post-p. JAC": "jaccard_post",
              "BACC": "balanced_accuracy", "Mean Performance": "mean_performance"}
    rows = []
    for split, metrics in results.items():
        row = {"Set": split.capitalize() if split != "val" else "Validation"}
        row.update({c: metrics[source[c]] for c in columns})
        if task != "seg":
            row.update({f"SE {_short(k)}": metrics[f"sensitivity_{k}"] for k in keys})
        rows.append(row)
    columns = ["Set"] + columns + ([f"SE {_short(k)}" for k in keys] if task != "seg" else [])
    fmt = {c: "{:.1f}" for c in columns[1:]}
    text = common.markdown_table(rows, columns, fmt, title=title)
    if task != "seg":  # Table XIII
        rows13 = []
        for split, metrics in results.items():
            for measure in ("sensitivity", "specificity"):
                rows13.append({"Set": "Validation" if split == "val" else split.capitalize(),
                               "Measure": measure.capitalize(),
                               **{n: metrics[f"{measure}_{k}"] for n, k in zip(class_names, keys)}})
        text += "\n\n" + common.markdown_table(rows13, ["Set", "Measure"] + list(class_names),
                                               {n: "{:.1f}" for n in class_names},
                                               title="Table XIII: sensitivity and specificity per class (%)")
    return text


def figure_examples(split, outputs, task, path, n_each=3):
    """Figs. 5-12: images with the true (green) and predicted (red) contours and the class
    probabilities, for correctly and wrongly classified cases (seg: best and worst JAC)."""
    if "probs" in outputs:
        correct = outputs["probs"].argmax(1) == split["labels"].cpu()
        picks = [(i, "correct") for i in correct.nonzero()[:n_each, 0].tolist()]
        picks += [(i, "wrong") for i in (~correct).nonzero()[:n_each, 0].tolist()]
    else:
        order = outputs["jaccard_post"].argsort(descending=True).tolist()
        picks = [(i, "best JAC") for i in order[:n_each]] + [(i, "worst JAC") for i in order[::-1][:n_each]]
    rows = 2 if "probs" in outputs else 1
    fig, axes = plt.subplots(rows, max(len(picks), 1), figsize=(2.6 * max(len(picks), 1), 2.8 * rows),
                             squeeze=False)
    names = split["class_names"]
    for col, (i, kind) in enumerate(picks):
        ax = axes[0, col]
        common.show_image(ax, split["images"][i].cpu())
        title = kind
        if "pred_post" in outputs:
            common.draw_contours(ax, split["masks"][i].cpu() > 0, "lime", label="truth")
            common.draw_contours(ax, outputs["pred_post"][i].cpu(), "red", label="predicted")
            title += f"\nJAC {100 * outputs['jaccard_post'][i].item():.0f}%"
        if "probs" in outputs:
            predicted = outputs["probs"][i].argmax().item()
            title += f"\ntrue {names[split['labels'][i].item()]}\npredicted {names[predicted]}"
            axes[1, col].barh(range(len(names)), outputs["probs"][i].numpy(), color="tab:blue")
            axes[1, col].set_yticks(range(len(names)), [_short(n.lower()) for n in names])
            axes[1, col].set_xlim(0, 1)
            axes[1, col].set_xlabel("probability")
        ax.set_title(title, fontsize=8)
    common.save_figure(fig, path)


def figure_comparison(rows, path):
    """Separate vs joint test JAC and BACC, next to the thesis' ISIC 2017 numbers."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ("JAC", "BACC")):
        shown = [r for r in rows if r[metric] is not None]
        positions = range(len(shown))
        ax.bar([p - 0.2 for p in positions], [r[metric] for r in shown], 0.4, label="this run")
        ax.bar([p + 0.2 for p in positions], [r["Thesis " + metric] for r in shown], 0.4, label="thesis (ISIC 2017)")
        ax.set_xticks(list(positions), [r["Model"].split(" (")[0].replace("separate ", "separate\n") for r in shown])
        ax.set_ylabel(f"test {metric} (%)")
        ax.set_ylim(0, 100)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def report_run(run, task, results, outputs, split, class_names, config, extra_rows=()):
    """results.json / results.md / figures of one trained model."""
    title = {"seg": "Table VI: segmentation, validation and test (%)",
             "cls": "Table IX: classification, BACC and sensitivity per class (%)",
             "joint": "Table XIV: multi-task model, validation and test (%)"}[task]
    markdown = f"# {SCRIPT}: task {task}\n\n" + task_table(task, results, class_names, title) + "\n"
    table = [{"row": "validation" if s == "val" else s, **m} for s, m in results.items()]
    final = "test" if "test" in results else "val"
    common.write_results(run.dir, SCRIPT, config["data"], final, results[final], table + list(extra_rows),
                         config, markdown)
    figure_examples(split, outputs, task, run.figures / "examples.png")
    keys = ["train_loss"] + [f"val_{k}" for k in ("jaccard_post", "balanced_accuracy", "mean_performance")
                             if k in results[final]]
    if run.path("log.jsonl").exists():  # not with --eval-only
        common.plot_curves(run.path("log.jsonl"), keys, run.figures / "training_curves.png")
    return markdown


# ==================================================================================================
# One run, and the tables as loops over it
# ==================================================================================================

def load_data(args):
    options = {}
    if args.data == "synthetic":
        options = {k: v for k, v in (("n_train", args.n_train), ("n_val", args.n_val), ("n_test", args.n_test))
                   if v is not None}
    name = "synthetic-lesions" if args.data == "synthetic" else args.data
    data = common.load_dataset(name, root=args.root, size=args.size, seed=args.seed, cache=args.cache, **options)
    if "train" not in data or "val" not in data:
        raise SystemExit(f"{name}: training needs train and val splits, found {sorted(data)}")
    return data


def run(config, data, device):
    """Trains (or, with --eval-only, loads) one model of task config.task and reports it.
    Returns {"task", "best_epoch", "results": {split: metrics}, "dir"}."""
    task = config.task
    common.seed_everything(config.seed)
    run_ = common.Run(config, SCRIPT)
    geometry = network_geometry(config)
    class_names = data["train"]["class_names"]
    on_device = {k: common.to_device(v, device) for k, v in data.items()}
    mean, std = common.channel_stats(on_device["train"]["images"])  # Sec. VIII normalisation
    mean, std = mean.to(device), std.to(device)
    model = build_model(config, len(class_names), geometry)
    if config.transfer:
        load_transfer_weights(model, config.transfer)
    model = common.prepare_model(model, device, compile=config.compile)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{task}] {n_params / 1e6:.2f}M parameters; network {geometry['input']} -> {geometry['output']} px "
          f"(images {config.size} px); run folder {run_.dir}")
    if not config.eval_only:
        train(model, on_device, config, task, geometry, mean, std, device, run_)
    checkpoint = config.checkpoint if config.eval_only else run_.path("best.pt")
    if not config.eval_only and not checkpoint.exists() and config.resume:  # resumed elsewhere, no new best
        checkpoint = Path(config.resume).with_name("best.pt")
    state = common.load_checkpoint(checkpoint, SCRIPT, map_location=device)
    model.load_state_dict(state["model"])
    results, outputs = {}, {}
    for split in ("val", "test"):
        if split in on_device:
            results[split], outputs[split] = evaluate(model, on_device[split], config, task, geometry,
                                                      mean, std, device)
    shown = "test" if "test" in results else "val"
    markdown = report_run(run_, task, results, outputs[shown], on_device[shown], class_names, vars(config))
    print(markdown)
    return {"task": task, "best_epoch": state.get("epoch"), "results": results, "dir": run_.dir,
            "markdown": markdown}


def sub_config(args, parent, name, **changes):
    config = copy.copy(args)
    config.out = str(Path(parent) / name)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def compare(args, data, device):
    """Separate segmentation and classification models vs the joint model (Sec. XVI, abstract)."""
    top = common.Run(args, SCRIPT)
    outcomes = {t: run(sub_config(args, top.dir, t, task=t), data, device) for t in TASKS}
    rows, table = [], []
    for t, label in (("seg", "separate segmentation"), ("cls", "separate classification"), ("joint", "joint")):
        test = outcomes[t]["results"].get("test", outcomes[t]["results"]["val"])
        row = {"row": label, "task": t, "best_epoch": outcomes[t]["best_epoch"], **test}
        table.append(row)
        rows.append({"Model": label + (f" (a = {args.alpha})" if t == "joint" else ""),
                     "JAC": test.get("jaccard_post"), "BACC": test.get("balanced_accuracy"),
                     "Thesis JAC": THESIS[t].get("jaccard_post"), "Thesis BACC": THESIS[t].get("balanced_accuracy")})
    fmt = {c: "{:.1f}" for c in ("JAC", "BACC", "Thesis JAC", "Thesis BACC")}
    title = "Test set, JAC after post-processing (%); thesis: ISIC 2017, its joint model at a = 0.8"
    markdown = (f"# {SCRIPT}: separate vs joint models\n\n"
                + common.markdown_table(rows, ["Model", "JAC", "BACC", "Thesis JAC", "Thesis BACC"], fmt, title=title)
                + "\n\n" + "\n\n".join(outcomes[t]["markdown"].split("\n", 2)[2] for t in TASKS) + "\n")
    split = "test" if "test" in data else "val"
    joint = {k: v for k, v in table[-1].items() if k not in ("row", "task", "best_epoch")}
    common.write_results(top.dir, SCRIPT, args.data, split, joint, table, vars(args), markdown)
    figure_comparison(rows, top.figures / "separate_vs_joint.png")
    print(markdown)
    return markdown


def alpha_sweep(args, data, device):
    """Table XI: one joint model per a, best epoch by Mean Performance on validation."""
    top = common.Run(args, SCRIPT)
    alphas = [float(a) for a in args.alpha_sweep.split(",") if a.strip()]
    table, rows = [], []
    for alpha in alphas:
        outcome = run(sub_config(args, top.dir, f"alpha_{alpha:g}", alpha=alpha, task="joint"), data, device)
        val, test = outcome["results"]["val"], outcome["results"].get("test", {})
        table.append({"row": f"alpha={alpha:g}", "alpha": alpha, "epoch": outcome["best_epoch"], **val,
                      **{f"test_{k}": v for k, v in test.items()}})
        rows.append({"a": alpha, "Epoch": outcome["best_epoch"], "Mean Performance": val["mean_performance"],
                     "JAC": val["jaccard_post"], "BACC": val["balanced_accuracy"],
                     "Test MP": test.get("mean_performance", math.nan), "Test JAC": test.get("jaccard_post", math.nan),
                     "Test BACC": test.get("balanced_accuracy", math.nan)})
    columns = ["a", "Epoch", "Mean Performance", "JAC", "BACC", "Test MP", "Test JAC", "Test BACC"]
    markdown = (f"# {SCRIPT}: a sweep\n\n" + common.markdown_table(
        rows, columns, {c: "{:.1f}" for c in columns[2:]} | {"a": "{:g}"},
        title="Table XI: values tested for a (validation at the best epoch; test alongside) (%)") + "\n")
    best = max(table, key=lambda r: r["mean_performance"])
    final = {k[len("test_"):]: v for k, v in best.items() if k.startswith("test_")} or {
        k: v for k, v in best.items() if k not in ("row", "alpha", "epoch")}
    common.write_results(top.dir, SCRIPT, args.data, "test", final, table, vars(args), markdown)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, label in (("mean_performance", "Mean Performance"), ("jaccard_post", "JAC"),
                       ("balanced_accuracy", "BACC")):
        ax.plot(alphas, [r[key] for r in table], marker="o", label=label)
    ax.set_xlabel("a (Eq. 4)")
    ax.set_ylabel("validation (%)")
    ax.legend()
    common.save_figure(fig, top.figures / "alpha_sweep.png")
    print(markdown)
    return markdown


def main(argv=None):
    args = resolve_defaults(build_parser().parse_args(argv))
    device = common.choose_device(args.device)
    if args.eval_only:
        if not args.checkpoint:
            raise SystemExit("--eval-only needs --checkpoint PATH")
        saved = common.load_checkpoint(args.checkpoint, SCRIPT)["args"]
        for key in ("task", "width", "depth", "unet_padding", "input_size", "size", "pool", "fc", "data"):
            setattr(args, key, saved[key])  # the architecture comes from the checkpoint
    if args.transfer:
        saved = common.load_checkpoint(args.transfer, SCRIPT)["args"]
        if saved["task"] == "cls":
            raise SystemExit(f"--transfer needs a segmentation (or joint) checkpoint; {args.transfer} is cls")
        for key in ("width", "depth", "unet_padding", "input_size", "size"):
            setattr(args, key, saved[key])
    if args.resume:
        if args.task == "compare" or args.alpha_sweep:
            raise SystemExit("--resume continues one model: pass --task and the last.pt of its run folder")
        if args.out is None:
            args.out = str(Path(args.resume).parent)  # keep writing into the interrupted run's folder
    data = load_data(args)
    if args.task == "compare":
        compare(args, data, device)
    elif args.alpha_sweep:
        alpha_sweep(args, data, device)
    else:
        run(args, data, device)


if __name__ == "__main__":
    main()
