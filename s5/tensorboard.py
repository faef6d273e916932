"""TensorBoard logs of a run (a run's callback, or by hand in a notebook): its history's scalars and its figures, as
event files. A resume purges what the earlier session wrote after its checkpoint, so every point appears once. Steps
are thousandths of an epoch, so epoch and step curves share one x-axis. Needs requirements-tensorboard.txt."""

from s5.errors import UserError

STEPS_PER_EPOCH = 1000
EPOCH_TAGS = {key: f"epoch/{key}" for key in ("train_loss", "test_loss", "train_acc", "test_acc", "val_loss",
                                              "val_acc", "lr")}  # a run with a validation split has val_*, not test_*
STEP_TAGS = {f"step_{key}": f"step/{key}" for key in ("train_loss", "train_acc", "lr")}


class TensorBoardMissingError(UserError, ImportError):
    """The tensorboard package is not installed; the message says how to install it."""


def global_step(epochs):
    """The TensorBoard step of a point `epochs` (a whole or fractional number of epochs) into the run."""
    return round(epochs * STEPS_PER_EPOCH)


def check_installed():
    """TensorBoardMissingError now, before a run starts, if the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise TensorBoardMissingError("TensorBoard logs need the tensorboard package: pip install -r "
                                      "requirements-tensorboard.txt (make tensorboard does it)") from None


class TensorBoardLog:
    """A run's scalars and figures, written into `folder`; `history` is a resumed run's checkpoint's, None if new."""

    def __init__(self, folder, history=None):
        check_installed()
        from torch.utils.tensorboard import SummaryWriter
        resumed = history is not None
        self.epochs_written = len(history["epoch"]) if resumed else 0
        self.steps_written = len(history["step_epoch"]) if resumed else 0
        self.writer = SummaryWriter(str(folder), purge_step=global_step(self.epochs_written) + 1 if resumed else None)

    def epoch(self, history):
        """Write the points of `history` (the run's whole history, grown since the last call) not yet written."""
        for tags, steps, first in ((EPOCH_TAGS, "epoch", self.epochs_written),
                                   (STEP_TAGS, "step_epoch", self.steps_written)):
            for i in range(first, len(history[steps])):
                for key, tag in tags.items():
                    if key in history:
                        self.writer.add_scalar(tag, history[key][i], global_step(history[steps][i]))
        self.epochs_written, self.steps_written = len(history["epoch"]), len(history["step_epoch"])
        self.writer.flush()  # on disk now: a run killed later loses nothing it has logged

    def epoch_end(self, run, epoch):
        self.epoch(run.history)

    def finish(self, run):
        pass

    def figures(self, **figures):
        """Add matplotlib figures as images tagged figures/NAME at the latest epoch (they stay open)."""
        for name, figure in figures.items():
            self.writer.add_figure(f"figures/{name}", figure, global_step(self.epochs_written), close=False)
        self.writer.flush()

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
