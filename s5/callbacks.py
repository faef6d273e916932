"""What a run writes and says, each a named callback with one job: `epoch_end(run, epoch)` after every epoch,
`finish(run)` once at the end, `close()` always. Every file goes through the run's folder (s5.files.RunDir):
atomically, never through a link.

    CollapseCheck   a warning when training is still at chance after the warm-up
    Checkpoints     best.pt (when the evaluated accuracy is the best yet) and last.pt every epoch; model.pt
    MetricsFiles    metrics.csv (a row an epoch) and steps.csv (a row every few batches); final.json
    TensorBoardLog  the same scalars and the final figures as TensorBoard event files (also by hand, in a notebook)
    Figures         accuracy_plots.png, training_curves.png (at most every PLOT_EVERY_S, and at the end);
                    confusion_matrix.png and misclassified.png
"""

import json
import logging
import secrets
import time

from s5 import checkpoints, evaluation, loop
from s5.data import make_loaders
from s5.distributed import SINGLE
from s5.errors import UserError

log = logging.getLogger(__name__)
PLOT_EVERY_S = 30.0  # redraw the curves at most this often: a redraw can take most of a GPU epoch
COLLAPSED_BELOW = 30.0  # % training accuracy over the 10 batches after the warm-up: chance is 10%
MIN_STEPS_TO_JUDGE = 50  # fewer steps than this are too few to call a run collapsed (a 4-step epoch is at chance)
EPOCH_TAGS = {key: f"epoch/{key}" for key in ("train_loss", "test_loss", "train_acc", "test_acc", "val_loss",
                                              "val_acc", "lr")}  # a run with a validation split has val_*, not test_*
STEP_TAGS = {f"step_{key}": f"step/{key}" for key in ("train_loss", "train_acc", "lr")}


class Callback:
    def epoch_end(self, run, epoch):
        pass

    def finish(self, run):
        pass

    def close(self):
        pass


def for_run(run):
    """The callbacks of a run that writes (rank 0), in the order they act after each epoch."""
    board = TensorBoardLog(run.folder, run.history if run.resume else None) if run.config.tensorboard else None
    # TensorBoard after the checkpoints: its logs are never ahead of what a resume restores.
    return [CollapseCheck(), Checkpoints(), MetricsFiles(), *([board] if board else []), Figures(board)]


def collapse_warning(history, steps_per_epoch, warmup_steps):
    """A one-line warning if the training accuracy over the 10 batches after the warm-up was below
    COLLAPSED_BELOW (measured over 65 short one-cycle runs: every run under 28% there ended at 65% or less, every
    run at 33% or more reached 87% or more); without a warm-up (a step schedule, as the original's, whose first
    epoch is erratic: 13% at its 60th step, 88% at its end), the last 10 batches of the first epoch. None while
    that window is not recorded yet (and before MIN_STEPS_TO_JUDGE steps), or when the run learns."""
    check_at = max(warmup_steps + loop.REFRESH_EVERY if warmup_steps else steps_per_epoch, MIN_STEPS_TO_JUDGE)
    for step_epoch, acc in zip(history["step_epoch"], history["step_train_acc"]):
        step = round(step_epoch * steps_per_epoch)
        if step >= check_at:
            if acc >= COLLAPSED_BELOW:
                return None
            when = "after the warm-up" if warmup_steps else "the end of the first epoch"
            return (f"training accuracy is {acc:.0f}% at step {step}, {when}: the run looks collapsed "
                    "(most ReLUs dead after a gradient spike at the peak learning rate) and may stay near chance; "
                    "try a lower learning rate or a longer warm-up")
    return None


class CollapseCheck(Callback):
    """Warns once (a log warning) when a run looks collapsed: see `collapse_warning`."""

    warned = False

    def epoch_end(self, run, epoch):
        steps = len(run.train_loader)
        warning = None if self.warned else collapse_warning(run.history, steps, run.config.recipe.warmup_steps(steps))
        if warning:
            self.warned = True
            log.warning(warning)


class Checkpoints(Callback):
    """best.pt and last.pt after every epoch, model.pt (the weights alone) at the end. A run resumed into a new
    folder brings its best.pt along (it may stay the best), and a finished run resumed there its last.pt too: a
    folder a run writes always holds both."""

    def epoch_end(self, run, epoch):
        state = checkpoints.checkpoint_bytes(run, epoch)
        accs = run.history[loop.evaluated(run.config.evaluated_on)[2]]
        if accs[-1] > max(accs[:-1], default=-1.0):  # first: a kill between the two never leaves best.pt behind
            run.run_dir.write("best.pt", state)
        elif not run.run_dir.exists("best.pt"):
            self.carry(run, "best.pt")
        run.run_dir.write("last.pt", state)

    def finish(self, run):
        for name in ("best.pt", "last.pt"):
            if not run.run_dir.exists(name):
                self.carry(run, name)
        run.run_dir.write("model.pt", checkpoints.weights_bytes(run.model))

    def carry(self, run, name):
        """The resumed run's checkpoint `name` (its best.pt, or the one resumed), as this folder's run's."""
        source = run.resume.path.parent / "best.pt" if name == "best.pt" else run.resume.path
        state = checkpoints.load_checkpoint(source) if source.is_file() else run.resume.state
        run.run_dir.write(name, checkpoints.restamped(state, run))


class MetricsFiles(Callback):
    """metrics.csv and steps.csv from the whole history (a row an epoch or a step, even after a resume); at the end
    final.json, the test set's loss and accuracy."""

    def epoch_end(self, run, epoch):
        for name, columns in (("metrics.csv", loop.epoch_columns(run.config.evaluated_on)),
                              ("steps.csv", loop.STEP_COLUMNS)):
            rows = [",".join(format(run.history[k][i], fmt) for k, fmt in columns.items())
                    for i in range(len(run.history[next(iter(columns))]))]
            run.run_dir.write(name, ("\n".join([",".join(columns), *rows]) + "\n").encode())

    def finish(self, run):
        if not run.run_dir.exists("metrics.csv"):  # a finished run resumed into a new folder
            self.epoch_end(run, run.config.epochs)
        final = {"test_loss": run.test_loss, "test_acc": run.test_acc, "epochs": run.config.epochs,
                 "evaluated_on": run.config.evaluated_on, "tta": run.config.recipe.tta}
        run.run_dir.write("final.json", (json.dumps(final) + "\n").encode())


class TensorBoardMissingError(UserError, ImportError):
    """The tensorboard package is not installed; the message says how to install it."""


def check_installed():
    """TensorBoardMissingError now, before a run starts, if the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise TensorBoardMissingError("TensorBoard logs need the tensorboard package: pip install -r "
                                      "requirements-tensorboard.txt (make tensorboard does it)") from None


def global_step(epochs):
    """The TensorBoard step of a point `epochs` (whole or fractional) into the run: thousandths of an epoch, so
    epoch and step curves share one x-axis."""
    return round(epochs * 1000)


class TensorBoardLog(Callback):
    """A run's history's scalars and its figures as TensorBoard event files in `folder` (needs
    requirements-tensorboard.txt). `history` is a resumed run's: what the earlier session wrote after its checkpoint
    is purged, so every point appears once."""

    def __init__(self, folder, history=None):
        check_installed()
        from torch.utils.tensorboard import SummaryWriter
        self.written = {x: 0 if history is None else len(history[x]) for x in ("epoch", "step_epoch")}  # points
        # SummaryWriter opens its event file by path: a random name, so that no link planted in the folder has it.
        self.writer = SummaryWriter(str(folder), filename_suffix=f".{secrets.token_hex(8)}",
                                    purge_step=None if history is None else global_step(self.written["epoch"]) + 1)

    def epoch(self, history):
        """Write the points of `history` (the run's whole history, grown since the last call) not yet written."""
        for tags, x in ((EPOCH_TAGS, "epoch"), (STEP_TAGS, "step_epoch")):
            for i in range(self.written[x], len(history[x])):
                for key, tag in tags.items():
                    if key in history:
                        self.writer.add_scalar(tag, history[key][i], global_step(history[x][i]))
            self.written[x] = len(history[x])
        self.writer.flush()  # on disk now: a run killed later loses nothing it has logged

    def epoch_end(self, run, epoch):
        self.epoch(run.history)

    def figures(self, **figures):
        """Add matplotlib figures as images tagged figures/NAME at the latest epoch (they stay open)."""
        for name, figure in figures.items():
            self.writer.add_figure(f"figures/{name}", figure, global_step(self.written["epoch"]), close=False)
        self.writer.flush()

    def close(self):
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Figures(Callback):
    """The original's 2x2 per-epoch figure and the every-few-batches curves, redrawn at most every PLOT_EVERY_S and
    after the last epoch; at the end the confusion matrix and the worst mistakes, also to TensorBoard (`board`)."""

    def __init__(self, board=None):
        self.board, self.drawn_at = board, -PLOT_EVERY_S

    def epoch_end(self, run, epoch):
        if epoch == run.config.epochs or time.perf_counter() - self.drawn_at >= PLOT_EVERY_S:
            self.draw(run, curves=True)

    def finish(self, run):  # a finished run resumed draws its curves again, with the other outputs
        self.draw(run, curves=run.start_epoch > run.config.epochs, finals=True)

    def draw(self, run, curves=False, finals=False):
        """The figures asked for, each written as NAME.png, then closed."""
        import matplotlib.pyplot as plt  # pyplot on the first figure, when an entry point has chosen its backend

        from s5 import plots
        figures = {}
        if finals:  # the gallery needs every test image, not this process's share
            loader = make_loaders(run.config, run.device, SINGLE)[2] if run.ctx.active else run.test_loader
            found = evaluation.predict_loader(run.evaluated, loader, run.device, run.amp_dtype, keep_images=True)
            figures = {"confusion_matrix": plots.plot_confusion_matrix(evaluation.confusion_matrix(found)),
                       "misclassified": plots.plot_misclassified(evaluation.misclassified(found, 24))}
            if self.board:
                self.board.figures(**figures)
        if curves:
            self.drawn_at = time.perf_counter()
            history, (label, loss, acc) = run.history, loop.evaluated(run.config.evaluated_on)
            figures["accuracy_plots"] = plots.post_accuracyplots(history["train_loss"], history[loss],
                                                                 history["train_acc"], history[acc],
                                                                 evaluated_on=label.capitalize())
            figures["training_curves"] = plots.plot_training(history, history[loss], history[acc], evaluated_on=label)
        try:
            for name, fig in figures.items():
                run.run_dir.write(f"{name}.png", plots.png_bytes(fig))
        finally:
            for fig in figures.values():
                plt.close(fig)
