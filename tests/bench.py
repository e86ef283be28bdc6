"""Speed benchmark: each script's model at paper scale, fed by this project's data pipeline and by
the DataLoader + PIL per-sample pipeline that users would otherwise write .

    python tests/bench.py                                   # every script, the default device
    python tests/bench.py --device cuda --out bench.json    # the GPU run of the README's speed table
    python tests/bench.py --scripts uml,joint_unet --steps 20 --workers 0,4,8
    python tests/bench.py --quick --device cpu              # tiny sizes: checks every path in seconds
    python tests/bench.py --print-schedules                 # item 2: each script's real-data schedule

For every script the model, the optimiser and the training step are the script's own, at the
script's real-data defaults (its parser with `--data <real set>`):

    uml                    REFUGE: 256 px, width 64, Res2Net blocks 3,4,6, batch 8, loss of Eq. 9
    joint_unet             ISIC 2017: valid U-Net 572 -> 388, width 32, joint task, batch 8, Eq. 4
    ensemble_annotators    ISIC multi-annotator: 96 px, width 32, depth 4, the meta step (Eq. 1-2)
                           with batches of 2 annotations of U and 64 clean images of C_i
    uncertainty_multiloss  GlaS: 512 px images, 250x250 patches, width 32, batch 8, Eq. 2

A synthetic set of the real training set's size (400, 2000, 1778 and 85 images), at the real
images' resolution (2124x2056 JPEG, 1024x768 JPEG, 1024x768 JPEG, 775x522 PNG; masks PNG), is made
from a small pool of the script's own synthetic images (upsampled, shifted, with pixel noise) and
written once to a temporary folder. Then, on the same model and step:

  project     uint8 tensors of the set at the model's size resident on the device; batches sliced,
              augmented (common.augment) and normalised on the device, as the scripts do;
  dataloader  torch DataLoader, one PIL per-sample pipeline per image reading those files: open,
              resize, random crop (GlaS), flips, rotation, normalise, mirror padding (572 px
              U-Net) on the CPU; pinned memory and non-blocking copies on CUDA. At 0, 4, 8 workers
              and the machine's usable cores (the ensemble runs two loaders, U and C_i, each with
              that many).

Measured after a warm-up, between two synchronisations (no per-step synchronisation): training
images/s (images read per step: the ensemble counts 2 + 64), the share of the window the host
spent waiting for the next batch (as the scripts print it), on CUDA the share of GPU time spent
making the project's batches (CUDA events), peak memory (torch.cuda.max_memory_allocated on CUDA;
the main process' peak RSS on CPU), and the ratio of the project's images/s to the best loader's.
Printed as Markdown, saved as JSON (--out). bf16 autocast and channels_last on CUDA, cuDNN
benchmark, --compile optional (not for the ensemble: its meta step differentiates twice).

The per-sample pipeline is kept cheap on purpose, so the ratio is a lower bound: no colour jitter,
scale jitter or elastic warp (the project's batches get them), files already in the page cache.

Each script is reached through one adapter function (`adapter_<script>`); when a script renames a
function, that adapter is the one place to change. A script whose adapter fails is reported as an
error row and the others still run. Not collected by pytest (tests/test_bench.py runs it tiny).
"""
import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import shlex
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (the project's root must be on sys.path first)

SCRIPTS = ("uml", "joint_unet", "ensemble_annotators", "uncertainty_multiloss")


def usable_cores():
    """CPU cores this process may run on (the affinity mask; os.cpu_count() counts the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ==================================================================================================
# What a script contributes: model, step, batches (filled in by its adapter)
# ==================================================================================================

@dataclass
class Stream:
    """One stream of training samples (the ensemble has two: U and C_i)."""
    batch_size: int
    pairs: Callable         # (n_images, pool) -> list of (image index, annotation slot or None)
    side: int               # images (and masks) are resized to side x side
    crop: int = 0           # random crop of this side after the resize (0 = none)
    pad: int = 0            # mirror padding of the network input (valid U-Net)
    rotate: float = 10.0    # +- degrees


@dataclass
class Bench:
    script: str
    model: torch.nn.Module
    step: Callable          # inputs -> loss tensor (forward, loss, backward, optimiser step)
    project: Callable       # ({stream: on-device batch}, generator) -> inputs (the scripts' own batching)
    streams: dict           # {name: Stream}
    pool: dict              # the synthetic images the files and the device tensors are made from
    norm: tuple             # (mean, std) on the device, [0, 1] scale
    loss: str               # what the step optimises
    model_input: str        # e.g. "572 -> 388 px"
    n_images: int           # the real training set's size
    file_size: tuple        # (width, height) of the written files
    image_format: str       # "JPEG" or "PNG"
    schedule_steps: Callable = None  # pool -> training steps of the real-data schedule (item 2)
    notes: list = field(default_factory=list)


def _on_device(model, device, compile):
    """common.prepare_model outside a run: one process, the benchmark's device, compiled when asked."""
    run = argparse.Namespace(device=torch.device(device), dist=common.Dist(), args=argparse.Namespace(compile=compile))
    return common.prepare_model(model, run)


def _attr(module, *names):
    """The first of `names` that `module` defines; a clear error naming the adapter otherwise."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"{module.__name__}.py defines none of {names}: update adapter_{module.__name__} "
                         "in tests/bench.py")


def _script_args(module, argv):
    """The script's own arguments for argv, its data-dependent defaults resolved."""
    if hasattr(module, "build_parser"):
        args = module.build_parser().parse_args(argv)
    else:
        args = _attr(module, "parse_args")(argv)
    if hasattr(module, "resolve_defaults"):
        args = module.resolve_defaults(args)
    args.compile = False  # the benchmark compiles (--compile) itself, the same way for every script
    return args


def _pool(name, side, count, **options):
    """`count` synthetic training images of one of common's generators, at the model's side."""
    split = common.load_dataset(name, size=side, seed=0, n_train=count, n_val=1, n_test=1, **options)["train"]
    return {k: v for k, v in split.items() if torch.is_tensor(v) or k.endswith("names")}


def _optimizer_step(optimizer, loss):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _single(n_images, pool):
    return [(i, None) for i in range(n_images)]


def _cl(x, device):
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


# ==================================================================================================
# Adapters: one per script, the only place that knows the script's names
# ==================================================================================================

def adapter_uml(opts, device):
    import uml
    args = _script_args(uml, ["--data", "refuge"] + (["--quick"] if opts.quick else []))
    pool = _pool("synthetic-fundus", args.size, opts.pool)
    spec = uml.ROWS["UML"][1] if hasattr(uml, "ROWS") else _attr(uml, "model_spec")("uml")  # the full UML row
    model = _attr(uml, "build_model")(spec, args, len(pool["class_names"]), len(pool["mask_names"]))
    model = _on_device(model, device, opts.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    norm = tuple(t.to(device) for t in common.channel_stats(pool["images"]))
    total_loss = _attr(uml, "total_loss")

    def step(inputs):
        with common.autocast(device, args.amp):
            out = model(inputs["x"])
        loss, _ = total_loss(out, inputs["masks"].long(), inputs["labels"], spec,
                             uml.annealing_coefficient(1, args.annealing_epochs), args.loss_weights)
        return _optimizer_step(optimizer, loss)

    def project(batches, generator):  # uml.train_row
        batch = common.augment(batches["train"], generator, flip=True, rotate=10.0, scale=0.05, color=0.05)
        x = uml.model_input(batch["images"], norm, device) if hasattr(uml, "model_input") else \
            _cl(common.normalize(batch["images"], *norm), device)
        return {"x": x, "masks": batch["masks"], "labels": batch["labels"]}

    steps = lambda pool: 100 * (400 // args.batch_size)  # noqa: E731  one row, 100 epochs of 400
    return Bench("uml", model, step, project, {"train": Stream(args.batch_size, _single, args.size, rotate=10.0)},
                 pool, norm, "script: total_loss (Eq. 9)",
                 f"{args.size} px, width {args.width}, Res2Net {args.res2net_blocks}", 400, (2124, 2056), "JPEG",
                 steps)


def adapter_joint_unet(opts, device):
    import joint_unet as ju
    args = _script_args(ju, ["--data", "isic2017"] + (["--quick"] if opts.quick else []))
    pool = _pool("synthetic-lesions", args.size, opts.pool)
    n_classes = len(pool["class_names"])
    args.task = "joint"
    model, geometry = _attr(ju, "build_model")(args, n_classes)
    model = _on_device(model, device, opts.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    norm = tuple(t.to(device) for t in common.channel_stats(pool["images"]))
    weights = torch.ones(n_classes, device=device)
    batch_size = ju.batch_size_for(args, "joint") if hasattr(ju, "batch_size_for") else 8

    def step(inputs):  # joint_unet.train: Eq. 2 and 3 of the branches, combined by Eq. 4
        with common.autocast(device, args.amp):
            masks = ju.resize(inputs["masks"].float(), geometry["output"], "nearest")  # at the output side
            losses = ju.branch_losses(model(inputs["x"]), masks, inputs["labels"], weights)
            loss = ju.joint_loss(losses["seg"], losses["cls"], args.alpha)
        return _optimizer_step(optimizer, loss)

    def project(batches, generator):  # joint_unet.train
        batch = common.augment(batches["train"], generator=generator)
        x = ju.preprocess(batch["images"], norm[0], norm[1], geometry, args.border_mode)
        return {"x": _cl(x, device), "masks": batch["masks"], "labels": batch["labels"]}

    pad = (geometry["input"] - geometry["output"]) // 2
    # compare = seg, cls and joint, 100 epochs each; on synthetic data batch 16 for all three
    steps = lambda pool: 3 * 100 * math.ceil(2000 / 16)  # noqa: E731
    bench = Bench("joint_unet", model, step, project,
                  {"train": Stream(batch_size, _single, geometry["output"], pad=pad, rotate=15.0)}, pool, norm,
                  "script: branch_losses + joint_loss (Eq. 4)",
                  f"{geometry['input']} -> {geometry['output']} px, width {args.width}", 2000, (1024, 768), "JPEG",
                  steps)
    bench.notes.append("joint_unet: the joint task's step (batch 8); the schedule estimate applies its img/s to "
                       "all three models of --task compare (seg and cls steps differ)")
    return bench


def adapter_ensemble_annotators(opts, device):
    import ensemble_annotators as ea
    argv = ["--data", "isic-multi"] + (["--quick", "--clean-batch-size", "8"] if opts.quick else [])
    args = _script_args(ea, argv)
    pool = _pool("synthetic-lesions", args.size, opts.pool, annotators=True)
    model = _attr(ea, "BayesianResidualFCN")(args.width, args.depth, args.dropout, args.dropout_layers)
    model = _on_device(model, device, False)  # the meta step differentiates twice: no compile
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    norm = tuple(t.to(device) for t in common.channel_stats(pool["images"]))
    meta_weighted_loss = _attr(ea, "meta_weighted_loss")

    def step(inputs):  # the script's step of a meta row: Eq. 1-2 on a batch of U and one of C_i
        u, c = inputs["u"], inputs["c"]
        with common.autocast(device, args.amp):
            loss = meta_weighted_loss(model, u["x"], u["masks"], c["x"], c["masks"], args.lr, args.mc_samples)
        return _optimizer_step(optimizer, loss)

    def project(batches, generator):  # ensemble_annotators.make_batch for U and C_i
        out = {}
        for key in ("u", "c"):
            batch = common.augment({"images": batches[key]["images"], "masks": batches[key]["masks"]}, generator,
                                   rotate=10.0, scale=0.05, color=0.05)
            out[key] = {"x": _cl(common.normalize(batch["images"], *norm), device), "masks": batch["masks"]}
        return out

    def annotation_pairs(n_images, pool):  # U: every (image, annotation)
        counts = pool["n_annotations"].tolist()
        return [(i, k) for i in range(n_images) for k in range(counts[i % len(counts)])]

    def clean_pairs(n_images, pool):  # C_i: one annotation per image (non-contradictory)
        return [(i, 0) for i in range(n_images)]

    annotations = float(pool["n_annotations"].float().mean())
    # nine rows (A, five base models, J, MV, STAPLE), 54 epochs of |U| / 2 steps each
    steps = lambda pool: 9 * 54 * int(1778 * annotations // args.batch_size)  # noqa: E731
    bench = Bench("ensemble_annotators", model, step, project,
                  {"u": Stream(args.batch_size, annotation_pairs, args.size),
                   "c": Stream(args.clean_batch_size, clean_pairs, args.size)}, pool, norm,
                  "script: meta_weighted_loss (Eq. 1-2) and the step",
                  f"{args.size} px, width {args.width}, depth {args.depth}, U {args.batch_size} + "
                  f"C {args.clean_batch_size}", 1778, (1024, 768), "JPEG", steps)
    bench.notes.append(f"ensemble_annotators: images/s counts every image a meta step reads ({args.batch_size} of U + "
                       f"{args.clean_batch_size} of C_i); the schedule estimate times the four plain rows as meta "
                       "steps too (an upper bound)")
    return bench


def adapter_uncertainty_multiloss(opts, device):
    import uncertainty_multiloss as um
    args = _script_args(um, ["--data", "glas"] + (["--quick"] if opts.quick else []))
    pool = _pool("synthetic-glands", args.size, opts.pool)
    model = _attr(um, "MultiLossFCN")(args.width, args.depth, init_log_sigma2=args.init_log_sigma2)
    model = _on_device(model, device, opts.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    norm = tuple(t.to(device) for t in common.channel_stats(pool["images"]))
    config = _attr(um, "config_from_args")(args)  # the full model: Lc + Ls + Lt + Lg, learned sigma
    loss_terms, combine_losses = _attr(um, "loss_terms"), _attr(um, "combine_losses")
    log_sigma2 = getattr(model, "_orig_mod", model).log_sigma2

    def step(inputs):
        with common.autocast(device, args.amp):
            class_logits, pixel_logits = model(inputs["x"])
        terms = loss_terms(class_logits, pixel_logits, inputs["labels"], inputs["masks"], list(config["weights"]))
        return _optimizer_step(optimizer, combine_losses(terms, config["weights"], config["uncertainty"], log_sigma2))

    def project(batches, generator):  # uncertainty_multiloss.train
        batch = common.augment(batches["train"], generator=generator, rotate=args.rotate, scale=args.scale,
                               elastic=args.elastic)
        if args.patch:
            batch = um.random_patches(batch, args.patch, generator)
        return {"x": _cl(common.normalize(batch["images"], *norm), device), "masks": batch["masks"],
                "labels": batch["labels"]}

    steps = lambda pool: 11 * 100 * (70 // args.batch_size)  # noqa: E731  Table 1: 11 rows of 100 epochs
    return Bench("uncertainty_multiloss", model, step, project,
                 {"train": Stream(args.batch_size, _single, args.size, crop=args.patch, rotate=args.rotate)},
                 pool, norm, "script: loss_terms + combine_losses (Eq. 2)",
                 f"{args.size} px, {args.patch}x{args.patch} patches, width {args.width}", 85, (775, 522), "PNG",
                 steps)


ADAPTERS = {"uml": adapter_uml, "joint_unet": adapter_joint_unet,
            "ensemble_annotators": adapter_ensemble_annotators,
            "uncertainty_multiloss": adapter_uncertainty_multiloss}


# ==================================================================================================
# Item 2: each script's real-data schedule at the real set's size (printed, not run)
# ==================================================================================================

SCHEDULES = {
    "uml": ("python uml.py --size 256 --width 64 --res2net-blocks 3,4,6 --lr 1e-4 --n-train 400 --n-val 400 "
            "--n-test 400 --epochs 100 --device cuda",
            "REFUGE-sized: 400/400/400 images, 256 px, the paper's network and 100 epochs of batch 8 "
            "(1 row; the noise rows are evaluation only)"),
    "joint_unet": ("python joint_unet.py --task compare --unet-padding valid --size 388 --width 32 --n-train 2000 "
                   "--n-val 150 --n-test 600 --epochs 100 --device cuda",
                   "ISIC 2017-sized: seg, cls and joint models, 572 -> 388, 100 epochs each (synthetic data: "
                   "batch 16 for all three; the thesis' 2/8/8 apply on real data)"),
    "ensemble_annotators": ("python ensemble_annotators.py --size 96 --width 32 --depth 4 --batch-size 2 "
                            "--clean-batch-size 64 --lr 1e-4 --momentum 0.99 --epochs 54 --n-train 1778 "
                            "--device cuda",
                            "ISIC multi-annotator-sized: nine trainings (A, B-F, J, MV, STAPLE), 54 epochs of "
                            "|U| / 2 steps (~100K iterations each, as the paper)"),
    "uncertainty_multiloss": ("python uncertainty_multiloss.py --table1 --size 512 --patch 250 --width 32 "
                              "--elastic 8 --epochs 100 --n-train 70 --device cuda",
                              "GlaS-sized: 70 training images (+ validation and test), 250x250 patches, the 11 "
                              "rows of Table 1, 100 epochs each"),
}


def check_schedule(script, command):
    """None if the script's parser accepts the command's flags on this checkout, else the reason."""
    messages = io.StringIO()
    try:
        module = __import__(script)
        with contextlib.redirect_stderr(messages):
            _script_args(module, shlex.split(command)[2:])
    except SystemExit:
        lines = messages.getvalue().strip().splitlines()
        return "not accepted on this checkout: " + (lines[-1].split("error: ", 1)[-1] if lines else "parser exited")
    except Exception as error:  # noqa: BLE001  report, do not stop
        return f"{type(error).__name__}: {error}"
    return None


def print_schedules(scripts, summary=None):
    print("## Real-data schedules : run each from the project root, time with `time`\n")
    for script in scripts:
        command, what = SCHEDULES[script]
        problem = check_schedule(script, command)
        print(f"- {script}: {what}\n\n      time {command}\n")
        if problem:
            print(f"  NOTE: {problem}\n")
        estimate = (summary or {}).get(script, {}).get("schedule_training_s")
        if estimate:
            print(f"  estimated training time at the measured project img/s: {estimate / 60:.1f} min "
                  "(training steps only; evaluation, checkpoints and data generation come on top)\n")


# ==================================================================================================
# Data: a pool of synthetic images -> files at the real resolution, and the device-resident set
# ==================================================================================================

_WRITER_POOL = {}


def _writer_init(pool):
    _WRITER_POOL.update(pool)


def _write_files(job):
    """Writes image `index` (JPEG or PNG) and its masks (PNG) from the pool, upsampled to `size`."""
    index, folder, size, image_format, slots = job
    images, masks = _WRITER_POOL["images"], _WRITER_POOL["masks"]
    k = index % len(images)
    rng = np.random.default_rng(index)
    shift = int(rng.integers(0, images.shape[1]))  # every file differs from its pool image
    image = Image.fromarray(np.roll(images[k], shift, axis=1)).resize(size, Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-3, 4, (size[1], size[0], 1), dtype=np.int16)
    suffix = ".jpg" if image_format == "JPEG" else ".png"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(Path(folder) / f"{index:05d}{suffix}",
                                                              image_format, quality=90)
    for slot in slots:
        mask = masks[k] if slot is None else masks[k][slot]
        Image.fromarray(np.roll(mask, shift, axis=1)).resize(size, Image.NEAREST).save(
            Path(folder) / f"{index:05d}_mask{'' if slot is None else slot}.png")
    return index


def write_files(bench, folder, n_images, file_size, processes):
    """The set as files: image i is <i>.jpg/png, its masks <i>_mask.png or <i>_mask<k>.png."""
    pool = {"images": bench.pool["images"].permute(0, 2, 3, 1).numpy(), "masks": bench.pool["masks"].numpy()}
    slots = {}
    for stream in bench.streams.values():
        for i, slot in stream.pairs(n_images, bench.pool):
            slots.setdefault(i, set()).add(slot)
    jobs = [(i, str(folder), file_size, bench.image_format, sorted(slots[i], key=lambda s: -1 if s is None else s))
            for i in range(n_images)]
    with ProcessPoolExecutor(processes, mp_context=get_context("fork"), initializer=_writer_init,
                             initargs=(pool,)) as executor:
        for _ in executor.map(_write_files, jobs, chunksize=8):
            pass


def device_set(bench, n_images, device):
    """{stream: split} of uint8 tensors on the device: the set at the model's size (pool images cycled)."""
    index = torch.arange(n_images) % bench.pool["images"].shape[0]
    pool = {k: v.to(device) for k, v in bench.pool.items() if torch.is_tensor(v)}
    out = {}
    for name, stream in bench.streams.items():
        pairs = stream.pairs(n_images, bench.pool)
        image = index[torch.tensor([i for i, _ in pairs])].to(device)
        split = {"images": pool["images"][image]}
        if pairs[0][1] is None:
            split["masks"] = pool["masks"][image]
        else:
            split["masks"] = pool["masks"][image, torch.tensor([s for _, s in pairs], device=device)]
        if pool.get("labels") is not None:
            split["labels"] = pool["labels"][image]
        out[name] = split
    return out


def endless(split, batch_size, generator):
    """Batches of a device-resident split for ever (common.iterate_batches, reshuffled per pass)."""
    drop_last = split["images"].shape[0] >= batch_size
    while True:
        yield from common.iterate_batches(split, batch_size, shuffle=True, generator=generator, drop_last=drop_last)


class FileSamples(Dataset):
    """The per-sample pipeline users write: PIL open, resize, (crop), flips, rotation, normalise."""

    def __init__(self, folder, pairs, labels, stream, image_format, mean, std):
        suffix = ".jpg" if image_format == "JPEG" else ".png"
        self.items = [(os.path.join(folder, f"{i:05d}{suffix}"),
                       os.path.join(folder, f"{i:05d}_mask{'' if s is None else s}.png"),
                       0 if labels is None else int(labels[i % len(labels)])) for i, s in pairs]
        self.stream = stream
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image_path, mask_path, label = self.items[i]
        s = self.stream
        image = Image.open(image_path).convert("RGB").resize((s.side, s.side), Image.BILINEAR)
        mask = Image.open(mask_path).resize((s.side, s.side), Image.NEAREST)
        if s.crop and s.crop < s.side:
            top, left = random.randint(0, s.side - s.crop), random.randint(0, s.side - s.crop)
            box = (left, top, left + s.crop, top + s.crop)
            image, mask = image.crop(box), mask.crop(box)
        for flip in (Image.FLIP_LEFT_RIGHT, Image.FLIP_TOP_BOTTOM):
            if random.random() < 0.5:
                image, mask = image.transpose(flip), mask.transpose(flip)
        angle = random.uniform(-s.rotate, s.rotate)
        image, mask = image.rotate(angle, Image.BILINEAR), mask.rotate(angle, Image.NEAREST)
        x = ((np.asarray(image, np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)
        if s.pad:
            x = np.pad(x, ((0, 0), (s.pad, s.pad), (s.pad, s.pad)), mode="reflect")
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.array(mask)), label


# ==================================================================================================
# Timing
# ==================================================================================================

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass


def _peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM"))
        return int(line.split()[1]) / 1024, "peak RSS"
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (process lifetime)"


def measure(next_inputs, step, device, warmup, steps, max_seconds, images_per_step, gpu_data_share=False):
    """Warm-up steps, then a window of `steps` steps (fewer when it passes `max_seconds`) between two
    synchronisations. The host time spent in next_inputs() is the data wait, as the scripts count it."""
    for _ in range(warmup):
        step(next_inputs())
    _sync(device)
    _reset_peak(device)
    events = []
    losses, wait, done = [], 0.0, 0
    start = time.perf_counter()
    while done < steps and (done < 3 or time.perf_counter() - start < max_seconds):
        tick = time.perf_counter()
        if gpu_data_share:
            events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            events[-1][0].record()
        inputs = next_inputs()
        if gpu_data_share:
            events[-1][1].record()
        wait += time.perf_counter() - tick
        losses.append(step(inputs))
        done += 1
    _sync(device)
    seconds = time.perf_counter() - start
    peak, peak_kind = _peak_mb(device)
    loss = torch.stack([torch.as_tensor(v).float().reshape(()) for v in losses]).cpu()
    row = {"steps": done, "seconds": seconds, "images_per_s": done * images_per_step / seconds,
           "steps_per_s": done / seconds, "data_wait_share": wait / seconds, "peak_memory_mb": peak,
           "memory": peak_kind, "loss_finite": bool(torch.isfinite(loss).all()), "last_loss": float(loss[-1])}
    if gpu_data_share:
        row["data_gpu_share"] = sum(a.elapsed_time(b) for a, b in events) / 1000 / seconds
    return row


def bench_project(bench, n_images, opts, device):
    data = device_set(bench, n_images, device)
    generator = torch.Generator(device=device).manual_seed(0)
    iterators = {name: endless(data[name], bench.streams[name].batch_size, generator) for name in bench.streams}
    images_per_step = sum(s.batch_size for s in bench.streams.values())
    bench.model.train()
    row = measure(lambda: bench.project({k: next(it) for k, it in iterators.items()}, generator), bench.step,
                  device, opts.warmup, opts.steps, opts.max_seconds, images_per_step,
                  gpu_data_share=device.type == "cuda")
    del data, iterators
    return row


def bench_loader(bench, folder, n_images, workers, opts, device):
    """The same model and step fed by one DataLoader per stream, each with `workers` workers."""
    mean, std = (t.cpu().numpy() for t in bench.norm)
    labels = bench.pool.get("labels")
    labels = None if labels is None else labels.tolist()
    prefetch = 2
    warmup = max(opts.warmup, workers * prefetch + 2)  # drain the batches made while the workers started
    loaders = {}
    for name, stream in bench.streams.items():
        dataset = FileSamples(folder, stream.pairs(n_images, bench.pool), labels, stream, bench.image_format,
                              mean, std)
        sampler = RandomSampler(dataset, replacement=True, num_samples=(warmup + opts.steps + 1) * stream.batch_size)
        loaders[name] = iter(DataLoader(dataset, batch_size=stream.batch_size, sampler=sampler, num_workers=workers,
                                        pin_memory=device.type == "cuda", drop_last=True,
                                        prefetch_factor=prefetch if workers else None))

    def next_inputs():
        out = {}
        for name, loader in loaders.items():
            x, masks, label = next(loader)
            out[name] = {"x": _cl(x.to(device, non_blocking=True), device),
                         "masks": masks.to(device, non_blocking=True),
                         "labels": label.to(device, non_blocking=True)}
        return out["train"] if list(out) == ["train"] else out

    images_per_step = sum(s.batch_size for s in bench.streams.values())
    bench.model.train()
    try:
        return measure(next_inputs, bench.step, device, warmup, opts.steps, opts.max_seconds, images_per_step)
    finally:
        for loader in loaders.values():
            getattr(loader, "_shutdown_workers", lambda: None)()
        loaders.clear()


def run_script(script, opts, device, workers, tmp):
    """Every row of one script: the project's pipeline, then the DataLoader at each worker count."""
    rows = []
    started = time.perf_counter()
    torch.manual_seed(0)
    bench = ADAPTERS[script](opts, device)
    n_images = opts.n_images or bench.n_images
    file_size = bench.file_size
    if opts.quick:  # tiny files that still need a resize
        file_size = (2 * max(s.side for s in bench.streams.values()),) * 2
    file_size = tuple(max(8, round(v * opts.file_scale)) for v in file_size)
    batch = " + ".join(str(s.batch_size) for s in bench.streams.values())
    base = {"script": script, "model_input": bench.model_input, "batch": batch, "loss": bench.loss,
            "n_images": n_images, "files": f"{file_size[0]}x{file_size[1]} {bench.image_format}",
            "parameters_m": sum(p.numel() for p in bench.model.parameters()) / 1e6}
    log(f"{script}: {base['parameters_m']:.1f}M parameters, {bench.model_input}; project pipeline")
    rows.append({**base, "pipeline": "project", "workers": None, **bench_project(bench, n_images, opts, device)})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    folder = Path(tmp) / script
    folder.mkdir()
    tick = time.perf_counter()
    write_files(bench, folder, n_images, file_size, opts.write_processes)
    log(f"{script}: wrote {n_images} images at {file_size[0]}x{file_size[1]} in {time.perf_counter() - tick:.1f} s")
    for w in workers:
        log(f"{script}: DataLoader + PIL, {w} workers")
        rows.append({**base, "pipeline": "dataloader", "workers": w,
                     **bench_loader(bench, str(folder), n_images, w, opts, device)})
    best = max(rows[1:], key=lambda r: r["images_per_s"], default=None)
    summary = {"project_images_per_s": rows[0]["images_per_s"], "notes": bench.notes,
               "seconds": time.perf_counter() - started}
    if best is not None:
        rows[0]["vs_best_loader"] = rows[0]["images_per_s"] / best["images_per_s"]
        summary.update(best_loader_images_per_s=best["images_per_s"], best_loader_workers=best["workers"],
                       ratio=rows[0]["vs_best_loader"])
    if bench.schedule_steps is not None and not opts.quick:
        summary["schedule_training_s"] = bench.schedule_steps(bench.pool) / rows[0]["steps_per_s"]
    return rows, summary


# ==================================================================================================
# Report
# ==================================================================================================

def markdown(rows, device_name):
    head = ["script", "model input", "batch", "loss", "pipeline", "workers", "img/s", "data wait",
            "peak memory", "project / best loader"]
    lines = [f"Training speed on {device_name} (`python tests/bench.py`)\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['script']} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        wait = f"{100 * r['data_wait_share']:.1f} %"
        if "data_gpu_share" in r:
            wait += f" (GPU {100 * r['data_gpu_share']:.1f} %)"
        ratio = f"{r['vs_best_loader']:.2f}x" if "vs_best_loader" in r else ""
        flag = "" if r["loss_finite"] else " (non-finite loss)"
        lines.append(f"| {r['script']} | {r['model_input']} | {r['batch']} | {r['loss']} | {r['pipeline']} | "
                     f"{'' if r['workers'] is None else r['workers']} | {r['images_per_s']:.1f}{flag} | {wait} | "
                     f"{r['peak_memory_mb']:.0f} MB | {ratio} |")
    return "\n".join(lines)


def device_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {usable_cores()} CPU cores, torch {torch.__version__}"
    return f"CPU ({usable_cores()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def parse_workers(text):
    out = []
    for token in text.split(","):
        token = token.strip()
        value = usable_cores() if token == "cpu" else int(token)
        if value not in out:
            out.append(value)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--scripts", default=",".join(SCRIPTS), help=f"comma list from {','.join(SCRIPTS)}")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row (default 30)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first (default 5; a DataLoader also drains its first 2 x workers batches)")
    p.add_argument("--max-seconds", type=float, default=8.0,
                   help="a row's timed window stops after this many seconds (at least 3 steps; default 8)")
    p.add_argument("--workers", default="0,4,8,cpu",
                   help="DataLoader worker counts; 'cpu' = the usable cores (default 0,4,8,cpu)")
    p.add_argument("--out", default=None, help="JSON file for the rows (default: print only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (not the ensemble's)")
    p.add_argument("--quick", action="store_true",
                   help="tiny: the scripts' --quick models, 12 images, small files (checks every path)")
    p.add_argument("--n-images", type=int, default=None, help="images per set (default: the real set's size)")
    p.add_argument("--file-scale", type=float, default=1.0, help="scale of the written files' resolution")
    p.add_argument("--pool", type=int, default=None,
                   help="distinct synthetic images the set is made from (default 32; --quick 4)")
    p.add_argument("--write-processes", type=int, default=min(16, usable_cores()),
                   help="processes writing the files")
    p.add_argument("--tmp", default=None, help="parent folder of the temporary image folder")
    p.add_argument("--print-schedules", action="store_true",
                   help="print each script's real-data schedule command and exit")
    args = p.parse_args(argv)
    args.scripts = [s.strip() for s in args.scripts.split(",") if s.strip()]
    unknown = [s for s in args.scripts if s not in SCRIPTS]
    if unknown:
        p.error(f"unknown script(s) {unknown}; choose from {','.join(SCRIPTS)}")
    if args.quick and args.n_images is None:
        args.n_images = 12
    args.pool = args.pool or (4 if args.quick else 32)
    return args


def main(argv=None):
    opts = parse_args(argv)
    if opts.print_schedules:
        print_schedules(opts.scripts)
        return 0
    device = common.choose_device(opts.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every shape is fixed
    workers = parse_workers(opts.workers)
    started = time.perf_counter()
    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-", dir=opts.tmp) as tmp:
        for script in opts.scripts:
            try:
                script_rows, summary[script] = run_script(script, opts, device, workers, tmp)
                rows += script_rows
            except Exception as error:  # noqa: BLE001  one broken adapter must not lose the other rows
                traceback.print_exc()
                rows.append({"script": script, "error": f"{type(error).__name__}: {error}"})
                summary[script] = {"error": rows[-1]["error"]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = device_description(device)
    table = markdown(rows, name)
    print(table + "\n")
    print("img/s: training images per second (ensemble: every image a meta step reads); data wait: share of the "
          "timed window the host spent making or waiting for the next batch" +
          ("; GPU: share of GPU time spent making the project's batches" if device.type == "cuda" else "") +
          "; peak memory: " + ("torch.cuda.max_memory_allocated (the project's rows include the resident set)"
                               if device.type == "cuda" else "peak RSS of the main process (not the workers)") +
          "; project / best loader: images/s of this project's pipeline over the best DataLoader row.")
    for script, s in summary.items():
        for note in s.get("notes", []):
            print(f"- {note}")
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s on {name}")
    if not opts.quick:
        print()
        print_schedules([s for s in opts.scripts if "error" not in summary.get(s, {})], summary)
    if opts.out:
        result = {"device": name, "torch": torch.__version__, "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
                  "settings": {k: v for k, v in vars(opts).items() if k != "print_schedules"},
                  "workers": workers, "rows": rows, "summary": summary, "seconds": total, "markdown": table}
        Path(opts.out).write_text(json.dumps(result, indent=1, default=str))
        print(f"rows in {opts.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
