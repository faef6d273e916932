"""Checkpoints: the weights, optimizer, scheduler, RNG states, history, run id and configuration that resume a run
exactly, written atomically. Loading uses `weights_only=True`, so a file carrying pickled code is refused, not run;
every way a file can be wrong is a one-line CheckpointError, found before anything is written."""

import io
import math
import random
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

from s5.config import ConfigError, Field, RunConfig
from s5.errors import UserError
from s5.files import atomic_write
from s5.loop import STEP_COLUMNS, new_history

CHECKPOINT_FORMAT = "s5-checkpoint-2"  # 2: the whole configuration and the run id; 1 (weights only now): the flags
UNREADABLE = ("{} is not a readable checkpoint (truncated, corrupted or another kind of file): use an intact "
              "last.pt/best.pt, or train again")
# torch.load inflates every archive entry to the size the archive declares before anything can be checked, so a small
# crafted file could ask for gigabytes: these caps, checked first, are over ten times a Net last.pt (about 5 MB).
MAX_ARCHIVE_BYTES = 64 * 2**20
MAX_ARCHIVE_ENTRIES = 1000


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unsafe, damaged or for another model; the message says which."""


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # in memory first: a full disk then fails with the OS's own errno
    return buffer.getvalue()


def checkpoint_bytes(run, epoch):
    """A run's checkpoint after `epoch`, as bytes; numpy's RNG key array as a tensor, a type weights_only accepts."""
    np_state = np.random.get_state()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return _torch_bytes({"format": CHECKPOINT_FORMAT, "arch": type(run.model).__name__,
                         "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                         "scheduler": run.scheduler.state_dict(), "epoch": int(epoch), "history": run.history,
                         "rng": rng, "config": run.config.to_dict(), "run_id": run.run_dir.run_id})


def restamped(state, run):
    """A checkpoint's state as bytes for `run`'s folder: its run id and configuration (where it runs) are `run`'s."""
    return _torch_bytes({**state, "run_id": run.run_dir.run_id, "config": run.config.to_dict()})


def weights_bytes(model):
    """The weights of the plain model inside DataParallel/DDP (`module`) and torch.compile (`_orig_mod`), as bytes."""
    while isinstance(inner := getattr(model, "module", getattr(model, "_orig_mod", None)), torch.nn.Module):
        model = inner
    return _torch_bytes(model.state_dict())


def save_weights(path, model):
    """The model's weights alone, written atomically: a run's model.pt, for predict.py, export.py and the demo."""
    data = weights_bytes(model)
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path, model=None, map_location="cpu"):
    """A run's checkpoint (or a bare state_dict) as a dict, loaded safely, optionally into `model`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the path of a .pt file a training run wrote")
    check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for the same kinds of damage
        if "unsupported global" in str(e).lower():  # a pickled class or function: it could be arbitrary code
            raise CheckpointError(f"refusing to load {path}: it holds pickled Python objects that could run code; "
                                  "only use checkpoints of this repo's runs from a source you trust") from None
        raise CheckpointError(UNREADABLE.format(path)) from None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"model": state}  # a bare model.state_dict(), e.g. model.pt
    elif not (isinstance(state, dict) and str(state.get("format")).startswith("s5-checkpoint-")):
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this repo: give last.pt, best.pt "
                              "or model.pt from a training run")
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
        raise CheckpointError(f"{path} is damaged: it has no model weights; use another checkpoint of the run")
    for prefix in ("module.", "_orig_mod."):  # saved by other code from a wrapped model: the plain names
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    state["model"] = weights
    if model is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise CheckpointError(f"{path} holds weights for a different architecture than {type(model).__name__} "
                                  f"(saved: {state.get('arch', 'unknown')}): use a checkpoint trained with this "
                                  "repo's model.py") from None
        if bad := [name for name, p in model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]:
            raise CheckpointError(f"{path} holds NaN or infinite weights ({bad[0]}, ...): the run it came "
                                  "from diverged; use an earlier checkpoint or train again")
    return state


Resumable = namedtuple("Resumable", "path state config history epoch run_id")  # a checkpoint checked for a resume


def read_resumable(path, model):
    """Load `path` into `model` and check every field a resume uses, before anything is claimed or written."""
    state = load_checkpoint(path, model)
    if state.get("config") is None:
        raise CheckpointError(f"{path} holds weights only, not a run to resume: give the run's last.pt")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by an earlier version of this repo: its weights still predict "
                              "and export, but resuming needs a last.pt from this version")
    if missing := [k for k in ("model", "optimizer", "scheduler", "epoch", "history", "rng") if state.get(k) is None]:
        raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)}; give the run's last.pt")
    try:
        config = RunConfig.from_dict(state["config"])
        epoch = Field(int, 0, config.epochs).check("epoch", state["epoch"])
        history, columns = state["history"], new_history(config.evaluated_on)
        if not isinstance(history, dict) or set(history) != set(columns):
            raise ConfigError("history", "not the columns of metrics.csv and steps.csv")
        number, whole = Field(float, -math.inf), Field(int, 1)
        for key, values in history.items():
            for value in Field(list).check(key, values):
                (whole if key == "epoch" else number).check(key, value)
        if history["epoch"] != list(range(1, epoch + 1)) or \
                len({len(history[k]) for k in set(columns) - set(STEP_COLUMNS)}) != 1 or \
                len({len(history[k]) for k in STEP_COLUMNS}) != 1:
            raise ConfigError("history", f"its rows do not match its {epoch} epochs done")
        run_id = Field(str).check("run_id", state.get("run_id"))
    except ConfigError as e:
        raise CheckpointError(f"{path} holds an impossible {e}: it is damaged or not a run of this repo; use "
                              "another checkpoint") from None
    if not run_id.isalnum() or not _rng_state_ok(state["rng"]):
        raise CheckpointError(f"{path} holds a damaged {'run id' if not run_id.isalnum() else 'random-number state'}"
                              ": use another checkpoint")
    return Resumable(Path(path), state, config, history, epoch, run_id)


def _rng_state_ok(state):
    try:
        random.Random().setstate(state["python"])
        name, keys, *rest = state["numpy"]
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), *rest))
        torch.Generator().set_state(state["torch"])
        return isinstance(state["cuda"], (list, tuple))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        return False


def check_archive(path):
    """CheckpointError unless `path`'s size and zip directory (torch.save's format) fit a checkpoint of Net."""
    size = Path(path).stat().st_size
    if size > MAX_ARCHIVE_BYTES:  # also bounds the directory zipfile parses below
        raise CheckpointError(f"refusing to load {path}: {size:,} bytes is larger than a checkpoint of this repo can "
                              f"be ({MAX_ARCHIVE_BYTES:,} bytes at most); only use checkpoints of this repo's runs")
    if not zipfile.is_zipfile(path):
        return  # torch's pre-1.6 format, a bare pickle or junk: torch.load refuses what is unsafe or damaged
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise CheckpointError(UNREADABLE.format(path)) from None
    declared = sum(entry.file_size for entry in entries)
    if len(entries) > MAX_ARCHIVE_ENTRIES or declared > MAX_ARCHIVE_BYTES:
        raise CheckpointError(f"refusing to load {path}: it declares {len(entries):,} entries and {declared:,} bytes "
                              f"uncompressed, more than a checkpoint of this repo's Net holds (at most "
                              f"{MAX_ARCHIVE_ENTRIES:,} entries, {MAX_ARCHIVE_BYTES:,} bytes); only use checkpoints "
                              "of this repo's runs")
