"""A run's configuration: every value a training run uses, resolved and checked once, saved whole in its checkpoints.

`RunConfig.build(recipe="fast", lr=0.1, ...)` fills what is not given from the recipe and the defaults and checks
every field; a wrong value is a `ConfigError` naming the field, the value and what is allowed (the command line
words it with its flag). A checkpoint holds `config.to_dict()`; resuming reads it back with `from_dict`, which
checks a file's values as strictly as the constructor, and `resumed(...)` applies only the changes a resume
may make.
"""

import math
import os
from dataclasses import asdict, dataclass, fields, replace

from s5.data import AUGMENTATIONS
from s5.mnist import DATA_DIR

RUNS_DIR = "runs"  # where a run without a chosen folder goes: runs/<recipe>-<date>-<time>
LOADERS = ("fast", "classic")
SCHEDULERS = ("StepLR", "OneCycleLR")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
TRAIN_IMAGES = 60_000  # in MNIST's training split: the most a subset or a validation split can take


class ConfigError(ValueError):
    """A configuration value is impossible; `field` names it (the CLI turns it into a flag)."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


def _check_int(obj, name, low, high=None):
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"{low} to {high}" if high is not None else f"{low} or more"
        raise ConfigError(name, f"{value!r} is out of range: give a whole number, {allowed}")


def _check_float(obj, name, low, high, low_open=False, high_open=False):
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value > high or (high_open and value == high):
        lo = f"above {low:g}" if low_open else f"at least {low:g}"
        hi = "" if high == math.inf else f" and {'below' if high_open else 'at most'} {high:g}"
        raise ConfigError(name, f"{value!r} is out of range: give a number {lo}{hi}")


def _check_bool(obj, name):
    if not isinstance(getattr(obj, name), bool):
        raise ConfigError(name, f"{getattr(obj, name)!r} is not true or false")


def _check_str(obj, name):
    value = getattr(obj, name)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(name, f"{value!r} is not a usable name")


def _check_choice(obj, name, choices):
    if getattr(obj, name) not in choices:
        raise ConfigError(name, f"{getattr(obj, name)!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class Recipe:
    """The hyperparameters of a training run. `seed` is the original S5 notebook's."""
    name: str
    epochs: int
    batch_size: int
    lr: float  # the StepLR start, or the OneCycleLR peak
    optimizer: str = "SGD"
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    scheduler: str = "StepLR"
    step_size: int = 15
    gamma: float = 0.1
    pct_start: float = 0.25  # one-cycle: the share of the steps spent warming up
    label_smoothing: float = 0.0  # training loss only: cross-entropy against (1 - s) one-hot + s / 10
    augment: str = "classic"  # the training images' augmentation: one of s5.data.AUGMENTATIONS
    tta: bool = False  # evaluate on each image and its four one-pixel shifts (s5.evaluation.ShiftAveraged)

    def __post_init__(self):
        _check_str(self, "name")
        for name in ("epochs", "batch_size", "step_size"):
            _check_int(self, name, 1)
        _check_float(self, "lr", 0.0, math.inf, low_open=True)
        _check_float(self, "momentum", 0.0, 1.0)
        _check_float(self, "weight_decay", 0.0, math.inf)
        _check_float(self, "gamma", 0.0, math.inf, low_open=True)
        _check_float(self, "pct_start", 0.0, 1.0, low_open=True, high_open=True)
        _check_float(self, "label_smoothing", 0.0, 1.0, high_open=True)
        _check_bool(self, "nesterov")
        _check_bool(self, "tta")
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_choice(self, "scheduler", SCHEDULERS)
        _check_choice(self, "augment", tuple(AUGMENTATIONS))


RECIPES = {
    "seed": Recipe("seed", epochs=20, batch_size=512, lr=0.01),
    # AdamW, not SGD at a 0.15 peak: a gradient spike at SGD's peak killed most ReLUs and left short runs at
    # chance (docs/recipes.md); label smoothing 0.1 in fp32 added 0.1 points on validation.
    "fast": Recipe("fast", epochs=2, batch_size=128, lr=3e-3, optimizer="AdamW", weight_decay=5e-4,
                   scheduler="OneCycleLR", label_smoothing=0.1),
    # `fast` on digits randomly rotated, scaled, sheared and shifted, for one epoch at batch 64 (docs/recipes.md,
    # "one-epoch and best")
    "one-epoch": Recipe("one-epoch", epochs=1, batch_size=64, lr=3e-3, optimizer="AdamW", weight_decay=5e-4,
                        scheduler="OneCycleLR", label_smoothing=0.1, augment="affine"),
    # `fast`, for 20 epochs, on the same affine digits (ibid.)
    "best": Recipe("best", epochs=20, batch_size=128, lr=3e-3, optimizer="AdamW", weight_decay=5e-4,
                   scheduler="OneCycleLR", label_smoothing=0.1, augment="affine"),
}


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe) if f.name != "name")  # what a run may override


def get_recipe(name, **overrides):
    """RECIPES[name] with the overrides that are not None, checked."""
    if name not in RECIPES:
        raise ConfigError("recipe", f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"a recipe has no field {unknown[0]!r}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run uses. `recipe` is resolved (no None); `out` is None until a folder is claimed."""
    recipe: Recipe
    seed: int = 1
    train_subset: int | None = None  # the first N training images (after the validation split)
    val_split: int = 0  # training images held out for validation, drawn by the seed; 0: evaluate on the test set
    loader: str = "fast"
    workers: int = 2  # classic loader's DataLoader workers
    device: str = "auto"
    amp: bool | None = None  # None: by hardware (s5.device.amp_dtype_for)
    channels_last: bool | None = None  # None: by device (s5.device.channels_last_for)
    deterministic: bool = False
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard event files into the run's folder (s5.tensorboard)
    data_dir: str = str(DATA_DIR)
    out: str | None = None

    # What a resume may change: where the data is, where and how it runs, for how long.
    RESUME_MAY_CHANGE = ("epochs", "data_dir", "device", "amp", "channels_last", "progress", "workers",
                         "deterministic", "tensorboard")

    def __post_init__(self):
        if not isinstance(self.recipe, Recipe):
            raise ConfigError("recipe", f"{self.recipe!r} is not a Recipe")
        _check_int(self, "seed", 0, 2**32 - 1)
        _check_int(self, "val_split", 0, TRAIN_IMAGES - 1)
        if self.train_subset is not None:
            _check_int(self, "train_subset", 1, TRAIN_IMAGES - self.val_split)
        _check_int(self, "workers", 0, 256)
        _check_choice(self, "loader", LOADERS)
        for name in ("deterministic", "progress", "tensorboard"):
            _check_bool(self, name)
        for name in ("amp", "channels_last"):
            if getattr(self, name) is not None:
                _check_bool(self, name)
        _check_str(self, "device")
        _check_str(self, "data_dir")
        if self.out is not None:
            _check_str(self, "out")
        if self.loader == "classic" and self.recipe.augment != "classic":
            raise ConfigError("loader", f"the classic loader has the original's augmentation only, not "
                                        f"{self.recipe.augment!r}: use the fast loader, or the classic augmentation")
        if self.recipe.batch_size > TRAIN_IMAGES:
            raise ConfigError("batch_size", f"{self.recipe.batch_size} is more than the {TRAIN_IMAGES:,} training "
                                            f"images: give 1 to {TRAIN_IMAGES}")

    @classmethod
    def build(cls, recipe="seed", **settings):
        """The configuration of a new run: the named recipe with the given overrides of its fields (epochs, lr,
        augment, ...; None leaves the recipe's), the other settings the run's, the rest defaults."""
        overrides = {k: settings.pop(k) for k in list(settings) if k in RECIPE_FIELDS}
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(unknown[0], f"a run has no setting {unknown[0]!r}")
        if "data_dir" in settings:
            settings["data_dir"] = os.path.expanduser(str(settings["data_dir"]))
        return cls(get_recipe(recipe, **overrides), **settings)

    @property
    def name(self):
        return self.recipe.name

    @property
    def epochs(self):
        return self.recipe.epochs

    def to_dict(self):
        """Plain values (for a checkpoint, JSON, or printing)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A configuration read from a file, checked field by field: ConfigError for a missing or wrong one."""
        if not isinstance(values, dict) or not isinstance(values.get("recipe"), dict):
            raise ConfigError("config", "missing or not a mapping")
        recipe_fields = {f.name for f in fields(Recipe)}
        run_fields = {f.name for f in fields(cls)} - {"recipe"}
        extra = sorted((set(values["recipe"]) - recipe_fields) | (set(values) - run_fields - {"recipe"}))
        if extra:
            raise ConfigError(str(extra[0]), "not a setting of this version's runs")
        return cls(Recipe(**values["recipe"]), **{k: v for k, v in values.items() if k != "recipe"})

    def resumed(self, changes, epochs_done):
        """This run's configuration with `changes` (field: value) applied, where a resume may make them.

        Returns (config, {field: (old, new)} of what changed). `out` in `changes` is where the run continues
        (None: its own folder, wherever it is now). A change to a field that defines the run, fewer
        epochs than are done, or more epochs for a one-cycle schedule (laid out over the planned steps) is a
        ConfigError.
        """
        changes = dict(changes)
        out = changes.pop("out", None)  # where to continue: the saved folder is history (it may have moved)
        changed = {}
        for field, value in changes.items():
            old = (self.name if field == "recipe" else getattr(self.recipe, field)
                   if field in RECIPE_FIELDS else getattr(self, field))
            if value == old:
                continue
            if field not in self.RESUME_MAY_CHANGE:
                raise ConfigError(field, f"cannot change when resuming (the run has {old}): leave it out, or "
                                         "start a new run")
            changed[field] = (old, value)
        epochs = changes.get("epochs", self.epochs)
        if "epochs" in changed:
            if epochs < epochs_done:
                raise ConfigError("epochs", f"{epochs} is fewer than the {epochs_done} epochs the run has done")
            if self.recipe.scheduler == "OneCycleLR":
                raise ConfigError("epochs", f"cannot change for a one-cycle run: its schedule was laid out over "
                                            f"{self.epochs} epochs; start a new run instead")
        run = {k: new for k, (_, new) in changed.items() if k != "epochs"} | {"out": out}
        if "data_dir" in run:
            run["data_dir"] = os.path.expanduser(str(run["data_dir"]))
        return replace(self, recipe=replace(self.recipe, epochs=epochs), **run), changed

    @classmethod
    def from_legacy_args(cls, args):
        """The configuration of a checkpoint written before configurations were saved whole (its `args`)."""
        if not isinstance(args, dict):
            raise ConfigError("args", "missing or not a mapping")
        known = {f.name for f in fields(cls)} - {"recipe"}
        run = {k: v for k, v in args.items() if k in known}
        return cls.build(args.get("recipe", "seed"), epochs=args.get("epochs"), batch_size=args.get("batch_size"),
                         lr=args.get("lr"), **run)
