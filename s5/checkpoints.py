"""Checkpoints: the weights, optimizer, scheduler, RNG states, history, run id and configuration that resume a run
exactly, written atomically. Loading uses `weights_only=True`, so a file carrying pickled code is refused, not run;
every way a file can be wrong is a one-line CheckpointError, found before anything is written."""

import copy
import io
import math
import random
import zipfile
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from s5 import optim
from s5.config import FIELDS, ConfigError, Field, RunConfig
from s5.errors import UserError, first_line
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


def set_rng_state(state, dry_run=False):
    """Restore the RNG states `checkpoint_bytes` saved (CUDA's for the devices this machine has); `dry_run`: into new
    generators instead, to check them (a damaged state raises)."""
    python, numpy, cpu = (random.Random(), np.random.RandomState(), torch.Generator()) if dry_run else \
        (random, np.random, torch.default_generator)
    python.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    numpy.set_state((name, keys.numpy().astype(np.uint32), *rest))
    cpu.set_state(state["torch"])
    cuda = state["cuda"][:torch.cuda.device_count()]
    if not all(s.dtype == torch.uint8 for s in cuda):
        raise TypeError("a CUDA state is not bytes")
    if not dry_run:
        torch.cuda.set_rng_state_all(cuda)


def _torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # in memory first: a full disk then fails with the OS's own errno
    return buffer.getvalue()


def checkpoint_bytes(run, epoch):
    """A run's checkpoint after `epoch`, as bytes; numpy's RNG key array as a tensor, a type weights_only accepts."""
    np_state = np.random.get_state()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
           "cuda": torch.cuda.get_rng_state_all()}
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


def load_checkpoint(path, model=None):
    """A run's checkpoint (or a bare state_dict) as a dict, loaded safely, optionally into `model`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the path of a .pt file a training run wrote")
    check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
            weights = state["model"] = {k.removeprefix(prefix): v for k, v in weights.items()}
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
    """Load `path` into `model` and check every part a resume restores, before anything is claimed or written: by
    their fields, or built like a fresh run's (`_check_like`), or loaded into new random-number generators."""
    state = load_checkpoint(path, model)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} holds weights only, not a run to resume: give the run's last.pt" if "format"
                              not in state else f"{path} was written by an earlier version of this repo: its weights "
                              "still predict and export, but resuming needs a last.pt from this version")
    if missing := [k for k in ("optimizer", "scheduler", "epoch", "history", "rng", "config", "run_id") if
                   state.get(k) is None]:
        raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)}; give the run's last.pt")
    try:
        config, fresh = RunConfig.from_dict(state["config"]), copy.deepcopy(model)
        epoch = Field(int, 0, config.epochs).check("epoch", state["epoch"])
        recipe = replace(config.recipe, lr=float(config.recipe.lr))  # (a schedule makes a whole-number lr a float)
        optimizer, scheduler, _ = optim.build_training(fresh, recipe, config.steps_per_epoch)
        for p in fresh.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # the state a step makes
        steps = state["history"].get("step_epoch") if isinstance(state["history"], dict) else None
        history = {k: [1.0] * (len(steps) if k in STEP_COLUMNS and isinstance(steps, list) else epoch)
                   for k in new_history(config.evaluated_on)} | {"epoch": list(range(1, epoch + 1))}
        for part, like in (("optimizer", optimizer.state_dict()), ("scheduler", scheduler.state_dict()),
                           ("history", history)):
            _check_like(state[part], like, part)
        if state["history"]["epoch"] != history["epoch"]:
            raise ConfigError("history.epoch", f"not the {epoch} epochs done")
        if not Field(str).check("run_id", state["run_id"]).isalnum():
            raise ConfigError("run_id", f"{state['run_id'][:40]!r} is not a run's id")
        try:
            set_rng_state(state["rng"], dry_run=True)
        except Exception as e:  # whatever the generators raise for a damaged state
            raise ConfigError("rng", f"does not load ({first_line(e)})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path} holds an impossible {e}: use another checkpoint of this repo's runs") from None
    return Resumable(Path(path), state, config, state["history"], epoch, state["run_id"])


def _check_like(saved, fresh, name):
    """ConfigError naming the first place where `saved` is not built like `fresh`: type (a whole number may be a
    float's), keys, length, tensor shape and dtype, names and switches (str, bool) equal; numbers finite, and in range
    under a field's name."""
    if type(saved) is not type(fresh) and (type(saved), type(fresh)) != (int, float):
        raise ConfigError(name, f"{type(saved).__name__} where a run has {type(fresh).__name__}")
    if isinstance(fresh, torch.Tensor) and (saved.shape, saved.dtype) != (fresh.shape, fresh.dtype):
        raise ConfigError(name, f"{saved.dtype} {[*saved.shape]} where a run has {fresh.dtype} {[*fresh.shape]}")
    if isinstance(fresh, (dict, list, tuple)):
        keys = fresh.keys() if isinstance(fresh, dict) else range(len(fresh))
        if odd := set(keys) ^ set(saved.keys() if isinstance(saved, dict) else range(len(saved))):
            first, what = min(odd, key=str), "key" if isinstance(fresh, dict) else "item"
            raise ConfigError(name, f"{'no' if first in keys else 'unexpected'} {what} {first}")
        for key in keys:
            _check_like(saved[key], fresh[key], f"{name}.{key}")
    elif isinstance(fresh, (str, bool)) and saved != fresh:  # a name, a switch (Nesterov, a Muon group): as built
        raise ConfigError(name, f"{(saved if isinstance(saved, bool) else saved[:40])!r} where a run has {fresh!r}")
    elif isinstance(fresh, (int, float)) and not isinstance(fresh, bool):
        FIELDS.get(name.rpartition(".")[2], Field(float, -math.inf)).check(name, saved)


def check_archive(path):
    """CheckpointError unless `path`'s size and zip directory (torch.save's format) fit a checkpoint of Net."""
    size, entries = Path(path).stat().st_size, []
    if size <= MAX_ARCHIVE_BYTES and zipfile.is_zipfile(path):  # (not a zip: torch's pre-1.6 format, or junk)
        try:
            with zipfile.ZipFile(path) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise CheckpointError(UNREADABLE.format(path)) from None
    declared = sum(entry.file_size for entry in entries)
    if max(size, declared) > MAX_ARCHIVE_BYTES or len(entries) > MAX_ARCHIVE_ENTRIES:
        raise CheckpointError(f"refusing to load {path}: {size:,} bytes, {len(entries):,} entries, {declared:,} "
                              f"bytes uncompressed: a checkpoint of this repo has at most {MAX_ARCHIVE_BYTES:,} bytes "
                              f"and {MAX_ARCHIVE_ENTRIES:,} entries; only use checkpoints of this repo's runs")
