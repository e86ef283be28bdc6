"""Shared pieces of the four scripts: U-Net building blocks, metrics, run bookkeeping, figures.

Everything here is used by at least two of `ensemble_annotators.py`, `uncertainty_multiloss.py`,
`joint_unet.py` and `uml.py`; anything specific to one paper stays in its script. Run-time
dependencies are the standard library, torch, numpy and matplotlib only.

Sections
    1. Networks            DoubleConv, ResidualBlock, Down, Up, center_crop, UNet
    2. Overlap and calibration metrics   jaccard, dice, nll, brier, pixel_accuracy, ...
    3. Surface distances   hausdorff (max or percentile), assd
    4. Objects             label_components, object_dice, object_hausdorff (GlaS definitions)
    5. Classification      confusion_matrix, sensitivity_specificity, accuracy, balanced_accuracy,
                           f1_score, auroc, expected_calibration_error, mean_and_se
    6. Run bookkeeping     add_common_args, seed_everything, choose_device, autocast, prepare_model,
                           Run, checkpoints and resume, check_finite, Progress, tables, results
    7. Figures             show_image, draw_contours, plot_uncertainty, plot_curves,
                           plot_reliability, save_figure

Conventions: segmentation metrics take batched tensors `[N,H,W]` (a single `[H,W]` image is
treated as N = 1) on any device and return one value per image as a CPU tensor; classification
metrics return Python floats.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

matplotlib.use("Agg")  # figures are files; never open a window (headless servers, CI)

# ==================================================================================================
# 1. Networks
# ==================================================================================================


def center_crop(x, height, width):
    """Crops the spatial centre `height x width` of `x` [..., H, W] (the skip crop of the valid U-Net)."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"cannot crop {h}x{w} features to {height}x{width}")
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top:top + height, left:left + width]


def _conv_pad(padding):
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', not {padding!r}")
    return 1 if padding == "same" else 0


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) x 2, then dropout (kept separate so MC dropout can enable it).

    padding="valid" is the original U-Net's unpadded convolution: each block shrinks the map by 4.
    """

    def __init__(self, in_ch, out_ch, dropout=0.0, padding="same", norm=True):
        pad = _conv_pad(padding)
        layers = []
        for cin in (in_ch, out_ch):
            layers.append(nn.Conv2d(cin, out_ch, 3, padding=pad, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut: relu(F(x) + skip(x))."""

    def __init__(self, in_ch, out_ch, dropout=0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
        self.skip = (nn.Identity() if in_ch == out_ch else
                     nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.dropout(F.relu(self.body(x) + self.skip(x)))


def _block(in_ch, out_ch, dropout, padding, residual):
    if residual:
        if padding != "same":
            raise ValueError("residual blocks need padding='same' (the shortcut keeps the map size)")
        return ResidualBlock(in_ch, out_ch, dropout)
    return DoubleConv(in_ch, out_ch, dropout, padding)


class Down(nn.Sequential):
    """One encoder step: 2x2 max-pool, then a conv block."""

    def __init__(self, in_ch, out_ch, dropout=0.0, padding="same", residual=False):
        super().__init__(nn.MaxPool2d(2), _block(in_ch, out_ch, dropout, padding, residual))


class Up(nn.Module):
    """One decoder step: upsample x2 to `in_ch // 2` channels, join the skip features, conv block.

    mode="transpose" is the U-Net's 2x2 up-convolution; mode="bilinear" upsamples and applies a 1x1
    conv. With padding="valid" the skip features are centre-cropped to the upsampled map (Ronneberger
    et al. 2015); with "same", an upsampled map smaller than the skip (odd sizes) is zero-padded.
    """

    def __init__(self, in_ch, skip_ch, out_ch, dropout=0.0, padding="same", mode="transpose",
                 residual=False):
        super().__init__()
        half, self.padding = in_ch // 2, padding
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(in_ch, half, 2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(in_ch, half, 1))
        else:
            raise ValueError(f"mode must be 'transpose' or 'bilinear', not {mode!r}")
        self.block = _block(half + skip_ch, out_ch, dropout, padding, residual)

    def forward(self, x, skip):
        x = self.up(x)
        h, w = x.shape[-2:]
        if self.padding == "valid":
            skip = center_crop(skip, h, w)
        elif (h, w) != skip.shape[-2:]:
            dh, dw = skip.shape[-2] - h, skip.shape[-1] - w
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.block(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Configurable U-Net (Ronneberger et al. 2015).

    Channels double at each of the `depth` down steps: width, 2 width, ..., 2^depth width at the
    bottleneck. `encode` returns the features of every level (bottleneck last) so a script can attach
    a classification head to `features[-1]`; `decode` turns them into logits. With padding="valid",
    depth=4, a 572x572 input gives 388x388 logits, as in the paper.
    """

    def __init__(self, in_channels=3, out_channels=1, width=32, depth=4, padding="same",
                 residual=False, dropout=0.0, up_mode="transpose"):
        super().__init__()
        self.feature_channels = [width * 2 ** level for level in range(depth + 1)]
        ch = self.feature_channels
        self.inc = _block(in_channels, ch[0], dropout, padding, residual)
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1], dropout, padding, residual) for i in range(depth))
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i], ch[i], dropout, padding, up_mode, residual)
                                 for i in reversed(range(depth)))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def encode(self, x):
        features = [self.inc(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        return features  # [level 0 (full size), ..., bottleneck]

    def decode(self, features):
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        return self.head(x)

    def forward(self, x):
        return self.decode(self.encode(x))


# ==================================================================================================
# 2. Overlap and calibration metrics (one value per image)
# ==================================================================================================


def _batched(x):
    """[H,W] -> [1,H,W]; [N,...] stays; flattened to [N, pixels]."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    return x.reshape(x.shape[0], -1)


def jaccard(pred, target):
    """|P & T| / |P | T| per image; an empty prediction of an empty target scores 1."""
    p, t = _batched(pred).bool(), _batched(target).bool()
    inter, union = (p & t).sum(1).double(), (p | t).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).cpu()


def dice(pred, target):
    """2 |P & T| / (|P| + |T|) per image; empty & empty = 1."""
    p, t = _batched(pred).bool(), _batched(target).bool()
    inter, total = (p & t).sum(1).double(), (p.sum(1) + t.sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).cpu()


def nll(prob, target, eps=1e-7):
    """Eq. 6 of the ensemble paper: -1/|X| sum_q [Y log Yhat + (1 - Y) log(1 - Yhat)], per image."""
    p, y = _batched(prob).double().clamp(eps, 1 - eps), _batched(target).double()
    return -(y * p.log() + (1 - y) * (1 - p).log()).mean(1).cpu()


def brier(prob, target):
    """Eq. 7 of the ensemble paper: 1/|X| sum_q (Y - Yhat)^2, per image."""
    return ((_batched(prob).double() - _batched(target).double()) ** 2).mean(1).cpu()


def pixel_accuracy(pred, target):
    """Share of pixels whose class index is right, per image."""
    return (_batched(pred) == _batched(target)).double().mean(1).cpu()


# ==================================================================================================
# 3. Surface distances (MONAI's conventions)
# ==================================================================================================
# Boundary = mask minus its erosion by the 4-connected cross, with outside-the-image counted as
# background (scipy.ndimage.binary_erosion's defaults, which MONAI's get_mask_edges uses). The
# directed distance of a boundary pixel is its Euclidean distance to the nearest boundary pixel of
# the other mask. Distances are exact: squared integer offsets, then one square root.

_CHUNK = 1 << 22  # elements per brute-force distance block (16 MB of int32)


def _erode_cross(mask):
    """Binary erosion of bool [N,H,W] by the 3x3 cross, pixels outside the image being False."""
    m = F.pad(mask, (1, 1, 1, 1), value=False)
    return m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]


def _boundary(mask):
    return mask & ~_erode_cross(mask)


def _distance_transform(target):
    """Exact Euclidean distance of every pixel of bool [H,W] to the nearest True pixel.

    Separable: first the distance to the nearest target in the same column (two cumulative scans),
    then D(y,x)^2 = min_x' [g(y,x')^2 + (x - x')^2] by brute force over x' in blocks of rows.
    """
    h, w = target.shape
    big = h + w  # farther than any real distance; int32 keeps the sums exact and is fast on CPU
    rows = torch.arange(h, device=target.device, dtype=torch.int32).unsqueeze(1).expand(h, w)
    above = torch.cummax(torch.where(target, rows, torch.full_like(rows, -big)), 0).values
    below = torch.cummin(torch.where(target, rows, torch.full_like(rows, 2 * big)).flip(0), 0).values.flip(0)
    g2 = torch.minimum(rows - above, below - rows) ** 2  # [H,W] squared column distance
    cols = torch.arange(w, device=target.device, dtype=torch.int32)
    dx2 = (cols.unsqueeze(1) - cols.unsqueeze(0)) ** 2  # [W(x), W(x')]
    out = torch.empty(h, w, dtype=torch.float64, device=target.device)
    step = max(1, _CHUNK // (w * w))
    for r in range(0, h, step):
        out[r:r + step] = (g2[r:r + step].unsqueeze(1) + dx2).amin(-1).double().sqrt()
    return out


def _nearest_distances(points, target):
    """Distance of each point (int64 [P,2]) to the nearest True pixel of bool [H,W] target.

    Brute force over the target's pixels when that is cheaper than a distance transform.
    """
    points, tgt = points.int(), target.nonzero().int()  # int32: exact here and fast on CPU
    h, w = target.shape
    if 32 * len(points) * len(tgt) > h * w * max(h, w):  # a pair costs ~32 transform steps (measured)
        return _distance_transform(target)[points[:, 0].long(), points[:, 1].long()]
    out = torch.empty(len(points), dtype=torch.float64, device=points.device)
    step = max(1, _CHUNK // max(1, len(tgt)))
    for s in range(0, len(points), step):
        p = points[s:s + step]
        d2 = (p[:, :1] - tgt[:, 0]) ** 2 + (p[:, 1:] - tgt[:, 1]) ** 2  # [p, T] squared distances
        out[s:s + step] = d2.amin(1).double().sqrt()
    return out


def _percentile(values, q):
    """np.percentile(values, q) with linear interpolation (MONAI's HD95)."""
    v = values.sort().values
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _surface_distances(pred, target):
    """Yields, per image, None (both empty), 'inf' (exactly one empty) or the two directed arrays."""
    p = pred.bool() if pred.dim() == 3 else pred.bool().unsqueeze(0)
    t = target.bool() if target.dim() == 3 else target.bool().unsqueeze(0)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    edges_p, edges_t = _boundary(p), _boundary(t)
    for n in range(p.shape[0]):
        has_p, has_t = bool(p[n].any()), bool(t[n].any())
        if not has_p and not has_t:
            yield None
        elif has_p != has_t:
            yield "inf"
        else:
            yield (_nearest_distances(edges_p[n].nonzero(), edges_t[n]),   # pred -> target
                   _nearest_distances(edges_t[n].nonzero(), edges_p[n]))   # target -> pred


def hausdorff(pred, target, percentile=None):
    """Symmetric Hausdorff distance in pixels per image: max of the two directed maxima, or, with
    `percentile` (95 for HD95), the max of the two directed percentiles. 0 if both masks are empty,
    inf if exactly one is. Equals MONAI's compute_hausdorff_distance."""
    out = []
    for d in _surface_distances(pred, target):
        if d is None or d == "inf":
            out.append(0.0 if d is None else math.inf)
        elif percentile is None:
            out.append(max(d[0].max().item(), d[1].max().item()))
        else:
            out.append(max(_percentile(d[0], percentile).item(), _percentile(d[1], percentile).item()))
    return torch.tensor(out, dtype=torch.float64)


def assd(pred, target):
    """Average symmetric surface distance per image: mean of both directions' distances pooled
    (MONAI's compute_average_surface_distance(symmetric=True)). Both empty 0, one empty inf."""
    out = []
    for d in _surface_distances(pred, target):
        if d is None or d == "inf":
            out.append(0.0 if d is None else math.inf)
        else:
            out.append(torch.cat(d).mean().item())
    return torch.tensor(out, dtype=torch.float64)


# ==================================================================================================
# 4. Objects: connected components and the GlaS object-level metrics
# ==================================================================================================


def label_components(mask, connectivity=4):
    """Connected components of a binary mask [H,W] or [N,H,W]: int32, 0 background, 1..k per image,
    numbered in raster order of each component's first pixel (as scipy.ndimage.label).

    Each foreground pixel starts with its own flat index as label; repeat (a) take the minimum label
    over the pixel and its 4 or 8 neighbours, (b) pointer jumping label <- label[label] (labels always
    name a pixel of the same component, so this follows chains in logarithmic time) until nothing
    changes. Every component ends with the index of its first pixel.
    """
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    single = mask.dim() == 2
    fg = (mask.unsqueeze(0) if single else mask).bool()
    n, h, w = fg.shape
    hw = h * w
    index = torch.arange(hw, device=fg.device).view(1, h, w).expand(n, h, w)
    labels = torch.where(fg, index, torch.full_like(index, hw))  # hw = "no label" sentinel
    while True:
        padded = F.pad(labels, (1, 1, 1, 1), value=hw)
        shifts = [(0, 1), (2, 1), (1, 0), (1, 2)] + ([(0, 0), (0, 2), (2, 0), (2, 2)] if connectivity == 8 else [])
        new = labels
        for dy, dx in shifts:
            new = torch.minimum(new, padded[:, dy:dy + h, dx:dx + w])
        new = torch.where(fg, new, labels)
        flat = torch.cat([new.reshape(n, hw), torch.full((n, 1), hw, device=fg.device)], 1)
        for _ in range(4):  # pointer jumping; label[label] <= label as labels only ever decrease
            flat = flat.gather(1, flat)
        new = flat[:, :hw].view(n, h, w)
        if torch.equal(new, labels):
            break
        labels = new
    # renumber the roots 1..k per image in raster order
    roots = labels + torch.arange(n, device=fg.device).view(n, 1, 1) * (hw + 1)
    unique, inverse = torch.unique(roots[fg], return_inverse=True)
    first_of_image = torch.searchsorted(unique, torch.arange(n, device=fg.device) * (hw + 1))
    image_of_pixel = fg.nonzero()[:, 0]
    out = torch.zeros(n, h, w, dtype=torch.int32, device=fg.device)
    out[fg] = (inverse - first_of_image[image_of_pixel] + 1).int()
    return out[0] if single else out


def _objects(instances):
    """Relabels int [H,W] to 0..k (0 background) and returns (labels, k, areas [k+1])."""
    ids, labels = torch.unique(instances, return_inverse=True)
    if ids[0] != 0:  # no background pixel: shift so object ids start at 1
        labels = labels + 1
    k = int(labels.max()) if labels.numel() else 0
    return labels, k, torch.bincount(labels.flatten(), minlength=k + 1).double()


def _match(s, g, ks, kg):
    """Overlap counts [ks+1, kg+1] and, for each S object, the G object it overlaps most (-1: none)."""
    overlap = torch.bincount((s * (kg + 1) + g).flatten(), minlength=(ks + 1) * (kg + 1)).view(ks + 1, kg + 1)
    best = overlap[1:, 1:].argmax(1) + 1  # argmax takes the smallest label on ties, as MATLAB's mode
    return overlap, torch.where(overlap[1:, 1:].amax(1) > 0, best, torch.full_like(best, -1))


def _region_hausdorff(a, b):
    """Hausdorff distance between two pixel sets (bool [H,W]), as the GlaS evaluation code does it:
    max(sup_{x in a} d(x, b), sup_{y in b} d(y, a)) over all pixels (not only boundaries)."""
    def directed(x, y):  # sup over x of the distance to y; pixels of x inside y are at 0
        outside = (x & ~y).nonzero()
        return _nearest_distances(outside, _boundary(y.unsqueeze(0))[0]).max().item() if len(outside) else 0.0
    return max(directed(a, b), directed(b, a))


def _label_boundaries(labels):
    """Boundary pixels of every object of a label image [H,W]: object pixels with a 4-neighbour of
    another label (or outside the image), i.e. each object minus its erosion."""
    padded = F.pad(labels.unsqueeze(0), (1, 1, 1, 1), value=-1)[0]
    inner = ((padded[:-2, 1:-1] == labels) & (padded[2:, 1:-1] == labels)
             & (padded[1:-1, :-2] == labels) & (padded[1:-1, 2:] == labels))
    return (labels > 0) & ~inner


def _hausdorff_to_each(obj, labels, k):
    """[k] Hausdorff distances between the pixel set `obj` and each object 1..k of `labels`, for an
    object that overlaps none of them (so every distance between the two is to a boundary)."""
    # sup_{y in B_j} d(y, obj): every pixel of the other objects against obj's boundary
    others = labels.nonzero()
    to_obj = _nearest_distances(others, _boundary(obj.unsqueeze(0))[0])
    result = torch.zeros(k + 1, dtype=torch.float64).scatter_reduce(
        0, labels[others[:, 0], others[:, 1]], to_obj, "amax")
    # sup_{x in obj} d(x, B_j): obj's pixels against the boundary pixels of all B_j, minimum per j
    edges = _label_boundaries(labels)
    edge_points = edges.nonzero().int()
    edge_label = labels[edges].long().unsqueeze(0)
    points = obj.nonzero().int()
    step = max(1, _CHUNK // max(1, len(edge_points)))
    for s in range(0, len(points), step):
        p = points[s:s + step]
        d2 = ((p[:, :1] - edge_points[:, 0]) ** 2 + (p[:, 1:] - edge_points[:, 1]) ** 2).double()  # [p, E]
        nearest = torch.full((len(p), k + 1), math.inf, dtype=torch.float64).scatter_reduce(
            1, edge_label.expand(len(p), -1), d2, "amin")  # [p, k+1] squared distance to each B_j
        result = torch.maximum(result, nearest.amax(0).sqrt())
    return result[1:]


def _glas_object_metric(pred_instances, gt_instances, pair_score, unmatched, both_empty, one_empty):
    """Sirinukunwattana et al. 2017: 1/2 [sum_i w_i f(S_i, G*(S_i)) + sum_j w~_j f(G_j, S*(G_j))] with
    w the object's share of its set's area and * the object of the other set overlapping it most."""
    # many small per-object steps: faster on the CPU than as tiny GPU kernels
    p = (pred_instances.unsqueeze(0) if pred_instances.dim() == 2 else pred_instances).cpu()
    t = (gt_instances.unsqueeze(0) if gt_instances.dim() == 2 else gt_instances).cpu()
    out = []
    for n in range(p.shape[0]):
        s, ks, area_s = _objects(p[n].long())
        g, kg, area_g = _objects(t[n].long())
        if ks == 0 or kg == 0:
            out.append(both_empty if ks == kg else one_empty)
            continue
        total = 0.0
        for a, ka, area_a, b, kb in ((s, ks, area_s, g, kg), (g, kg, area_g, s, ks)):
            _, match = _match(a, b, ka, kb)
            for i in range(1, ka + 1):
                obj, j = a == i, int(match[i - 1])
                score = pair_score(obj, b == j) if j > 0 else unmatched(obj, b, kb)
                total += 0.5 * (area_a[i] / area_a[1:].sum()).item() * score
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def object_dice(pred_instances, gt_instances):
    """GlaS object-level Dice per image (instances int [N,H,W], 0 background). An object that
    overlaps no object of the other set scores 0. No objects on either side 1, on one side 0."""
    def pair(a, b):
        return 2 * (a & b).sum().item() / (a.sum() + b.sum()).item()
    return _glas_object_metric(pred_instances, gt_instances, pair, lambda obj, other, k: 0.0, 1.0, 0.0)


def object_hausdorff(pred_instances, gt_instances):
    """GlaS object-level Hausdorff per image. An object that overlaps nothing is paired with the
    object of the other set at the smallest Hausdorff distance. Both sides empty 0, one side inf."""
    def unmatched(obj, other, k):
        return _hausdorff_to_each(obj, other, k).min().item()
    return _glas_object_metric(pred_instances, gt_instances, _region_hausdorff, unmatched, 0.0, math.inf)


# ==================================================================================================
# 5. Classification metrics and summaries
# ==================================================================================================


def _flat_long(x):
    return torch.as_tensor(x).reshape(-1).long().cpu()


def confusion_matrix(pred, target, n_classes):
    """int64 [C,C]: rows = true class, columns = predicted class."""
    p, t = _flat_long(pred), _flat_long(target)
    return torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).view(n_classes, n_classes)


def sensitivity_specificity(pred, target, n_classes):
    """Per class (one-vs-rest): sensitivity TP/(TP+FN), specificity TN/(TN+FP); nan where undefined."""
    cm = confusion_matrix(pred, target, n_classes).double()
    tp, support, predicted, total = cm.diag(), cm.sum(1), cm.sum(0), cm.sum()
    negatives = total - support
    tn = total - support - predicted + tp
    nan = torch.full_like(tp, math.nan)
    return (torch.where(support > 0, tp / support.clamp_min(1), nan),
            torch.where(negatives > 0, tn / negatives.clamp_min(1), nan))


def accuracy(pred, target):
    return (_flat_long(pred) == _flat_long(target)).double().mean().item()


def balanced_accuracy(pred, target, n_classes):
    """Mean per-class sensitivity over the classes present in `target` (as scikit-learn)."""
    sens, _ = sensitivity_specificity(pred, target, n_classes)
    return sens[~sens.isnan()].mean().item()


def f1_score(pred, target, n_classes=2, positive=1):
    """Binary: F1 = 2TP / (2TP + FP + FN) of the `positive` class. n_classes > 2: macro mean over
    classes. An undefined F1 (class absent from prediction and target) counts 0, as scikit-learn."""
    cm = confusion_matrix(pred, target, n_classes).double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1)  # = 2TP + FP + FN
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return f1[positive].item() if n_classes == 2 else f1.mean().item()


def auroc(scores, positives):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counted 1/2
    (Mann-Whitney U with average ranks). nan when one class is absent."""
    s, y = torch.as_tensor(scores).reshape(-1).double().cpu(), torch.as_tensor(positives).reshape(-1).bool().cpu()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    values, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1  # 1-based rank of each distinct value's first copy
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]  # tied scores share their average rank
    return ((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def _reliability_bins(confidence, correct, n_bins):
    """Equal-width bins (i/M, (i+1)/M] of the confidence (0 goes to the first bin): count, mean
    accuracy and mean confidence per bin."""
    c = torch.as_tensor(confidence).reshape(-1).double().cpu()
    a = torch.as_tensor(correct).reshape(-1).double().cpu()
    bins = (torch.ceil(c * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.bincount(bins, minlength=n_bins).double()
    acc = torch.bincount(bins, weights=a, minlength=n_bins) / count.clamp_min(1)
    conf = torch.bincount(bins, weights=c, minlength=n_bins) / count.clamp_min(1)
    return count, acc, conf


def expected_calibration_error(confidence, correct, n_bins=10):
    """ECE = sum_b |B_b|/n |acc(B_b) - conf(B_b)| over equal-width confidence bins (Guo et al. 2017)."""
    count, acc, conf = _reliability_bins(confidence, correct, n_bins)
    return ((count / count.sum().clamp_min(1)) * (acc - conf).abs()).sum().item()


def mean_and_se(values):
    """(mean, standard error) of the finite values: se = std(ddof=1) / sqrt(n); se = 0 for n = 1,
    (nan, nan) for n = 0."""
    v = torch.as_tensor(values if not isinstance(values, list) else [float(x) for x in values]).reshape(-1)
    v = v.double().cpu()
    v = v[torch.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return v.item(), 0.0
    return v.mean().item(), (v.std(unbiased=True) / math.sqrt(len(v))).item()


# ==================================================================================================
# 6. Run bookkeeping
# ==================================================================================================


def add_common_args(parser, *, size, epochs, batch_size, lr, data="synthetic", data_choices=None):
    """Adds the shared flags of DESIGN.md (same names and meaning in every script)."""
    g = parser.add_argument_group("shared options")
    g.add_argument("--data", default=data, choices=data_choices,
                   help=f"dataset: the embedded synthetic benchmark or an official layout (default {data})")
    g.add_argument("--root", default=None, help="dataset folder (real datasets only)")
    g.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size})")
    g.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"batch size (default {batch_size})")
    g.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto takes CUDA when present (default auto)")
    g.add_argument("--out", default=None, help="run folder (default runs/<script>-<data>-<time>)")
    g.add_argument("--quick", action="store_true", help="tiny smoke run of every code path")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue training from a last.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint without training")
    g.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint for --eval-only")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (no effect on CPU; default on)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cache", default=".cache", metavar="DIR", help="preprocessing cache (default .cache)")
    g.add_argument("--log-every", type=int, default=20, metavar="N",
                   help="steps between progress lines and loss checks (default 20)")
    return parser


def seed_everything(seed):
    """Seeds python's random, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def choose_device(name="auto"):
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} was asked for, but this torch ({torch.__version__}) sees no "
                           "CUDA device; use --device cpu or auto, or install a CUDA build of torch")
    return device


def autocast(device, enabled=True):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay in float32)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model, device, compile=False):
    """Moves the model to the device, channels_last on CUDA, torch.compile when asked."""
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # a torch.compile'd module keeps the original here


def _plain(value):
    """JSON-able and weights_only-loadable version of an argument value."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _json_ready(value):
    """Like _plain, but non-finite floats become None so the file is strict JSON."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def _atomic_write_text(path, text):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _git_commit():
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5)
        return result.stdout.strip() or None if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _script_name(script):
    return Path(str(script)).name.removesuffix(".py")


class Run:
    """A run folder: config.json, log.jsonl, checkpoints, results and figures/.

    Run(args, script) creates args.out (default runs/<script>-<data>-<YYYYmmdd-HHMMSS>, then stored
    back in args.out) and writes config.json with all arguments, library versions, the device and the
    git commit of the code when there is one.
    """

    def __init__(self, args, script, device=None):
        self.script = _script_name(script)
        if getattr(args, "out", None) is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            args.out = str(Path("runs") / f"{self.script}-{getattr(args, 'data', 'data')}-{stamp}")
        self.dir = Path(args.out)
        self.figures = self.dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        device = torch.device(device) if device is not None else choose_device(getattr(args, "device", "auto"))
        config = {
            "script": self.script,
            "args": _json_ready(vars(args)),
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available()
                            else platform.processor() or platform.machine()),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "matplotlib": matplotlib.__version__},
            "git_commit": _git_commit(),
            "command": " ".join(sys.argv),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        _atomic_write_text(self.dir / "config.json", json.dumps(config, indent=2) + "\n")

    def path(self, name):
        return self.dir / name

    def log(self, record):
        """Appends one JSON line (the record plus a unix time) to log.jsonl."""
        line = json.dumps(_json_ready({**record, "time": round(time.time(), 3)}), allow_nan=False)
        with open(self.dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def save(self, name, state):
        """Atomic torch.save of `state` (plus "script") to <dir>/<name>: a temporary file, then a rename,
        so an interrupted write never leaves a truncated checkpoint."""
        path = self.dir / name
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**state, "script": self.script}, tmp)
        os.replace(tmp, path)
        return path


def load_checkpoint(path, script, map_location="cpu"):
    """torch.load(weights_only=True) of a checkpoint written by Run.save, refusing another script's."""
    path, script = Path(path), _script_name(script)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a last.pt or best.pt in a "
                                f"run folder of {script}.py)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt file, or objects a plain checkpoint never holds
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or "script" not in state:
        raise ValueError(f"{path} is not a checkpoint written by this project's scripts")
    if state["script"] != script:
        raise ValueError(f"{path} is a checkpoint of {state['script']}.py, not of {script}.py: "
                         f"pass a checkpoint written by {script}.py")
    return state


def _rng_state():
    """RNG states as tensors and plain lists so they load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": [version, list(internal), gauss_next]}


def _set_rng_state(rng):
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    npst = rng["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def checkpoint_state(model, optimizer, scheduler, epoch, best, args, rng=True, generator=None):
    """What a checkpoint holds: weights, optimiser and scheduler states, `epoch` = number of epochs
    completed, the best validation metric, the arguments as plain types, the RNG states and, when
    given, the state of the torch.Generator that shuffles batches."""
    state = {"model": _unwrap(model).state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "epoch": int(epoch),
             "best": _plain(best),
             "args": _plain(vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}))}
    if rng:
        state["rng"] = _rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_state(state, model, optimizer=None, scheduler=None, generator=None):
    """Loads what checkpoint_state saved into the given objects; returns (epoch, best)."""
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        _set_rng_state(state["rng"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].cpu())
    return state["epoch"], state.get("best")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


def check_finite(loss, step, run=None):
    """Raises NonFiniteLossError if `loss` (tensor or float) is not finite. Call it on the running mean
    at log time, not every step (it synchronises with the device). Checkpoints are written only at
    epoch ends, so the last good one stays on disk."""
    value = loss.detach().float().mean().item() if isinstance(loss, torch.Tensor) else float(loss)
    if math.isfinite(value):
        return value
    where = "no checkpoint was written yet"
    if run is not None:
        run.log({"event": "non_finite_loss", "step": str(step), "loss": str(value)})
        if run.path("last.pt").exists():
            where = f"the last good checkpoint is {run.path('last.pt')}"
    raise NonFiniteLossError(f"loss is {value} at step {step}; stopping ({where}). "
                             "Try a lower --lr or check the data.")


class Progress:
    """A progress line every `every` steps (and at the last), at most one per `min_interval` seconds:

        epoch 3 step 120/400 loss 0.4312 img/s 812.5 data-wait 3% eta 2:41

    `.step(loss, images, wait_s)` takes the step's loss as a tensor (summed on the device, read once per
    printed line, so there is no host sync per step), the number of images and the seconds spent waiting
    for the batch. It returns the mean loss since the last line when it printed (for check_finite),
    else None (also None when no loss was given). A skipped line keeps summing, so a NaN is never lost:
    with one Progress per epoch (`total_steps` = steps per epoch) the last step always prints, so the
    epoch's loss is checked before its checkpoint is written. `total_steps` is what the ETA counts to.
    """

    def __init__(self, total_steps, every=20, epoch=None, min_interval=1.0, file=None):
        self.total, self.every, self.epoch, self.min_interval = total_steps, max(1, every), epoch, min_interval
        self.file = file or sys.stdout
        self.steps = self.images = 0
        self.wait = 0.0
        self.start = self.last_print = time.perf_counter()
        self._loss_sum, self._loss_n = None, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def step(self, loss=None, images=0, wait_s=0.0):
        self.steps += 1
        self.images += images
        self.wait += wait_s
        if loss is not None:
            loss = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        now = time.perf_counter()
        due = self.steps % self.every == 0 and now - self.last_print >= self.min_interval
        if not (due or self.steps == self.total):
            return None
        mean = None
        if self._loss_n:
            mean = self._loss_sum.item() / self._loss_n  # the one host sync of this window
            self._loss_sum, self._loss_n = None, 0
        elapsed = max(now - self.start, 1e-9)
        eta = elapsed / self.steps * max(self.total - self.steps, 0)
        parts = [f"epoch {self.epoch}" if self.epoch is not None else None,
                 f"step {self.steps}/{self.total}",
                 f"loss {mean:.4f}" if mean is not None else None,
                 f"img/s {self.images / elapsed:.1f}",
                 f"data-wait {100 * self.wait / elapsed:.0f}%",
                 f"eta {int(eta // 60)}:{int(eta % 60):02d}"]
        print(" ".join(p for p in parts if p), file=self.file, flush=True)
        self.last_print = now
        return mean

    def summary(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"images_per_s": self.images / elapsed, "data_wait_share": self.wait / elapsed,
                "steps": self.steps, "seconds": elapsed}


def _format_cell(value, fmt):
    if value is None:
        return "–"
    if callable(fmt):
        return fmt(value)
    if fmt is not None:
        return fmt.format(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")
    return str(value)


def markdown_table(rows, columns, formats=None, title=None):
    """Markdown table of `rows` (dicts) in the order of `columns`; `formats` maps a column to a format
    string ("{:.1f}") or a function. Missing cells are "–"."""
    formats = formats or {}
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c), formats.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def fmt_mean_se(mean, se, percent=False, digits=None):
    """'82.1 ± 0.4'. percent multiplies by 100 (1 decimal); otherwise `digits` decimals, by default 1
    from 10 up, 2 from 1 up, 3 below."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    scale = 100.0 if percent else 1.0
    if digits is None:
        digits = 1 if percent or abs(mean) >= 10 else (2 if abs(mean) >= 1 else 3)
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def write_results(run_dir, script, data, split, metrics, table, config, markdown):
    """results.json = {"script", "data", "split", "metrics", "table", "config"} (non-finite numbers as
    null) and results.md = `markdown`, both written atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"script": _script_name(script), "data": data, "split": split,
               "metrics": {str(k): _json_ready(v) for k, v in metrics.items()},
               "table": [_json_ready(row) for row in table],
               "config": _json_ready(vars(config) if isinstance(config, argparse.Namespace) else config)}
    _atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    _atomic_write_text(run_dir / "results.md", markdown if markdown.endswith("\n") else markdown + "\n")
    return results


# ==================================================================================================
# 7. Figures (matplotlib, Agg backend; PNG files)
# ==================================================================================================


def _numpy(x):
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def show_image(ax, image_uint8_chw):
    """Shows a [3,H,W] (uint8 0-255 or float 0-1) or [H,W] image without axes."""
    img = _numpy(image_uint8_chw)
    if img.ndim == 3:
        img = img.transpose(1, 2, 0)
    if img.max() > 1.0:
        img = img / 255.0
    ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None)
    ax.set_axis_off()


def draw_contours(ax, mask, color, label=None):
    """Outline of a [H,W] mask; `label` adds a legend entry."""
    m = _numpy(mask).astype(float)
    if m.any() and not m.all():
        ax.contour(m, levels=[0.5], colors=[color], linewidths=1.2)
    if label is not None:
        ax.plot([], [], color=color, label=label)


def plot_uncertainty(ax, umap, title=None):
    """Heat-map of a [H,W] uncertainty map with its colour bar."""
    im = ax.imshow(_numpy(umap), cmap="magma")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def save_figure(fig, path):
    """Saves a PNG (folders created) and closes the figure."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(log_path, keys, out_png):
    """One panel per key of log.jsonl against the epoch (records without the key are skipped)."""
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["epoch"], r[key]) for r in records if "epoch" in r and r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_reliability(confidence, correct, out_png, n_bins=10):
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE."""
    import matplotlib.pyplot as plt
    count, acc, conf = _reliability_bins(confidence, correct, n_bins)
    centres = (np.arange(n_bins) + 0.5) / n_bins
    used = count.numpy() > 0
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar(centres[used], acc.numpy()[used], width=1.0 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {expected_calibration_error(confidence, correct, n_bins):.4f}")
    ax.legend(loc="upper left")
    return save_figure(fig, out_png)
