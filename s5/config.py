"""A run's configuration: every setting defined once in `FIELDS` (type, range, help: the flags are made from it),
checked once (`Field.check`), saved whole in checkpoints. Below this boundary, code trusts its values."""

import math
import os
import reprlib
from dataclasses import asdict, dataclass, fields, replace

from s5.data import AUGMENTATIONS
from s5.errors import ConfigError, first_line
from s5.mnist import DATA_DIR

RUNS_DIR = "runs"  # where a run without a chosen folder goes: runs/<recipe>-<date>-<time>
TRAIN_IMAGES = 60_000  # in MNIST's training split: the most a subset or a validation split can take


@dataclass(frozen=True)
class Field:
    """One setting: its type (int, float, bool, str, ...), its range or choices, whether None is allowed, its help."""
    kind: type
    low: float | None = None
    high: float | None = None
    above: bool = False  # low itself is excluded
    below: bool = False  # high itself is excluded
    choices: tuple = ()
    none: bool = False
    help: str = ""

    def allowed(self):
        """What the setting takes, in words: "1 to 60000", "a number above 0", "one of SGD, Adam, AdamW"."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is int:
            return f"{self.low} or more" if self.high is None else f"{self.low} to {self.high}"
        if self.kind is not float:
            return {bool: "true or false", str: "a non-empty name"}.get(self.kind, f"a {self.kind.__name__}")
        low = f"a number {'above' if self.above else 'at least'} {self.low:g}"
        return low if self.high is None else f"{low} and {'below' if self.below else 'at most'} {self.high:g}"

    def check(self, name, value, shown=None):
        """`value` if this field can hold it, else ConfigError naming `name`, the value (as `shown`) and the range."""
        if value is None and self.none:
            return value
        number = self.kind in (int, float) and not self.choices
        if self.choices:
            ok = value in self.choices
        elif number:
            ok = isinstance(value, int if self.kind is int else (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind) and (self.kind is not str or value != "" and "\0" not in value)
        if not ok:  # (reprlib: a crafted file's value may be huge, the error stays one short line)
            raise ConfigError(name, f"{reprlib.repr(value)} is not "
                                    f"{'a whole number' if number and self.kind is int else self.allowed()}")
        if number and not (-math.inf < value < math.inf and (value > self.low if self.above else value >= self.low)
                           and (self.high is None or (value < self.high if self.below else value <= self.high))):
            raise ConfigError(name, f"{shown or reprlib.repr(value)} is out of range: give {self.allowed()}")
        return value

    def parse(self, name, text):
        """`text` (a flag's, an environment variable's) as this field's value, checked; an error quotes the text."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ConfigError(name, f"{text!r} is not {'a whole number' if self.kind is int else 'a number'}") from None
        return self.check(name, value, text)


FIELDS = {
    # a recipe's
    "name": Field(str, help="the recipe: seed = the original notebook; fast = AdamW one-cycle, 2 epochs; one-epoch = "
                  "fast on rotated, scaled, sheared, shifted digits, 1 epoch at batch 64; best = the same, 20 epochs; "
                  "sprint = one-epoch on 24,000 images by Muon, batch 128, peak lr 5e-3"),
    "epochs": Field(int, 1, help="epochs"),
    "batch_size": Field(int, 1, TRAIN_IMAGES, help="batch size (global: over all processes)"),
    "lr": Field(float, 0, above=True, help="learning rate; the peak for one-cycle"),
    "optimizer": Field(str, choices=("SGD", "Adam", "AdamW", "Muon"), help="optimizer (Muon: the hidden layers' "
                       "weights by Muon, the rest by AdamW)"),
    "momentum": Field(float, 0, 1, below=True, help="SGD's momentum, Adam's and AdamW's first beta; a one-cycle "
                      "schedule starts and ends there and dips 0.1 lower (not below 0) at the peak learning rate"),
    "weight_decay": Field(float, 0, help="weight decay"),
    "nesterov": Field(bool, help="Nesterov momentum (SGD)"),
    "scheduler": Field(str, choices=("StepLR", "OneCycleLR"), help="StepLR every epoch, or OneCycleLR every batch"),
    "step_size": Field(int, 1, help="StepLR: epochs between learning-rate drops"),
    "gamma": Field(float, 0, above=True, help="StepLR: factor of each drop"),
    "pct_start": Field(float, 0, 1, above=True, below=True, help="one-cycle: share of the steps warming up"),
    "label_smoothing": Field(float, 0, 1, below=True, help="label smoothing of the training loss"),
    "augment": Field(str, choices=tuple(AUGMENTATIONS), help="training augmentation: classic = the original's rotation "
                     "and zoom; affine = rotation, scale, shear, shift; elastic = affine plus Simard's distortion"),
    "tta": Field(bool, help="evaluate each image with its four one-pixel shifts, averaged"),
    "epoch_images": Field(int, 1, TRAIN_IMAGES, none=True, help="images an epoch trains on, the first N of its "
                          "shuffled order (default: all; fewer: a run that ends mid-epoch; fast loader only)"),
    # a run's
    "seed": Field(int, 0, 2**32 - 1, help="seed for weights, shuffling, augmentation and the validation split"),
    "train_subset": Field(int, 1, TRAIN_IMAGES, none=True, help="the first N training images only (after --val-split)"),
    "val_split": Field(int, 0, TRAIN_IMAGES - 1, help="hold out N training images, drawn by --seed, to evaluate each "
                       "epoch and pick best.pt on, then test once at the end (0: test every epoch, as the original)"),
    "loader": Field(str, choices=("fast", "classic"), help="fast = batches made and augmented on the device; classic = "
                    "torchvision's DataLoader"),
    "workers": Field(int, 0, 256, help="DataLoader workers, classic loader only"),
    "device": Field(str, help="cpu, cuda, cuda:N, mps, xpu, or auto: the machine's accelerator, else the CPU"),
    "amp": Field(bool, none=True, help="bf16/fp16 mixed precision (default: on for CPUs with native bf16 and GPUs "
                 "before Ampere; newer GPUs train fp32 on TF32 tensor cores)"),
    "channels_last": Field(bool, none=True, help="channels_last layout (default: on for CPU and CUDA, faster there)"),
    "deterministic": Field(bool, help="deterministic algorithms (bit-exact resume)"),
    "progress": Field(bool, help="tqdm bars"),
    "tensorboard": Field(bool, help="also write TensorBoard logs into the run's folder (make tensorboard shows runs/)"),
    "data_dir": Field(str, help="MNIST root; files go in DIR/MNIST/raw"),
    "out": Field(str, none=True, help="output folder, new or empty (default: a new runs/<recipe>-<date>-<time>); "
                 "with --resume, continue the run there instead of in its own folder"),
}


def check(name, value):
    """`value` checked against FIELDS[name]: the one value check of the repo."""
    return FIELDS[name].check(name, value)


def _check_fields(obj):
    for f in fields(obj):
        if f.name in FIELDS:
            check(f.name, getattr(obj, f.name))


def check_one_cycle(total_steps, pct_start):
    """ConfigError unless a one-cycle schedule of `total_steps` has at least one step to warm up and to cool down."""
    if pct_start * total_steps <= 1 or (1 - pct_start) * total_steps <= 1:
        least = math.floor(1 / min(pct_start, 1 - pct_start)) + 1
        raise ConfigError("epochs", f"a one-cycle schedule needs at least {least} optimizer steps to warm up and cool "
                                    f"down, and this run has {total_steps}: train on more images, for more epochs, or "
                                    "with a smaller batch")


@dataclass(frozen=True)
class Recipe:
    """The hyperparameters of a training run (FIELDS says what each is). `seed` is the original S5 notebook's."""
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
    pct_start: float = 0.25
    label_smoothing: float = 0.0  # training loss only: cross-entropy against (1 - s) one-hot + s / 10
    augment: str = "classic"
    tta: bool = False  # s5.evaluation.ShiftAveraged
    epoch_images: int | None = None  # None: every training image an epoch

    def __post_init__(self):
        _check_fields(self)
        if self.nesterov and self.optimizer != "SGD":
            muon = self.optimizer == "Muon"
            raise ConfigError("nesterov", "Muon's momentum is always Nesterov's: leave it off" if muon else
                              f"Nesterov momentum is SGD's, not {self.optimizer}'s: use SGD, or leave it off")
        if self.optimizer in ("AdamW", "Muon") and self.lr * self.weight_decay >= 1:  # (decoupled: w *= 1 - lr·wd)
            raise ConfigError("weight_decay", f"{self.weight_decay:g} at lr {self.lr:g} would scale every weight by "
                                              f"{1 - self.lr * self.weight_decay:g} a step: lr × weight decay must "
                                              "stay below 1 (the recipes: 5e-4 at 3e-3)")

    def warmup_steps(self, steps_per_epoch):
        """Optimizer steps before the learning rate peaks: one-cycle's warm-up; none for a step schedule."""
        return int(self.pct_start * self.epochs * steps_per_epoch) if self.scheduler == "OneCycleLR" else 0


# AdamW, not SGD at a 0.15 peak: a gradient spike at SGD's peak killed most ReLUs and left short runs at chance
# (docs/recipes.md); label smoothing 0.1 in fp32 added 0.1 points on validation.
_FAST = Recipe("fast", epochs=2, batch_size=128, lr=3e-3, optimizer="AdamW", momentum=0.95, weight_decay=5e-4,
               scheduler="OneCycleLR", label_smoothing=0.1)  # beta1 0.95 -> 0.85 at the peak -> 0.95
RECIPES = {
    "seed": Recipe("seed", epochs=20, batch_size=512, lr=0.01),
    "fast": _FAST,
    # `fast` on digits randomly rotated, scaled, sheared and shifted: for one epoch at batch 64, or for 20 epochs
    # (docs/recipes.md, "one-epoch and best")
    "one-epoch": replace(_FAST, name="one-epoch", epochs=1, batch_size=64, augment="affine"),
    "best": replace(_FAST, name="best", epochs=20, augment="affine"),
    # `one-epoch` cut short: 24,000 images (the first of the epoch's shuffled order, then it ends), peak lr 5e-3, by
    # Muon at batch 128 (on validation, 99.04% with AdamW became 99.22%, at 27,000 images 99.29%; batch 128 halves
    # Muon's added time, 24,000 images keep a run under half of one-epoch's: docs/recipes.md, "sprint")
    "sprint": replace(_FAST, name="sprint", epochs=1, batch_size=128, lr=5e-3, optimizer="Muon", augment="affine",
                      epoch_images=24_000),
}
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe) if f.name != "name")  # what a run may override


def get_recipe(name, **overrides):
    """RECIPES[name] with the overrides that are not None, checked."""
    if name not in RECIPES:
        raise ConfigError("name", f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], f"there is no setting {unknown[0]!r}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run uses. `recipe` is resolved (no None); `out` is None until a folder is claimed."""
    recipe: Recipe
    seed: int = 1
    train_subset: int | None = None  # the first N training images (after the validation split)
    val_split: int = 0  # training images held out for validation, drawn by the seed; 0: evaluate on the test set
    loader: str = "fast"
    workers: int = 2
    device: str = "auto"
    amp: bool | None = None  # None: by hardware (s5.device.amp_dtype_for)
    channels_last: bool | None = None  # None: by device (s5.device.channels_last_for)
    deterministic: bool = False
    progress: bool = True
    tensorboard: bool = False
    data_dir: str = str(DATA_DIR)
    out: str | None = None

    # What a resume may change: where the data is, where and how it runs, for how long.
    RESUME_MAY_CHANGE = ("epochs", "data_dir", "device", "amp", "channels_last", "progress", "workers",
                         "deterministic", "tensorboard")

    def __post_init__(self):
        Field(Recipe).check("name", self.recipe)
        _check_fields(self)
        Field(int, 1, TRAIN_IMAGES - self.val_split, none=True).check("train_subset", self.train_subset)
        if self.loader == "classic" and self.recipe.epoch_images:
            raise ConfigError("loader", "the classic loader trains on whole epochs: use the fast loader for a recipe "
                                        "with epoch_images")
        if self.loader == "classic" and self.recipe.augment != "classic":
            raise ConfigError("loader", f"the classic loader has the original's augmentation only, not "
                                        f"{self.recipe.augment!r}: use the fast loader, or the classic augmentation")
        if self.recipe.scheduler == "OneCycleLR":
            check_one_cycle(self.epochs * self.steps_per_epoch, self.recipe.pct_start)

    @classmethod
    def build(cls, recipe="seed", **settings):
        """A new run's configuration: the named recipe, its fields in `settings` overridden (None: the recipe's)."""
        run = {f.name: settings.pop(f.name) for f in fields(cls) if f.name in settings}
        return cls(get_recipe(recipe, **settings), **_expanded(run))

    @property
    def name(self):
        return self.recipe.name

    @property
    def epochs(self):
        return self.recipe.epochs

    @property
    def evaluated_on(self):
        """What every epoch is measured on (and best.pt chosen by): "val" with a validation split, else "test"."""
        return "val" if self.val_split else "test"

    @property
    def steps_per_epoch(self):
        images = self.train_subset or TRAIN_IMAGES - self.val_split
        return math.ceil(min(images, self.recipe.epoch_images or images) / self.recipe.batch_size)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A configuration read from a file, checked as strictly as a new one: ConfigError for anything wrong."""
        try:
            return cls(Recipe(**values["recipe"]), **{k: v for k, v in values.items() if k != "recipe"})
        except (TypeError, KeyError, AttributeError) as e:  # not a mapping; a setting missing, or not this version's
            raise ConfigError("config", f"not a configuration of this version ({first_line(e)})") from None

    def resumed(self, changes, epochs_done):
        """(this configuration with `changes` (field: value; "recipe": its name) that a resume may make, {field: (old,
        new)}). `out` is where the run continues (None: its own folder, wherever it is now)."""
        changes = _expanded(changes)
        out = changes.pop("out", None)  # the saved folder is history: the run may have moved
        now = {**asdict(self), **asdict(self.recipe), "recipe": self.name}
        changed = {k: (now[k], v) for k, v in changes.items() if v != now[k]}
        for field, (old, _) in changed.items():
            if field not in self.RESUME_MAY_CHANGE:
                raise ConfigError(field, f"cannot change when resuming (the run has {old}): leave it out, or start a "
                                         "new run")
        new = {k: v for k, (_, v) in changed.items()}
        epochs = new.pop("epochs", self.epochs)
        if epochs < epochs_done:
            raise ConfigError("epochs", f"{epochs} is fewer than the {epochs_done} epochs the run has done")
        if epochs != self.epochs and self.recipe.scheduler == "OneCycleLR":
            raise ConfigError("epochs", f"cannot change for a one-cycle run: its schedule was laid out over "
                                        f"{self.epochs} epochs; start a new run instead")
        return replace(self, recipe=replace(self.recipe, epochs=epochs), out=out, **new), changed


def _expanded(settings):
    """`~` expanded in the paths a user gives, the same way everywhere."""
    return {k: os.path.expanduser(v) if k in ("data_dir", "out") and isinstance(v, str) else v
            for k, v in settings.items()}
