"""Checkpoints: everything needed to resume a run exactly, written atomically, loaded without running code.

Loading uses `weights_only=True`, so a file carrying pickled code is refused, not run; every way a file can be
wrong (missing, truncated, another kind of file, another architecture, keys missing) is a one-line
CheckpointError.
"""

import io
import random
from pathlib import Path

import numpy as np
import torch

from s5.files import atomic_write

CHECKPOINT_FORMAT = "s5-checkpoint-1"
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng", "args")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unsafe, damaged or for another model; the message says which."""


def rng_state():
    """RNG states of python, numpy, torch and CUDA, in types that weights_only loading accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrapped(model):
    return getattr(model, "module", model)  # DataParallel/DDP wrappers: save the plain model's names


def save_checkpoint(path, model, optimizer=None, scheduler=None, epoch=0, history=None, args=None):
    """Everything needed to resume a run exactly, written atomically."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "arch": type(_unwrapped(model)).__name__,
        "model": _unwrapped(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "history": history,
        "rng": rng_state(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in (args or {}).items()},
    }
    _save(path, state)


def save_weights(path, model):
    """The model's weights alone (a state_dict, as model.pt), written atomically."""
    _save(path, _unwrapped(model).state_dict())


def _save(path, obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialised in memory first: a full disk then fails with the OS's own errno
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path, model=None, map_location="cpu"):
    """Load a train.py checkpoint (or a bare state_dict) safely; optionally into `model`.

    Uses weights_only loading, so a file carrying pickled code is refused, not run. Every failure
    is a CheckpointError with a one-line message saying what is wrong and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the path of a .pt file written by train.py")
    check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for the same kinds of damage
        if "unsupported global" in str(e).lower():  # a pickled class or function: it could be arbitrary code
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects that could run code, not just "
                "weights; only use checkpoints written by train.py from a source you trust") from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupted or another kind of file): "
            "use an intact last.pt/best.pt, or train again") from None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        weights = state.get("model")
    elif isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights, state = state, {"model": state}  # a bare model.state_dict(), e.g. model.pt
    else:
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this repo: give last.pt, best.pt "
                              "or model.pt from a train.py run")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} is damaged: it has no model weights; use another checkpoint of the run")
    if model is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise CheckpointError(
                f"{path} holds weights for a different architecture than {type(model).__name__} "
                f"(saved: {state.get('arch', 'unknown')}): use a checkpoint trained with this repo's model.py"
            ) from None
        bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
        if bad:
            raise CheckpointError(f"{path} holds NaN or infinite weights ({bad[0]}, ...): the run it came "
                                  "from diverged; use an earlier checkpoint or train again")
    return state


def check_resumable(state, path):
    """CheckpointError unless `state` (from load_checkpoint) holds all a resume needs."""
    if not state.get("args"):
        raise CheckpointError(f"{path} holds weights only, not a run to resume: give the run's last.pt")
    missing = [k for k in RESUME_KEYS if state.get(k) is None]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)}; give the run's last.pt")


# A train.py last.pt of Net is about 5 MB: 593,200 fp32 weights, as many SGD momentum values, the history (a row
# every 10 batches: 0.2 MB for 100 epochs at batch size 128) and the RNG states. torch.load inflates every archive
# entry to the size the archive declares before anything can be checked, so a small crafted file could ask for
# gigabytes. The caps are over ten times a real checkpoint.
MAX_ARCHIVE_BYTES = 64 * 2**20
MAX_ARCHIVE_ENTRIES = 1000


def check_archive(path):
    """CheckpointError unless `path` is a zip archive (torch.save's format) whose entries, uncompressed, could
    be a checkpoint of Net; read from the archive's directory, before anything is inflated."""
    import zipfile  # here, not at the top: this function is the file's only user

    if Path(path).stat().st_size > MAX_ARCHIVE_BYTES:  # also bounds the directory zipfile parses below
        raise CheckpointError(f"refusing to load {path}: at {Path(path).stat().st_size:,} bytes it is larger than a "
                              f"checkpoint of this repo's Net can be ({MAX_ARCHIVE_BYTES:,} bytes at most); only "
                              "use checkpoints written by train.py")
    if not zipfile.is_zipfile(path):
        return  # torch's pre-1.6 format, a bare pickle or junk: torch.load refuses what is unsafe or damaged
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupted or another kind of file): "
            "use an intact last.pt/best.pt, or train again") from None
    declared = sum(entry.file_size for entry in entries)
    if len(entries) > MAX_ARCHIVE_ENTRIES or declared > MAX_ARCHIVE_BYTES:
        raise CheckpointError(
            f"refusing to load {path}: it declares {len(entries):,} entries and {declared:,} bytes uncompressed, "
            f"more than a checkpoint of this repo's Net holds (at most {MAX_ARCHIVE_ENTRIES:,} entries, "
            f"{MAX_ARCHIVE_BYTES:,} bytes); only use checkpoints written by train.py")
