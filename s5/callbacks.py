"""What a run writes and says, each a named callback with one job: `epoch_end(run, epoch)` after every epoch,
`finish(run)` once at the end, `close()` always. Every file goes through the run's folder (s5.files.RunDir):
atomically, never through a link.

    CollapseCheck   a warning when training is still at chance after the warm-up
    Checkpoints     best.pt (when the evaluated accuracy is the best yet) and last.pt, every epoch
    MetricsFiles    metrics.csv (a row an epoch) and steps.csv (a row every few batches)
    Curves          accuracy_plots.png and training_curves.png (at most every PLOT_EVERY_S, and at the end)
    Finals          final.json, model.pt, confusion_matrix.png and misclassified.png
    TensorBoardLog  (s5.tensorboard) the same scalars and figures as event files
"""

import json
import logging
import time

from s5 import checkpoints, evaluation, loop
from s5.data import make_loaders
from s5.distributed import SINGLE
from s5.tensorboard import TensorBoardLog

log = logging.getLogger(__name__)
PLOT_EVERY_S = 30.0  # redraw the curves at most this often: a redraw can take most of a GPU epoch
COLLAPSED_BELOW = 30.0  # % training accuracy over the 10 batches after the warm-up: chance is 10%
MIN_STEPS_TO_JUDGE = 50  # fewer steps than this are too few to call a run collapsed (a 4-step epoch is at chance)


class Callback:
    def epoch_end(self, run, epoch):
        pass

    def finish(self, run):
        pass

    def close(self):
        pass


def for_run(run):
    """The callbacks of a run that writes (rank 0), in the order they act after each epoch."""
    found = [CollapseCheck(), Checkpoints(), MetricsFiles(), Curves(), Finals()]
    if run.config.tensorboard:  # after the checkpoints: the logs are never ahead of what a resume restores
        found.insert(3, TensorBoardLog(run.folder, run.history if run.resume is not None else None))
    return found


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

    def __init__(self):
        self.warned = False

    def epoch_end(self, run, epoch):
        steps = len(run.train_loader)
        warning = None if self.warned else collapse_warning(run.history, steps, run.config.recipe.warmup_steps(steps))
        if warning:
            self.warned = True
            log.warning(warning)


class Checkpoints(Callback):
    """best.pt and last.pt. A run resumed into a new folder brings its best.pt along (it may stay the best), and a
    finished run resumed there its last.pt too: a folder a run writes always holds both."""

    def epoch_end(self, run, epoch):
        accs = run.history[f"{run.config.evaluated_on}_acc"]
        if accs[-1] > max(accs[:-1], default=-1.0):  # before last.pt: a kill between the two never leaves
            run.run_dir.write("best.pt", checkpoints.checkpoint_bytes(run, epoch))  # best.pt behind last.pt
        elif not run.run_dir.exists("best.pt"):
            self.carry(run, "best.pt")
        run.run_dir.write("last.pt", checkpoints.checkpoint_bytes(run, epoch))

    def finish(self, run):
        for name in ("best.pt", "last.pt"):
            if not run.run_dir.exists(name):
                self.carry(run, name)

    def carry(self, run, name):
        """The resumed run's checkpoint `name` (its best.pt, or the one resumed), as this folder's run's."""
        source = run.resume.path.parent / "best.pt" if name == "best.pt" else run.resume.path
        state = checkpoints.load_checkpoint(source) if source.is_file() else run.resume.state
        run.run_dir.write(name, checkpoints.restamped(state, run))


class MetricsFiles(Callback):
    def finish(self, run):
        if not run.run_dir.exists("metrics.csv"):  # a finished run resumed into a new folder
            self.epoch_end(run, run.config.epochs)

    def epoch_end(self, run, epoch):
        run.run_dir.write("metrics.csv", csv_bytes(run.history, loop.epoch_columns(run.config.evaluated_on)))
        run.run_dir.write("steps.csv", csv_bytes(run.history, loop.STEP_COLUMNS))


def csv_bytes(history, columns):
    """metrics.csv or steps.csv from the whole history: one row an epoch or a step, even after a resume."""
    rows = [",".join(columns)]
    for i in range(len(history[next(iter(columns))])):
        rows.append(",".join(format(history[k][i], fmt) for k, fmt in columns.items()))
    return ("\n".join(rows) + "\n").encode()


class Curves(Callback):
    """The original's 2x2 per-epoch figure and the every-few-batches curves, redrawn at most every PLOT_EVERY_S."""

    def __init__(self):
        self.drawn_at = -PLOT_EVERY_S

    def epoch_end(self, run, epoch):
        if epoch == run.config.epochs or time.perf_counter() - self.drawn_at >= PLOT_EVERY_S:
            self.draw(run)

    def finish(self, run):
        if run.start_epoch > run.config.epochs:  # a finished run resumed: drawn again with the other outputs
            self.draw(run)

    def draw(self, run):
        from s5 import plots  # pyplot on the first figure, when an entry point has chosen its backend
        self.drawn_at = time.perf_counter()
        history, on = run.history, run.config.evaluated_on
        label = "validation" if on == "val" else "test"
        losses, accs = history[f"{on}_loss"], history[f"{on}_acc"]
        write_figure(run, "accuracy_plots.png", plots.post_accuracyplots(
            history["train_loss"], losses, history["train_acc"], accs, evaluated_on=label.capitalize()))
        write_figure(run, "training_curves.png", plots.plot_training(history, losses, accs, evaluated_on=label))


def write_figure(run, name, fig):
    import matplotlib.pyplot as plt

    from s5 import plots
    try:
        run.run_dir.write(name, plots.png_bytes(fig))
    finally:
        plt.close(fig)


class Finals(Callback):
    def finish(self, run):
        from s5 import plots
        final = {"test_loss": run.test_loss, "test_acc": run.test_acc, "epochs": run.config.epochs,
                 "evaluated_on": run.config.evaluated_on, "tta": run.config.recipe.tta}
        run.run_dir.write("final.json", (json.dumps(final) + "\n").encode())
        run.run_dir.write("model.pt", checkpoints.weights_bytes(run.model))
        test_loader = run.test_loader
        if run.ctx.active:  # the gallery needs every test image, not this process's share
            test_loader = make_loaders(run.config, run.device, SINGLE)[2]
        predictions = evaluation.predict_loader(run.evaluated, test_loader, run.device, run.amp_dtype,
                                                keep_images=True)
        figures = {"confusion_matrix": plots.plot_confusion_matrix(evaluation.confusion_matrix(predictions)),
                   "misclassified": plots.plot_misclassified(evaluation.misclassified(predictions, 24))}
        for callback in run.callbacks:
            if hasattr(callback, "figures"):
                callback.figures(**figures)
        for name, fig in figures.items():
            write_figure(run, f"{name}.png", fig)
