"""Transforms and loaders: the original per-image PIL pipeline, and the fast loader that augments whole batches.

Both loaders read the same verified tensors (`s5.mnist.load_split`): the classic one hands them to the original
per-image PIL transforms through a `DataLoader`, the fast one keeps them on the training device and augments
whole batches there. `make_loader` builds either from tensors.
"""

import functools
import math
import signal

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision import transforms

from s5.device import pins_memory
from s5.mnist import MNIST_MD5, load_split

MEAN, STD = 0.1307, 0.3081  # of the 60,000 training images' pixels, as the original normalised them


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


def _uniform(n, half_width, generator, device):
    """n draws, uniform in [-half_width, half_width]."""
    return (torch.rand(n, generator=generator, device=device) * 2 - 1) * half_width


def sample_augmentation(n, generator, device, max_degrees=15.0, crop_p=0.1):
    """Random draws of the train augmentation for n images: angles in degrees, and which are cropped."""
    angles = _uniform(n, max_degrees, generator, device)
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


def sample_affine(n, generator, device, degrees=10.0, scale=0.1, shear=10.0, shift=2.0, elastic=0.0, sigma=4.0,
                  size=28):
    """Random draws of the `affine` augmentation for n images, as `affine_batch` takes them.

    Each image's 2x3 sampling matrix (affine_grid's: the input point each output pixel reads, in normalised
    coordinates): the digit shifted by up to `shift` pixels each way, then rotated by up to `degrees`, sheared
    along x by up to `shear` degrees and scaled by 1 ± `scale`, about the centre. With `elastic` > 0 also an
    elastic distortion (Simard et al. 2003, their alpha and sigma): uniform noise in [-1, 1] for each pixel and
    direction, smoothed by a Gaussian of `sigma` pixels and scaled to `elastic` pixels, as an (n, size, size, 2)
    displacement of the sampling grid. Everything random is drawn here, for the whole batch, so a process's share
    of it is exactly its part of the single-process batch.
    """
    def uniform(half_width):
        return _uniform(n, half_width, generator, device)

    rad, shear_rad = torch.deg2rad(uniform(degrees)), torch.deg2rad(uniform(shear))
    zoom = 1 + uniform(scale)
    cos, sin, tan = torch.cos(rad), torch.sin(rad), torch.tan(shear_rad)
    # output pixel p reads input point (rotation @ shear / zoom) p + t: the image shifted by -t, then warped
    theta = torch.stack([torch.stack([cos, cos * tan - sin, uniform(shift) * 2 / size], 1),
                         torch.stack([sin, sin * tan + cos, uniform(shift) * 2 / size], 1)], 1) / zoom.view(-1, 1, 1)
    theta[:, :, 2] *= zoom.view(-1, 1)  # the division above is the scale of the warp, not of the shift
    if not elastic:
        return (theta,)
    noise = torch.rand(n * 2, 1, size, size, generator=generator, device=device) * 2 - 1
    k = _gaussian_kernel(sigma, device)
    field = F.conv2d(F.conv2d(noise, k.view(1, 1, 1, -1), padding=(0, len(k) // 2)), k.view(1, 1, -1, 1),
                     padding=(len(k) // 2, 0))
    return theta, field.view(n, 2, size, size).permute(0, 2, 3, 1) * (elastic * 2 / size)  # pixels -> normalised


def _gaussian_kernel(sigma, device):
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-x.square() / (2 * sigma * sigma))
    return kernel / kernel.sum()


def affine_batch(images, theta, field=None):
    """A batch of (B, 1, H, W) images (0 = background) warped by `sample_affine`'s draws in one bilinear
    grid_sample: the affine map, displaced by the elastic `field` where one is given."""
    grid = F.affine_grid(theta.float(), list(images.shape), align_corners=False)
    if field is not None:
        grid = grid + field
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# The elastic distortion's alpha and sigma, in pixels. Simard et al. 2003 used alpha 34 on 29x29 digits: here that
# ended 0.4 points behind affine alone on validation after 15 epochs, alpha 12 level with it after 20
# (docs/recipes.md#one-epoch-and-best).
ELASTIC_ALPHA, ELASTIC_SIGMA = 12.0, 4.0
# The fast loader's augmentations by name (a recipe's `augment`): (draw the random parameters for n images, apply
# them to a batch). "classic" is the original's; "affine" shifts, rotates, shears and scales; "elastic" adds
# Simard's distortion.
AUGMENTATIONS = {
    "classic": (sample_augmentation, augment_batch),
    "affine": (sample_affine, affine_batch),
    "elastic": (functools.partial(sample_affine, elastic=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA), affine_batch),
}


def positive_int(value, name):
    """`value` if it is a whole number of at least 1 (not a bool), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: give a positive whole number")
    return value



class FastMNISTLoader:
    """MNIST held once as uint8 tensors on the training device; batches are made there.

    A drop-in for a DataLoader in `train`, `test` and `post_display`: iterate for normalised
    `(images, labels)` batches of shape (B, 1, 28, 28) float32 and (B,) int64; `len()` is the
    number of batches. Augmentation (train split) is `augment` of AUGMENTATIONS: "classic" (or True) is
    `augment_batch`, the original's augmentation done once per batch instead of with PIL once per image.

    Epoch e is shuffled and augmented from seed + e, so a run is reproducible and a resumed run
    sees the same batches (`set_epoch`, as with DistributedSampler; iterating also advances it).

    Sharded (`rank` of `world_size` processes): every process draws the same permutation and the same
    augmentation for the whole global batch of `batch_size`, and keeps its contiguous share of it, so the
    processes' batches at a step together are exactly the single-process batch, whatever the number of
    processes. `len()` is the number of global batches, the same on every process.
    """

    def __init__(self, images, labels, batch_size=512, shuffle=False, augment=False, device="cpu",
                 seed=None, drop_last=False, rank=0, world_size=1):
        self.device = torch.device(device)  # where the caller trains: never chosen here
        self.images = images.to(self.device)  # uint8: 47 MB for the training split
        self.labels = labels.to(self.device, torch.int64)
        self.dataset = TensorDataset(self.images, self.labels)
        self.batch_size = positive_int(batch_size, "batch_size")
        if augment is True:
            augment = "classic"
        if augment and augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}: use one of {', '.join(AUGMENTATIONS)}, or False")
        self.shuffle, self.augment, self.drop_last = shuffle, augment or None, drop_last
        self._draw, self._apply = AUGMENTATIONS[augment] if augment else (None, None)
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
            draws = self._draw(len(idx), gen, self.device) if self.augment else None
            if self.world_size > 1:
                share = self._share(len(idx))
                idx = idx[share]
                if draws is not None:
                    draws = tuple(d[share] for d in draws)
            x = self.images[idx].unsqueeze(1).float().div_(255)
            if self.augment and len(idx):  # a process's share of a last, tiny batch can be empty
                x = self._apply(x, *draws)
            yield x.sub_(MEAN).div_(STD), self.labels[idx]

    def _share(self, n):
        """This rank's contiguous part of a global batch of n (sizes differ by at most one, as tensor_split)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def _leave_signals_to_the_main_process(worker_id):
    """In a DataLoader worker: ignore Ctrl-C, SIGTERM and SIGHUP sent to the whole process group (a terminal, a
    job scheduler); the main process stops cleanly and shuts its workers down, instead of each dying loudly."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(images, labels, *, batch_size, train, loader="fast", device="cpu", seed=None, workers=0,
                pin_memory=False, drop_last=False, shuffle=None, shard=(0, 1), augment="classic",
                **dataloader_options):
    """A loader over (images uint8 (N, 28, 28), labels): augmented when `train`, shuffled when `shuffle` (default:
    when `train`).

    loader="fast": a FastMNISTLoader on `device`, augmenting whole batches there. loader="classic": the original
    torchvision-style DataLoader, per-image PIL transforms in `workers` processes; `pin_memory` is honoured
    only where it helps, a copy to a CUDA device. `shard=(rank, world_size)` gives process `rank` its share
    of every global batch of `batch_size` (the classic loader through a DistributedSampler, batch_size //
    world_size images a process: the caller checks that it divides). Other `dataloader_options` (prefetch_factor,
    persistent_workers, ...) go to the classic DataLoader.
    """
    device = torch.device(device)
    rank, world_size = shard
    shuffle = train if shuffle is None else shuffle
    if loader == "fast":
        return FastMNISTLoader(images, labels, batch_size, shuffle=shuffle, augment=train and augment, device=device,
                               seed=seed, drop_last=drop_last, rank=rank, world_size=world_size)
    if train and augment not in ("classic", True):
        raise ValueError(f"augment={augment!r}: the classic loader has the original's augmentation only (augment="
                         "'classic'); use loader='fast' for the others, or train=False for none")
    dataset = MNISTImages(images, labels, get_train_transforms() if train else get_test_transforms())
    options = {"batch_size": batch_size, "num_workers": workers, "drop_last": drop_last,
               "pin_memory": pin_memory and pins_memory(device),  # pinned pages only speed copies to a GPU
               "persistent_workers": workers > 0,  # start the workers once, not every epoch
               "worker_init_fn": _leave_signals_to_the_main_process if workers > 0 else None, **dataloader_options}
    if world_size > 1:
        options["sampler"] = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed or 0,
                                                drop_last=drop_last)
        options["batch_size"] = batch_size // world_size
    else:
        options["shuffle"] = shuffle
    return DataLoader(dataset, **options)


TEST_BATCH = 256  # evaluation batch (rounded up to a multiple of the number of processes)


def make_loaders(config, device, ctx):
    """The training, validation (None without a split) and test loaders of the configuration, on `device`,
    sharded for `ctx`'s processes."""
    common = {"loader": config.loader, "device": device, "workers": config.workers, "pin_memory": True,
              "shard": (ctx.rank, ctx.world_size)}
    images, labels = load_split(True, config.data_dir)
    held_out = None
    if config.val_split:
        (images, labels), held_out = split_images(images, labels, config.val_split, config.seed)
    if config.train_subset is not None:
        images, labels = images[:config.train_subset], labels[:config.train_subset]
    train_loader = make_loader(images, labels, batch_size=config.recipe.batch_size, train=True, seed=config.seed,
                               augment=config.recipe.augment, **common)
    eval_batch = -(-TEST_BATCH // ctx.world_size) * ctx.world_size
    val_loader = make_loader(*held_out, batch_size=eval_batch, train=False, **common) if held_out else None
    test_loader = make_loader(*load_split(False, config.data_dir), batch_size=eval_batch, train=False, **common)
    return train_loader, val_loader, test_loader


def split_images(images, labels, held_out, seed):
    """(kept, held out): `held_out` training images drawn by `seed` (the same ones for every run with that seed),
    both in their original order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    keep, hold = order[held_out:].sort().values, order[:held_out].sort().values
    return (images[keep], labels[keep]), (images[hold], labels[hold])
