import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from s5.data import (
    MEAN,
    STD,
    Affine,
    FastMNISTLoader,
    affine_batch,
    augment_batch,
    get_mnist_dataset,
    get_test_transforms,
    get_train_transforms,
    sample_augmentation,
)
from utils import get_MNISTdataset_with_loader


@pytest.fixture(scope="module")
def real_train(mnist_root):
    ds = get_mnist_dataset(True, mnist_root)
    return ds.data[:1000], ds.targets[:1000]


def make(images, labels, **kw):
    return FastMNISTLoader(images, labels, device="cpu", **{"batch_size": 128, "seed": 3, **kw})


@pytest.mark.slow
def test_shapes_dtypes_and_len(real_train):
    loader = make(*real_train, shuffle=True, augment=True)
    batches = list(loader)
    assert len(loader) == len(batches) == math.ceil(1000 / 128)
    x, y = batches[0]
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert batches[-1][0].shape[0] == 1000 - 7 * 128
    assert loader.batch_size == 128 and len(loader.dataset) == 1000
    assert len(make(*real_train, drop_last=True)) == 7


@pytest.mark.slow
def test_normalisation_matches_torchvision_transforms(mnist_root):
    ds = get_mnist_dataset(False, mnist_root, transform=get_test_transforms())
    loader = get_MNISTdataset_with_loader("test", {"batch_size": 10}, data_dir=mnist_root, device="cpu")
    x, y = next(iter(loader))
    for i in range(10):
        ref_x, ref_y = ds[i]
        torch.testing.assert_close(x[i], ref_x)
        assert y[i].item() == ref_y
    assert len(loader.dataset) == 10_000


@pytest.mark.slow
def test_every_sample_once_per_epoch_with_labels_aligned(real_train):
    images, labels = real_train
    loader = make(images, labels, shuffle=True)
    key = {bytes(img.numpy()): int(lbl) for img, lbl in zip(images, labels)}
    seen = []
    for x, y in loader:
        raw = ((x * STD + MEAN) * 255).round().to(torch.uint8).squeeze(1)
        for img, lbl in zip(raw, y):
            assert key[bytes(img.numpy())] == int(lbl)  # the label travelled with its image
            seen.append(bytes(img.numpy()))
    assert len(seen) == 1000 and len(set(seen)) == len(set(key))


def test_an_epoch_of_fewer_images_draws_them_anew_each_epoch(real_train):
    """epoch_images (a run that ends mid-epoch): each epoch is the first N images of its own shuffled order."""
    loader = make(*real_train, shuffle=True, limit=300)
    first, second = (torch.cat([y for _, y in loader]) for _ in range(2))
    assert len(loader) == 3 and len(first) == len(second) == 300  # 128 + 128 + 44
    whole = make(*real_train, shuffle=True)
    assert torch.equal(first, torch.cat([y for _, y in whole])[:300])  # the same order, cut short
    assert not torch.equal(first.sort().values, second.sort().values)  # other images the next epoch
    assert len(make(*real_train, shuffle=True, limit=5000)) == len(whole)  # more than there are: all of them


@pytest.mark.slow
def test_shuffle_order_changes_between_epochs_and_not_without_shuffle(real_train):
    loader = make(*real_train, shuffle=True)
    first, second = (torch.cat([y for _, y in loader]) for _ in range(2))
    assert not torch.equal(first, second) and torch.equal(first.sort().values, second.sort().values)
    plain = make(*real_train)
    assert torch.equal(torch.cat([y for _, y in plain]), real_train[1])


@pytest.mark.slow
def test_same_seed_same_batches_and_set_epoch_replays(real_train):
    a, b = make(*real_train, shuffle=True, augment=True), make(*real_train, shuffle=True, augment=True)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch1 = [x for x, _ in a]
    a.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(epoch1, (x for x, _ in a)))
    other = make(*real_train, shuffle=True, augment=True, seed=4)
    assert not torch.equal(next(iter(other))[1], next(iter(make(*real_train, shuffle=True)))[1])


def orientation_degrees(images):
    """Principal-axis angle of each image's ink, from second moments (0 = vertical)."""
    n = images.shape[0]
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    w = images.reshape(n, 28, 28).clamp(min=0)
    total = w.sum((1, 2))
    my, mx = (w * ys).sum((1, 2)) / total, (w * xs).sum((1, 2)) / total
    dy, dx = ys - my.view(n, 1, 1), xs - mx.view(n, 1, 1)
    cyy, cxx, cxy = (w * dy * dy).sum((1, 2)), (w * dx * dx).sum((1, 2)), (w * dx * dy).sum((1, 2))
    return torch.rad2deg(0.5 * torch.atan2(2 * cxy, cyy - cxx))


def test_augmentation_varies_and_stays_within_15_degrees():
    bar = torch.zeros(512, 1, 28, 28)
    bar[:, :, 4:24, 13:15] = 1.0  # a vertical stroke
    gen = torch.Generator().manual_seed(0)
    angles, cropped = sample_augmentation(512, gen, "cpu")
    assert angles.abs().max() <= 15 and angles.std() > 5
    assert 0.05 < cropped.float().mean() < 0.16
    out = augment_batch(bar, angles, cropped)
    measured = orientation_degrees(out)
    assert measured.abs().max() < 16.5  # within ±15° (plus pixelation error)
    assert measured.std() > 5  # and it really rotates
    error = (measured.abs() - angles.abs()).abs()
    assert error.mean() < 1.0 and error.max() < 4.0  # nearest-neighbour pixelates a 2-pixel stroke
    zoomed = out[cropped].sum((1, 2, 3)).mean() / out[~cropped].sum((1, 2, 3)).mean()
    assert zoomed.item() == pytest.approx((28 / 22) ** 2, rel=0.1)  # crop-22-and-resize enlarges the ink


@pytest.mark.slow
def test_augmentation_gives_the_classic_pipelines_pixels(real_train):
    """Same angle and crop draw -> the same image as the PIL transforms of get_train_transforms()."""
    random_crop, resize, rotation = get_train_transforms().transforms[:3]
    images = real_train[0][:64]
    gen = torch.Generator().manual_seed(1)
    angles, cropped = sample_augmentation(64, gen, "cpu", crop_p=0.5)
    expected = []
    for img, angle, crop in zip(images, angles.tolist(), cropped.tolist()):
        pil = Image.fromarray(img.numpy())
        pil = resize(random_crop.transforms[0](pil) if crop else pil)
        pil = TF.rotate(pil, angle, interpolation=rotation.interpolation, fill=rotation.fill)
        expected.append(torch.from_numpy(np.array(pil)).float())
    out = augment_batch(images.unsqueeze(1).float() / 255, angles, cropped)[:, 0] * 255
    assert 10 < cropped.sum() < 54
    off = (out - torch.stack(expected)).abs() > 1.0 + 1e-3  # PIL rounds its bilinear resize to whole levels
    # A pixel centre that lands exactly between two source pixels may round the other way in float32.
    assert off.float().mean() < 1e-4


@pytest.mark.slow
def test_identity_warp_leaves_images_unchanged(real_train):
    x = real_train[0][:8].unsqueeze(1).float() / 255
    out = augment_batch(x, torch.zeros(8), torch.zeros(8, dtype=torch.bool))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_augmented_batches_differ_from_plain_ones(real_train):
    plain = next(iter(make(*real_train)))[0]
    augmented = next(iter(make(*real_train, augment=True)))[0]
    assert (plain - augmented).abs().mean() > 0.05


def centre_of_mass(images):
    """(x, y) centre of each (B, 1, H, W) image's ink, in pixels."""
    h, w = images.shape[-2:]
    mass = images.sum((1, 2, 3))
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    return torch.stack([(images.sum((1, 2)) * xs).sum(1) / mass, (images.sum((1, 3)) * ys).sum(1) / mass], 1)


@pytest.mark.slow
def test_affine_without_ranges_is_the_identity(real_train):
    x = real_train[0][:8].unsqueeze(1).float() / 255
    draws = Affine(degrees=0, scale=0, shear=0, shift=0).sample(8, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(affine_batch(x, *draws), x, atol=1e-5, rtol=0)


def test_affine_shifts_scales_and_rotates_within_its_ranges():
    blob = torch.zeros(512, 1, 28, 28)
    blob[:, :, 10:18, 12:16] = 1.0  # an upright bar in the middle
    gen = torch.Generator().manual_seed(0)
    moved = affine_batch(blob, *Affine(degrees=0, scale=0, shear=0, shift=2.0).sample(512, gen, "cpu"))
    offset = centre_of_mass(moved) - centre_of_mass(blob)
    assert offset.abs().max() <= 2.05 and offset.std(0).min() > 0.8  # up to 2 pixels, in both directions
    zoomed = affine_batch(blob, *Affine(degrees=0, scale=0.1, shear=0, shift=0).sample(512, gen, "cpu"))
    area = zoomed.sum((1, 2, 3)) / blob.sum((1, 2, 3))
    assert 0.9**2 - 0.02 < area.min() and area.max() < 1.1**2 + 0.02 and area.std() > 0.05
    turned = affine_batch(blob, *Affine(degrees=10, scale=0, shear=0, shift=0).sample(512, gen, "cpu"))
    angles = orientation_degrees(turned)
    assert angles.abs().max() < 11 and angles.std() > 4


@pytest.mark.slow
def test_elastic_distortion_is_smooth_and_local(real_train):
    x = real_train[0][:64].unsqueeze(1).float() / 255
    gen = torch.Generator().manual_seed(0)
    theta, field = Affine(degrees=0, scale=0, shear=0, shift=0, elastic=34.0, sigma=4.0).sample(64, gen, "cpu")
    pixels = field * 14  # normalised coordinates -> pixels
    assert field.shape == (64, 28, 28, 2) and 0.5 < pixels.abs().max() < 34  # alpha bounds it; smoothing shrinks it
    # smooth: neighbouring pixels move alike (about 0.17x the mean displacement apart for sigma 4; raw noise, ~1.3x)
    step = max((pixels[:, 1:] - pixels[:, :-1]).abs().mean(), (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean())
    assert step < 0.3 * pixels.abs().mean()
    warped = affine_batch(x, theta, field)
    changed = (warped - x).abs().mean((1, 2, 3))
    assert changed.min() > 0.01  # every image is distorted
    assert warped.sum() / x.sum() == pytest.approx(1.0, abs=0.1)  # ink moves, it is not created or lost
    assert centre_of_mass(warped).sub(centre_of_mass(x)).abs().max() < 3  # a local warp, not a shift


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["affine", "elastic"])
def test_each_augmentation_is_reproducible_by_seed_and_epoch(real_train, augment):
    a, b = make(*real_train, shuffle=True, augment=augment), make(*real_train, shuffle=True, augment=augment)
    first = next(iter(a))[0]
    assert torch.equal(first, next(iter(b))[0])  # same seed, same epoch: the same batch
    assert not torch.equal(first, next(iter(a))[0])  # the next epoch draws anew
    assert (first - next(iter(make(*real_train, shuffle=True)))[0]).abs().mean() > 0.05  # it does augment


@pytest.mark.slow
def test_an_unknown_augmentation_is_refused(real_train):
    with pytest.raises(ValueError, match="augment='rotate'.*classic, affine, elastic"):
        make(*real_train, augment="rotate")


def test_the_classic_loader_refuses_an_epoch_of_fewer_images(real_train):
    from s5.data import make_loader
    with pytest.raises(ValueError, match="limit: the classic loader trains on whole epochs"):
        make_loader(*real_train, 64, True, loader="classic", limit=300)
