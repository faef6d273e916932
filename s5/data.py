"""Transforms and loaders: the original per-image PIL pipeline in a DataLoader, and the fast loader that augments whole
batches on the training device. Both read `s5.mnist.load_split`'s verified tensors; `make_loader` builds either."""

import functools
import math
import signal
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision import transforms

from s5.device import pins_memory
from s5.mnist import MNIST_MD5, load_split

MEAN, STD = 0.1307, 0.3081  # of the 60,000 training images' pixels, as the original normalised them
TEST_BATCH = 256  # evaluation batch (rounded up to a multiple of the number of processes)


def get_train_transforms():
    return transforms.Compose([transforms.RandomApply([transforms.CenterCrop(22)], p=0.1), transforms.Resize((28, 28)),
                               transforms.RandomRotation((-15.0, 15.0), fill=0), *get_test_transforms().transforms])


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
    return MNISTImages(*load_split(train, root, checksums), transform=transform)


def _uniform(n, half_width, generator, device):  # n draws in [-half_width, half_width]
    return (torch.rand(n, generator=generator, device=device) * 2 - 1) * half_width


def sample_augmentation(n, generator, device, max_degrees=15.0, crop_p=0.1):
    """Random draws of the train augmentation for n images: angles in degrees, and which are cropped."""
    return _uniform(n, max_degrees, generator, device), torch.rand(n, generator=generator, device=device) < crop_p


def augment_batch(images, angles, cropped, crop=22):
    """The original's train augmentation of a (B, 1, H, W) batch in [0, 1]: CenterCrop(22) + Resize where `cropped`,
    then a nearest-neighbour rotation (fill 0) as RandomRotation's: its pixels to a grey level; bilinear would blur."""
    size = images.shape[-2:]
    top, left = round((size[0] - crop) / 2), round((size[1] - crop) / 2)  # as CenterCrop
    zoomed = F.interpolate(images[..., top:top + crop, left:left + crop], size, mode="bilinear", align_corners=False)
    images = torch.where(cropped.view(-1, 1, 1, 1), zoomed, images)  # no boolean indexing: no GPU sync
    rad = torch.deg2rad(angles.float())
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    return affine_batch(images, torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(-1, 2, 3), mode="nearest")


@dataclass(frozen=True)
class Affine:
    """The `affine` augmentation's strengths: shift by up to `shift` pixels, then rotate by up to `degrees`, shear along
    x by up to `shear` degrees and scale by 1 ± `scale` about the centre; `elastic` > 0 adds Simard et al.'s (2003)
    elastic distortion: uniform noise smoothed by a Gaussian of `sigma` pixels, scaled to `elastic` pixels."""
    degrees: float = 10.0
    scale: float = 0.1
    shear: float = 10.0
    shift: float = 2.0
    elastic: float = 0.0
    sigma: float = 4.0

    def sample(self, n, generator, device, size=28):
        """For n images, as `affine_batch` takes them: affine_grid matrices and, with `elastic`, grid offsets."""
        uniform = functools.partial(_uniform, n, generator=generator, device=device)
        rad, shear_rad = torch.deg2rad(uniform(self.degrees)), torch.deg2rad(uniform(self.shear))
        zoom = 1 + uniform(self.scale)
        cos, sin, tan = rad.cos(), rad.sin(), shear_rad.tan()
        shift_x, shift_y = uniform(self.shift) * 2 / size, uniform(self.shift) * 2 / size
        # output pixel p reads input point (rotation @ shear / zoom) p + t: the image shifted by -t, then warped
        theta = torch.stack([cos, cos * tan - sin, shift_x, sin, sin * tan + cos, shift_y], 1).view(-1, 2, 3) \
            / zoom.view(-1, 1, 1)
        theta[:, :, 2] *= zoom.view(-1, 1)  # the division above is the scale of the warp, not of the shift
        if not self.elastic:
            return (theta,)
        noise = torch.rand(n * 2, 1, size, size, generator=generator, device=device) * 2 - 1
        r, sigma = max(1, math.ceil(3 * self.sigma)), self.sigma
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=device).square() / (2 * sigma * sigma))
        k = k / k.sum()  # a Gaussian of `sigma` pixels, applied along x then along y
        field = F.conv2d(F.conv2d(noise, k.view(1, 1, 1, -1), padding=(0, r)), k.view(1, 1, -1, 1), padding=(r, 0))
        return theta, field.view(n, 2, size, size).permute(0, 2, 3, 1) * (self.elastic * 2 / size)  # normalised


def affine_batch(images, theta, field=None, mode="bilinear"):
    """A batch of (B, 1, H, W) images (0 = background) warped by `Affine.sample`'s draws, in one grid_sample."""
    grid = F.affine_grid(theta.float(), list(images.shape), align_corners=False)
    grid = grid if field is None else grid + field
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


AUGMENTATIONS = {  # a recipe's `augment`: (draw the random parameters for n images, apply them to a batch)
    "classic": (sample_augmentation, augment_batch),
    "affine": (Affine().sample, affine_batch),
    # Simard's alpha 34 ended 0.4 points behind affine alone; 12 level with it (docs/recipes.md#one-epoch-and-best).
    "elastic": (Affine(elastic=12.0, sigma=4.0).sample, affine_batch),
}


@dataclass(eq=False, repr=False)
class FastMNISTLoader:
    """A drop-in for a DataLoader: MNIST held once as uint8 on the training device, batches made and augmented there
    (`augment`: a name in AUGMENTATIONS, True for "classic"). Epoch e is shuffled and augmented from seed + e
    (`set_epoch`; iterating advances it), so a resumed run sees the same batches. Sharded (`rank` of `world_size`),
    every process draws for the whole global batch and keeps its share: together, exactly the single-process batch.
    `limit`: an epoch is the first `limit` images of its shuffled order (a run that ends mid-epoch)."""
    images: torch.Tensor  # uint8 (N, 28, 28), kept so on the device: 47 MB for the training split
    labels: torch.Tensor
    batch_size: int = 512
    shuffle: bool = False
    augment: str | bool | None = False
    device: torch.device | str = "cpu"  # where the caller trains: never chosen here
    seed: int | None = None  # None: drawn from the global RNG, so set_seed() makes it reproducible
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    limit: int | None = None

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device, torch.int64)
        self.dataset = TensorDataset(self.images, self.labels)
        self.augment = "classic" if self.augment is True else self.augment or None
        if self.augment not in (None, *AUGMENTATIONS):
            raise ValueError(f"augment={self.augment!r}: use one of {', '.join(AUGMENTATIONS)}, or False")
        self.seed = int(self.seed) if self.seed is not None else int(torch.randint(2**31 - 1, ()).item())
        self.epoch, self.epoch_size = 0, min(self.limit or len(self.labels), len(self.labels))  # an epoch's

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.epoch_size // self.batch_size if self.drop_last else math.ceil(self.epoch_size / self.batch_size)

    def __iter__(self):
        gen = torch.Generator(device=self.device).manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n, device, (draw, apply) = len(self.labels), self.device, AUGMENTATIONS.get(self.augment, (None, None))
        order = torch.randperm(n, generator=gen, device=device) if self.shuffle else torch.arange(n, device=device)
        for idx in order[:min(self.epoch_size, len(self) * self.batch_size)].split(self.batch_size):
            draws = draw(len(idx), gen, device) if draw else ()
            idx, *draws = (t.tensor_split(self.world_size)[self.rank] for t in (idx, *draws))  # this process's share
            x = self.images[idx].unsqueeze(1).float().div_(255)
            if draw and len(idx):  # a process's share of a last, tiny batch can be empty
                x = apply(x, *draws)
            yield x.sub_(MEAN).div_(STD), self.labels[idx]


def _leave_signals_to_the_main_process(worker_id):
    """In a worker, ignore the group's Ctrl-C, SIGTERM and SIGHUP: the main process shuts the workers down cleanly."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(images, labels, batch_size, train, loader="fast", device="cpu", **options):
    """A loader over (images uint8 (N, 28, 28), labels), augmented when `train`: a FastMNISTLoader on `device`, or
    ("classic") a DataLoader with the original's PIL transforms. `options`: shuffle (default `train`), drop_last, seed,
    augment (default "classic"), limit (fast: images an epoch), shard=(rank, world_size) for process `rank`'s share
    of each global batch (classic: batch_size // world_size images, the caller checks it divides); the classic loader
    takes any DataLoader option."""
    shuffle, drop_last, seed = options.pop("shuffle", train), options.pop("drop_last", False), options.pop("seed", None)
    augment, (rank, world_size) = options.pop("augment", "classic"), options.pop("shard", (0, 1))
    if loader == "fast":
        return FastMNISTLoader(images, labels, batch_size, shuffle, train and augment, device, seed, drop_last, rank,
                               world_size, options.pop("limit", None))
    if options.pop("limit", None):
        raise ValueError("limit: the classic loader trains on whole epochs; use loader='fast'")
    if train and augment not in ("classic", True):
        raise ValueError(f"augment={augment!r}: the classic loader has the original's augmentation only (augment="
                         "'classic'); use loader='fast' for the others, or train=False for none")
    dataset = MNISTImages(images, labels, get_train_transforms() if train else get_test_transforms())
    sampler = (DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed or 0, drop_last=drop_last)
               if world_size > 1 else None)
    workers, pin = options.pop("num_workers", 0), options.pop("pin_memory", False) and pins_memory(device)
    return DataLoader(dataset, batch_size // world_size, shuffle and sampler is None, sampler, num_workers=workers,
                      pin_memory=pin, drop_last=drop_last, worker_init_fn=_leave_signals_to_the_main_process,
                      **{"persistent_workers": workers > 0, **options})


def make_loaders(config, device, ctx):
    """The train, validation (None without a split) and test loaders of `config` on `device`, sharded for `ctx`."""
    common = {"loader": config.loader, "device": device, "num_workers": config.workers, "pin_memory": True,
              "shard": (ctx.rank, ctx.world_size)}
    (images, labels), held_out = split_images(*load_split(True, config.data_dir), config.val_split, config.seed)
    eval_batch = -(-TEST_BATCH // ctx.world_size) * ctx.world_size
    # In this order: the evaluation loaders, unseeded, draw their seeds from the global RNG.
    return (make_loader(images[:config.train_subset], labels[:config.train_subset], config.recipe.batch_size, True,
                        seed=config.seed, augment=config.recipe.augment, limit=config.recipe.epoch_images, **common),
            make_loader(*held_out, eval_batch, False, **common) if config.val_split else None,
            make_loader(*load_split(False, config.data_dir), eval_batch, False, **common))


def split_images(images, labels, held_out, seed):
    """(kept, held out): `held_out` images drawn by `seed` (the same for every run with it), both in their order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    keep, hold = order[held_out:].sort().values, order[:held_out].sort().values
    return (images[keep], labels[keep]), (images[hold], labels[hold])
