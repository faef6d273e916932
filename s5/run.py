"""One training run: its state, built once from a `RunConfig`, and `fit`, the epoch loop every entry point drives.

    with Run(config, device) as run:   # claims the folder; builds data, model, optimizer, scheduler, history
        run.fit()                      # train, evaluate, tell the callbacks (s5.callbacks: what a run writes)

Under torchrun every process builds its Run with its `ctx`; rank 0 alone claims the folder, logs and writes.
"""

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from s5 import callbacks, checkpoints, distributed, evaluation, loop, optim
from s5.config import RUNS_DIR, ConfigError
from s5.data import make_loaders
from s5.device import amp_dtype_for, keep_freed_memory, new_net, out_of_memory_typed, set_seed
from s5.files import OutputError, RunDir, timestamp
from s5.mnist import ensure_mnist

log = logging.getLogger(__name__)


class Run:
    """A run's state. The folder is claimed first (s5.files.RunDir), so a refused run leaves nothing behind; a
    resume (a `checkpoints.Resumable`) restores model, optimizer, scheduler, RNG states and history."""

    def __init__(self, config, device, ctx=distributed.SINGLE, resume=None, started=None):
        self.started = time.perf_counter() if started is None else started
        if config.loader == "classic" and config.recipe.batch_size % ctx.world_size:
            raise ConfigError("batch_size", f"{config.recipe.batch_size} does not split evenly over "
                                            f"{ctx.world_size} processes: give a multiple of {ctx.world_size} for "
                                            "the classic loader")
        self.ctx, self.device, self.resume = ctx, device, resume
        self.run_dir = self._claim(config)
        self.config = replace(config, out=str(self.folder))
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _claim(self, config):
        """Rank 0 claims the folder and tells the others; every rank stops alike if the claim fails."""
        run_dir, failure = None, None
        if self.ctx.is_main:
            try:
                run_dir = claim_folder(config, self.resume)
            except OutputError as e:
                failure = e
        folder, message, kind = distributed.broadcast(self.ctx, (run_dir and str(run_dir.path), str(failure or ""),
                                                                 getattr(failure, "kind", None)))
        if folder is None:
            raise failure or OutputError(message, kind)
        self.folder = Path(folder)
        return run_dir

    def _build(self):
        config, ctx, device, resume = self.config, self.ctx, self.device, self.resume
        set_seed(config.seed, config.deterministic)
        torch.backends.cudnn.benchmark = not config.deterministic  # time convolution algorithms once, keep the fastest
        if device.type == "cpu":
            keep_freed_memory()  # reuse each step's activation buffers instead of page-faulting fresh ones
        self.amp_dtype = amp_dtype_for(device, config.amp)
        log.info(f"device {device}, precision {self.amp_dtype or torch.float32}, loader {config.loader}, recipe "
                 f"{config.name}" + (f", {ctx.world_size} processes (the batch size is global)" if ctx.active else ""))
        self.model = new_net(device, config.channels_last)
        if ctx.local_rank == 0:
            ensure_mnist(config.data_dir)  # one fetch a machine, before its other processes read
        distributed.barrier(ctx)
        self.train_loader, self.val_loader, self.test_loader = make_loaders(config, device, ctx)
        self.optimizer, self.scheduler, loss_fn = optim.build_training(self.model, config.recipe,
                                                                       len(self.train_loader), verbose=True)
        self.history, self.start_epoch = loop.new_history(config.evaluated_on), 1
        if resume is not None:
            for part in ("model", "optimizer", "scheduler"):
                getattr(self, part).load_state_dict(resume.state[part])
            checkpoints.set_rng_state(resume.state["rng"])
            self.history, self.start_epoch = resume.history, resume.epoch + 1
            log.info(f"resuming {resume.path} at epoch {self.start_epoch}" if self.start_epoch <= config.epochs
                     else f"{resume.path} has all {config.epochs} epochs done: writing the final outputs")
        # What every accuracy is of; data-parallel: gradients averaged, checkpoints of the plain `model`.
        self.evaluated = evaluation.ShiftAveraged(self.model) if config.recipe.tta else self.model
        trained = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if ctx.active else self.model
        self.step = loop.Step(trained, self.optimizer, distributed.share_weighted(ctx, loss_fn),
                              self.scheduler if optim.steps_per_batch(self.scheduler) else None, self.amp_dtype)
        self.callbacks = callbacks.for_run(self) if self.run_dir is not None else []

    def fit(self):
        """The epoch loop (train, evaluate, step an epoch-wise schedule, record, tell the callbacks), then `finish`."""
        config, history = self.config, self.history
        elapsed_before = history["elapsed_seconds"][-1] if history["elapsed_seconds"] else 0.0
        with out_of_memory_typed(), distributed.group_errors(self.ctx):
            for epoch in range(self.start_epoch, config.epochs + 1):
                for shuffler in (self.train_loader, getattr(self.train_loader, "sampler", None)):
                    if hasattr(shuffler, "set_epoch"):  # ours, or a DistributedSampler
                        shuffler.set_epoch(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                log.info(f"Epoch {epoch}  lr {lr:.4g}")
                t0 = time.perf_counter()
                train_loss, train_acc = loop.train_epoch(self.step, self.train_loader, self.ctx, config.progress,
                                                         history, epoch - 1)
                train_seconds = time.perf_counter() - t0
                loss, acc, n_correct, n = self.evaluate(self.val_loader or self.test_loader, config.progress)
                log.info(loop.report_line(loss, n_correct, n, config.evaluated_on))
                if self.step.scheduler is None:
                    self.scheduler.step()  # an epoch-wise schedule
                row = (epoch, lr, train_loss, train_acc, loss, acc, train_seconds,
                       elapsed_before + time.perf_counter() - self.started)
                for key, value in zip(loop.epoch_columns(config.evaluated_on), row):
                    history[key].append(value)
                for callback in self.callbacks:
                    callback.epoch_end(self, epoch)
            self.finish()

    def evaluate(self, loader, progress=False):
        return loop.evaluate(self.evaluated, loader, F.nll_loss, self.device, self.ctx, self.amp_dtype, progress)

    def finish(self):
        """The test set's loss and accuracy (after a validation split, evaluated now), then the final outputs."""
        if self.val_loader is None:
            self.test_loss, self.test_acc = self.history["test_loss"][-1], self.history["test_acc"][-1]
        else:  # the test set, once: every choice was made on validation
            self.test_loss, self.test_acc, n_correct, n = self.evaluate(self.test_loader)
            log.info(loop.report_line(self.test_loss, n_correct, n) + " (the test set, evaluated once, at the end)")
        if self.ctx.active:
            if not distributed.same_on_every_rank(self.ctx, list(self.model.parameters())):
                raise distributed.GroupError("the processes ended with different weights: a bug, please report it")
            log.info(f"weights identical in all {self.ctx.world_size} processes")
        for callback in self.callbacks:
            callback.finish(self)

    @property
    def last_checkpoint(self):
        """The run's latest checkpoint, if one was saved (what a stopped run can be resumed from)."""
        present = self.run_dir.exists("last.pt") if self.run_dir is not None else (self.folder / "last.pt").exists()
        return self.folder / "last.pt" if present else None

    def close(self):
        for callback in getattr(self, "callbacks", []):
            callback.close()
        if self.run_dir is not None:
            self.run_dir.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def claim_folder(config, resume=None):
    """The run's folder, claimed: the resumed run's own, the configuration's `out`, or a new runs/<recipe>-<time>.

    Resuming in place needs the folder's marker to name the checkpoint's run, and the checkpoint to be the
    folder's last.pt: an older one (best.pt, a copy) would rewind the run and lose the epochs after it.
    """
    if resume is not None:
        folder = Path(resume.path).parent
        if config.out is None or Path(config.out).resolve() == folder.resolve():
            last = folder / "last.pt"
            if Path(resume.path).name != "last.pt" or not last.is_file():
                raise OutputError(f"{resume.path} is not the latest checkpoint of its run ({last} is): resuming it "
                                  "in place would rewind the run", "not_latest", last)
            return RunDir.claim(folder, run_id=resume.run_id)
    if config.out is not None:
        return RunDir.claim(config.out)
    return RunDir.claim_new(RUNS_DIR, f"{config.name}-{timestamp()}")
