"""Shared pieces of the four paper scripts: networks, metrics, run bookkeeping and data.

Everything here is used by at least two of `ensemble_annotators.py`, `uncertainty_multiloss.py`,
`joint_unet.py` and `uml.py`, except a dataset's reader and split glue, which serve the scripts that
read that dataset. Anything specific to one paper (its model, losses, fusion rule; uml.py's ImageNet
backbones) stays in its script. Run-time dependencies: the standard library, torch, numpy, PIL,
matplotlib.

Part 1: what a student reads beside a script
    1. Networks            DoubleConv, ResidualBlock, Down, Up, center_crop, UNet
    2. Overlap and calibration metrics   jaccard, dice, nll, brier, pixel_accuracy
    3. Surface distances   hausdorff (max or percentile), assd  (MONAI's conventions)
    4. Objects             label_components, object_dice, object_hausdorff (GlaS definitions)
    5. Classification      confusion_matrix, sensitivity_specificity, accuracy, balanced_accuracy,
                           f1_score, f1_weighted, auroc, expected_calibration_error,
                           classification_metrics (all of them from probabilities), mean_and_se,
                           finite_mean (mean of the defined values, the others counted);
                           assd_medpy (medpy's ASSD form with the UML authors' empty-mask value)
    6. Figures             show_image, draw_contours, plot_uncertainty, show_with_contours,
                           plot_bars, blank_grid, pick_examples, plot_reliability
    Conventions: segmentation metrics take batched tensors `[N,H,W]` (a single `[H,W]` image is
    treated as N = 1) on any device and return one value per image as a CPU tensor;
    classification metrics return Python floats.

Part 2: the run kit (the script writes its own training step; see the part's header)
    7. Command line        UsageError, CheckpointError, NonFiniteLossError, cli, checked (typed
                           flags), add_common_args, parse_args (--resume DIR), restore_architecture,
                           fill_defaults, seed_list, synthetic_split_sizes, seed_everything,
                           choose_device, autocast
    8. Runs and jobs       open_run (a new or empty folder, claimed exclusively), Run, Job,
                           run_jobs (rows x seeds, finished jobs kept, torchrun), job_folder,
                           prepare_model, shard, mean_over_ranks (torchrun's data mode)
    9. Checkpoints         save (last.pt, best.pt), resume, load_best, load_checkpoint,
                           load_model_state, unwrap
    10. Progress           Progress (the progress line, the NaN stop, images/s, data wait)
    11. Results            summarize_rows, row_metrics, fmt_mean_se, fmt_over_seeds,
                           markdown_table, write_results, save_figure, plot_curves
    12. Predict            Predictor, run_predict, predict_images_in (a user's own images ->
                           masks, overlays, uncertainty maps, predictions.csv)

Part 3: data
    One entry point, `load_dataset(name, root=None, size=128, seed=0, cache=None, **options)`,
    returns a dict of splits ("train", "val", "test"; a test-only dataset returns only "test").
    A split is a plain dict of CPU tensors and lists:

        images        uint8 [N,3,H,W]      masks  uint8 [N,H,W] class indices, or [N,A,H,W]
        n_annotations int64 [N] or None    (several annotators; unused mask slots are 0)
        labels        int64 [N] or None    instances int32 [N,H,W] or None (glands: 0 bg, 1..k)
        truth         uint8 [N,H,W] or None (synthetic multi-annotator data: the true mask)
        valid         uint8 [N,H,W] or None (real sets: 1 on image pixels, 0 on letterbox padding)
        sizes         int64 [N,2] or None  (real sets: each image's original height, width)
        names, class_names, mask_names     lists of str
        real test splits: removed_overlap  (names removed: also in train/val, or `exclude`d)
        glas val/test: full_instances, full_masks (lists of [h,w] tensors at original resolution)

    Sections: 1 errors and constants; 2 tensor helpers for the generators; 3-6 the four synthetic
    benchmarks (generated from the seed, no files); 7 the letterbox (`letterbox_box`,
    `letterbox`, `from_canvas`: aspect ratio kept, zero padding, and back to the original size);
    8 files (`_tree` lists the unpacked tree once, `_find` matches a layout's paths, wherever
    unzipping put them); 9 reading images, masks, CSV, .xlsx and NIfTI files; 10 the official
    layouts, one reader each (refuge, isic2017, isic-multi with Ribeiro et al.'s split lists, ph2,
    dermofit, glas, folder, ispy1); 11 `load_dataset`, the checksummed disk cache, seeded splits,
    `exclude` and the test-overlap check; 12 batches, augmentation and normalisation on the device
    (`to_device`, `iterate_batches`, `augment`, `channel_stats`, `normalize`).
"""
import argparse
import atexit
import collections
import contextlib
import csv
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# ================================================================================================
# Part 1: networks, metrics, figures
# ================================================================================================

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
    inf if exactly one is. Equals MONAI's compute_hausdorff_distance wherever both masks are
    non-empty; for an empty mask MONAI warns and returns nan or inf instead of these values."""
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
    (MONAI's compute_average_surface_distance(symmetric=True) on non-empty masks; medpy 0.5's assd
    pools too). Both empty 0, one empty inf."""
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


def f1_weighted(pred, target, n_classes):
    """Support-weighted mean of the per-class F1 scores, sum_k (n_k / n) F1_k with n_k the number of
    targets of class k (scikit-learn's f1_score(average="weighted")); an undefined F1 counts 0."""
    cm = confusion_matrix(pred, target, n_classes).double()
    denom = cm.sum(0) + cm.sum(1)  # = 2TP + FP + FN per class
    f1 = torch.where(denom > 0, 2 * cm.diag() / denom.clamp_min(1), torch.zeros(n_classes, dtype=torch.float64))
    support = cm.sum(1)
    return ((support / support.sum().clamp_min(1)) * f1).sum().item()


def assd_medpy(pred, target, empty=10.0):
    """ASSD in the form of medpy.metric.binary.assd up to medpy 0.4 (the version the UML authors
    used), per image: the MEAN OF THE TWO DIRECTED MEAN distances, (mean d(pred->target) + mean
    d(target->pred)) / 2; medpy 0.5 pools both directions, like assd() above. Same boundaries.
    Where either mask is empty the value is `empty`: the UML authors' copy of medpy returns an array
    of 10s for an empty mask, so their ASSD is 10 px there (both empty too)."""
    out = []
    for d in _surface_distances(pred, target):
        out.append(empty if d is None or d == "inf" else 0.5 * (d[0].mean().item() + d[1].mean().item()))
    return torch.tensor(out, dtype=torch.float64)


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


def classification_metrics(prob, labels, uncertainty=None, belief=None, positive=1):
    """Image-level metrics of class probabilities prob [N,K] against labels [N], the prediction being
    the most probable class: acc, f1 (class `positive`'s F1 for two classes, the macro mean over
    classes for more), f1_weighted (support-weighted), ece (on
    the probability of the predicted class); with `uncertainty` [N] also uncertainty_auroc (how well
    it flags wrong predictions), with `belief` [N,K] also ece_belief (on the predicted class's belief)."""
    prob, labels = torch.as_tensor(prob).cpu(), torch.as_tensor(labels).cpu()
    n_classes, predicted = prob.shape[1], prob.argmax(1)
    correct = predicted == labels
    metrics = {"acc": accuracy(predicted, labels), "f1": f1_score(predicted, labels, n_classes, positive=positive),
               "f1_weighted": f1_weighted(predicted, labels, n_classes)}
    if uncertainty is not None:
        metrics["uncertainty_auroc"] = auroc(uncertainty, ~correct)
    metrics["ece"] = expected_calibration_error(prob.max(1).values, correct)
    if belief is not None:
        metrics["ece_belief"] = expected_calibration_error(belief.cpu().gather(1, predicted[:, None])[:, 0], correct)
    return metrics


def mean_and_se(values):
    """(mean, standard error) of the finite values: se = std(ddof=1) / sqrt(n); se = 0 for n = 1,
    (nan, nan) for n = 0."""
    # Python floats (float64) all the way: a list of floats never passes through torch's float32
    # default dtype, and math.fsum keeps the sums exact to the last bit.
    if torch.is_tensor(values):
        flat = values.detach().cpu().double().reshape(-1).tolist()
    elif isinstance(values, np.ndarray):
        flat = values.astype(np.float64).reshape(-1).tolist()
    else:
        flat = [float(x) for x in values]
    v = [x for x in flat if math.isfinite(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(v) / n
    if n == 1:
        return mean, 0.0
    variance = math.fsum((x - mean) ** 2 for x in v) / (n - 1)  # sample variance, ddof = 1
    return mean, math.sqrt(variance / n)


def finite_mean(values):
    """(mean of the finite values, number of non-finite ones): a metric undefined on some images (an
    ASSD with exactly one empty mask is inf) is averaged over the others and the rest are counted,
    never averaged in as an inf; the mean is nan when no value is finite."""
    v = torch.as_tensor(values).reshape(-1).double().cpu()
    finite = torch.isfinite(v)
    return (v[finite].mean().item() if finite.any() else math.nan), int((~finite).sum())


# ==================================================================================================
# 6. Figures: the drawing pieces of the scripts' paper figures (matplotlib, Agg backend)
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


CONTOUR_COLOURS = ("yellow", "cyan", "magenta", "lime", "orange", "red")


def show_with_contours(ax, image, masks, title=None, legend=False):
    """An image with the outline of every mask of `masks` ({label: [H,W] mask}), one colour each
    (CONTOUR_COLOURS in order); `legend` names them in the lower right corner."""
    show_image(ax, image)
    for (label, mask), colour in zip(masks.items(), CONTOUR_COLOURS * (1 + len(masks) // len(CONTOUR_COLOURS))):
        draw_contours(ax, mask, colour, label=label)
    if title:
        ax.set_title(title, fontsize=9)
    if legend and masks:
        ax.legend(loc="lower right", fontsize=7)


def plot_bars(ax, names, values, colors=None, title=None, ylim=(0, 1)):
    """A bar per value with its name under it (e.g. the belief per class and the uncertainty)."""
    ax.set_axis_on()
    ax.bar(range(len(values)), [float(v) for v in values], color=colors)
    ax.set_xticks(range(len(values)), list(names), fontsize=8)
    ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=9)


def blank_grid(n_rows, n_cols, figsize):
    """(figure, axes [n_rows, n_cols]) with every axis switched off, so that a panel left unused stays blank."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def pick_examples(n_images, count, labels=None):
    """Indices of `count` of `n_images` images for a figure: the first image of each class (in class
    order, when image labels [N] are given), then the others in order."""
    first = [int((labels == c).nonzero()[0]) for c in torch.unique(labels).tolist()] if labels is not None else []
    return list(dict.fromkeys(first + list(range(n_images))))[:count]


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


# ================================================================================================
# Part 2: the run kit
#
#    A command is one run folder; a run is a list of jobs (table row x seed), each with its own
#    sub-folder <out>/<row>-seed<seed>/ holding last.pt, best.pt and, once it finished, result.json.
#    The script writes its training step itself; this part gives it the rest:
#
#        args = common.parse_args(parser, SCRIPT, argv, resolve)  # every flag checked; --resume DIR
#        run = common.open_run(args, SCRIPT, n_jobs)              # the folder, exclusively; torchrun
#        table = common.run_jobs(run, jobs, train_and_test)       # None on torchrun ranks > 0
#          inside a job:  start, best = common.resume(job, model, optimizer, scheduler)
#                         best = common.save(job, epoch + 1, score, best, model, optimizer, scheduler)
#                         common.load_best(job, model)
#        common.write_results(run, metrics, table, markdown)
#
#    torchrun: `open_run` joins the process group and picks a mode: "rows" (job i on rank i % N)
#    when the run has several jobs, "data" (one model, gradients averaged over the ranks, each rank a
#    slice of every batch: `prepare_model`, `shard`) when it has one, or as --parallel says. `run_jobs`,
#    `prepare_model` and `shard` are the only code that knows about ranks.
# ================================================================================================

# --------------------------------------------------------------------------------------------------
# 7. Errors and the command line
# --------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A bad flag or input a user can fix: `cli` prints it on one line and exits with code 2."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable (corrupt, truncated) or written by another script."""


class NonFiniteLossError(UsageError):
    """The loss, or a learned quantity, is no longer finite; the message names the epoch and step."""


_NEW_RUN = {}  # the run folder this process created: {"dir", "created"} (see _forget_empty_run)


def cli(main, argv=None):
    """Runs `main(argv)` as a command: an expected error (UsageError and its kinds, DatasetError)
    prints `<script>: error: ...` and exits with code 2, without a traceback unless --debug is
    given or COMMON_DEBUG=1 is set; a run folder in which nothing but config.json was written is
    removed again, so that the corrected command can use the same --out. Any other exception keeps
    its traceback (it is a bug)."""
    words = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in words or os.environ.get("COMMON_DEBUG", "") not in ("", "0")
    _NEW_RUN.clear()  # only a folder this command makes
    try:
        main(argv) if argv is not None else main()
        if _leave_torchrun(wait=True):
            # a torchrun process ends here: gloo's threads can abort the interpreter's teardown after a
            # finished run (SIGABRT in 3 of 125 two-process CPU runs, torch 2.13), so it is skipped;
            # every file this module writes is already closed
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except (UsageError, DatasetError) as error:
        _forget_empty_run()
        if debug:
            raise
        print(f"{Path(sys.argv[0]).name or 'python'}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        _leave_torchrun(wait=False)


def checked(kind, low=None, above=None, high=None):
    """argparse type: a finite `kind` (int or float) >= low, > above, <= high; anything else is an
    argparse error (one line, exit 2) saying what was expected."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
        for fails, what in ((low is not None and value < low, f">= {low}"), (above is not None and value <= above,
                            f"> {above}"), (high is not None and value > high, f"<= {high}")):
            if fails:
                raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT, NONNEGATIVE_INT = checked(int, low=1), checked(int, low=0)
POSITIVE, NONNEGATIVE = checked(float, above=0), checked(float, low=0)


def checked_list(kind, distinct=False, **bounds):
    """argparse type of a comma-separated list ('0,0.01,0.05' -> [0.0, 0.01, 0.05]): one or more
    items, each as `checked(kind, **bounds)` says, all different when `distinct`."""
    item = checked(kind, **bounds)

    def parse(text):
        values = [item(t) for t in str(text).split(",") if t.strip()]
        if not values or distinct and len(set(values)) != len(values):
            what = "distinct comma-separated values" if distinct else "comma-separated values"
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}")
        return values
    return parse


def add_common_args(parser, *, size, epochs, batch_size, lr, data="synthetic", data_choices=None):
    """Adds the shared flags of DESIGN.md (same names and meaning in every script), each checked."""
    g = parser.add_argument_group("shared options")
    add = g.add_argument
    add("--data", default=data, choices=data_choices, help=f"synthetic benchmark or dataset (default {data})")
    add("--root", help="dataset folder (real datasets only)")
    add("--size", type=checked(int, low=8), default=size, help=f"image side in pixels (default {size})")
    add("--epochs", type=POSITIVE_INT, default=epochs, help=f"training epochs (default {epochs})")
    add("--batch-size", type=POSITIVE_INT, default=batch_size, help=f"batch size (default {batch_size})")
    add("--lr", type=POSITIVE, default=lr, help=f"learning rate (default {lr})")
    add("--seed", type=NONNEGATIVE_INT, default=0, help="random seed (default 0)")
    add("--seeds", type=checked_list(int, distinct=True, low=0), metavar="0,1,2",
        help="train and test every row once per seed; tables give mean ± standard error over seeds")
    for split, what in (("train", "training"), ("val", "validation"), ("test", "test")):
        add(f"--n-{split}", type=POSITIVE_INT, metavar="N", help=f"synthetic data: number of {what} images")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto takes CUDA when present")
    add("--out", help="run folder, new or empty (default runs/<script>-<data>-<time>)")
    add("--resume", metavar="DIR", help="continue the run in DIR (or the run of a checkpoint inside it)")
    add("--quick", action="store_true", help="tiny smoke run of every code path")
    add("--eval-only", action="store_true", help="test --checkpoint without training")
    add("--checkpoint", metavar="PATH", help="a best.pt for --eval-only or --predict")
    add("--predict", metavar="PATH", help="an image or a folder of images to segment with --checkpoint")
    add("--recursive", action="store_true", help="--predict: also read sub-folders")
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA (default on)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--cache", default=".cache", metavar="DIR", help="preprocessing cache (default .cache)")
    add("--log-every", type=POSITIVE_INT, default=20, metavar="N", help="steps between progress lines")
    add("--parallel", choices=["rows", "data"], help="torchrun: share out the jobs (rows) or split each batch "
        "(data); default rows when the run has several jobs")
    add("--debug", action="store_true", help="show the traceback of expected errors too")
    return parser


_MAY_CHANGE_ON_RESUME = {"device", "log_every", "epochs", "debug", "resume", "out"}


def parse_args(parser, script, argv=None, resolve=None):
    """argv -> args, every flag checked by its type, then `resolve(args)` (the script's defaults that
    depend on the data or --quick, and its checks across flags). With --resume DIR (or a checkpoint
    inside DIR) the arguments are those of DIR/config.json: a flag given beside it that differs from
    them is refused, naming it, except --device, --log-every and a larger --epochs."""
    parser.allow_abbrev = False  # a flag is known by its full name (see `given`)
    parser.error = _refuse      # one line through `cli`, not argparse's usage block
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.resume is None:
        if args.eval_only and not args.checkpoint or args.predict and not args.checkpoint:
            raise UsageError(f"--{'predict' if args.predict else 'eval-only'} needs --checkpoint PATH "
                             f"(a best.pt written by {script}.py)")
        return resolve(args) if resolve else args
    if args.eval_only or args.predict:
        raise UsageError("--resume continues training; it cannot be combined with --eval-only or --predict")
    folder, config = _run_of(args.resume, script)
    options = parser._option_string_actions
    given = {options[w.split("=", 1)[0]].dest for w in argv if w.split("=", 1)[0] in options}
    saved = config["args"]
    differ = sorted(d for d in given - _MAY_CHANGE_ON_RESUME if _plain(getattr(args, d)) != saved.get(d))
    if "out" in given and Path(args.out).resolve() != folder.resolve():
        differ.append("out")
    if "epochs" in given and args.epochs < saved["epochs"]:
        differ.append("epochs (it may only grow)")
    if differ:
        raise UsageError(f"--resume {args.resume}: " + ", ".join(f"--{d.replace('_', '-')}" for d in differ)
                         + " differ from the run's config.json; drop them to continue the run as it was started")
    resumed = argparse.Namespace(**{**vars(args), **saved})
    for key in given & {"device", "log_every", "epochs", "debug"}:
        setattr(resumed, key, getattr(args, key))
    resumed.resume = resumed.out = str(folder)
    return resumed


def _refuse(message):
    raise UsageError(message)


def _run_of(path, script):
    """(run folder, its config.json) of --resume PATH: the folder itself or one holding the checkpoint."""
    path = Path(path)
    for folder in [path] + list(path.parents)[:2]:
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            if config.get("script") != script:
                raise UsageError(f"--resume {path}: a run of {config.get('script')}.py, not of {script}.py")
            return folder, config
    raise UsageError(f"--resume {path}: no config.json there or above; expected a run folder of {script}.py")


def restore_architecture(args, checkpoint, keys):
    """Copies the argument names `keys` from checkpoint["args"] onto `args`, so that --eval-only and
    --predict rebuild the network the checkpoint was trained with; prints each value that changes."""
    saved = checkpoint.get("args") or {}
    for key in (k for k in keys if k in saved):
        if _plain(getattr(args, key, None)) != saved[key]:
            print(f"--{key.replace('_', '-')}: using the checkpoint's {saved[key]!r} (command line: "
                  f"{getattr(args, key, None)!r})")
        setattr(args, key, saved[key])
    return args


def fill_defaults(args, *tables):
    """Sets every argument that is still None to its value in the first of `tables` that has it."""
    for table in tables:
        for key, value in table.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    return args


def seed_list(args):
    """The seeds every row is trained with: --seeds when given, else [--seed]."""
    return list(args.seeds) if getattr(args, "seeds", None) else [int(getattr(args, "seed", 0))]


def synthetic_split_sizes(args):
    """load_dataset's split sizes from --n-train/--n-val/--n-test (the synthetic benchmarks only)."""
    return {k: getattr(args, k) for k in ("n_train", "n_val", "n_test") if getattr(args, k, None) is not None}


def seed_everything(seed):
    """Seeds python's random, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def choose_device(name="auto", local_rank=0):
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA is an error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda was asked for, but this torch ({torch.__version__}) sees no CUDA "
                         "device; use --device cpu or auto, or install a CUDA build of torch")
    cuda = name != "cpu" and torch.cuda.is_available()
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def autocast(device, enabled=True):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay in float32)."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _plain(value, finite=False):
    """JSON-able, weights_only-loadable form of a value: tensors and numpy numbers become Python
    ones; `finite`: NaN and infinities become None (results.json and log.jsonl are strict JSON)."""
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, finite) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, finite) for k, v in value.items()}
    if isinstance(value, float) and finite and not math.isfinite(value):
        return None
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _atomic_write_text(path, text):
    """A temporary file unique to this process, then a rename: never half a file, never another's."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _append_line(path, line):
    """One write() on an O_APPEND descriptor: lines of several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# 8. The run folder, jobs and torchrun
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    """This process under torchrun: `rank` of `world_size`, its GPU `local_rank`, `mode` "single",
    "rows" or "data", and the gloo `group` used for Python objects (None: the default group)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "single"
    group: object = None


@dataclasses.dataclass
class Run:
    """A run folder: config.json, log.jsonl, figures/, results.json/.md and one sub-folder per job."""
    dir: Path
    script: str
    args: argparse.Namespace
    device: torch.device
    dist: Dist

    @property
    def figures(self):
        return self.dir / "figures"


@dataclasses.dataclass
class Job:
    """One table row x seed. `dir` holds its last.pt, best.pt and result.json; `log` appends a line
    (with its row and seed) to the run's log.jsonl; figures drawn inside the job go to `figures`.
    (On data-parallel ranks > 0 these are a private scratch copy: rank 0 writes the run's files.)"""
    row: str
    seed: int
    index: int
    run: Run
    dir: Path
    log_file: Path
    figures: Path = None

    @property
    def name(self):
        return self.dir.name  # <row>-seed<seed>

    def log(self, **record):
        line = {"row": str(self.row), "seed": self.seed, **record, "time": round(time.time(), 3)}
        _append_line(self.log_file, json.dumps(_plain(line, finite=True), allow_nan=False) + "\n")


def open_run(args, script, n_jobs=1):
    """The run folder of `args`: with --resume the existing one; otherwise --out (default
    runs/<script>-<data>-<time>), which must not exist or be empty and is claimed exclusively
    (config.json created with O_EXCL: two runs never share a folder). Joins torchrun first when
    WORLD_SIZE > 1 (see the part's header); config.json records the arguments, versions, device,
    git commit and processes. Nothing that was in the folder is ever deleted or replaced."""
    dist = _join_torchrun(args, n_jobs)
    device = choose_device(args.device, dist.local_rank)
    folder = Path(args.out) if args.out else Path("runs") / (
        f"{script}-{args.data}-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    config = {"script": script, "args": _plain(vars(args), finite=True), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "world_size": dist.world_size, "parallel": dist.mode,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "numpy": np.__version__, "matplotlib": matplotlib.__version__},
              "git_commit": _git_commit(), "command": " ".join(sys.argv),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    refused = None
    if args.resume and dist.rank == 0:  # a larger --epochs given beside --resume is now the run's
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if saved["args"].get("epochs") != args.epochs:
            saved["args"]["epochs"] = args.epochs
            _atomic_write_text(folder / "config.json", json.dumps(saved, indent=2) + "\n")
    if not args.resume and dist.rank == 0:
        try:
            _claim(folder, config)
        except UsageError as error:
            refused = str(error)
    if dist.world_size > 1:  # rank 0's folder (its clock) once it exists, or why it was refused
        folder, refused = _broadcast((str(folder), refused), dist)
    if refused:
        raise UsageError(refused)
    folder = Path(folder)
    args.out = str(folder)
    return Run(folder, script, args, device, dist)


def _new_folder(folder, hint=""):
    """Creates `folder`, or takes it when it exists empty; True when it was created."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file; name a new or empty folder")
    try:
        folder.mkdir(parents=True)
        return True
    except FileExistsError:
        if any(folder.iterdir()):
            raise UsageError(f"--out {folder} is not empty; choose another --out or remove that folder{hint}")
        return False
    except OSError as error:
        raise UsageError(f"--out {folder}: cannot create it ({error.strerror})")


def _claim(folder, config):
    created = _new_folder(folder, " (to continue the run there, pass --resume instead)")
    try:
        fd = os.open(folder / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UsageError(f"--out {folder} was just taken by another run; choose another --out")
    except OSError as error:
        raise UsageError(f"--out {folder}: cannot write there ({error.strerror})")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    (folder / "figures").mkdir()
    _NEW_RUN.update(dir=folder, created=created)


def _forget_empty_run():
    """After an expected error: a run folder this process created holding only config.json and empty
    folders loses them again (the user's own files never: `_claim` took an empty folder only)."""
    folder = _NEW_RUN.pop("dir", None)
    if folder is None or any(p.is_file() and p.name != "config.json" for p in folder.rglob("*")):
        return
    (folder / "config.json").unlink(missing_ok=True)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        sub.rmdir()
    if _NEW_RUN.pop("created"):
        folder.rmdir()


def _git_commit():
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5)
        return done.stdout.strip() or None if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_jobs(run, jobs, train_and_test):
    """Runs every job (row, seed) of a table: `train_and_test(job)` returns a flat dict of numbers
    (and strings), kept in the job's result.json. A job whose result.json exists (finished before a
    --resume) is not run again; the others start with every generator seeded with the job's seed.
    torchrun rows mode: job i on rank i % N; data mode: every rank runs every job. Returns the table
    of `summarize_rows` on the process that writes the run's files (rank 0), None on the others."""
    dist, n = run.dist, len(jobs)
    jobs = [Job(row, int(seed), i, run, job_folder(run, row, seed), run.dir / "log.jsonl", run.figures)
            for i, (row, seed) in enumerate(jobs)]
    failure, scratch = None, None
    for job in jobs:
        if (dist.mode == "rows" and job.index % dist.world_size != dist.rank) or _finished(job):
            continue
        if dist.mode == "data" and dist.rank > 0:  # same steps as rank 0; its files go to a scratch copy
            scratch = scratch or Path(tempfile.mkdtemp(prefix=f"{run.script}-rank{dist.rank}-"))
            if job.dir.is_dir():
                shutil.copytree(job.dir, scratch / job.name)
            job.dir, job.log_file, job.figures = scratch / job.name, scratch / "log.jsonl", scratch / "figures"
        where = f", rank {dist.rank}" if dist.mode == "rows" else ""
        print(f"[job {job.index + 1}/{n}] {job.row}, seed {job.seed}{where}", flush=True)
        seed_everything(job.seed)
        started = time.perf_counter()
        try:
            result = _plain(dict(train_and_test(job)))
        except Exception as error:  # rows mode: tell the other ranks before stopping
            if dist.mode != "rows":
                raise
            failure = (error, f"rank {dist.rank}, {job.row} seed {job.seed}: {error}")
            break
        if dist.rank == 0 or dist.mode == "rows":
            job.dir.mkdir(exist_ok=True)
            rank = dist.rank if dist.mode == "rows" else "all" if dist.mode == "data" else 0
            record = {"row": str(job.row), "seed": job.seed, "epochs": run.args.epochs, "rank": rank,
                      "seconds": round(time.perf_counter() - started, 1), "metrics": result}
            _atomic_write_text(job.dir / "result.json", json.dumps(record, indent=1) + "\n")
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    if dist.world_size > 1:  # also the barrier after which rank 0 reads every job's result
        import torch.distributed as td
        failures = [None] * dist.world_size
        td.all_gather_object(failures, failure and failure[1], group=dist.group)
        if failure:
            raise failure[0]
        if any(failures):
            raise UsageError(f"another process failed ({next(f for f in failures if f)})")
        if dist.rank > 0:
            return None
    per_row = {}
    for job in jobs:
        done = json.loads((job.dir / "result.json").read_text(encoding="utf-8"))
        per_row.setdefault(job.row, []).append({**done["metrics"], "seed": job.seed, "rank": done["rank"]})
    return summarize_rows(per_row)


def _finished(job):
    """Whether the job's result.json exists for this run's --epochs (a --resume with more epochs
    continues finished jobs from their last.pt)."""
    path = job.dir / "result.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("epochs") == job.run.args.epochs


def job_folder(run, row, seed):
    """The folder of the job (row, seed): <out>/<row>-seed<seed>/, the row's name made safe."""
    return run.dir / (re.sub(r"[^A-Za-z0-9.+=-]+", "_", str(row)).strip("_") + f"-seed{int(seed)}")


def _join_torchrun(args, n_jobs):
    """Joins the torchrun process group when WORLD_SIZE > 1 (NCCL with one GPU per process on CUDA,
    gloo on CPU) and picks the mode; Dist() without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = choose_device(args.device).type == "cuda"
    mode = args.parallel or ("rows" if n_jobs > 1 else "data")
    if cuda:
        if mode == "data" and int(os.environ.get("LOCAL_WORLD_SIZE", world)) > torch.cuda.device_count():
            raise UsageError("--parallel data needs one GPU per process: lower --nproc_per_node, or use rows")
        local_rank %= torch.cuda.device_count()  # rows mode may share a GPU between processes
        torch.cuda.set_device(local_rank)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_leave_torchrun, wait=False)  # main() called without `cli`: still leave cleanly
    dist = Dist(rank, world, local_rank, mode, td.new_group(backend="gloo") if cuda else None)
    if rank == 0:
        print(f"torchrun: {world} processes, mode {mode}: " + (f"{n_jobs} jobs shared out" if mode == "rows"
              else "one model, each batch split across processes"), flush=True)
    return dist


def _leave_torchrun(wait):
    """Leaves the process group while the interpreter is whole (after a barrier when `wait`); True
    when there was one to leave."""
    import torch.distributed as td
    if not (td.is_available() and td.is_initialized()):
        return False
    try:
        if wait:
            td.barrier()
    finally:
        td.destroy_process_group()
    return True


def _broadcast(obj, dist):
    import torch.distributed as td
    box = [obj]
    td.broadcast_object_list(box, src=0, group=dist.group)
    return box[0]


def prepare_model(model, run):
    """The model on the run's device: channels_last on CUDA; torch.compile with --compile. In data
    mode every rank starts from rank 0's weights and each gradient is averaged over the ranks as
    backward accumulates it (what DistributedDataParallel does, without its bucketing, so that a
    baseline that leaves a head unused or a loss weight used outside forward needs no change);
    BatchNorm is SyncBatchNorm on GPUs, and on CPU each rank normalises its slice (rank 0's
    running statistics are the ones saved)."""
    model = model.to(run.device)
    if run.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if run.dist.mode == "data":
        import torch.distributed as td
        if run.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for parameter in model.parameters():
            td.broadcast(parameter.data, src=0)
            parameter.register_post_accumulate_grad_hook(_average_gradient)
    return torch.compile(model) if run.args.compile else model


def mean_over_ranks(value, dist):
    """In data mode the mean of a tensor over the ranks (e.g. the epoch loss a plateau schedule reads,
    so that every rank takes the same step); else the tensor itself."""
    if dist.mode != "data":
        return value
    import torch.distributed as td
    value = value.clone()
    td.all_reduce(value)
    return value / dist.world_size


def _average_gradient(parameter):
    import torch.distributed as td
    td.all_reduce(parameter.grad)
    parameter.grad /= td.get_world_size()


def shard(batch, dist):
    """In data mode this rank's contiguous slice of every per-image entry of a batch dict (so the
    ranks' mean gradients average to the whole batch's when it divides evenly); else the batch."""
    if dist.mode != "data":
        return batch
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
    base, extra = divmod(n, dist.world_size)
    start = dist.rank * base + min(dist.rank, extra)
    stop = start + base + (dist.rank < extra)
    return {k: v[start:stop] if (torch.is_tensor(v) and v.dim() > 0 or isinstance(v, (list, tuple)))
            and len(v) == n else v for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# 9. Checkpoints: last.pt every epoch, best.pt when the validation score improves, resume
# --------------------------------------------------------------------------------------------------


def unwrap(model):
    """The plain module inside torch.compile (`._orig_mod`): its weights, its own attributes."""
    return getattr(model, "_orig_mod", model)


def load_model_state(model, state_dict, strict=True):
    """Loads weights into the plain module inside `model`, whatever wrapper prefixes the keys carry."""
    def plain_key(key):
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        return key
    try:
        return unwrap(model).load_state_dict({plain_key(k): v for k, v in state_dict.items()}, strict=strict)
    except RuntimeError as error:  # missing, unexpected or misshapen weights
        reason = " ".join(line.strip() for line in str(error).strip().split("\n")[:2])[:300]
        raise CheckpointError(f"the checkpoint's weights do not fit this model (another version of the script, or "
                              f"other architecture flags): {reason}") from error


def _rng_state():
    """The RNG states as tensors and plain lists, so that they load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def _set_rng_state(rng):
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save(job, epoch, score, best, model, optimizer=None, scheduler=None, generator=None, **extra):
    """End of epoch `epoch` (counted from 1): writes the job's last.pt, and best.pt when `score`
    (higher is better) beats `best` or no best.pt exists yet; returns the best score. A checkpoint
    holds the weights, optimiser, scheduler, RNG states (and a script's own torch.Generator), epoch,
    best score, arguments and `extra`.
    Each file is written to a temporary name and renamed, and only with finite parameters and
    buffers: otherwise the run stops (NonFiniteLossError), the previous files intact."""
    weights = unwrap(model).state_dict()
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteLossError(f"{job.name}: after epoch {epoch} {bad[0]} is not finite ({len(bad)} tensors "
                                 f"in all); not saved, the last good checkpoint is {job.dir / 'last.pt'}. "
                                 "Try a lower --lr or check the data.")
    improved = (math.isfinite(score) and score > best) or not (job.dir / "best.pt").exists()
    best = score if improved and math.isfinite(score) else best
    state = {"script": job.run.script, "row": str(job.row), "seed": job.seed, "epoch": int(epoch),
             "score": float(score), "best": float(best), "model": weights,
             "optimizer": optimizer and optimizer.state_dict(), "scheduler": scheduler and scheduler.state_dict(),
             "rng": _rng_state(), "generator": generator and generator.get_state(),
             "args": _plain(vars(job.run.args)), **extra}
    job.dir.mkdir(parents=True, exist_ok=True)
    for name in ("best.pt", "last.pt") if improved else ("last.pt",):
        tmp = job.dir / f".{name}.{os.getpid()}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, job.dir / name)
    return best


def resume(job, model, optimizer=None, scheduler=None, generator=None):
    """(epochs done, best score) of the job: (0, -inf) for a fresh one; after an interruption its
    last.pt's weights, optimiser, scheduler and RNG states (and `generator`'s) are loaded."""
    if not (job.dir / "last.pt").exists():
        return 0, -math.inf
    state = load_checkpoint(job.dir / "last.pt", job.run.script)
    load_model_state(model, state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    if generator is not None:
        generator.set_state(state["generator"])
    print(f"[{job.name}] resumed after epoch {state['epoch']} (best score {state['best']:.4f})", flush=True)
    return state["epoch"], state["best"]


def load_best(job, model):
    """Loads the job's best.pt weights into `model`; returns the checkpoint."""
    state = load_checkpoint(job.dir / "best.pt", job.run.script)
    load_model_state(model, state["model"])
    return state


def load_checkpoint(path, script, map_location="cpu"):
    """torch.load(weights_only=True) of a checkpoint written by `save`; CheckpointError for a missing,
    unreadable (corrupt or truncated) file or another script's checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a best.pt or last.pt in a job "
                              f"folder of a {script}.py run)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt file, or objects a plain checkpoint never holds
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): {error}") from error
    if not isinstance(state, dict) or "script" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by this project's scripts")
    if state["script"] != script:
        raise CheckpointError(f"{path} is a checkpoint of {state['script']}.py, not of {script}.py: "
                              f"pass a checkpoint written by {script}.py")
    return _Checkpoint(state, path=path)


class _Checkpoint(dict):
    """A loaded checkpoint: a key it lacks (a checkpoint of an older version of the script) is a
    CheckpointError naming the file and the key, not a KeyError."""

    def __init__(self, state, path):
        super().__init__(state)
        self.path = path

    def __missing__(self, key):
        raise CheckpointError(f"{self.path} has no '{key}': it was written by another version of this script; "
                              "retrain, or use a checkpoint written by this version")


# --------------------------------------------------------------------------------------------------
# 10. The progress line
# --------------------------------------------------------------------------------------------------


class Progress:
    """One job's training progress. `for batch in progress.epoch(epoch, batches)` times the wait for
    each batch; `progress.step(loss, n_images)` sums the loss on the device and every `every` steps
    (and at an epoch's last) prints

        [UML-seed0] epoch 3 step 40/50 loss 0.4312 img/s 812.5 data-wait 3% eta 2:41

    reading the running mean once (the only host sync) and stopping the run (NonFiniteLossError) when
    it is not finite, naming the epoch and step as the log numbers them (both from 1)."""

    def __init__(self, job, steps_per_epoch, epochs, start_epoch=0, every=20):
        self.job, self.per_epoch, self.every = job, steps_per_epoch, every
        self.remaining = steps_per_epoch * (epochs - start_epoch)
        self.steps = self.images = 0
        self.wait = 0.0
        self.start = time.perf_counter()
        self.window, self.count = 0.0, 0

    def epoch(self, epoch, batches):
        self.current, self.in_epoch = epoch + 1, 0
        batches = iter(batches)
        while True:
            tick = time.perf_counter()
            batch = next(batches, None)
            self.wait += time.perf_counter() - tick
            if batch is None:
                return
            yield batch

    def step(self, loss, images):
        self.steps, self.in_epoch, self.images = self.steps + 1, self.in_epoch + 1, self.images + images
        self.window, self.count = self.window + loss.detach().float(), self.count + 1
        if self.in_epoch % self.every and self.in_epoch != self.per_epoch:
            return
        mean = float(self.window) / self.count
        self.window, self.count = 0.0, 0
        if not math.isfinite(mean):
            last = self.job.dir / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise NonFiniteLossError(f"{self.job.name}: loss is {mean} at epoch {self.current} step "
                                     f"{self.in_epoch}; stopping ({kept}). Try a lower --lr.")
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        eta = elapsed / self.steps * max(self.remaining - self.steps, 0)
        print(f"[{self.job.name}] epoch {self.current} step {self.in_epoch}/{self.per_epoch} loss {mean:.4f} "
              f"img/s {self.images / elapsed:.1f} data-wait {100 * self.wait / elapsed:.0f}% "
              f"eta {int(eta // 60)}:{int(eta % 60):02d}", flush=True)

    def report(self):
        """Prints and logs the job's images per second and data-wait share; returns them."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        speed = {"images_per_s": self.images / elapsed, "data_wait_share": self.wait / elapsed}
        print(f"[{self.job.name}] {speed['images_per_s']:.1f} img/s, "
              f"data wait {100 * speed['data_wait_share']:.0f}% "
              "(step time spent waiting for batches)", flush=True)
        self.job.log(event="speed", **speed)
        return speed


# --------------------------------------------------------------------------------------------------
# 11. Tables, results and figures
# --------------------------------------------------------------------------------------------------


def summarize_rows(per_row):
    """Table rows from {row: [per-seed metric dicts]}: per row {"row", <metric>: mean over seeds,
    <metric>_se: sample std (ddof 1) / sqrt(n), 0 for one seed, "seeds", "rank", "per_seed"}.
    Non-finite or missing values are left out of the mean and counted in <metric>_undefined;
    non-numeric values are kept when all seeds agree."""
    table = []
    for name, entries in per_row.items():
        row = {"row": name}
        for key in dict.fromkeys(k for e in entries for k in e if k not in ("seed", "rank")):
            values = [e.get(key) for e in entries]
            if all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                    and any(v is not None for v in values):
                numbers = [math.nan if v is None else float(v) for v in values]
                row[key], row[f"{key}_se"] = mean_and_se(numbers)
                undefined = sum(not math.isfinite(v) for v in numbers)
                if undefined:
                    row[f"{key}_undefined"] = undefined
            elif all(v == values[0] for v in values):
                row[key] = values[0]
        table.append({**row, "seeds": [e["seed"] for e in entries], "rank": [e["rank"] for e in entries],
                      "per_seed": entries})
    return table


def row_metrics(row):
    """A summarize_rows row without its bookkeeping: what results.json's "metrics" holds."""
    return {k: v for k, v in row.items() if k not in ("row", "seeds", "rank", "per_seed")}


def fmt_mean_se(mean, se, percent=False, digits=None):
    """'82.1 ± 0.4'; percent multiplies by 100 (1 decimal); else `digits`, by default 1 from 10 up,
    2 from 1 up, 3 below. 'n/a' for a missing or non-finite mean."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    digits = digits if digits is not None else 1 if percent or abs(mean) >= 10 else 2 if abs(mean) >= 1 else 3
    scale = 100.0 if percent else 1.0
    return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def fmt_over_seeds(row, key, percent=False, digits=None):
    """A summarize_rows cell: 'mean ± SE' over several seeds, the plain value for one."""
    text = fmt_mean_se(row.get(key), row.get(f"{key}_se", math.nan), percent, digits)
    return text if len(row.get("seeds", [])) > 1 else text.split(" ± ")[0]


def markdown_table(rows, columns, formats=None, title=None):
    """Markdown table of `rows` (dicts) in the order of `columns`; `formats` maps a column to a format
    string ("{:.1f}") or a function. Missing cells are "–"."""
    def cell(value, fmt):
        if value is None:
            return "–"
        if fmt is not None:
            return fmt(value) if callable(fmt) else fmt.format(value)
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    formats = formats or {}
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(columns) + " |",
                                                        "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c), formats.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(run, metrics, table, markdown, split="test"):
    """results.json {"script", "data", "split", "seeds", "metrics", "table", "config"} (non-finite
    numbers as null) and results.md = `markdown`, each written atomically; prints the markdown."""
    args = run.args
    results = {"script": run.script, "data": getattr(args, "dataset", args.data), "split": split,
               "seeds": seed_list(args), "metrics": _plain(metrics, finite=True),
               "table": _plain(table, finite=True), "config": _plain(vars(args), finite=True)}
    _atomic_write_text(run.dir / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    _atomic_write_text(run.dir / "results.md", markdown.rstrip("\n") + "\n")
    print(markdown + f"\nresults in {run.dir}", flush=True)
    return results


def save_figure(fig, path):
    """Saves a PNG (folders created) and closes the figure."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(job, keys, out_png):
    """One panel per key of the job's log.jsonl records against the epoch."""
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in job.log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in records if (r.get("row"), r.get("seed")) == (str(job.row), job.seed)]
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


# --------------------------------------------------------------------------------------------------
# 12. Predict: a trained model on a user's own images (--predict)
#
#    The script gives a Predictor (its model and what the checkpoint says about the input) and a
#    predict_batch(predictor, images_uint8 [B,3,S,S]) -> {"mask", "instances"?, "maps", "rows"};
#    predict_images_in reads the images, brings them to the model's input the way training did,
#    maps every output back to each image's own size and writes the files.
# --------------------------------------------------------------------------------------------------

_PREDICT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# contour colours of classes 1, 2, ... in the overlay (class 0 is background / stroma: no contour)
_CLASS_COLOURS = ((0, 255, 0), (255, 40, 40), (0, 200, 255), (255, 220, 0), (255, 0, 255), (255, 140, 0))


@dataclasses.dataclass
class Predictor:
    """What predicting needs, read from a checkpoint by a script's load_model: the model (eval mode,
    on `device`), the checkpoint's arguments, the normalisation (mean, std) of training, the input
    side `size`, whether training kept the aspect ratio (letterbox) or resized to a square, the
    image-level class names and the segmentation class names (index order), and anything else the
    script's predict_batch needs (`extra`, e.g. a fusion rule)."""
    model: object
    args: object
    norm: tuple = None
    size: int = 128
    keep_aspect: bool = True
    device: object = "cpu"
    class_names: list = None
    mask_names: list = None
    extra: dict = dataclasses.field(default_factory=dict)


def run_predict(args, load_model, predict_batch, script):
    """--predict PATH --checkpoint CKPT of a script's main: load_model(CKPT, device), then
    predict_images_in(PATH, ...) into --out; UsageError when no image could be read."""
    predictor = load_model(args.checkpoint, choose_device(args.device))
    count = predict_images_in(args.predict, predictor, predict_batch, args.out, script=script,
                              recursive=args.recursive, batch_size=args.batch_size)
    if not count:
        raise UsageError(f"--predict {args.predict}: no image could be read (see errors.txt)")
    return count


def _to_model_input(image, size, keep_aspect):
    """uint8 [3,h,w] -> uint8 [3,size,size], with the data section's geometry (the same as training):
    letterboxed (aspect kept, zero padding) or squashed to the square."""
    return letterbox(image, size, "bilinear") if keep_aspect else _resize_to(image, size, size, "bilinear")


def _to_image_size(x, height, width, keep_aspect, mode):
    """[size,size] model output -> [height,width] at the image's own size: the letterbox box cropped
    (when the aspect was kept, `from_canvas`) and resized; 'nearest' for class indices and instances,
    'bilinear' for float maps."""
    if keep_aspect:
        return from_canvas(x, height, width, mode)
    return _resize_to(x, height, width, mode)


def _read_user_image(path):
    """RGB uint8 [3,h,w] of any image PIL reads: greyscale, palette and 16-bit images become RGB
    (16-bit stretched to 0..255), the alpha channel of RGBA is dropped, EXIF rotation applied."""
    from PIL import ImageOps
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float32)
            array = (array - array.min()) / max(float(array.max() - array.min()), 1e-6) * 255
            image = Image.fromarray(array.round().astype(np.uint8))
        image = image.convert("RGB")
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _list_images(path, recursive):
    """[(file, path relative to the input)] of the image files at `path` (a file or a folder;
    sub-folders only when recursive), in name order; other files, hidden files and __MACOSX skipped."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--predict {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in _PREDICT_EXTENSIONS:
            raise UsageError(f"--predict {path} is not an image file ({', '.join(_PREDICT_EXTENSIONS)})")
        return [(path, Path(path.name))]
    found = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith(".") or entry.name == "__MACOSX":
            continue
        if entry.is_dir() and recursive:
            found += [(f, entry.name / rel) for f, rel in _list_images(entry, True)]
        elif entry.is_file() and entry.suffix.lower() in _PREDICT_EXTENSIONS:
            found.append((entry, Path(entry.name)))
    return found


def _output_names(items):
    """Each input's output base name, relative to the output folder: `<stem>` (in its sub-folder when
    recursive); `<stem>_<ext>` when two files of one folder share a stem (a.png, a.jpg), then a
    number until the name is taken by no other input (a_png.bmp beside a.png: a_png_2), letter case
    ignored, so that two inputs never share an output."""
    stems = collections.Counter((rel.parent, rel.stem.lower()) for _, rel in items)
    names, taken = [], set()
    for _, rel in items:
        name = rel.stem if stems[(rel.parent, rel.stem.lower())] == 1 else f"{rel.stem}_{rel.suffix[1:].lower()}"
        candidate, k = name, 1
        while (rel.parent, candidate.lower()) in taken:
            k += 1
            candidate = f"{name}_{k}"
        taken.add((rel.parent, candidate.lower()))
        names.append(rel.parent / candidate)
    return names


def _label_edges(labels):
    """bool [h,w]: pixels of a label > 0 with a 4-neighbour of another label (outside the image = 0),
    i.e. the inner contour of every region of an integer map."""
    padded = F.pad(labels[None, None].float(), (1, 1, 1, 1))[0, 0]
    centre = padded[1:-1, 1:-1]
    differs = ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
               | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))
    return differs & (centre > 0)


def _contour_overlay(image, mask, instances=None):
    """uint8 [h,w,3]: the image with the contour of every class > 0 of `mask` [h,w] in its colour, and
    of every instance in white."""
    out = image.permute(1, 2, 0).clone()
    edges = _label_edges(mask)
    for c in mask[edges].unique().tolist():
        out[edges & (mask == c)] = torch.tensor(_CLASS_COLOURS[(c - 1) % len(_CLASS_COLOURS)], dtype=torch.uint8)
    if instances is not None:
        out[_label_edges(instances)] = 255
    return out.numpy()


def _colour_map(values):
    """uint8 [h,w,3]: magma colours of a float map scaled from its minimum to its maximum."""
    v = values.numpy().astype(np.float64)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return (matplotlib.colormaps["magma"](np.nan_to_num(scaled))[..., :3] * 255).round().astype(np.uint8)


def predict_images_in(path, predictor, predict_batch, out_dir=None, *, recursive=False, batch_size=8,
                      script="script"):
    """Predicts every image file at `path` (a file or a folder; png, jpg, jpeg, bmp, tif, tiff in any
    letter case; sub-folders when `recursive`, mirrored in the output) with
    `predict_batch(predictor, images_uint8 [B,3,S,S] on predictor.device)` and writes into `out_dir`
    (new or empty, as a run's; default runs/<script>-predict-<time>), at each image's own size:
      <name>_mask.png        class indices (8-bit) of "mask";  <name>_instances.png  16-bit "instances";
      <name>_overlay.png     the image with the contours of every class > 0 (and of each instance);
      <name>_<map>.npy/.png  each float map of "maps", as float32 and in magma colours;
    and predictions.csv (image, width, height, then the keys of "rows") and errors.txt (unreadable
    files, also named on stderr). Every <name> is decided first (`_output_names`). Returns the
    number of images predicted (the caller exits non-zero when it is 0)."""
    items = _list_images(path, recursive)
    if not items:
        raise UsageError(f"--predict {path}: no image files ({', '.join(_PREDICT_EXTENSIONS)})"
                         + ("" if recursive else "; add --recursive to read sub-folders"))
    out_dir = Path(out_dir or Path("runs") / f"{script}-predict-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    source = Path(path).resolve()
    if source.is_dir() and (out_dir.resolve() == source or source in out_dir.resolve().parents):
        raise UsageError(f"--out {out_dir} lies inside the images' folder {path}: choose another --out "
                         "(nothing is written into an input folder)")
    _new_folder(out_dir)
    names = _output_names(items)
    for name in names:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    size, rows, errors, count = predictor.size, [], [], 0
    batch_size = max(1, int(batch_size))
    for start in range(0, len(items), batch_size):
        images, kept = [], []
        for (file, rel), name in zip(items[start:start + batch_size], names[start:start + batch_size]):
            try:
                image = _read_user_image(file)
            except Exception as error:  # PIL raises several types for broken files
                message = f"{file}: cannot read image ({type(error).__name__}: {error})"
                print(message, file=sys.stderr, flush=True)
                errors.append(message)
                continue
            images.append(image)
            kept.append((rel, name))
        if not images:
            continue
        canvas = torch.stack([_to_model_input(im, size, predictor.keep_aspect) for im in images])
        with torch.no_grad():
            out = predict_batch(predictor, canvas.to(predictor.device))
        for b, (image, (rel, name)) in enumerate(zip(images, kept)):
            h, w = image.shape[-2:]
            back = lambda x, mode: _to_image_size(x[b].detach().cpu(), h, w, predictor.keep_aspect, mode)  # noqa: E731
            base = out_dir / name
            mask = back(out["mask"], "nearest").round().long()
            if int(mask.min()) < 0 or int(mask.max()) > 255:
                raise ValueError(f"predict_batch gave classes outside 0..255 ({int(mask.min())}..{int(mask.max())})")
            Image.fromarray(mask.numpy().astype(np.uint8), mode="L").save(f"{base}_mask.png")
            instances = None
            if out.get("instances") is not None:
                instances = back(out["instances"], "nearest").round().long().clamp(0, 65535)
                Image.fromarray(instances.numpy().astype(np.uint16)).save(f"{base}_instances.png")
            Image.fromarray(_contour_overlay(image, mask, instances)).save(f"{base}_overlay.png")
            for map_name, values in (out.get("maps") or {}).items():
                values = back(values.float(), "bilinear")
                np.save(f"{base}_{map_name}.npy", values.numpy().astype(np.float32))
                Image.fromarray(_colour_map(values)).save(f"{base}_{map_name}.png")
            extra = (out.get("rows") or [{}] * len(images))[b]
            rows.append({"image": rel.as_posix(), "width": w, "height": h,
                         **{str(k): f"{v:.6g}" if isinstance(v, float) else v for k, v in _plain(extra).items()}})
            count += 1
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns or ["image", "width", "height"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "errors.txt").write_text("".join(e + "\n" for e in errors), encoding="utf-8")
    print(f"predicted {count} of {len(items)} images into {out_dir}"
          + (f"; {len(errors)} unreadable, listed in {out_dir / 'errors.txt'}" if errors else ""), flush=True)
    return count


# ================================================================================================
# Part 3: data
# ================================================================================================

class DatasetError(ValueError):
    """Bad dataset input: missing folder, wrong layout, unreadable file, inconsistent labels."""


_SPLITS = ("train", "val", "test")
_TENSOR_KEYS = ("images", "masks", "n_annotations", "labels", "instances", "truth", "valid", "sizes")
_RENDER_CHUNK = 64  # images rendered at once: bounds the memory of [chunk, K, H, W] intermediates

# ---------------------------------------------------------------------------------------------
# 2. Tensor helpers for the generators. Geometry lives in normalised coordinates ([-1, 1] across
#    the image) so that a benchmark looks the same at every `size`; pixel-sized details (blur,
#    hairs, nuclei) are scaled by size / 128.
# ---------------------------------------------------------------------------------------------


def _uniform(gen, n, low, high):
    return low + (high - low) * torch.rand(n, generator=gen)


def _exact_labels(n, shares, gen):
    """Labels with exact class counts (largest remainder rounding of shares * n), shuffled."""
    counts = [int(math.floor(s * n)) for s in shares]
    for k in sorted(range(len(shares)), key=lambda k: counts[k] - shares[k] * n)[: n - sum(counts)]:
        counts[k] += 1
    labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    return labels[torch.randperm(n, generator=gen)]


def _coords(size):
    """Pixel-centre coordinates (yy, xx), each [H,W] in (-1, 1)."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    return torch.meshgrid(t, t, indexing="ij")


def _col(v):
    return v[:, None, None]  # [N] -> [N,1,1]: per-image parameters broadcast over [N,H,W]


def _polar(yy, xx, cy, cx):
    dy, dx = yy - _col(cy), xx - _col(cx)
    return torch.sqrt(dy * dy + dx * dx), torch.atan2(dy, dx)


def _ellipse_distance(yy, xx, cy, cx, ry, rx, angle):
    """Normalised elliptic radius [N,H,W]: < 1 inside the rotated ellipse, 1 on its edge."""
    dy, dx = yy - _col(cy), xx - _col(cx)
    c, s = _col(torch.cos(angle)), _col(torch.sin(angle))
    u, v = c * dx + s * dy, -s * dx + c * dy
    return torch.sqrt((u / _col(rx)) ** 2 + (v / _col(ry)) ** 2)


def _harmonics(theta, amps, phases):
    """max(0.25, 1 + sum_k amps_k cos(k theta + phase_k)), k = 1..K; theta [N,...], amps/phases [N,K]."""
    shape = (theta.shape[0],) + (1,) * (theta.dim() - 1)
    out = torch.ones_like(theta)
    for k in range(amps.shape[1]):  # loop over harmonics, not over samples
        out = out + amps[:, k].view(shape) * torch.cos((k + 1) * theta + phases[:, k].view(shape))
    return out.clamp_min(0.25)


def _smooth_noise(gen, n, size, cells, octaves=1):
    """Value noise [N,H,W] in about [-1, 1]: a coarse uniform grid upsampled bicubically. Octave o
    has cells * 2^o cells and amplitude 0.5^o; the sum is divided by the total amplitude."""
    out = torch.zeros(n, size, size)
    for o in range(octaves):
        c = max(2, min(size, int(cells * 2 ** o)))
        grid = torch.rand(n, 1, c, c, generator=gen) * 2 - 1
        out += 0.5 ** o * F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    return out / (2 - 0.5 ** (octaves - 1))


def _blur(x, sigma):
    """Separable Gaussian blur of x [N,C,H,W] (sigma in pixels), reflecting at the borders."""
    if sigma < 0.3:
        return x
    r = min(int(math.ceil(3 * sigma)), x.shape[-1] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _finish(img, gen, size, blur_max, noise_std):
    """Acquisition nuisance shared by all generators: a per-image blur (a mix of the sharp and a
    blurred copy), additive Gaussian noise, then quantisation to uint8. img [N,3,H,W] in [0,1]."""
    amount = _uniform(gen, img.shape[0], 0.0, 1.0).view(-1, 1, 1, 1)
    img = torch.lerp(img, _blur(img, blur_max * size / 128), amount)
    img = img + noise_std * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _lerp(img, colour, alpha):
    """Blend img [N,3,H,W] towards colour ([N,3] or [3]) with weight alpha [N,H,W]."""
    return img + alpha[:, None] * (colour.view(-1, 3, 1, 1) - img)


def _chunks(n):
    """(slice, count) of each run of at most _RENDER_CHUNK images, the images rendered at once."""
    return [(slice(i, i + _RENDER_CHUNK), min(n - i, _RENDER_CHUNK)) for i in range(0, n, _RENDER_CHUNK)]


# ---------------------------------------------------------------------------------------------
# 3. synthetic-fundus (REFUGE-like, for uml.py)
# ---------------------------------------------------------------------------------------------


def _synthetic_fundus(n, size, gen, glaucoma_share=0.35):
    """Colour fundus photographs with the optic disc and cup (normalised units: half-width = 1).

    Masks: 0 background, 1 disc rim, 2 cup (disc = mask >= 1). Labels: 0 non-glaucoma, 1 glaucoma.
    The label sets the vertical cup-to-disc ratio vCDR ~ N(0.42, 0.09) or N(0.62, 0.09), clipped to
    [0.2, 0.85]; the classes overlap (a perfect vCDR threshold is right for about 88 % of images),
    so no method reaches 100 %. The disc is a bright tilted ellipse placed nasally (left or right
    eye); the cup inside it sits temporally, with little contrast and a blurred edge (hard to see).
    Nuisance: retina colour and texture, macula, 10 vessels leaving the disc over the cup,
    field-of-view circle with vignetting, blur up to 1.2 px, noise.
    Glaucoma share 0.35 by default. REFUGE has 10 %, but at 10 % a CPU-sized training set holds
    only a few dozen glaucoma images, the classifier learns "always normal" (90 % accuracy) and
    the paper's F1 becomes noise; 35 % keeps the minority class learnable while still imbalanced.
    """
    labels = _exact_labels(n, [1 - glaucoma_share, glaucoma_share], gen)
    vcdr = (0.42 + 0.20 * labels.float() + 0.09 * torch.randn(n, generator=gen)).clamp(0.2, 0.85)
    side = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)  # left or right eye
    disc_cx, disc_cy = side * _uniform(gen, n, 0.1, 0.35), _uniform(gen, n, -0.15, 0.15)  # nasal
    disc_ry = _uniform(gen, n, 0.17, 0.27)
    disc_rx, tilt = disc_ry * _uniform(gen, n, 0.82, 1.0), _uniform(gen, n, -0.25, 0.25)
    cup_ry = vcdr * disc_ry  # the cup: same tilt, inside the disc, towards the temporal side (the macula)
    cup_rx = torch.minimum(cup_ry * _uniform(gen, n, 0.8, 1.1) * disc_rx / disc_ry, 0.92 * disc_rx)
    cup_cx = disc_cx - side * (disc_rx - cup_rx) * _uniform(gen, n, 0.0, 0.5)
    cup_cy = disc_cy + (disc_ry - cup_ry) * _uniform(gen, n, -0.3, 0.3)
    retina = torch.tensor([0.78, 0.36, 0.16]) * _uniform(gen, (n, 3), 0.75, 1.15)  # colour, then brightness
    retina = retina * _uniform(gen, n, 0.7, 1.1)[:, None]
    disc_contrast, cup_contrast = _uniform(gen, n, 0.45, 0.85), _uniform(gen, n, 0.2, 0.6)
    disc_edge, cup_edge = _uniform(gen, n, 0.03, 0.08), _uniform(gen, n, 0.05, 0.2)
    n_vessels = 10  # half of them form the upper/lower arcades, the rest leave in any direction
    arcade = torch.where(torch.rand(n, n_vessels, generator=gen) < 0.5, -1.0, 1.0) * math.pi / 2
    vessel_angle = torch.where(torch.arange(n_vessels) < n_vessels // 2,
                               arcade + 0.5 * torch.randn(n, n_vessels, generator=gen),
                               _uniform(gen, (n, n_vessels), -math.pi, math.pi))
    vessel_curve = 1.2 * torch.randn(n, n_vessels, generator=gen)
    vessel_width = _uniform(gen, (n, n_vessels), 0.012, 0.026).clamp_min(1.4 / size)
    vessel_length = _uniform(gen, (n, n_vessels), 0.4, 1.2)
    fov_radius, vignette = _uniform(gen, n, 0.9, 1.05), _uniform(gen, n, 0.2, 0.6)
    yy, xx = _coords(size)
    images, masks = [], []
    for sl, m in _chunks(n):
        d_disc = _ellipse_distance(yy, xx, disc_cy[sl], disc_cx[sl], disc_ry[sl], disc_rx[sl], tilt[sl])
        d_cup = _ellipse_distance(yy, xx, cup_cy[sl], cup_cx[sl], cup_ry[sl], cup_rx[sl], tilt[sl])
        masks.append((d_disc < 1).to(torch.uint8) + ((d_cup < 1) & (d_disc < 1)).to(torch.uint8))
        img = retina[sl].view(m, 3, 1, 1) * (1 + 0.15 * _smooth_noise(gen, m, size, 5, octaves=3)[:, None])
        macula = (xx - _col(disc_cx[sl] - side[sl] * 0.6)) ** 2 + (yy - _col(disc_cy[sl])) ** 2
        img = img * (1 - 0.35 * torch.exp(-macula / (2 * 0.12 ** 2)))[:, None]
        disc_alpha = torch.sigmoid((1 - d_disc) / _col(disc_edge[sl]))
        cup_alpha = torch.sigmoid((1 - d_cup) / _col(cup_edge[sl])) * disc_alpha
        img = _lerp(img, torch.tensor([1.0, 0.8, 0.52]), disc_alpha * _col(disc_contrast[sl]))
        img = _lerp(img, torch.tensor([1.0, 0.95, 0.8]), cup_alpha * _col(cup_contrast[sl]))
        rho, theta = _polar(yy, xx, disc_cy[sl], disc_cx[sl])
        vessels = torch.zeros(m, size, size)
        for v in range(n_vessels):  # loop over vessel slots, each vectorised over the images
            offset = theta - _col(vessel_angle[sl, v]) - _col(vessel_curve[sl, v]) * rho
            dist = rho * torch.atan2(torch.sin(offset), torch.cos(offset)).abs()
            width = _col(vessel_width[sl, v]) * (1 - 0.5 * rho.clamp(max=1))
            alpha = torch.exp(-(dist / width) ** 2) * torch.exp(-rho / _col(vessel_length[sl, v]))
            vessels = torch.maximum(vessels, alpha * (rho > 0.02))
        img = img * (1 - 0.55 * vessels[:, None] * torch.tensor([0.45, 0.8, 0.8]).view(1, 3, 1, 1))
        r_fov = torch.sqrt(yy ** 2 + xx ** 2)
        field = torch.sigmoid((_col(fov_radius[sl]) - r_fov) / 0.02)
        img = img * (field * (1 - _col(vignette[sl]) * (r_fov / _col(fov_radius[sl])) ** 2))[:, None]
        images.append(_finish(img, gen, size, blur_max=1.2, noise_std=0.02))
    return {"images": torch.cat(images), "masks": torch.cat(masks), "labels": labels,
            "class_names": ["non_glaucoma", "glaucoma"], "mask_names": ["background", "rim", "cup"]}


# ---------------------------------------------------------------------------------------------
# 4. synthetic-breast (I-SPY 1-like, for uml.py)
# ---------------------------------------------------------------------------------------------


def _synthetic_breast(n, size, gen, pcr_share=0.27):
    """Grey DCE-MRI-like breast slices (repeated over 3 channels) with one enhancing tumour.

    Masks: 0 background, 1 tumour. Labels: 0 non-pCR, 1 pCR (pathological complete response).
    Knobs: pCR share 0.27 (I-SPY 1: 43 of 157 patients); tumour radius ~ N(0.17, 0.045) for
    non-pCR and N(0.12, 0.045) for pCR, heterogeneity (internal texture and a dark necrotic core)
    ~ N(0.55, 0.18) vs N(0.30, 0.18), both clipped; the Bayes rule on the two features is right
    for about 85 % of slices (tumour area alone: 81 %). Nuisance: breast outline and chest wall,
    fibroglandular texture, 0-3 enhancing background blobs (not tumour, not in the mask), a smooth
    bias field, Rician noise, blur, intensity scale.
    """
    labels = _exact_labels(n, [1 - pcr_share, pcr_share], gen)
    radius = (0.17 - 0.05 * labels.float() + 0.045 * torch.randn(n, generator=gen)).clamp(0.05, 0.3)
    hetero = (0.55 - 0.25 * labels.float() + 0.18 * torch.randn(n, generator=gen)).clamp(0, 1)
    breast_cy = _uniform(gen, n, 0.15, 0.35)
    breast_ry, breast_rx = _uniform(gen, n, 0.8, 1.0), _uniform(gen, n, 0.8, 1.0)
    chest = _uniform(gen, n, 0.55, 0.8)  # y of the chest wall
    tumour_cy, tumour_cx = _uniform(gen, n, -0.45, 0.3), _uniform(gen, n, -0.45, 0.45)
    amps = (0.04 + 0.12 * hetero)[:, None] * torch.randn(n, 6, generator=gen) / torch.arange(1, 7) ** 0.5
    phases, soft = _uniform(gen, (n, 6), -math.pi, math.pi), _uniform(gen, n, 0.01, 0.03)
    blob_cy, blob_cx = _uniform(gen, (n, 3), -0.6, 0.4), _uniform(gen, (n, 3), -0.7, 0.7)
    blob_amp = _uniform(gen, (n, 3), 0.0, 0.35) * (torch.rand(n, 3, generator=gen) < 0.6)
    blob_sigma = _uniform(gen, (n, 3), 0.03, 0.08)
    yy, xx = _coords(size)
    images, masks = [], []
    for sl, m in _chunks(n):
        rho, theta = _polar(yy, xx, tumour_cy[sl], tumour_cx[sl])
        r_edge = _col(radius[sl]) * _harmonics(theta, amps[sl], phases[sl])
        masks.append((rho < r_edge).to(torch.uint8))
        zero = torch.zeros(m)
        d_breast = _ellipse_distance(yy, xx, breast_cy[sl], zero, breast_ry[sl], breast_rx[sl], zero)
        body = torch.sigmoid((1 - d_breast) / 0.03) * torch.sigmoid((_col(chest[sl]) - yy) / 0.02)
        wall = torch.sigmoid((yy - _col(chest[sl])) / 0.02)
        glandular = torch.sigmoid((_smooth_noise(gen, m, size, 4, octaves=3) - 0.1) / 0.08)
        tissue = body * (0.3 + 0.25 * glandular) + wall * (0.22 + 0.05 * _smooth_noise(gen, m, size, 8))
        for b in range(3):  # background parenchymal enhancement: bright blobs that are not tumour
            d2 = (yy - _col(blob_cy[sl, b])) ** 2 + (xx - _col(blob_cx[sl, b])) ** 2
            tissue = tissue + body * _col(blob_amp[sl, b]) * torch.exp(-d2 / (2 * _col(blob_sigma[sl, b]) ** 2))
        # tumour: a necrotic centre (heterogeneous tumours), internal texture, a soft edge
        inner = 0.85 * (1 - 0.55 * _col(hetero[sl]) * torch.exp(-(rho / (0.55 * r_edge)) ** 2))
        inner = inner * (1 + 0.35 * _col(hetero[sl]) * _smooth_noise(gen, m, size, 16))
        grey = tissue + torch.sigmoid((r_edge - rho) / _col(soft[sl])) * body * (inner - tissue)
        grey = grey * (1 + 0.25 * _smooth_noise(gen, m, size, 2)) * _col(_uniform(gen, m, 0.8, 1.15))
        sigma = _col(_uniform(gen, m, 0.02, 0.05))  # Rician noise: magnitude of a complex signal
        grey = torch.sqrt((grey + sigma * torch.randn(grey.shape, generator=gen)) ** 2
                          + (sigma * torch.randn(grey.shape, generator=gen)) ** 2)
        images.append(_finish(grey[:, None].expand(m, 3, size, size), gen, size, blur_max=1.0, noise_std=0.0))
    return {"images": torch.cat(images), "masks": torch.cat(masks), "labels": labels,
            "class_names": ["non_pcr", "pcr"], "mask_names": ["background", "tumour"]}


# ---------------------------------------------------------------------------------------------
# 5. synthetic-lesions (ISIC-like, for joint_unet.py and ensemble_annotators.py)
# ---------------------------------------------------------------------------------------------

_LESION_CLASSES = ["nevus", "melanoma", "seborrheic_keratosis"]
_LESION_SHARES = [0.686, 0.187, 0.127]  # ISIC 2017 training set
# Class means of four ABCD-like features (each ~ N(mean, 0.18), clipped to [0, 1]):
#                 border irregularity, asymmetry, colour variegation, keratotic texture
_LESION_FEATURES = torch.tensor([[0.30, 0.25, 0.25, 0.20],   # nevus
                                 [0.50, 0.45, 0.50, 0.30],   # melanoma
                                 [0.35, 0.30, 0.30, 0.55]])  # seborrheic keratosis
_LESION_RADIUS = torch.tensor([0.48, 0.54, 0.50])  # mean radius per class, sd 0.09
_ANNOTATION_COUNTS = torch.tensor([2094.0, 100.0, 36.0, 3.0])  # images with 2, 3, 4, 5 masks
# The annotator panel: ISIC's three pipelines, each annotator with its own grow/shrink bias
# (relative radius). "threshold" = automatic + review (tight, ragged), "flood" = semi-automatic
# (smooth, grown), "polygon" = manual (few vertices, coarse; the number is the vertex count).
_ANNOTATORS = [("threshold", -0.06, 0), ("threshold", 0.0, 0), ("flood", 0.08, 0),
               ("flood", 0.03, 0), ("polygon", 0.02, 8), ("polygon", -0.03, 6)]
_EDGE_LEVEL_SCALE = 20.0  # an annotator's edge level on a fading border: bias * 20 (+- 1 per image)
_MAX_ANNOTATIONS = 5
_HAIR_SLOTS = 12
# ISIC-like difficulty: shares of images with each nuisance (the shifted test set draws its own)
_FUZZY_SHARE, _FRAME_CUT_SHARE, _HAIR_SHARE, _RULER_SHARE, _VIGNETTE_SHARE = 0.55, 0.30, 0.50, 0.25, 0.60


def _synthetic_lesions(n, size, gen, annotators=False, shift=False, annotator_gen=None):
    """Dermoscopy-like skin lesions with ISIC's difficulties: one star-shaped lesion on textured skin.

    Masks: 0 skin, 1 lesion. Labels 0 nevus, 1 melanoma, 2 seborrheic keratosis at ISIC 2017's shares
    (68.6 / 18.7 / 12.7 %, exact counts per split). Four features per image from overlapping class
    distributions (`_LESION_FEATURES`, sd 0.18): border irregularity (outline harmonics 3..16),
    asymmetry (harmonics 1 and 3, an off-centre pigment gradient), colour variegation (dark, blue-grey
    and red patches), keratotic texture (ridges, bright milia-like dots); radius N(0.48 / 0.54 / 0.50,
    0.09) of the half-width. The Bayes rule on the features is right for about 83 % of images (the
    majority class: 68.6 %); the images hide part of that. Difficulties (shares of images): fuzzy,
    low-contrast borders (55 %: the pigment fades over 6-15 % of the half-width, not 1-4 %, and is
    30-65 % lighter; the true outline is where the fade is half-way); lesions cut by the frame (30 %
    pushed over an edge; measured: 30 % of all lesions touch it); hairs (50 %, 2-12, half of them
    starting on the border); a ruler with ticks near the border (25 %); a dark round dermoscope frame
    (60 %); light (a gradient up to +-30 %, radial shading), skin tone and texture, blur, noise.
    annotators=True: 2-5 masks per image in the ISIC Archive's proportions (2094 / 100 / 36 / 3 images
    with 2 / 3 / 4 / 5) by distinct members of the panel `_ANNOTATORS` (threshold: tight, ragged
    +-1.5 px; flood fill: smooth, harmonics 1-3 only; polygon: 6 or 8 vertices), each with its
    grow/shrink bias (+- 0.03 per image) and its own level on a fading border: on sharp borders they
    nearly agree, on fuzzy ones flood fill traces far outside threshold. Slots beyond `n_annotations`
    are 0; the true mask is `truth`. Measured (400 images, 64 px, seed 0): mean pairwise Cohen's kappa
    0.66 (sd 0.24; Ribeiro et al.: 0.67 on the ISIC Archive), pairwise Jaccard 0.60, Jaccard with the
    truth 0.70. The scripts' defaults reach (mean ± SE over seeds 0-2, README): joint_unet's
    segmentation JAC 87.9 ± 0.6 % against the truth and classification BACC 51.8 ± 5.0 % (chance
    33 %); ensemble_annotators' rows 50-60 % in domain, MV and STAPLE 6-8 points below the fusions.
    shift=True (test_shift): other skin tone and white balance, lesions 1.25x larger, no dermoscope
    frame, fewer hairs, more blur and noise (a stand-in for PH2 / DermoFit).
    """
    labels = _exact_labels(n, _LESION_SHARES, gen)
    feats = (_LESION_FEATURES[labels] + 0.18 * torch.randn(n, 4, generator=gen)).clamp(0, 1)
    border, asym, variegation, texture = feats.unbind(1)
    radius = (_LESION_RADIUS[labels] + 0.09 * torch.randn(n, generator=gen)).clamp(0.25, 0.72)
    radius = radius * (1.25 if shift else 1.0)
    cy, cx = _uniform(gen, n, -0.12, 0.12), _uniform(gen, n, -0.12, 0.12)
    # frame cut: the centre moves towards one edge until the lesion crosses it
    cut, side = torch.rand(n, generator=gen) < _FRAME_CUT_SHARE, torch.randint(0, 4, (n,), generator=gen)
    towards = torch.where(side % 2 == 0, 1.0, -1.0) * (1 - radius * _uniform(gen, n, 0.2, 0.8))
    across = _uniform(gen, n, -0.35, 0.35)
    cy = torch.where(cut, torch.where(side < 2, towards, across), cy)
    cx = torch.where(cut, torch.where(side < 2, across, towards), cx)
    # outline harmonics: k=1 and 3 for asymmetry, k=2 elongation (nuisance), 3..16 irregularity
    amps = border[:, None] * 0.3 * torch.randn(n, 16, generator=gen) / torch.arange(1, 17, dtype=torch.float32)
    amps[:, 0] = 0.25 * asym
    amps[:, 1] = _uniform(gen, n, 0.0, 0.15)
    amps[:, 2] += 0.1 * asym * torch.randn(n, generator=gen)
    phases = _uniform(gen, (n, 16), -math.pi, math.pi)
    fuzzy = torch.rand(n, generator=gen) < _FUZZY_SHARE
    soft = torch.where(fuzzy, _uniform(gen, n, 0.06, 0.15), _uniform(gen, n, 0.01, 0.04))
    skin = torch.tensor([0.86, 0.66, 0.56]) * _uniform(gen, (n, 3), 0.95, 1.05)  # tone, then brightness
    skin = skin * _uniform(gen, n, 0.75, 1.05)[:, None]
    if shift:  # another camera and population: darker, redder skin and a bluish white balance
        skin = skin * torch.tensor([0.85, 0.78, 0.8]) * torch.tensor([0.92, 0.97, 1.12])
    darkness = _uniform(gen, n, 0.45, 0.9) * torch.where(fuzzy, _uniform(gen, n, 0.35, 0.7), torch.ones(n))
    # hairs: 2-12 on half of the images (fewer under shift); half of them start on the lesion border
    hairy = torch.rand(n, generator=gen) < (0.3 if shift else _HAIR_SHARE)
    n_hairs = torch.where(hairy, torch.randint(2, _HAIR_SLOTS + 1, (n,), generator=gen), 0)
    n_hairs = n_hairs.clamp(max=4 if shift else _HAIR_SLOTS)
    hair_angle = _uniform(gen, (n, _HAIR_SLOTS), -math.pi, math.pi)
    hair_curve = 1.5 * torch.randn(n, _HAIR_SLOTS, generator=gen)
    hair_length = _uniform(gen, (n, _HAIR_SLOTS), 0.4, 1.6)
    hair_width = _uniform(gen, (n, _HAIR_SLOTS), 0.006, 0.012).clamp_min(0.8 / size)
    at = _uniform(gen, (n, _HAIR_SLOTS), -math.pi, math.pi)  # where a border hair starts
    start_y = cy[:, None] + radius[:, None] * torch.sin(at) + 0.5 * hair_length * torch.sin(hair_angle)
    start_x = cx[:, None] + radius[:, None] * torch.cos(at) + 0.5 * hair_length * torch.cos(hair_angle)
    on_border = torch.rand(n, _HAIR_SLOTS, generator=gen) < 0.5
    hair_py = torch.where(on_border, start_y, _uniform(gen, (n, _HAIR_SLOTS), -1, 1))
    hair_px = torch.where(on_border, start_x, _uniform(gen, (n, _HAIR_SLOTS), -1, 1))
    # ruler: a dark straight line with ticks, laid near the lesion border
    ruler = (torch.rand(n, generator=gen) < (0.0 if shift else _RULER_SHARE)).float()
    ruler_angle, ruler_offset = _uniform(gen, n, -math.pi, math.pi), radius * _uniform(gen, n, 0.6, 1.2)
    ruler_width = torch.full((n,), max(0.012, 0.8 / size))
    # light: linear gradient of up to +-30 % in a random direction; dermoscope frame
    light, light_angle = _uniform(gen, n, -0.3, 0.3), _uniform(gen, n, -math.pi, math.pi)
    vignette = (torch.rand(n, generator=gen) < (0.0 if shift else _VIGNETTE_SHARE)).float()
    vignette_radius = _uniform(gen, n, 0.95, 1.35)
    yy, xx = _coords(size)
    images, truths = [], []
    for sl, m in _chunks(n):
        rho, theta = _polar(yy, xx, cy[sl], cx[sl])
        r_edge = _col(radius[sl]) * _harmonics(theta, amps[sl], phases[sl])
        truths.append((rho < r_edge).to(torch.uint8))
        img = skin[sl].view(m, 3, 1, 1) * (1 + 0.06 * _smooth_noise(gen, m, size, 4, 2)
                                             + 0.03 * _smooth_noise(gen, m, size, 32))[:, None]
        # pigment: darker towards one side for asymmetric lesions, patches of other colours
        gradient = torch.cos(theta - _col(phases[sl, 0])) * (rho / r_edge).clamp(max=1)
        pigment = _col(darkness[sl]) * (1 + 0.4 * _col(asym[sl]) * gradient).clamp(0.3, 1.5)
        lesion = img * (1 - pigment[:, None] * torch.tensor([0.55, 0.68, 0.72]).view(1, 3, 1, 1))
        v = _col(variegation[sl])
        for colour, cells in (([0.12, 0.07, 0.06], 3), ([0.38, 0.42, 0.52], 4), ([0.62, 0.28, 0.26], 5)):
            patch = torch.sigmoid((_smooth_noise(gen, m, size, cells, 2) - 0.35 + 0.5 * v) / 0.08)
            lesion = _lerp(lesion, torch.tensor(colour), 0.85 * v * patch)
        t = _col(texture[sl])  # keratotic ridges and milia-like bright dots
        lesion = lesion * (1 + 0.3 * t * _smooth_noise(gen, m, size, max(4, size // 8)))[:, None]
        dots = (torch.rand(m, size, size, generator=gen) > 1 - 0.01 * t * (128 / size) ** 2).float()
        dots = _blur(dots[:, None], 0.9 * size / 128)[:, 0].clamp(max=0.08) / 0.08
        lesion = _lerp(lesion, torch.tensor([0.95, 0.9, 0.8]), 0.7 * dots * t)
        img = img + torch.sigmoid((r_edge - rho) / _col(soft[sl]))[:, None] * (lesion - img)  # soft edge
        for h in range(_HAIR_SLOTS):  # hair slots, vectorised over the images; unused slots are invisible
            c, s = _col(torch.cos(hair_angle[sl, h])), _col(torch.sin(hair_angle[sl, h]))
            dy, dx = yy - _col(hair_py[sl, h]), xx - _col(hair_px[sl, h])
            along, across = c * dx + s * dy, -s * dx + c * dy
            across = across - _col(hair_curve[sl, h]) * along ** 2 / 2  # a curved hair
            hair = torch.exp(-(across / _col(hair_width[sl, h])) ** 2) * (along.abs() < _col(hair_length[sl, h]) / 2)
            img = _lerp(img, torch.tensor([0.2, 0.14, 0.1]), 0.85 * hair * _col((n_hairs[sl] > h).float()))
        # ruler: line at ruler_offset from the lesion centre, ticks every 0.08 on its far side
        c, s = _col(torch.cos(ruler_angle[sl])), _col(torch.sin(ruler_angle[sl]))
        dy, dx = yy - _col(cy[sl]), xx - _col(cx[sl])
        along, across = c * dx + s * dy, -s * dx + c * dy - _col(ruler_offset[sl])
        line = torch.exp(-(across / _col(ruler_width[sl])) ** 2)
        ticks = (across > 0) & (across < 0.06) & (torch.remainder(along, 0.08) < _col(ruler_width[sl]) * 1.5)
        marks = torch.maximum(line, ticks.float()) * _col(ruler[sl])
        img = _lerp(img, torch.tensor([0.08, 0.08, 0.1]), 0.85 * marks)
        r_img = torch.sqrt(yy ** 2 + xx ** 2)
        towards = _col(torch.cos(light_angle[sl])) * xx + _col(torch.sin(light_angle[sl])) * yy  # in [-sqrt 2, sqrt 2]
        lit = 1 + _col(light[sl]) * towards / math.sqrt(2)
        scope = 1 - _col(vignette[sl]) * torch.sigmoid((r_img - _col(vignette_radius[sl])) / 0.03)
        img = img * (lit * scope * (1 - 0.15 * r_img ** 2))[:, None]
        images.append(_finish(img, gen, size, blur_max=2.0 if shift else 1.0, noise_std=0.035 if shift else 0.015))
    out = {"images": torch.cat(images), "labels": labels, "class_names": list(_LESION_CLASSES),
           "mask_names": ["background", "lesion"], "masks": torch.cat(truths)}
    if annotators:  # the panel's masks; the true one moves to `truth`
        masks, n_annotations = _lesion_annotations(size, annotator_gen, cy, cx, radius, amps, phases, soft)
        out.update(masks=masks, n_annotations=n_annotations, truth=out["masks"])
    return out


def _lesion_annotations(size, gen, cy, cx, radius, amps, phases, soft):
    """The masks of the annotator panel for lesions with outline r(theta) = radius * harmonics whose
    pigment fades as sigmoid((r - rho) / soft). An annotator stops where the fade reaches its own
    level: at rho = grow * r + soft * z, z = bias * _EDGE_LEVEL_SCALE + N(0, 1) per image (a wide
    fade moves the traced edge far, a sharp one hardly).
    Returns masks uint8 [N, 5, H, W] (unused slots 0) and n_annotations int64 [N]."""
    n, share = cy.shape[0], _ANNOTATION_COUNTS / _ANNOTATION_COUNTS.sum()
    n_annotations = 2 + torch.multinomial(share, n, replacement=True, generator=gen)
    # each image gets distinct annotators from the panel, in random order (slot k = k-th mask)
    who = torch.rand(n, len(_ANNOTATORS), generator=gen).argsort(dim=1)[:, :_MAX_ANNOTATIONS]
    style = torch.tensor([["threshold", "flood", "polygon"].index(a[0]) for a in _ANNOTATORS])[who]
    panel_bias = torch.tensor([a[1] for a in _ANNOTATORS])[who]
    vertices = torch.tensor([a[2] for a in _ANNOTATORS])[who]
    bias = panel_bias + 0.03 * torch.randn(n, _MAX_ANNOTATIONS, generator=gen)
    level = panel_bias * _EDGE_LEVEL_SCALE + torch.randn(n, _MAX_ANNOTATIONS, generator=gen)
    vertex_phase = _uniform(gen, (n, _MAX_ANNOTATIONS), -math.pi, math.pi)
    vertex_jitter = _uniform(gen, (n, _MAX_ANNOTATIONS, 9), -0.3, 0.3)
    yy, xx = _coords(size)
    out = []
    for sl, m in _chunks(n):
        rho, theta = _polar(yy, xx, cy[sl], cx[sl])
        r_true = _col(radius[sl]) * _harmonics(theta, amps[sl], phases[sl])
        r_smooth = _col(radius[sl]) * _harmonics(theta, amps[sl, :3], phases[sl, :3])
        slots = []
        for k in range(_MAX_ANNOTATIONS):
            grow = 1 + _col(bias[sl, k])
            edge = _col(soft[sl] * level[sl, k])  # the visible edge's offset on a fading border
            ragged = 0.025 * 128 / size * _smooth_noise(gen, m, size, max(4, size // 6))
            threshold = rho < r_true * grow + edge + ragged
            flood = rho < r_smooth * grow + edge
            polygon = torch.zeros_like(threshold)
            for v in (6, 8):  # polygon annotators: exact star-shaped polygon through the outline
                r_polygon = _polygon_radius(theta, v, vertex_phase[sl, k], vertex_jitter[sl, k, :v],
                                            radius[sl], amps[sl], phases[sl])
                polygon = torch.where(_col(vertices[sl, k] == v), rho < grow * r_polygon + edge, polygon)
            s = _col(style[sl, k])
            mask = torch.where(s == 0, threshold, torch.where(s == 1, flood, polygon))
            slots.append(mask & _col(n_annotations[sl] > k))
        out.append(torch.stack(slots, 1).to(torch.uint8))
    return torch.cat(out), n_annotations


def _polygon_radius(theta, n_vertices, phase, jitter, radius, amps, phases):
    """Radius [N,H,W] at angle theta of the polygon whose vertices lie on the outline at angles
    phase + 2 pi (i + jitter_i) / V (jitter_0 = 0). On the edge between vertices (t_i, r_i) and
    (t_j, r_j): r(t) = r_i r_j sin(t_j - t_i) / (r_i sin(t - t_i) + r_j sin(t_j - t))."""
    step = 2 * math.pi / n_vertices
    jitter = torch.cat([torch.zeros_like(jitter[:, :1]), jitter[:, 1:]], 1)
    rel = torch.arange(n_vertices) * step + jitter * step  # [N,V], increasing, rel[:,0] = 0
    rel = torch.cat([rel, torch.full_like(rel[:, :1], 2 * math.pi)], 1)  # close the polygon
    r_vertex = radius[:, None] * _harmonics(phase[:, None] + rel, amps, phases)  # [N,V+1]
    t = torch.remainder(theta - _col(phase), 2 * math.pi).flatten(1)  # [N,HW]
    i = (torch.searchsorted(rel.contiguous(), t.contiguous(), right=True) - 1).clamp(0, n_vertices - 1)
    t_i, t_j = rel.gather(1, i), rel.gather(1, i + 1)
    r_i, r_j = r_vertex.gather(1, i), r_vertex.gather(1, i + 1)
    r = r_i * r_j * torch.sin(t_j - t_i) / (r_i * torch.sin(t - t_i) + r_j * torch.sin(t_j - t))
    return r.view(theta.shape)


# ---------------------------------------------------------------------------------------------
# 6. synthetic-glands (GlaS-like, for uncertainty_multiloss.py)
# ---------------------------------------------------------------------------------------------

# optical densities (R, G, B) of haematoxylin and eosin: Macenko et al.'s (2009) reference stains
_HAEMATOXYLIN, _EOSIN = torch.tensor([0.5626, 0.7201, 0.4062]), torch.tensor([0.2159, 0.8012, 0.5581])


def _synthetic_glands(n, size, gen, malignant_share=0.55):
    """H&E-like colon tissue: pink stroma with fibres and scattered nuclei; glands (up to 9, on a
    jittered 3x3 grid) = pale lumen inside a darker, nucleus-rich epithelial border.

    Masks: 0 stroma, 1 border (epithelium), 2 lumen; `instances` numbers the glands 1..k. Glands that
    touch or overlap stay separate instances, split where they meet as GlaS annotates them: a pixel
    belongs to the gland it lies deepest inside (the smallest normalised outline distance), and a lumen
    keeps the border thickness from its gland's outline and from the line where it meets a neighbour,
    so every gland is ringed by its own border (glands touch in 44 % of images, 68 % of the malignant
    ones, at 96 px). Labels 0 benign, 1 malignant, share 0.55 (GlaS: 48 of 85 training images). A
    latent grade g ~ N(0.3, 0.14) (benign) or N(0.7, 0.14) (malignant), clipped to [0, 1], drives
    every gland of the image (coefficients beside the code): more, larger, more irregular and jittered
    glands (malignant ones crowd and touch), thicker borders, lumens missing, denser epithelial nuclei;
    a perfect reader of g is right for about 92 % of images. Nuisance, independent of the label: the
    grid shifted and its spacing scaled per image (glands cut by the edge, crowding); border thickness
    varying along each gland; a per-image epithelium/stroma contrast; stroma nuclei and fibres in a
    random direction; lumen debris (eosin secretion, shed nuclei); stain strength and hue; an
    illumination gradient up to 25 %; blur up to 1.2 px (at 128 px) and noise 0.03. The default
    uncertainty_multiloss.py run (64 px, 40 epochs, seeds 0, 1, 2) reaches test pixel accuracy
    0.961 ± 0.006, object Dice 0.906 ± 0.010 (the ground-truth region map split into glands by its
    regions_to_instances: 0.970) and classification accuracy 0.79 ± 0.03.
    """
    labels = _exact_labels(n, [1 - malignant_share, malignant_share], gen)
    grade = (0.3 + 0.4 * labels.float() + 0.14 * torch.randn(n, generator=gen)).clamp(0, 1)
    g = grade[:, None]
    cells = torch.tensor([-2 / 3, 0.0, 2 / 3])
    grid_y, grid_x = cells.repeat_interleave(3), cells.repeat(3)  # 9 cells
    n_glands = 9
    present = torch.rand(n, n_glands, generator=gen) < 0.75 + 0.2 * g  # gland presence per cell
    present[:, 4] = True  # at least the centre gland
    spacing = _uniform(gen, (n, 1), 0.8, 1.1)  # nuisance: grid spacing and offset per image
    offset_y, offset_x = _uniform(gen, (n, 1), -0.3, 0.3), _uniform(gen, (n, 1), -0.3, 0.3)
    jitter = 0.05 + 0.1 * g  # malignant glands crowd and touch
    gy = spacing * grid_y + offset_y + jitter * _uniform(gen, (n, n_glands), -1, 1)
    gx = spacing * grid_x + offset_x + jitter * _uniform(gen, (n, n_glands), -1, 1)
    g_radius = (0.19 + 0.09 * g) * _uniform(gen, (n, n_glands), 0.8, 1.2)
    aspect, tilt = _uniform(gen, (n, n_glands), 0.65, 1.0), _uniform(gen, (n, n_glands), -math.pi, math.pi)
    k = torch.arange(1, 7, dtype=torch.float32)  # outline irregularity: harmonics 1-6
    amps = (0.03 + 0.25 * g)[..., None] * torch.randn(n, n_glands, 6, generator=gen) / k ** 0.5
    phases = _uniform(gen, (n, n_glands, 6), -math.pi, math.pi)
    # mean border thickness (of the radius), varying along the gland with harmonics 1-3
    thickness = (0.25 + 0.3 * g + 0.05 * torch.randn(n, n_glands, generator=gen)).clamp(0.15, 0.85)
    thick_amps = 0.2 * torch.randn(n, n_glands, 3, generator=gen).clamp(-1.75, 1.75)  # +-35 % along the gland
    thick_phases = _uniform(gen, (n, n_glands, 3), -math.pi, math.pi)
    no_lumen = torch.rand(n, n_glands, generator=gen) < 0.6 * (g - 0.45).clamp_min(0)
    stain_h, stain_e = _uniform(gen, n, 0.7, 1.35), _uniform(gen, n, 0.7, 1.35)  # stain strength
    hue = 1 + 0.08 * torch.randn(n, 3, generator=gen)
    contrast = _uniform(gen, n, 0.6, 1.0)  # epithelium vs stroma: 1 = textbook, 0.6 = faint
    stroma_nuclei, debris = _uniform(gen, n, 0.002, 0.012), _uniform(gen, n, 0.0, 1.0)  # lumen debris
    light_angle, light_depth = _uniform(gen, n, -math.pi, math.pi), _uniform(gen, n, 0.0, 0.25)
    yy, xx = _coords(size)
    images, masks, instances = [], [], []
    for sl, m in _chunks(n):
        # normalised distance of every pixel to every gland's outline: < 1 inside gland j; and the
        # border thickness of gland j in the direction of the pixel
        dist, thick = [], []
        for j in range(n_glands):
            ry = g_radius[sl, j]
            d = _ellipse_distance(yy, xx, gy[sl, j], gx[sl, j], ry, ry * aspect[sl, j], tilt[sl, j])
            theta = torch.atan2(yy - _col(gy[sl, j]), xx - _col(gx[sl, j]))
            d = d / _harmonics(theta, amps[sl, j], phases[sl, j])
            dist.append(torch.where(_col(present[sl, j]), d, torch.full_like(d, float("inf"))))
            thick.append(_col(thickness[sl, j]) * _harmonics(theta, thick_amps[sl, j], thick_phases[sl, j]))
        dist, thick = torch.stack(dist, 1), torch.stack(thick, 1)  # [m, G, H, W]
        # each pixel belongs to the gland it lies deepest inside (d_1, the smallest d; d_2 the next):
        # glands that touch or overlap stay separate instances, split where d_1 = d_2 as GlaS draws them
        two = dist.topk(2, 1, largest=False)
        (d_1, d_2), nearest = two.values.unbind(1), two.indices[:, 0]
        gland = d_1 < 1
        owns = torch.zeros(m, n_glands).scatter_add_(1, nearest.flatten(1), gland.flatten(1).float()) > 0
        number = owns.long().cumsum(1).gather(1, nearest.flatten(1)).view(m, size, size)  # 1..k in gland order
        instances.append(torch.where(gland, number, 0).to(torch.int32))
        # lumen: at least the border thickness t (of the radius) inside the pixel's own gland, from its
        # outline (1 - d_1 > t) and from the line where it meets a neighbour ((d_2 - d_1) / 2 > t), so
        # that touching glands are each ringed by their own border; none where the gland has no lumen
        t = thick.gather(1, nearest[:, None])[:, 0]
        lumen = (d_1 < 1 - t) & (d_2 - d_1 > 2 * t)
        lumen = lumen & ~no_lumen[sl].gather(1, nearest.flatten(1)).view(m, size, size)
        masks.append(gland.to(torch.uint8) + lumen.to(torch.uint8))
        # stain concentrations per region, softened at region edges, then nuclei on top
        region = _blur(torch.stack([~gland, gland & ~lumen, lumen], 1).float(), 1.0 * size / 128)
        streaks = torch.rand(m, 1, max(2, size // 16), max(2, size // 4), generator=gen)  # stretched noise
        fibres = F.interpolate(streaks, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
        fibres = torch.where(_col(torch.rand(m, generator=gen) < 0.5), fibres, fibres.transpose(1, 2))
        secretion = (_smooth_noise(gen, m, size, 6, octaves=2) * 0.5 + 0.5).clamp(0, 1) * _col(debris[sl])
        c = _col(contrast[sl])
        # stroma: eosin with fibres carrying some haematoxylin; border: stroma + contrast x (epithelium - stroma)
        stroma_h, stroma_e = 0.1 + 0.08 * fibres, 0.35 + 0.2 * fibres
        border_h, border_e = stroma_h + c * (0.5 - stroma_h), stroma_e + c * (0.5 - stroma_e)
        conc_h = region[:, 0] * stroma_h + region[:, 1] * border_h + region[:, 2] * (0.03 + 0.15 * secretion)
        conc_e = region[:, 0] * stroma_e + region[:, 1] * border_e + region[:, 2] * (0.06 + 0.45 * secretion)
        # nuclei per pixel: stroma, epithelium (0.03 (1 + g)), shed into the lumen
        density = (region[:, 0] * _col(stroma_nuclei[sl]) + region[:, 1] * (0.03 * (1 + _col(grade[sl])))
                   + region[:, 2] * 0.004 * _col(debris[sl]))
        seeds = (torch.rand(m, size, size, generator=gen) < density * (128 / size) ** 2).float()
        sigma = 0.9 * size / 128  # a nucleus: a seed blurred, scaled to peak above 1, clipped
        nuclei = (_blur(seeds[:, None], sigma)[:, 0] * 1.5 * 2 * math.pi * sigma ** 2).clamp(max=1)
        conc_h = conc_h + 0.9 * nuclei
        od = (_col(stain_h[sl]) * conc_h)[:, None] * (_HAEMATOXYLIN.view(1, 3, 1, 1) * hue[sl].view(m, 3, 1, 1)) \
            + (_col(stain_e[sl]) * conc_e)[:, None] * _EOSIN.view(1, 3, 1, 1)
        ramp = torch.cos(_col(light_angle[sl])) * xx + torch.sin(_col(light_angle[sl])) * yy  # in [-1.4, 1.4]
        light = 1 - _col(light_depth[sl]) * (ramp + 1.42) / 2.84
        images.append(_finish(torch.exp(-1.6 * od) * light[:, None], gen, size, blur_max=1.2, noise_std=0.03))
    return {"images": torch.cat(images), "masks": torch.cat(masks), "instances": torch.cat(instances),
            "labels": labels, "class_names": ["benign", "malignant"], "mask_names": ["stroma", "border", "lumen"]}


# ---------------------------------------------------------------------------------------------
# 7. Letterbox: the aspect-preserving resize of every real dataset and of --predict. An image of
#    h x w is scaled by size / max(h, w) and centred on a size x size canvas of zeros; `valid`
#    marks its pixels, `from_canvas` maps a prediction back to h x w. No anisotropic resizing.
# ---------------------------------------------------------------------------------------------


def letterbox_box(height, width, size):
    """Where an image of `height x width` lands on the `size x size` canvas: (top, left, new_h,
    new_w). The longer side becomes `size`, the shorter round(side * size / longer) (at least 1),
    centred: top = (size - new_h) // 2, left = (size - new_w) // 2.
    Example: a GlaS image 522 x 775 at size 128 -> new_h = round(522 * 128 / 775) = round(86.2)
    = 86, new_w = 128, top = (128 - 86) // 2 = 21: rows 21..106 hold the image."""
    height, width, size = int(height), int(width), int(size)
    if min(height, width, size) < 1:
        raise ValueError(f"letterbox needs positive sizes, got {height}x{width} -> {size}")
    longer = max(height, width)
    new_h = min(size, max(1, (2 * height * size + longer) // (2 * longer)))  # round half up, in integers
    new_w = min(size, max(1, (2 * width * size + longer) // (2 * longer)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def _resize_to(x, height, width, mode):
    """x [..., h, w] -> [..., height, width] on x's device.
    "nearest": each output pixel takes the input pixel under its centre, src = floor((dst + 1/2)
    * h / height) (PIL's NEAREST, torch's "nearest-exact"): an index gather, so any dtype (class
    indices, instance ids) passes unchanged and a disc stays a disc.
    "bilinear": half-pixel-centred bilinear, antialiased when shrinking (as PIL's BILINEAR);
    uint8 in -> uint8 out (rounded), float in -> same float dtype."""
    h, w = x.shape[-2:]
    height, width = int(height), int(width)
    if mode == "nearest":
        rows = ((2 * torch.arange(height, device=x.device) + 1) * h) // (2 * height)
        cols = ((2 * torch.arange(width, device=x.device) + 1) * w) // (2 * width)
        return x.index_select(-2, rows).index_select(-1, cols)
    if mode != "bilinear":
        raise ValueError(f"mode must be 'bilinear' or 'nearest', not {mode!r}")
    lead = tuple(x.shape[:-2])
    if (h, w) == (height, width):
        return x.clone()
    if x.numel() == 0:
        return x.new_zeros(*lead, height, width)
    flat = x.reshape(1, math.prod(lead), h, w).float()
    y = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False,
                      antialias=height < h or width < w).reshape(*lead, height, width)
    if x.dtype == torch.uint8:
        return y.round().clamp(0, 255).to(torch.uint8)
    return y.to(x.dtype) if x.is_floating_point() else y


def _place_on_canvas(x, height, width, size, mode):
    """x (an image of original size height x width, possibly already decoded smaller) resized into
    letterbox_box(height, width, size) of a zero canvas [..., size, size]."""
    top, left, new_h, new_w = letterbox_box(height, width, size)
    out = x.new_zeros(*x.shape[:-2], size, size)
    out[..., top:top + new_h, left:left + new_w] = _resize_to(x, new_h, new_w, mode)
    return out


def letterbox(image, size, mode="bilinear"):
    """image [..., h, w] (uint8 [3,h,w], a mask [h,w], a batch [B,C,h,w]; CPU or CUDA) ->
    [..., size, size], same dtype and device: resized isotropically into letterbox_box(h, w, size)
    with `mode` ("bilinear" for images, "nearest" for masks and instances), zeros around it."""
    h, w = image.shape[-2:]
    return _place_on_canvas(image, h, w, size, mode)


def from_canvas(x, height, width, mode=None):
    """The inverse of `letterbox`: x [..., size, size] -> [..., height, width]. Crops
    letterbox_box(height, width, size) and resizes it to the original size: mode "bilinear" for
    float maps (probabilities, uncertainty), "nearest" for class indices and instances; None picks
    bilinear for floating-point x and nearest otherwise."""
    size = x.shape[-1]
    if x.shape[-2] != size:
        raise ValueError(f"from_canvas expects a square canvas [..., S, S], got {tuple(x.shape)}")
    mode = mode or ("bilinear" if x.is_floating_point() else "nearest")
    top, left, new_h, new_w = letterbox_box(height, width, size)
    return _resize_to(x[..., top:top + new_h, left:left + new_w], height, width, mode)


def _valid_map(height, width, size):
    """uint8 [size,size]: 1 on the pixels letterbox_box(height, width, size) covers, 0 on padding."""
    top, left, new_h, new_w = letterbox_box(height, width, size)
    valid = torch.zeros(size, size, dtype=torch.uint8)
    valid[top:top + new_h, left:left + new_w] = 1
    return valid


# ---------------------------------------------------------------------------------------------
# 8. Files: the tree under --root is listed once (`_tree`: lower-case paths, macOS debris and
#    hidden files skipped, numbers sorted as numbers); a layout's files are found by a pattern on
#    the end of their path (`_find`), wherever unzipping put their folder. The README's dataset
#    table describes the layouts; a reader's docstring says only what it takes from where.
# ---------------------------------------------------------------------------------------------

_IMAGE = r"\.(?:jpe?g|png|bmp|tiff?)"  # an image file's extension, as a pattern
_DEBRIS = {"__macosx", "thumbs.db", "desktop.ini"}


def _natural_key(name):
    """'train_10' after 'train_9': digit runs compare as numbers, the rest case-insensitively."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", str(name))]


def _tree(root):
    """[(lower-case path relative to root, Path)] of every file below root in natural order, and of
    every folder (its path ending in "/"); `__MACOSX`, `Thumbs.db`, hidden `._*` files skipped."""
    entries, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        if os.path.realpath(folder) in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(os.path.realpath(folder))
        dirs[:] = [d for d in dirs if d.lower() not in _DEBRIS and not d.startswith(".")]
        for n in dirs + [n for n in names if n.lower() not in _DEBRIS and not n.startswith(".")]:
            path = Path(folder) / n
            entries.append((path.relative_to(root).as_posix().lower() + ("/" if n in dirs else ""), path))
    return sorted(entries, key=lambda e: _natural_key(e[0]))


def _find(files, pattern):
    """[(match, path)] of the files whose lower-case path ends with `pattern` (from a folder boundary)."""
    regex = re.compile(r"(?:^|/)" + pattern + "$")
    return [(m, p) for rel, p in files if (m := regex.search(rel))]


def _by_id(name, found, group=1, what="image"):
    """{id: path} of `_find`'s matches, the id being the match's `group`; an id found twice is an
    error naming both files (an old copy beside the new one, or --root above two datasets)."""
    out = {}
    for match, path in found:
        key = match.group(group)
        if key in out:
            raise DatasetError(f"{name}: {what} id '{key}' found twice: '{out[key]}' and '{path}'; keep one copy "
                               "(or point --root at one dataset)")
        out[key] = path
    return out


def _file(name, files, filename, required=False):
    """The one file called `filename` (any case, any folder), or None (an error when required)."""
    found = [p for _, p in _find(files, re.escape(filename.lower()))]
    if len(found) > 1:
        raise DatasetError(f"{name}: two files '{filename}': '{found[0]}' and '{found[1]}'; keep one of them")
    if required and not found:
        raise DatasetError(f"{name}: no file '{filename}' in the dataset folder")
    return found[0] if found else None


def _pairs(name, images, masks, looked_for):
    """(image, [mask]) per image of {id: path}; an image without a mask is an error."""
    missing = [p for key, p in images.items() if key not in masks]
    if missing:
        raise DatasetError(f"{name}: image '{missing[0]}' has no mask (looked for {looked_for})"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return [(p, masks[key] if isinstance(masks[key], list) else [masks[key]]) for key, p in images.items()]


def _found(name, files, patterns, mask_pattern, looked_for, group=1):
    """{split: [(image, [mask])]} of the images matching {split: pattern}, each with the mask matching
    `mask_pattern` whose id (the match's `group`) is the same (`_by_id`, `_pairs`)."""
    masks = _by_id(name, _find(files, mask_pattern), group, "mask")
    return {split: _pairs(name, _by_id(name, _find(files, pattern), group), masks, looked_for)
            for split, pattern in patterns.items()}


def _layout_error(name, root, files, what):
    """No `what` under root: name the layout's place in the README, where the dataset is published,
    and the zips still packed under root (REFUGE2.zip unpacked holds six)."""
    zips = [p.name for rel, p in files if rel.endswith(".zip")]
    packed = (f"\nStill zipped under it: {', '.join(zips[:8])}{' ...' if len(zips) > 8 else ''}; unpack each "
              "(into a folder of its own name) and run again." if zips else "")
    where = f"; published at {_READERS[name]['url']}" if name != "folder" else ""
    return DatasetError(f"{name}: no {what} under '{root}'. See the dataset table in README.md for the layout of "
                        f"'{name}'{where}.{packed}")


# ---------------------------------------------------------------------------------------------
# 9. Reading images, masks and label files
# ---------------------------------------------------------------------------------------------


def _read_image(name, path, size):
    """RGB uint8 [3,size,size], letterboxed, and the original (height, width). JPEGs are decoded at a
    reduced scale (PIL's draft) that still covers the box; 16-bit and float images are stretched to 0..255."""
    try:
        image = Image.open(path)
        width, height = image.size
        _, _, new_h, new_w = letterbox_box(height, width, size)
        if image.format == "JPEG":
            image.draft("RGB", (new_w, new_h))
        if image.mode in ("I", "I;16", "I;16B", "F"):
            array = np.asarray(image, dtype=np.float32)
            array = (array - array.min()) / max(float(array.max() - array.min()), 1e-6) * 255
            image = Image.fromarray(array.round().astype(np.uint8))
        array = np.asarray(image.convert("RGB"))
    except Exception as error:  # PIL raises several types for broken files
        raise DatasetError(f"{name}: cannot read image '{path}' ({error})") from error
    image = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return _place_on_canvas(image, height, width, size, "bilinear"), (height, width)


def _read_mask(name, path, original, image_path, to_index, dtype):
    """int32 [h,w] class indices at the original resolution, `to_index` mapping the stored array
    (thresholds, never exact values); its size must be its image's and its values must fit `dtype`."""
    try:
        image = Image.open(path)
        image.load()
    except Exception as error:  # PIL raises several types for broken files
        raise DatasetError(f"{name}: cannot read mask '{path}' ({error})") from error
    if image.size != (original[1], original[0]):
        raise DatasetError(f"{name}: mask '{path}' is {image.size[0]}x{image.size[1]} but its image "
                           f"'{image_path}' is {original[1]}x{original[0]}")
    values = torch.from_numpy(np.ascontiguousarray(to_index(image)).astype(np.int32))
    if int(values.min()) < 0 or int(values.max()) > torch.iinfo(dtype).max:
        raise DatasetError(f"{name}: mask '{path}' holds values {int(values.min())}..{int(values.max())}, "
                           f"outside 0..{torch.iinfo(dtype).max}")
    return values


def _binary(image):
    """Lesion and tumour masks: foreground where grey > 127 (or > 0 for masks stored as 0/1)."""
    grey = np.asarray(image.convert("L"))
    return (grey > (127 if grey.max() > 1 else 0)).astype(np.uint8)


def _refuge_classes(image):
    """REFUGE BMP: 0 cup, 128 rim, 255 background -> 2 cup, 1 rim, 0 background (thresholds at
    the midpoints 64 and 192, so JPEG-like noise or 127/129 still land in the right class)."""
    grey = np.asarray(image.convert("L"))
    return np.where(grey < 64, 2, np.where(grey < 192, 1, 0)).astype(np.uint8)


def _raw_labels(image):
    """Class-index or instance maps stored as values (grey or palette indices)."""
    array = np.asarray(image if image.mode in ("L", "P", "I", "I;16", "1") else image.convert("L"))
    return array.astype(np.int32)


def _stack(names, images, masks, sizes, labels, dtype=torch.uint8, annotations=False):
    """A split of letterboxed images, each with its list of masks, plus `valid` and `sizes`. One mask
    each gives masks [N,H,W]; several, or annotations=True, [N,A,H,W] (A = the most any image has,
    unused slots 0) and n_annotations."""
    counts, size = [len(m) for m in masks], images[0].shape[-1]
    split = {"images": torch.stack(images), "names": names,
             "labels": None if labels is None else torch.tensor(labels, dtype=torch.int64),
             "valid": torch.stack([_valid_map(h, w, size) for h, w in sizes]),
             "sizes": torch.tensor(sizes, dtype=torch.int64)}
    if max(counts) == 1 and not annotations:
        split["masks"] = torch.stack([m[0] for m in masks]).to(dtype)
    else:
        slots = torch.zeros(len(masks), max(counts), size, size, dtype=dtype)
        for i, ms in enumerate(masks):
            slots[i, :len(ms)] = torch.stack(ms).to(dtype)
        split.update(masks=slots, n_annotations=torch.tensor(counts, dtype=torch.int64))
    return split


def _read_text(path):
    """Text with any line ends (CR-only files from old Mac tools included), BOM removed."""
    text = Path(path).read_bytes().decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_csv(path):
    """Rows of a CSV file as lists of stripped cells (spaces around names and values removed)."""
    rows = csv.reader(io.StringIO(_read_text(path)))
    return [[c.strip() for c in row] for row in rows if any(c.strip() for c in row)]


def _read_xlsx(path):
    """Rows of the first worksheet of an .xlsx file (a zip of XML parts), read with the standard
    library: cells are str or float, missing cells ''."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    try:
        with zipfile.ZipFile(path) as book:
            names = book.namelist()
            shared = []
            if "xl/sharedStrings.xml" in names:
                root = ElementTree.fromstring(book.read("xl/sharedStrings.xml"))
                shared = ["".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")) for si in root.findall("m:si", ns)]
            sheets = sorted((n for n in names if re.match(r"xl/worksheets/sheet\d+\.xml$", n)), key=_natural_key)
            sheet = ElementTree.fromstring(book.read(sheets[0]))
    except (OSError, IndexError, zipfile.BadZipFile, ElementTree.ParseError) as error:
        raise DatasetError(f"cannot read '{path}' as an .xlsx workbook ({error or type(error).__name__}); "
                           "save it from a spreadsheet program as .xlsx") from error
    rows = []
    for row in sheet.iter(f"{{{ns['m']}}}row"):
        cells = {}
        for cell in row.findall("m:c", ns):
            letters = re.match(r"[A-Z]+", cell.get("r", "A")).group(0)
            column = sum((ord(ch) - 64) * 26 ** i for i, ch in enumerate(reversed(letters))) - 1
            kind, value = cell.get("t"), cell.find("m:v", ns)
            if kind == "s":
                cells[column] = shared[int(value.text)]
            elif kind == "inlineStr":
                cells[column] = "".join(t.text or "" for t in cell.iter(f"{{{ns['m']}}}t"))
            elif value is not None and value.text is not None:
                try:
                    cells[column] = float(value.text)
                except ValueError:
                    cells[column] = value.text
        if cells:
            rows.append([cells.get(i, "") for i in range(max(cells) + 1)])
    return rows


def _table_column(name, rows, key_header, value_header, path):
    """{key: value} from the columns whose headers match (case and spaces ignored)."""
    simple = lambda s: re.sub(r"\s+", "", str(s)).lower()  # noqa: E731
    for i, row in enumerate(rows):
        header = [simple(c) for c in row]
        if simple(key_header) in header and simple(value_header) in header:
            k, v = header.index(simple(key_header)), header.index(simple(value_header))
            return {str(r[k]).strip(): r[v] for r in rows[i + 1:] if len(r) > max(k, v) and str(r[k]).strip()}
    raise DatasetError(f"{name}: '{path}' has no header row with columns '{key_header}' and '{value_header}'")


def _match_labels(name, names, table, path):
    """Labels for `names` from {name: label}; both an unknown name and a missing one are errors."""
    table = {Path(k).stem.lower(): v for k, v in table.items()}
    unknown = sorted(set(table) - {n.lower() for n in names})
    if unknown:
        raise DatasetError(f"{name}: label file '{path}' names images that are not in the dataset: {unknown[:5]}")
    missing = [n for n in names if n.lower() not in table]
    if missing:
        raise DatasetError(f"{name}: no label for image(s) {missing[:5]} in '{path}'")
    return [table[n.lower()] for n in names]


def _labels_or_none(name, options, read, *args):
    """`read(*args)`'s labels. A label file that is missing or does not parse is an error when labels
    are needed (option need_labels, default from _READERS), else a warning and no labels (PH2's txt)."""
    try:
        return read(*args)
    except (DatasetError, ValueError, KeyError, IndexError, zipfile.BadZipFile, ElementTree.ParseError) as error:
        if options.get("need_labels", _READERS[name]["need_labels"]):
            raise error if isinstance(error, DatasetError) else DatasetError(f"{name}: {error}") from error
        print(f"warning: {error}\n  (labels are not needed: going on without them)", file=sys.stderr)
        return None


# NIfTI-1 datatype codes -> numpy types (nifti1.h); others (complex, RGB) are refused
_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def _read_nifti(name, path):
    """A single-file NIfTI-1 volume (.nii, or gzipped .nii.gz) as float32 [nz, ny, nx]. The 348-byte
    header gives the byte order (sizeof_hdr = 348 little- or big-endian), dim (bytes 40-56), datatype
    (70), vox_offset (108), scl_slope and scl_inter (112, 116; value = slope * stored + inter when the
    slope is non-zero) and the magic "n+1" (344). Voxels are stored i fastest, so the C-order array is
    [k, j, i]: slice k has rows j and columns i, the orientation the UML authors' preprocessing
    writes (np.rot90(., 1) then np.flip(., 0) of nibabel's [i, j, k] array transposes each slice)."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: .nii.gz (whatever the file is called)
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{name}: cannot read '{path}' ({error})") from error
    endian = next((e for e in "<>" if len(raw) >= 348 and struct.unpack(e + "i", raw[:4])[0] == 348), None)
    if endian is None:
        sizeof = struct.unpack("<i", raw[:4])[0] if len(raw) >= 4 else None
        kind = "NIfTI-2" if sizeof in (540, 0x1C020000) else f"header size {sizeof}, not 348"
        raise DatasetError(f"{name}: '{path}' is not a NIfTI-1 file ({kind})")
    if raw[344:347] != b"n+1":
        raise DatasetError(f"{name}: '{path}' is not a single-file NIfTI-1 image (magic {raw[344:348]!r}, "
                           "expected 'n+1'; a .hdr/.img pair is not supported)")
    dim = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    vox_offset, slope, inter = struct.unpack(endian + "3f", raw[108:120])
    shape = list(dim[1:1 + dim[0]])
    while len(shape) > 3 and shape[-1] == 1:  # a 4-D file holding one volume
        shape.pop()
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(f"{name}: '{path}' holds a volume of shape {tuple(dim[1:1 + dim[0]])}; expected 3-D")
    if datatype not in _NIFTI_TYPES:
        raise DatasetError(f"{name}: '{path}' has NIfTI datatype {datatype}, which is not a real-valued scalar type")
    count = int(np.prod(shape))
    dtype = np.dtype(endian + _NIFTI_TYPES[datatype])
    if int(vox_offset) + count * dtype.itemsize > len(raw):
        raise DatasetError(f"{name}: '{path}' is truncated: {len(raw)} bytes for {shape} voxels of {dtype}")
    data = np.frombuffer(raw, dtype, count, int(vox_offset)).reshape(shape[::-1]).astype(np.float32)
    if slope != 0 and np.isfinite(slope):
        data = data * np.float32(slope) + np.float32(inter if np.isfinite(inter) else 0)
    return data  # [nz, ny, nx]


# ---------------------------------------------------------------------------------------------
# 10. The official layouts, one reader each: (name, root, files, size, options) -> {split: split}.
#     Seeded train/val splits, `exclude` and the test-overlap check come after the cache (11).
# ---------------------------------------------------------------------------------------------


def _read_splits(name, found, size, options, to_index, labels_of=None, looked_for=None, dtype=torch.uint8,
                 full=False, annotations=False):
    """{split: split} of found {split: [(image path, [mask paths])]} (empty ones skipped): images
    bilinear, masks nearest (`_stack`), labelled by `labels_of(split, pairs)` through `_labels_or_none`.
    full=True also keeps each image's first mask at its original resolution (list "full_instances").
    A missing train, val or test is printed with the folders `looked_for`."""
    out = {}
    for split, pairs in found.items():
        if not pairs:
            continue
        labels = None if labels_of is None else _labels_or_none(name, options, labels_of, split, pairs)
        images, masks, sizes, originals = [], [], [], []
        for image_path, mask_paths in pairs:
            image, original = _read_image(name, image_path, size)
            maps = [_read_mask(name, m, original, image_path, to_index, dtype) for m in mask_paths]
            images.append(image)
            masks.append([letterbox(m, size, "nearest") for m in maps])
            sizes.append(original)
            originals.append(maps[0] if full else None)
        out[split] = _stack([p.stem for p, _ in pairs], images, masks, sizes, labels, dtype, annotations)
        if full:
            out[split]["full_instances"] = originals
    if looked_for and set(_SPLITS) - set(out):
        print(f"{name}: found split(s) {sorted(out) or 'none'}; no {sorted(set(_SPLITS) - set(out))} "
              f"(looked for {looked_for})")
    return out


def _read_refuge(name, root, files, size, options):
    """Training400/{Glaucoma,Non-Glaucoma}/*.jpg, REFUGE-Validation400/*.jpg and Test400/*.jpg with the
    .bmp masks named as each image; labels: the class folder, the G/N mask folders of REFUGE-Test-GT or
    the split's .xlsx. A copy in the folder layout with REFUGE's grey-level masks is read as that layout."""
    patterns = {"train": r"training400/(?:glaucoma|non-glaucoma)/([^/]+)\.jpg",
                "val": r"refuge-validation400/([^/]+)\.jpg", "test": r"(?:refuge-)?test400/([^/]+)\.jpg"}
    found = _found(name, files, patterns, r"([^/]+)\.bmp", "a .bmp of the same name, e.g. in Disc_Cup_Masks/")
    if not any(found.values()):
        if _find(files, _SPLIT_FOLDER + r"/images/[^/]+" + _IMAGE):
            return _read_folder(name, root, files, size, options, to_index=_refuge_classes)
        raise _layout_error(name, root, files, "Training400/, REFUGE-Validation400/ or Test400/ images")

    def read_labels(split, pairs):
        folders = [m[0].parent.name.lower() for _, m in pairs]
        if split == "train":
            return [int(p.parent.name.lower() == "glaucoma") for p, _ in pairs]
        if split == "test" and set(folders) <= {"g", "n"}:
            return [int(f == "g") for f in folders]
        xlsx, column = {"val": ("Fovea_locations.xlsx", "Glaucoma Label"),
                        "test": ("Glaucoma_label_and_Fovea_location.xlsx", "Label(Glaucoma=1)")}[split]
        xlsx = _file(name, files, xlsx, required=True)
        table = _table_column(name, _read_xlsx(xlsx), "ImgName", column, xlsx)
        return [int(float(v)) for v in _match_labels(name, [p.stem for p, _ in pairs], table, xlsx)]
    return _read_splits(name, found, size, options, _refuge_classes, read_labels,
                        "Training400/, REFUGE-Validation400/, Test400/")


def _read_isic2017(name, root, files, size, options):
    """ISIC-2017_<tag>_Data/ISIC_<id>.jpg, ISIC-2017_<tag>_Part1_GroundTruth/ISIC_<id>_segmentation.png
    and ISIC-2017_<tag>_Part3_GroundTruth.csv's labels for each tag present: Training, Validation,
    Test_v2 (or its first name, Test). Superpixel and metadata files are skipped."""
    tags = {"train": "training", "val": "validation", "test": "test_v2|test"}  # Test: Test_v2's first name
    patterns = {split: rf"isic-2017_(?:{tag})_data/(isic_\d+)\.jpg" for split, tag in tags.items()}
    mask = r"isic-2017_(?:training|validation|test_v2|test)_part1_groundtruth/(isic_\d+)_segmentation\.png"
    found = _found(name, files, patterns, mask,
                   "ISIC-2017_<tag>_Part1_GroundTruth/ISIC_<id>_segmentation.png")
    if not any(found.values()):
        raise _layout_error(name, root, files, "ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_*.jpg images")

    def read_labels(split, pairs):
        tag = pairs[0][0].parent.name[10:-5]  # ISIC-2017_<tag>_Data
        csv_path = _file(name, files, f"ISIC-2017_{tag}_Part3_GroundTruth.csv", required=True)
        table = {r[0]: r for r in _read_csv(csv_path)[1:]}
        rows = _match_labels(name, [p.stem for p, _ in pairs], table, csv_path)
        # image_id, melanoma, seborrheic_keratosis (floats); nevus when both are 0
        return [1 if float(r[1]) >= 0.5 else 2 if float(r[2]) >= 0.5 else 0 for r in rows]
    return _read_splits(name, found, size, options, _binary, read_labels, "ISIC-2017_Training_Data, "
                        "ISIC-2017_Validation_Data, ISIC-2017_Test_v2_Data or ISIC-2017_Test_Data")


# Ribeiro et al.'s split lists (the D-LEMA paper tests on "the exact set" of their ISIC test images)
_SPLIT_LISTS = {"train": "train_isic_titans_full.txt", "val": "validation_isic_titans_full.txt",
                "test": "test_isic_titans_2000.txt", "ph2": "test_ph2.txt", "dermofit": "test_dermofit.txt"}
_LISTED_PATH = re.compile(r"\S.*?" + _IMAGE + r"(?=\s|$)", re.I)  # a path may hold spaces


def _split_list(name, files, options, key):
    """(path, [(image, [masks])]) of Ribeiro et al.'s list `_SPLIT_LISTS[key]` (in option `splits`'
    folder, else anywhere under the root), or (None, None). A line: the authors' absolute paths, image
    first, matched here by file name; the listed files not in the dataset are named in one error."""
    folder = Path(options["splits"]).expanduser() if options.get("splits") else None
    if folder is not None and not folder.is_dir():
        raise DatasetError(f"{name}: splits folder '{folder}' does not exist")
    path = _file(name, files if folder is None else _tree(folder), _SPLIT_LISTS[key])
    if path is None:
        return None, None
    index = {}
    for m, p in _find(files, r"([^/]+" + _IMAGE + ")"):
        index.setdefault(m.group(1), []).append(p)
    pairs, missing = [], []
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        listed = _LISTED_PATH.findall(line.strip())
        if len(listed) == 1:
            raise DatasetError(f"{name}: line {number} of '{path}' lists an image without masks: {line.strip()!r}")
        local = []
        for entry in listed:
            candidates = index.get(entry.replace("\\", "/").rsplit("/", 1)[-1].lower(), [])
            if len(candidates) > 1:
                raise DatasetError(f"{name}: '{path}' lists '{entry}', and two files carry its name: "
                                   f"'{candidates[0]}' and '{candidates[1]}'")
            local += candidates
            missing += [entry] if not candidates else []
        if listed and len(local) == len(listed):
            pairs.append((local[0], local[1:]))
    if missing:
        shown = ", ".join(Path(m.replace("\\", "/")).name for m in missing[:5])
        raise DatasetError(f"{name}: {len(missing)} file(s) listed in '{path}' are not in the dataset folder: "
                           f"{shown}{' ...' if len(missing) > 5 else ''}")
    if not pairs:
        raise DatasetError(f"{name}: split list '{path}' lists no image")
    return path, pairs


# ISIC MultiAnnot++ mask names: ISIC_<id>_<annotator>_<tool T1-T3>_<skill S1-S2>[_<n>].png
_IMA_MASK = r"(isic_\d+)_([a-z0-9]+)_t[123]_s[12](?:_\d+)?\.png"


def _read_isic_multi(name, root, files, size, options):
    """D-LEMA's ISIC Archive (Sec. 3.1): images with two or more masks are the training pool (80/20
    train/val after the cache), those with one mask `test`. Masks: Ribeiro et al.'s targets/, or
    IMA++'s names (each segmentation an annotation, as IMA++ counts them; its consensus ST / MV masks
    skipped). Ribeiro et al.'s split lists, under the root or in option `splits`, define the splits."""
    lists = {k: _split_list(name, files, options, k) for k in _SPLITS}
    found = [path for path, _ in lists.values() if path]
    if found:
        if not (lists["train"][0] and lists["val"][0]):
            raise DatasetError(f"{name}: found '{found[0]}' but not both '{_SPLIT_LISTS['train']}' and "
                               f"'{_SPLIT_LISTS['val']}'")
        listed = {split: pairs for split, (_, pairs) in lists.items()}
        return _read_splits(name, listed, size, options, _binary, annotations=True)
    masks = _find(files, r"targets/(?:[^/]+/)*(isic_\d+)_[^/]+\.png")
    if masks:  # Ribeiro et al.: the images are those in inputs/
        images = _by_id(name, _find(files, r"inputs/(?:[^/]+/)*(isic_\d+)" + _IMAGE))
    else:
        images = _by_id(name, _find(files, r"(isic_\d+)" + _IMAGE))
        masks = [(m, p) for m, p in _find(files, _IMA_MASK) if m.group(2) not in ("st", "mv")]
    if not images:
        raise _layout_error(name, root, files, "ISIC_<id>.jpg images (inputs/ or beside IMA++ masks)")
    groups = {}
    for m, p in masks:
        groups.setdefault(m.group(1), []).append(p)
    lonely = [p for key, p in images.items() if key not in groups]
    if lonely:
        others = [p.name for _, p in _find(files, r"isic_\d+_[^/]+" + _IMAGE)][:3]
        raise DatasetError(f"{name}: {len(lonely)} image(s) have no mask, e.g. '{lonely[0]}'. Masks are read from "
                           "a folder named 'targets' (Ribeiro et al.: inputs/ISIC_<id>.jpg, targets/ISIC_<id>_<k>.png) "
                           "or by IMA++'s names ISIC_<id>_<annotator>_T<1-3>_S<1-2>.png"
                           f"{f'; found other ISIC_<id>_* files such as {others}' if others else ''}")
    pool = [(p, groups[key]) for key, p in images.items() if len(groups[key]) >= 2]
    single = [(p, groups[key]) for key, p in images.items() if len(groups[key]) == 1]
    print(f"{name}: {len(pool)} images with two or more masks (train/val), {len(single)} with one (test)")
    return _read_splits(name, {"train": pool, "test": single}, size, options, _binary, annotations=True)


def _read_ph2(name, root, files, size, options):
    """IMDxxx_Dermoscopic_Image/IMDxxx.bmp with IMDxxx_lesion/IMDxxx_lesion.bmp (or the images that
    Ribeiro et al.'s test_ph2.txt lists); labels: Clinical Diagnosis of PH2_dataset.txt, if any."""
    listed, pairs = _split_list(name, files, options, "ph2")
    if listed is None:
        pairs = _found(name, files, {"test": r"([^/]+)_dermoscopic_image/[^/]+" + _IMAGE},
                       r"([^/]+)_lesion/[^/]+" + _IMAGE, "IMDxxx_lesion/IMDxxx_lesion.bmp")["test"]
        if not pairs:
            raise _layout_error(name, root, files, "IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp images")
    txt = _file(name, files, "PH2_dataset.txt")

    def read_labels(split, pairs):
        # '||'-separated table; empty cells are kept so that the columns stay aligned
        rows = [[c.strip() for c in line.split("||")] for line in _read_text(txt).split("\n") if "||" in line]
        table = _table_column(name, rows, "Name", "Clinical Diagnosis", txt)
        table = {k: v for k, v in table.items() if re.fullmatch(r"IMD\d+", k, re.I)}
        return [int(v) for v in _match_labels(name, [p.stem for p, _ in pairs], table, txt)]
    return _read_splits(name, {"test": pairs}, size, options, _binary, None if txt is None else read_labels)


def _read_dermofit(name, root, files, size, options):
    """originalImages/<CLASS>/<ID>/<ID>.png with originalMasks/<CLASS>/<ID>/<ID>mask.png; the class
    folder is the label. Ribeiro et al.'s test_dermofit.txt, when found or given, selects the images."""
    images = _by_id(name, _find(files, r"originalimages/[^/]+/([^/]+)/\1\.png"))
    if not images:
        raise _layout_error(name, root, files, "originalImages/<CLASS>/<ID>/<ID>.png images")
    classes = list(dict.fromkeys(p.parent.parent.name for p in images.values()))
    listed, pairs = _split_list(name, files, options, "dermofit")
    if listed is not None:
        outside = [p for p, _ in pairs if p not in images.values()]
        if outside:
            raise DatasetError(f"{name}: '{outside[0]}' (listed in '{listed}') is not in a class folder of "
                               "originalImages")
    else:
        masks = _by_id(name, _find(files, r"originalmasks/[^/]+/([^/]+)/\1mask\.png"), what="mask")
        pairs = _pairs(name, images, masks, "originalMasks/<CLASS>/<ID>/<ID>mask.png")
    out = _read_splits(name, {"test": pairs}, size, options, _binary,
                       lambda split, pairs: [classes.index(p.parent.parent.name) for p, _ in pairs])
    out["test"]["class_names"] = classes
    return out


# GlaS border rule, in the originals' pixels: a gland pixel is border when a pixel of another
# label (stroma or another gland) lies within `border_width` pixels (chessboard distance), lumen
# otherwise; the image edge does not count. The paper gives no rule. 18 px (about 11 um at GlaS'
# 0.62 um/px) is the 3 px of a 128 px canvas the project used before (775 * 3 / 128 = 18.2).
_GLAS_BORDER_WIDTH = 18


def _read_glas(name, root, files, size, options):
    """train_N.bmp with train_N_anno.bmp (instances 0..k), testA_* and testB_* (test), Grade.csv, in any
    folder. Region masks (0 stroma, 1 border, 2 lumen) come from the instances at the original
    resolution (option border_width, original pixels), then letterboxed; full_instances / full_masks
    stay at the original resolution for the metrics."""
    patterns = {"train": r"(train_\d+)\.bmp", "test": r"(test[ab]_\d+)\.bmp"}  # testA and testB: test
    found = _found(name, files, patterns, r"((?:train|testa|testb)_\d+)_anno\.bmp",
                   "<name>_anno.bmp beside it")
    stems = [p.stem for pairs in found.values() for p, _ in pairs]
    if not stems:
        raise _layout_error(name, root, files, "train_<n>.bmp, testA_<n>.bmp or testB_<n>.bmp images (in any folder)")
    width = int(options.get("border_width") or _GLAS_BORDER_WIDTH)
    if width < 1:
        raise DatasetError(f"{name}: border_width must be at least 1 pixel, got {width}")
    grade = _file(name, files, "Grade.csv")

    def read_grades():
        if grade is None:
            raise DatasetError(f"{name}: Grade.csv (the benign / malignant grade of each image) is missing: "
                               f"found {len(stems)} GlaS images under '{root}' but no Grade.csv")
        table = _table_column(name, _read_csv(grade), "name", "grade (GlaS)", grade)
        grades = _match_labels(name, stems, table, grade)
        return {k: ["benign", "malignant"].index(str(g).strip().lower()) for k, g in zip(stems, grades)}
    grades = _labels_or_none(name, options, read_grades)

    def labels_of(split, pairs):
        return [grades[p.stem] for p, _ in pairs]
    out = _read_splits(name, found, size, options, _raw_labels, None if grades is None else labels_of,
                       dtype=torch.int32, full=True)
    for data in out.values():
        data["full_masks"] = [_glas_regions(f[None], width)[0] for f in data["full_instances"]]
        data["instances"] = data.pop("masks")  # letterboxed with nearest: ids kept
        data["masks"] = torch.stack([letterbox(m, size, "nearest") for m in data["full_masks"]])
    return out


def _glas_regions(instances, width):
    """0 stroma, 1 border, 2 lumen (uint8) from instance maps [N,H,W]: a gland pixel is lumen when
    every pixel within `width` (a (2w+1)^2 square, image border replicated) carries its own id."""
    x = instances.float()[:, None]
    padded = F.pad(x, (width,) * 4, mode="replicate")
    k = 2 * width + 1

    def square_max(v):  # the max over a k x k square = a max over rows, then over columns (separable: 2k, not k^2)
        return F.max_pool2d(F.max_pool2d(v, (1, k), stride=1), (k, 1), stride=1)
    high, low = square_max(padded), -square_max(-padded)
    gland = instances > 0
    lumen = gland & (high[:, 0] == x[:, 0]) & (low[:, 0] == x[:, 0])
    return gland.to(torch.uint8) + lumen.to(torch.uint8)


_SPLIT_FOLDER = r"(train|training|val|valid|validation|test|testing)"
_SPLIT_OF_FOLDER = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                    "test": "test", "testing": "test"}


def _read_folder(name, root, files, size, options, to_index=None):
    """<split>/images/<name>.<ext> with <split>/masks/<name>.<ext> (or <name>_<k>.<ext>, one per
    annotator); labels from any labels.csv (name,label: integers, or class names sorted to indices).
    Masks hold class indices (0/255 becomes 0/1) unless `to_index` maps them (ispy1, refuge)."""
    seen = {}

    def classes(image):
        array = _raw_labels(image)
        seen[image.filename] = set(np.unique(array).tolist())
        return np.where(array == 255, 1, array) if seen[image.filename] <= {0, 255} else array
    found = _find(files, _SPLIT_FOLDER + r"/images/([^/]+)" + _IMAGE)
    tables = {p: _read_csv(p) for _, p in _find(files, r"labels\.csv")}
    label_of = {}
    for csv_path, rows in tables.items():
        rows = rows[1:] if rows and rows[0][-1].strip().lower() == "label" else rows
        if any(len(r) < 2 for r in rows):
            raise DatasetError(f"{name}: '{csv_path}' needs two columns per row: name,label")
        label_of.update({r[0]: r[1] for r in rows})
    names = [p.stem for _, p in found]
    if label_of:  # every image named in a labels.csv exists, and every image has a label
        labels = _match_labels(name, names, label_of, ", ".join(map(str, tables)))
        label_of = dict(zip(map(str.lower, names), labels))
    elif name == "ispy1":
        raise DatasetError(f"{name}: no labels.csv (name,label with 1 = pCR) under '{root}'")
    values = sorted(set(label_of.values()))
    numeric = all(re.fullmatch(r"-?\d+", v) for v in values)
    class_names = values if not numeric else [f"class_{v}" for v in range(max(map(int, values), default=-1) + 1)]
    class_names = options.get("class_names") or class_names

    def labels_of(split, pairs):
        raw = [label_of[p.stem.lower()] for p, _ in pairs]
        return [int(v) for v in raw] if numeric else [class_names.index(v) for v in raw]
    pairs, read = {}, {}
    folders = _find(files, _SPLIT_FOLDER + r"/images/")
    for m, folder in sorted(folders, key=lambda f: _SPLITS.index(_SPLIT_OF_FOLDER[f[0].group(1)])):
        split = _SPLIT_OF_FOLDER[m.group(1)]
        if split in read:
            raise DatasetError(f"{name}: two '{split}' folders: '{read[split]}' and '{folder}'; keep one of them")
        read[split] = folder
        images = _by_id(name, [(m, p) for m, p in found if p.parent == folder], group=2)
        if not images:
            raise DatasetError(f"{name}: split '{split}' is empty: no images in '{folder}'")
        exact, numbered = {}, {}  # <name>.png, or <name>_<k>.png for several annotators
        for mask_match, p in _find(files, _SPLIT_FOLDER + r"/masks/([^/]+)" + _IMAGE):
            if p.parent.parent == folder.parent:
                exact[mask_match.group(2)] = p
                several = re.fullmatch(r"(.+)_\d+", mask_match.group(2))
                if several:
                    numbered.setdefault(several.group(1), []).append(p)
        masks = {k: [exact[k]] if k in exact else numbered[k] for k in images if k in exact or k in numbered}
        pairs[split] = _pairs(name, images, masks, f"{folder.parent / 'masks'}/<name>.png or <name>_<k>.png")
    if not pairs:
        raise _layout_error(name, root, files, "train/, val/ or test/ folder with images/ and masks/")
    out = _read_splits(name, pairs, size, options, to_index or classes, labels_of if label_of else None)
    if to_index is None:
        _check_class_indices(name, seen)
    spec = _READERS[name]  # refuge and ispy1 in this layout keep their own class and mask names
    top_class = max(int(s["masks"].max()) for s in out.values())
    mask_names = (options.get("mask_names") or spec["masks"]
                  or ["background"] + [f"class_{k}" for k in range(1, max(2, top_class + 1))])
    for split in out.values():
        split.update(class_names=list(spec["classes"] or class_names), mask_names=list(mask_names))
    return out


def _check_class_indices(name, seen):
    """seen: {mask file: its values}. Every class 1..K-1 must occur in some mask (0/255 counts as
    0/1); grey levels such as REFUGE's 0/128/255 are refused, naming a file and its values."""
    indices = {f: {x // 255 for x in v} if v <= {0, 255} else v for f, v in seen.items()}
    present = set().union(*indices.values())
    absent = sorted(set(range(1, max(present) + 1)) - present)
    if absent:
        path = next(f for f, v in indices.items() if max(v) > absent[0])
        refuge = (" These are REFUGE's grey levels (0 cup, 128 rim, 255 background): read the dataset with --data "
                  "refuge." if seen[path] <= {0, 128, 255} else "")
        raise DatasetError(f"{name}: mask '{path}' holds the values {sorted(seen[path])}, but no mask of the dataset "
                           f"holds {absent[0]}: a folder mask holds class indices 0, 1, 2, ... (or 0 and 255 for a "
                           f"binary mask).{refuge}")


# I-SPY 1 as the UML paper uses it (Sec. 3): 157 patients, 10 tumour slices each, 1,230 / 170 / 170
# slices -> 123 / 17 / 17 patients, split by patient. The authors' preprocessing (github.com/KarryRen/UML,
# Data/ispy_preprocess.py) takes 127 / 15 / 15 by row order of outcome_new.xlsx within each pCR class
# (92+35 / 11+4 / 11+4), no seed; we follow the paper's numbers, seeded and, as they do, stratified by pCR.
_ISPY_SLICES = 10
_ISPY_SHARES = (1230, 170, 170)
# the JPEG tree the authors' preprocessing writes: <Split>/images/ispy_<id>/ispy_<id>_<pcr>_s<k>_img.jpg,
# k below 0 where the slice of largest tumour area is low (their slice range starts below 0)
_ISPY_TREE = r"(train|valid|test)/{}/(?:[^/]+/)*((ispy_\d+)_([01])_s(-?\d+))_{}\.jpg"


def _tumour_slices(areas, keep=_ISPY_SLICES):
    """The slices the UML authors' preprocessing keeps, in slice order: from (peak - keep // 2) upwards
    the first `keep` slices with tumour; when fewer, those with tumour just below (down to
    peak - keep // 2 - (keep - 1)). peak = the first slice of largest tumour area."""
    peak = int(np.argmax(areas))
    start = max(0, peak - keep // 2)  # the authors' code lets a negative start wrap around the volume
    chosen = [k for k in range(start, len(areas)) if areas[k] > 0][:keep]
    for k in range(start - 1, max(-1, start - keep), -1):
        if len(chosen) == keep:
            break
        if areas[k] > 0:
            chosen.append(k)
    return sorted(chosen)


def _read_ispy1_nifti(name, files, size, outcome):
    """Dataset ISPY/ISPY_<id>/DCEMRI_1.nii[.gz] and Tumor_segmentation_new/ISPY_<id>_tumor_mask.nii[.gz]
    of every patient of outcome_new.xlsx (SUBJECTID, PCR): its tumour slices (`_tumour_slices`), each
    stretched to 0..255 between its own min and max (as plt.imsave with the grey colour map in the
    authors' preprocessing), named ISPY_<id>_s<k>; one "train" pool, split by patient after the cache."""
    table = _table_column(name, _read_xlsx(outcome), "SUBJECTID", "PCR", outcome)
    volumes = _by_id(name, _find(files, r"dataset ispy/ispy_(\d+)/dcemri_1\.nii(?:\.gz)?"), what="volume")
    tumours = _by_id(name, _find(files, r"tumor_segmentation_new/ispy_(\d+)_tumor_mask\.nii(?:\.gz)?"), what="mask")
    images, masks, sizes, names, labels, short = [], [], [], [], [], []
    for subject, pcr in table.items():
        subject = str(int(float(subject))) if re.fullmatch(r"\d+(\.0*)?", str(subject)) else str(subject)
        if str(pcr).strip() not in ("0", "1", "0.0", "1.0"):
            raise DatasetError(f"{name}: '{outcome}' gives PCR {pcr!r} for SUBJECTID {subject}; expected 0 or 1")
        if subject not in volumes or subject not in tumours:
            missing = (f"Dataset ISPY/ISPY_{subject}/DCEMRI_1.nii[.gz]" if subject not in volumes
                       else f"Tumor_segmentation_new/ISPY_{subject}_tumor_mask.nii[.gz]")
            raise DatasetError(f"{name}: SUBJECTID {subject} of '{outcome}' has no '{missing}'")
        volume, tumour = _read_nifti(name, volumes[subject]), _read_nifti(name, tumours[subject])
        if volume.shape != tumour.shape:
            raise DatasetError(f"{name}: image '{volumes[subject]}' has shape {volume.shape[::-1]} but its mask "
                               f"'{tumours[subject]}' has {tumour.shape[::-1]} (i, j, k)")
        tumour = tumour != 0  # the authors keep a slice when its mask sum is non-zero
        chosen = _tumour_slices(tumour.sum((1, 2)))
        if len(chosen) < _ISPY_SLICES:
            short.append(f"ISPY_{subject}: {len(chosen)} slice(s) with tumour")
        height, width = volume.shape[1:]
        for k in chosen:
            low, high = float(volume[k].min()), float(volume[k].max())
            grey = torch.from_numpy(np.round((volume[k] - low) / max(high - low, 1e-12) * 255).astype(np.uint8))
            images.append(_place_on_canvas(grey.expand(3, height, width), height, width, size, "bilinear"))
            masks.append([letterbox(torch.from_numpy(tumour[k].astype(np.uint8)), size, "nearest")])
            sizes.append((height, width))
            names.append(f"ISPY_{subject}_s{k}")
            labels.append(int(float(pcr)))
    if short:
        print(f"warning: {name}: {len(short)} patient(s) with fewer than {_ISPY_SLICES} tumour slices; "
              f"taking what there is: {short[:10]}", file=sys.stderr)
    if not images:
        raise DatasetError(f"{name}: '{outcome}' lists no patient")
    return {"train": _stack(names, images, masks, sizes, labels)}


def _read_ispy1(name, root, files, size, options):
    """I-SPY 1 as (a) the NIfTI download with outcome_new.xlsx, (b) the JPEG tree the UML authors'
    preprocessing writes (labels from the names, their split kept), (c) the folder layout (binary
    masks, labels.csv). (a), and (c) without val/test folders, are split by patient after the cache."""
    outcome = _file(name, files, "outcome_new.xlsx")
    if outcome is not None or _find(files, r"dataset ispy/"):
        if outcome is None:
            raise DatasetError(f"{name}: found 'Dataset ISPY' but no 'outcome_new.xlsx' (SUBJECTID, PCR) in '{root}'")
        return _read_ispy1_nifti(name, files, size, outcome)
    images = _find(files, _ISPY_TREE.format("images", "img"))
    if not images:
        return _read_folder(name, root, files, size, options, to_index=_binary)
    masks = _by_id(name, _find(files, _ISPY_TREE.format("masks", "msk")), group=2, what="mask")
    found, named, looked_for = {}, {}, "<Split>/masks/ispy_<id>/<name>_msk.jpg"
    for split in _SPLITS:
        chosen = sorted(((m, p) for m, p in images if _SPLIT_OF_FOLDER[m.group(1)] == split),
                        key=lambda f: (_natural_key(f[0].group(3)), int(f[0].group(5))))  # slice order
        found[split] = _pairs(name, _by_id(name, chosen, group=2), masks, looked_for)
        named[split] = [(f"{m.group(3).upper()}_s{m.group(5)}", int(m.group(4))) for m, _ in chosen]
    out = _read_splits(name, found, size, options, _binary, lambda split, _: [pcr for _, pcr in named[split]])
    for split, data in out.items():
        data["names"] = [n for n, _ in named[split]]
    return out


def _patient_of(name):
    """The patient of a slice name '<patient>_s<k>' (the whole name when it has no slice suffix)."""
    match = re.fullmatch(r"(.+)_s-?\d+", str(name), re.I)
    return (match.group(1) if match else str(name)).lower()


def _split_by_patient(name, split, seed, shares):
    """Parts of `split` (one per share, the first is the rest) of whole patients, shuffled with the seed
    and stratified by label (each placed by its rank within its class, so every part gets the classes
    in their overall proportion); the later parts get round(P * share / total) patients (at least 1)."""
    patients = {}
    for i, n in enumerate(split["names"]):
        patients.setdefault(_patient_of(n), []).append(i)
    labels = split["labels"]
    label_of = {}
    for p, index in patients.items():
        values = labels[index].unique().tolist() if labels is not None else [0]
        if len(values) > 1:
            raise DatasetError(f"{name}: the slices of patient {p} carry different labels {values}")
        label_of[p] = values[0]
    if len(patients) < len(shares):
        raise DatasetError(f"{name}: {len(patients)} patient(s) cannot be split into {len(shares)} parts by patient")
    keys = sorted(patients, key=_natural_key)
    shuffled = [keys[i] for i in torch.randperm(len(keys), generator=torch.Generator().manual_seed(int(seed))).tolist()]
    rank, seen = {}, {}
    for p in shuffled:
        rank[p] = seen.get(label_of[p], 0)
        seen[label_of[p]] = rank[p] + 1
    order = sorted(shuffled, key=lambda p: ((rank[p] + 0.5) / seen[label_of[p]], label_of[p]))
    counts = [max(1, round(len(keys) * s / sum(shares))) for s in shares[1:]]
    if len(keys) - sum(counts) < 1:
        raise DatasetError(f"{name}: {len(keys)} patients are too few for a split by patient")
    ends = np.cumsum(counts).tolist()  # val, test from the front of `order`, train the rest
    parts = [order[ends[-1]:]] + [order[end - count:end] for count, end in zip(counts, ends)]
    return [_take_images(split, sorted(i for p in part for i in patients[p])) for part in parts]


def _ispy1_splits(name, data, seed):
    """A training pool without val (layout (a), or (c) without val/test folders) is split by patient
    123 / 17 / 17 (train / val / test), or train / val in those proportions when test is given.
    Splits given as folders are kept, but a patient in two of them is an error."""
    if "train" in data and "val" not in data:
        shares = _ISPY_SHARES if "test" not in data else _ISPY_SHARES[:2]
        parts = _split_by_patient(name, data.pop("train"), seed, shares)
        data = {"train": parts[0], "val": parts[1], "test": parts[2] if len(parts) > 2 else data["test"]}
    seen = {}
    for split, part in data.items():
        for patient in {_patient_of(n) for n in part["names"]}:
            if patient in seen:
                raise DatasetError(f"{name}: patient {patient} has slices in both '{seen[patient]}' and '{split}'; "
                                   "a patient belongs to one split")
            seen[patient] = split
    return data


_COMMON_OPTIONS = {"exclude", "need_labels"}  # every real dataset takes these (see load_dataset)
# name: its reader, the share of "train" split off as val with the seed (None: the dataset's own
# split), a post-cache split, its own options, whether labels are needed, class and mask names
_READERS = {
    "refuge": dict(read=_read_refuge, options=set(), need_labels=True, classes=["non_glaucoma", "glaucoma"],
                   masks=["background", "rim", "cup"], url="https://refuge.grand-challenge.org"),
    "isic2017": dict(read=_read_isic2017, options=set(), need_labels=True, classes=list(_LESION_CLASSES),
                     masks=["background", "lesion"], url="https://challenge.isic-archive.com/data/#2017"),
    "isic-multi": dict(read=_read_isic_multi, val_fraction=0.2, options={"splits"}, need_labels=False, classes=[],
                       masks=["background", "lesion"],
                       url="https://www.isic-archive.com (or IMA++: https://github.com/sfu-mial/skin-IAV)"),
    "ph2": dict(read=_read_ph2, options={"splits"}, need_labels=False, masks=["background", "lesion"],
                classes=["common_nevus", "atypical_nevus", "melanoma"],
                url="https://www.fc.up.pt/addi/ph2%20database.html"),
    "dermofit": dict(read=_read_dermofit, options={"splits"}, need_labels=True, classes=[],
                     masks=["background", "lesion"],
                     url="https://licensing.edinburgh-innovations.ed.ac.uk/product/dermofit-image-library"),
    "glas": dict(read=_read_glas, val_fraction=15 / 85, options={"border_width"}, need_labels=True,
                 classes=["benign", "malignant"], masks=["stroma", "border", "lumen"],
                 url="https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/"),
    "folder": dict(read=_read_folder, options={"class_names", "mask_names"}, need_labels=True, classes=[],
                   masks=[], url="your own data"),
    "ispy1": dict(read=_read_ispy1, split=_ispy1_splits, options=set(), need_labels=True,
                  classes=["non_pcr", "pcr"], masks=["background", "tumour"],
                  url="https://www.cancerimagingarchive.net/collection/ispy1/ (preprocessing: "
                      "https://github.com/KarryRen/UML)"),
}


# ---------------------------------------------------------------------------------------------
# 11. load_dataset: synthetic sets generated from the seed, real sets read once and cached;
#     the seeded train/val split, `exclude` and the test-overlap check after the cache
# ---------------------------------------------------------------------------------------------

# name -> (generator, default split sizes, generator options with defaults). Split sizes keep the
# real sets' proportions at a CPU-friendly scale: REFUGE 400/400/400 -> 200/200/200; I-SPY 1
# 1230/170/170 slices -> 360/50/50; ISIC 2017 2000/150/600 -> 400/60/120 (validation doubled so
# that model selection is not noise); GlaS 70/15/80 (the paper's split) -> 140/30/160.
_SYNTHETIC = {
    "synthetic-fundus": (_synthetic_fundus, (200, 200, 200), {"glaucoma_share": 0.35}),
    "synthetic-breast": (_synthetic_breast, (360, 50, 50), {"pcr_share": 0.27}),
    "synthetic-lesions": (_synthetic_lesions, (400, 60, 120), {"annotators": False, "domain_shift": False}),
    "synthetic-glands": (_synthetic_glands, (140, 30, 160), {"malignant_share": 0.55}),
}


def _split_generator(name, split, seed):
    """An independent, seeded generator per (dataset, split, seed): a split does not change when
    another split's size changes, and no global RNG is touched."""
    return torch.Generator().manual_seed(zlib.crc32(f"{name}|{split}|{seed}".encode()))


def _load_synthetic(name, size, seed, options):
    generate, sizes, defaults = _SYNTHETIC[name]
    counts = dict(zip(("n_train", "n_val", "n_test"), sizes))
    unknown = set(options) - set(counts) - set(defaults)
    if unknown:
        raise DatasetError(f"{name}: unknown option(s) {sorted(unknown)}; "
                           f"known: {sorted(set(counts) | set(defaults))}")
    counts.update({k: int(v) for k, v in options.items() if k in counts})
    knobs = {k: options.get(k, v) for k, v in defaults.items()}
    splits = list(zip(_SPLITS, counts.values()))
    if knobs.pop("domain_shift", False):
        splits.append(("test_shift", counts["n_test"]))
    out = {}
    for split, n in splits:
        if n < 1:
            raise DatasetError(f"{name}: split '{split}' would be empty (n={n}); ask for at least one image")
        kwargs = dict(knobs)
        if name == "synthetic-lesions":
            # annotators draw from their own generator: the images do not change with annotators=True
            annotator_gen = _split_generator(name + ":annotators", split, seed)
            kwargs.update(shift=split == "test_shift", annotator_gen=annotator_gen)
        data = generate(n, size, _split_generator(name, split, seed), **kwargs)
        data["names"] = [f"{split}_{i:04d}" for i in range(n)]
        out[split] = {**dict.fromkeys(_TENSOR_KEYS), **data}  # every split has every key
    return out


def load_dataset(name, root=None, size=128, seed=0, cache=None, **options):
    """Load a dataset as a dict of splits (the split's keys: the module docstring).

    Synthetic (`_SYNTHETIC`): generated from the seed (no files, no cache), square (valid = sizes =
    None); options n_train, n_val, n_test and the generator's knobs (glaucoma_share, pcr_share,
    malignant_share; lesions: annotators, domain_shift adds "test_shift").

    Real (`_READERS`): read from `root` in the README's layouts, letterboxed once (section 7) and
    cached under `cache` (default ".cache" in the working folder, never inside the dataset). Splits:
    the dataset's own; isic-multi's pool 80/20 and glas' 85 training images 70/15 are split into
    train/val with the seed, ispy1 by patient (`_ispy1_splits`). Options exclude=<image ids>
    (removed from test) and need_labels=False (a missing or unparsable label file is a warning,
    labels None). A test image also in train or val (same id; for "folder", same pixels) is removed
    from test, listed in its `removed_overlap` and printed.
    """
    size = int(size)
    if size < 8:
        raise DatasetError(f"{name}: size must be at least 8 pixels, got {size}")
    if name in _SYNTHETIC:
        return _load_synthetic(name, size, seed, options)
    if name not in _READERS:
        raise DatasetError(f"unknown dataset '{name}'; known: {sorted(_SYNTHETIC) + sorted(_READERS)}")
    return _load_real(name, root, size, seed, cache, options)


def _take_images(split, index):
    """The split restricted to the images at `index` (int64 tensor or list, in that order)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    n = len(split["names"])
    out = {}
    for key, value in split.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[index]
        elif key in ("names", "full_instances", "full_masks") and isinstance(value, list):  # per-image lists
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def _seeded_split(data, fraction, seed):
    """Split data["train"] into train and val (a seeded random `fraction` goes to val)."""
    train = data.pop("train")
    n = len(train["names"])
    if n < 2:
        raise DatasetError(f"need at least 2 training images for a train/val split, found {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_val = min(n - 1, max(1, round(fraction * n)))
    return {"train": _take_images(train, order[n_val:].sort().values),
            "val": _take_images(train, order[:n_val].sort().values), **data}


def _remove_from_test(name, data, exclude):
    """Drop from data["test"] every image also in train/val or in `exclude`, into its `removed_overlap`
    (printed). Official datasets compare ids; the folder layout, whose users number each split from
    0001, compares pixels (a hash of each letterboxed image and its size)."""
    test = data.get("test")
    if test is None:
        return data

    def image_id(name):  # the stem, lower-cased
        path = Path(str(name))
        return (path.stem if re.fullmatch(_IMAGE, path.suffix, re.I) else str(name)).lower()

    def keys(split):
        if name != "folder":
            return [image_id(n) for n in split["names"]]
        return [hashlib.sha1(image.numpy().tobytes() + bytes(str(hw.tolist()), "ascii")).hexdigest()
                for image, hw in zip(split["images"], split["sizes"])]
    taken = {k for s in ("train", "val") if s in data for k in keys(data[s])}
    excluded = {image_id(n) for n in exclude}
    drop = [k in taken or image_id(n) in excluded for k, n in zip(keys(test), test["names"])]
    removed = [n for n, d in zip(test["names"], drop) if d]
    if removed:
        if all(drop):
            raise DatasetError(f"{name}: every test image is also in training or excluded ({len(removed)} images)")
        print(f"{name}: removed {len(removed)} test image(s) also in train/val or excluded: "
              f"{removed[:5]}{' ...' if len(removed) > 5 else ''}")
        test = _take_images(test, [i for i, d in enumerate(drop) if not d])
    data["test"] = {**test, "removed_overlap": removed}
    return data


_CACHE_FORMAT = 4  # bump when what a reader returns changes, so that old cache files are not used


def _cache_read(path):
    """The dataset in a cache file, or None when it is absent, unreadable, or its payload does not
    match the sha256 on its first line (a file damaged on disk is read again, never trained on)."""
    try:
        head, _, payload = path.read_bytes().partition(b"\n")
    except OSError:
        return None
    if head != b"sha256 " + hashlib.sha256(payload).hexdigest().encode():
        print(f"cache file '{path}' does not match its checksum: reading the dataset again")
        return None
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception:  # a foreign file: read the dataset again
        return None


def _cache_write(path, data):
    """`data` into path as 'sha256 <hex>' and a newline, then torch.save's bytes; written to a file
    of this process and renamed, so a concurrent reader never sees half a file."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    payload = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(b"sha256 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    os.replace(tmp, path)


def _load_real(name, root, size, seed, cache, options):
    spec = _READERS[name]
    unknown = set(options) - spec["options"] - _COMMON_OPTIONS
    if unknown:
        raise DatasetError(f"{name}: unknown option(s) {sorted(unknown)}; "
                           f"known: {sorted(spec['options'] | _COMMON_OPTIONS)}")
    options = dict(options)
    exclude = options.pop("exclude", None) or ()
    exclude = [exclude] if isinstance(exclude, (str, Path)) else exclude
    if root is None:
        raise DatasetError(f"{name}: no dataset folder given (pass --root / root=); see the dataset table in "
                           f"README.md (published at {spec['url']})")
    base = Path(root).expanduser().resolve()
    if base.is_file():
        raise DatasetError(f"{name}: --root '{root}' is a file, not a folder"
                           f"{'; unpack it first' if base.suffix.lower() in ('.zip', '.gz', '.tar', '.7z') else ''}")
    if not base.is_dir():
        raise DatasetError(f"{name}: dataset folder '{root}' does not exist; see the dataset table in README.md "
                           f"(published at {spec['url']})")
    cache_dir = Path(cache or ".cache").expanduser().resolve()
    if cache_dir == base or base in cache_dir.parents:
        raise DatasetError(f"{name}: the cache folder '{cache_dir}' is inside the dataset folder '{base}'; "
                           "choose another with --cache (nothing is written into a dataset)")
    # the cache key: format, dataset, folder, size, every option that changes what is read (exclude is
    # applied after the cache), every file's path, size and mtime -- those of a splits folder too
    files = _tree(base)
    keyed = {k: (str(Path(v).expanduser().resolve()) if k == "splits" and v else v) for k, v in options.items()}
    listed = [(rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in files if not rel.endswith("/")]
    if keyed.get("splits") and Path(keyed["splits"]).is_dir():
        listed += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(keyed["splits"]).rglob("*")
                   if p.is_file()]
    key = json.dumps([_CACHE_FORMAT, name, str(base), size, sorted(keyed.items()), listed], default=str)
    path = cache_dir / f"{name}-{size}px-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    data = _cache_read(path)  # None when absent or damaged
    if data is None:
        data = spec["read"](name, base, files, size, options)
        _cache_write(path, data)
    if spec.get("split"):  # a dataset's own post-cache split (I-SPY 1: by patient)
        data = spec["split"](name, data, seed)
    elif spec.get("val_fraction") and "train" in data and "val" not in data:
        data = _seeded_split(data, spec["val_fraction"], seed)
        for key in ("full_instances", "full_masks"):  # the metrics at original resolution need val/test only
            data["train"].pop(key, None)
    data = _remove_from_test(name, data, exclude)
    for key, split in data.items():  # every split has every key
        data[key] = {**dict.fromkeys(_TENSOR_KEYS), "class_names": list(spec["classes"]),
                     "mask_names": list(spec["masks"]), **split}
    return data


# ---------------------------------------------------------------------------------------------
# 12. Batches on the device: slicing, augmentation, normalisation (no per-sample Python)
# ---------------------------------------------------------------------------------------------


def to_device(split, device):
    """The split with its tensors moved to `device` (dtypes kept: uint8 stays uint8); lists kept."""
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in split.items()}


def iterate_batches(split, batch_size, shuffle=True, generator=None, drop_last=False):
    """Yield batches sliced from the split's tensors: the tensor keys (images, masks, labels, ...)
    indexed by one batch of indices, plus "index" (int64 [B]). The permutation is drawn with
    `generator` (on the split's device or the CPU) so that runs repeat; one host-to-device copy of
    the permutation per epoch at most."""
    device = split["images"].device
    n = split["images"].shape[0]
    if shuffle:
        gen_device = generator.device if generator is not None else device
        order = torch.randperm(n, generator=generator, device=gen_device).to(device)
    else:
        order = torch.arange(n, device=device)
    tensors = {k: v for k, v in split.items() if torch.is_tensor(v)}
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        batch = {k: v.index_select(0, index) for k, v in tensors.items()}
        batch["index"] = index
        yield batch


def _random(draw, shape, generator, device):
    """draw (torch.rand, torch.randn) from `generator` on its own device (None: the default one), on `device`."""
    return draw(shape, generator=generator, device=device if generator is None else generator.device).to(device)


def augment(batch, generator=None, flip=True, rotate=15.0, scale=0.1, elastic=0.0, color=0.1):
    """A new batch with one random geometric transform per sample applied to the image (bilinear)
    and, with the same sampling grid, to masks / instances / truth (nearest); colour jitter on
    the image only. rotate: degrees (+-), scale: fraction (+-), elastic: displacement magnitude
    in pixels (0 = off), color: jitter strength for brightness, contrast and saturation (0 = off).
    Everything is batched on the batch's device; images stay uint8."""
    images = batch["images"]
    b, _, h, w = images.shape
    dev = images.device
    u = _random(torch.rand, (b, 8), generator, dev)  # all per-sample random numbers in one draw
    angle = (2 * u[:, 0] - 1) * math.radians(rotate)
    zoom = 1 + (2 * u[:, 1] - 1) * scale
    flip_x = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    flip_y = torch.where(u[:, 3] < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    # output pixel p samples the input at A p (normalised coordinates): rotation / zoom, then flips
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_x
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_y, cos * flip_y
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)  # [B,H,W,2]
    if elastic > 0:
        # smooth random displacement: coarse noise (one knot every ~8 px) upsampled bicubically,
        # scaled so that its RMS is `elastic` pixels, converted to normalised units (2 / side)
        knots = max(2, min(h, w) // 8)
        noise = _random(torch.randn, (b, 2, knots, knots), generator, dev)
        field = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
        field = field / field.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6) * elastic
        # python-float scales, not a new device tensor: building one from a list is a host-to-device
        # copy that waits for the queue (a host sync per step)
        field = torch.cat([field[:, :1] * (2.0 / w), field[:, 1:] * (2.0 / h)], dim=1)
        grid = grid + field.permute(0, 2, 3, 1)
    out = dict(batch)
    img = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    for key in ("masks", "instances", "truth", "valid"):  # valid: the padding moves with the image
        labels = batch.get(key)
        if labels is None:
            continue
        flat = labels.float() if labels.dim() == 4 else labels.float()[:, None]
        warped = F.grid_sample(flat, grid, mode="nearest", padding_mode="reflection", align_corners=False)
        out[key] = (warped if labels.dim() == 4 else warped[:, 0]).round().to(labels.dtype)
    if color > 0:
        bright = 1 + (2 * u[:, 4] - 1) * color
        contrast = 1 + (2 * u[:, 5] - 1) * color
        saturation = 1 + (2 * u[:, 6] - 1) * color
        grey = 0.299 * img[:, :1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:]  # luma, no host copy
        img = grey + saturation.view(b, 1, 1, 1) * (img - grey)
        mean = grey.mean((2, 3), keepdim=True)
        img = mean + contrast.view(b, 1, 1, 1) * (img - mean)
        img = img * bright.view(b, 1, 1, 1)
    out["images"] = img.clamp(0, 255).round().to(torch.uint8)
    return out


def channel_stats(images, valid=None):
    """Per-channel mean and standard deviation (float32 [3] each, on the [0, 1] scale) of uint8
    images [N,3,H,W] over their image pixels: `valid` [N,H,W] (a real split's) leaves the letterbox
    padding out, which would pull the mean towards black; None counts every pixel. Accumulated in
    float64 over chunks so a whole split never becomes float."""
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], 256):
        x = images[start:start + 256].to(torch.float64) / 255.0
        if valid is not None:
            x = x * valid[start:start + 256, None].to(torch.float64)  # padding pixels count as 0 ...
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    # ... and are not counted here
    count = images.shape[0] * images.shape[2] * images.shape[3] if valid is None else valid.sum().item()
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def normalize(images, mean, std):
    """(x / 255 - mean) / std per channel, float32; mean and std [3] on the images' device."""
    return (images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
