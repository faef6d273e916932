"""TensorBoard logs of a run (a callback of s5.callbacks, or by hand in a notebook): its history's scalars and its
figures, as event files in the run's folder.

`epoch(history)` writes the points of the growing history not yet written. A resumed run starts from the history
its checkpoint holds, and what the earlier session wrote after that checkpoint is purged, so every point appears
once. Global steps are thousandths of an epoch, so the epoch and the step curves share one x-axis. Tags:
epoch/{train,test,val}_{loss,acc}, epoch/lr; step/train_loss, step/train_acc, step/lr; figures/NAME. It needs the
tensorboard package, which the core install leaves out (requirements-tensorboard.txt; `make tensorboard`).
"""

from s5.errors import UserError

STEPS_PER_EPOCH = 1000
REQUIREMENTS = "requirements-tensorboard.txt"
EPOCH_TAGS = {"train_loss": "epoch/train_loss", "test_loss": "epoch/test_loss", "train_acc": "epoch/train_acc",
              "test_acc": "epoch/test_acc", "val_loss": "epoch/val_loss", "val_acc": "epoch/val_acc",
              "lr": "epoch/lr"}  # history key -> tag (a run with a validation split has val_*, not test_*)
STEP_TAGS = {"step_train_loss": "step/train_loss", "step_train_acc": "step/train_acc", "step_lr": "step/lr"}


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
        raise TensorBoardMissingError(f"TensorBoard logs need the tensorboard package: pip install -r "
                                      f"{REQUIREMENTS} (make tensorboard does it)") from None


class TensorBoardLog:
    """A run's scalars and figures for TensorBoard, written into `folder` (the run's folder).

    `history`: for a resumed run, the history its checkpoint holds (its points were written by the session
    before); None for a new run. TensorBoardMissingError when the tensorboard package is not installed.
    """

    def __init__(self, folder, history=None):
        check_installed()
        from torch.utils.tensorboard import SummaryWriter
        self.epochs_written = len(history["epoch"]) if history is not None else 0
        self.steps_written = len(history["step_epoch"]) if history is not None else 0
        # A resume hides whatever the earlier session wrote after the checkpoint's last epoch.
        purge_step = global_step(self.epochs_written) + 1 if history is not None else None
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def epoch(self, history):
        """Write the points of `history` (the run's whole history, grown since the last call) not yet written."""
        for i in range(self.epochs_written, len(history["epoch"])):
            step = global_step(history["epoch"][i])
            for key, tag in EPOCH_TAGS.items():
                if key in history:
                    self.writer.add_scalar(tag, history[key][i], step)
        for i in range(self.steps_written, len(history["step_epoch"])):
            step = global_step(history["step_epoch"][i])
            for key, tag in STEP_TAGS.items():
                self.writer.add_scalar(tag, history[key][i], step)
        self.epochs_written, self.steps_written = len(history["epoch"]), len(history["step_epoch"])
        self.writer.flush()  # on disk now: a run killed later loses nothing it has logged

    def epoch_end(self, run, epoch):  # as a run's callback (s5.callbacks)
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
