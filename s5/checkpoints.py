"""Checkpoints: everything needed to resume a run exactly, written atomically, loaded without running code.

A run's checkpoint holds the weights, optimizer, scheduler, RNG states, the history, the run's id and its whole
resolved configuration (`s5.config.RunConfig`). Loading uses `weights_only=True`, so a file carrying pickled code
is refused, not run; every way a file can be wrong (missing, truncated, another kind of file, another
architecture, keys missing, values of the wrong type or range) is a one-line CheckpointError, found before
anything is written.
"""

import io
import math
import random
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from s5.config import ConfigError, Field, RunConfig
from s5.errors import UserError
from s5.files import atomic_write
from s5.loop import STEP_COLUMNS, new_history

CHECKPOINT_FORMAT = "s5-checkpoint-2"  # 2: the whole configuration and the run id; 1 (weights only now): the flags
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrap the names of the weights


class CheckpointError(UserError, ValueError):
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
    """The plain model inside DataParallel/DDP (`module`) and torch.compile (`_orig_mod`) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) or \
            isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def checkpoint_bytes(run, epoch):
    """A run's checkpoint after `epoch`, as bytes: everything needed to resume it exactly."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "arch": type(run.model).__name__,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": int(epoch),
        "history": run.history,
        "rng": rng_state(),
        "config": run.config.to_dict(),
        "run_id": run.run_dir.run_id,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialised in memory first: a full disk then fails with the OS's own errno
    return buffer.getvalue()


def weights_bytes(model):
    buffer = io.BytesIO()
    torch.save(_unwrapped(model).state_dict(), buffer)
    return buffer.getvalue()


def save_weights(path, model):
    """The model's weights alone (a state_dict, as a run's model.pt), written atomically: for predict.py, export.py
    and the demo. Not a run to resume: train.py --resume needs a run's last.pt."""
    data = weights_bytes(model)
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(path, model=None, map_location="cpu"):
    """Load a run's checkpoint (or a bare state_dict) safely; optionally into `model`.

    Uses weights_only loading, so a file carrying pickled code is refused, not run. Every failure
    is a CheckpointError with a one-line message saying what is wrong and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the path of a .pt file a training run wrote")
    check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for the same kinds of damage
        if "unsupported global" in str(e).lower():  # a pickled class or function: it could be arbitrary code
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects that could run code, not just "
                "weights; only use checkpoints of this repo's runs from a source you trust") from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupted or another kind of file): "
            "use an intact last.pt/best.pt, or train again") from None
    if isinstance(state, dict) and str(state.get("format")).startswith("s5-checkpoint-"):
        weights = state.get("model")
    elif isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights, state = state, {"model": state}  # a bare model.state_dict(), e.g. model.pt
    else:
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this repo: give last.pt, best.pt "
                              "or model.pt from a training run")
    if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
        raise CheckpointError(f"{path} is damaged: it has no model weights; use another checkpoint of the run")
    for prefix in WRAPPER_PREFIXES:  # saved from a wrapped model by other code: the plain names
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    state["model"] = weights
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


class Resumable(NamedTuple):
    """A run's checkpoint, checked for a resume: its path, state, configuration, history, epochs done and run id."""
    path: Path
    state: dict
    config: RunConfig
    history: dict
    epoch: int
    run_id: str


def read_resumable(path, model):
    """Load `path` into `model` and check every field a resume uses, before anything is claimed or written.

    Returns a Resumable. CheckpointError for weights only, an earlier version's file, missing keys, or values of
    the wrong type or range (a configuration that could not have been run, a history that disagrees with itself).
    """
    state = load_checkpoint(path, model)
    if state.get("config") is None:
        raise CheckpointError(f"{path} holds weights only, not a run to resume: give the run's last.pt")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by an earlier version of this repo: its weights still predict "
                              "and export, but resuming needs a last.pt from this version")
    missing = [k for k in RESUME_KEYS if state.get(k) is None]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)}; give the run's last.pt")
    try:
        config = RunConfig.from_dict(state["config"])
        epoch = Field(int, 0, config.epochs).check("epoch", state["epoch"])
        history = _checked_history(state["history"], config.evaluated_on, epoch)
        run_id = Field(str).check("run_id", state.get("run_id"))
    except ConfigError as e:
        raise CheckpointError(f"{path} holds an impossible {e}: it is damaged or not a run of this repo; use "
                              "another checkpoint") from None
    if not run_id.isalnum() or not _rng_state_ok(state["rng"]):
        raise CheckpointError(f"{path} holds a damaged {'run id' if not run_id.isalnum() else 'random-number state'}"
                              ": use another checkpoint")
    return Resumable(Path(path), state, config, history, epoch, run_id)


def _checked_history(history, evaluated_on, epochs):
    """`history` if it holds exactly a run's columns, each a list of finite numbers, a row for each of `epochs`."""
    columns = new_history(evaluated_on)
    if not isinstance(history, dict) or set(history) != set(columns):
        raise ConfigError("history", "not the columns of metrics.csv and steps.csv")
    number, epoch = Field(float, -math.inf), Field(int, 1)
    for key, values in history.items():
        for value in Field(list).check(key, values):
            (epoch if key == "epoch" else number).check(key, value)
    if history["epoch"] != list(range(1, epochs + 1)) or \
            len({len(history[k]) for k in set(columns) - set(STEP_COLUMNS)}) != 1 or \
            len({len(history[k]) for k in STEP_COLUMNS}) != 1:
        raise ConfigError("history", f"its rows do not match its {epochs} epochs done")
    return history


def _rng_state_ok(state):
    try:
        random.Random().setstate(state["python"])
        name, keys, *rest = state["numpy"]
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), *rest))
        return isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8 and \
            isinstance(state["cuda"], (list, tuple))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


# A run's last.pt of Net is about 5 MB: 593,200 fp32 weights, as many SGD momentum values, the history (a row
# every 10 batches: 0.2 MB for 100 epochs at batch size 128) and the RNG states. torch.load inflates every archive
# entry to the size the archive declares before anything can be checked, so a small crafted file could ask for
# gigabytes. The caps are over ten times a real checkpoint.
MAX_ARCHIVE_BYTES = 64 * 2**20
MAX_ARCHIVE_ENTRIES = 1000


def check_archive(path):
    """CheckpointError unless `path` is a zip archive (torch.save's format) whose entries, uncompressed, could
    be a checkpoint of Net; read from the archive's directory, before anything is inflated."""
    if Path(path).stat().st_size > MAX_ARCHIVE_BYTES:  # also bounds the directory zipfile parses below
        raise CheckpointError(f"refusing to load {path}: at {Path(path).stat().st_size:,} bytes it is larger than a "
                              f"checkpoint of this repo's Net can be ({MAX_ARCHIVE_BYTES:,} bytes at most); only "
                              "use checkpoints of this repo's runs")
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
            f"{MAX_ARCHIVE_BYTES:,} bytes); only use checkpoints of this repo's runs")
