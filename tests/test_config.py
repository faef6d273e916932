"""A run's configuration: resolved from a recipe once, checked field by field, read back strictly, resumed by rule."""
import math

import pytest

from s5.config import FIELDS, RECIPES, ConfigError, RunConfig, check, get_recipe


def test_recipes():
    seed = get_recipe("seed")
    assert (seed.epochs, seed.batch_size, seed.lr, seed.momentum, seed.step_size, seed.gamma) == \
        (20, 512, 0.01, 0.9, 15, 0.1)
    assert get_recipe("fast", epochs=7, lr=None).epochs == 7
    with pytest.raises(ValueError, match="seed, fast"):
        get_recipe("slow")


@pytest.mark.parametrize("overrides, field", [
    ({"epochs": 0}, "epochs"), ({"batch_size": -5}, "batch_size"), ({"lr": float("nan")}, "lr"),
    ({"lr": -1}, "lr"), ({"momentum": 2}, "momentum"), ({"epoch": 3}, "epoch"), ({"pct_start": 0}, "pct_start"),
    ({"pct_start": 1.5}, "pct_start"), ({"step_size": 0}, "step_size"), ({"epochs": True}, "epochs"),
    ({"augment": "rotate"}, "augment"), ({"augment": 5}, "augment"), ({"tta": "yes"}, "tta"),
    ({"weight_decay": 1000}, "weight_decay"),  # AdamW's decay at lr 3e-3: every weight times -2 a step
])
def test_get_recipe_refuses_impossible_values(overrides, field):
    with pytest.raises(ConfigError) as err:
        get_recipe("fast", **overrides)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_build_resolves_every_recipe_value():
    config = RunConfig.build("fast", batch_size=256)
    assert (config.recipe.epochs, config.recipe.batch_size, config.recipe.lr) == (2, 256, RECIPES["fast"].lr)
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("run, field", [
    ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"train_subset": 0}, "train_subset"),
    ({"train_subset": 60_001}, "train_subset"), ({"loader": "turbo"}, "loader"), ({"workers": -1}, "workers"),
    ({"amp": "yes"}, "amp"), ({"data_dir": ""}, "data_dir"), ({"progress": 1}, "progress"), ({"colour": 1}, "colour"),
])
def test_run_values_are_checked_once_when_built(run, field):
    with pytest.raises(ConfigError) as err:
        RunConfig.build("seed", **run)
    assert err.value.field == field


def test_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(ConfigError, match="batch_size: 60001 is out of range: give 1 to 60000"):
        RunConfig.build("seed", batch_size=60_001)


def test_resume_changes_only_what_may_change():
    config = RunConfig.build("seed", out="runs/a")
    resumed, changed = config.resumed({"epochs": 25, "device": "cpu", "workers": 0, "seed": 1}, epochs_done=3)
    assert resumed.epochs == 25 and resumed.workers == 0 and changed == {"epochs": (20, 25), "device": ("auto", "cpu"),
                                                                         "workers": (2, 0)}
    assert resumed.out is None  # continues in its own folder, wherever that is now
    for change in ({"seed": 2}, {"lr": 0.5}, {"batch_size": 64}, {"recipe": "fast"}, {"loader": "classic"},
                   {"train_subset": 100}):
        with pytest.raises(ConfigError, match="cannot change when resuming"):
            config.resumed(change, epochs_done=3)
    with pytest.raises(ConfigError, match="fewer than the 3 epochs"):
        config.resumed({"epochs": 2}, epochs_done=3)
    with pytest.raises(ConfigError, match="one-cycle"):
        RunConfig.build("fast").resumed({"epochs": 5}, epochs_done=1)


def test_a_stronger_augmentation_needs_the_fast_loader():
    from dataclasses import replace
    with pytest.raises(ConfigError) as err:
        RunConfig(replace(RECIPES["fast"], augment="elastic"), loader="classic")
    assert err.value.field == "loader" and "fast loader" in str(err.value)
    assert RunConfig(replace(RECIPES["fast"], augment="elastic")).recipe.augment == "elastic"


def test_an_epoch_of_fewer_images_sets_the_steps_and_needs_the_fast_loader():
    assert RunConfig.build("one-epoch", epoch_images=30000).steps_per_epoch == math.ceil(30000 / 64)
    assert RunConfig.build("sprint").steps_per_epoch == math.ceil(24000 / 128)  # it ends mid-epoch
    assert RunConfig.build("one-epoch", epoch_images=30000, train_subset=1000).steps_per_epoch == math.ceil(1000 / 64)
    with pytest.raises(ConfigError) as err:
        RunConfig.build("fast", epoch_images=30000, loader="classic")
    assert err.value.field == "loader" and "whole epochs" in str(err.value)
    with pytest.raises(ConfigError, match="out of range"):
        RunConfig.build("fast", epoch_images=0)


def test_a_configuration_saved_before_augment_and_tta_reads_back_with_the_old_behaviour():
    saved = RunConfig.build("fast").to_dict()
    for key in ("augment", "tta"):
        del saved["recipe"][key]
    recipe = RunConfig.from_dict(saved).recipe
    assert (recipe.augment, recipe.tta) == ("classic", False)


@pytest.mark.parametrize("existing", [False, True])
def test_a_refused_configuration_leaves_the_output_folder_as_it_was(tmp_path, capsys, existing):
    """Every configuration check runs before the folder is claimed: one-cycle's least steps (train.py's configure),
    the classic loader's batch split over the processes (Run, before its claim)."""
    import torch

    import train
    from s5.distributed import Context
    from s5.run import Run

    out, data = tmp_path / "out", tmp_path / "data"
    if existing:
        out.mkdir()
    with pytest.raises(SystemExit) as stop:  # 256 images at batch 128: 2 one-cycle steps
        train.main(["--recipe", "fast", "--train-subset", "256", "--epochs", "1", "--no-progress", "--out", str(out),
                    "--data-dir", str(data)])
    assert stop.value.code == 2 and "needs at least 5 optimizer steps" in capsys.readouterr().err
    config = RunConfig.build("seed", loader="classic", out=str(out), data_dir=str(data))
    with pytest.raises(ConfigError, match="512 does not split evenly over 3 processes"):
        Run(config, torch.device("cpu"), Context(rank=0, world_size=3))
    assert (list(out.iterdir()) == [] if existing else not out.exists()) and not data.exists()


def test_a_crafted_value_is_refused_in_one_short_line():
    for value in (10**400, "x" * 10_000, list(range(10_000))):
        with pytest.raises(ConfigError) as err:
            check("batch_size", value)
        assert len(str(err.value)) < 120 and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"seed: {'9' * 30} is out of range: give 0 to 4294967295"):
        FIELDS["seed"].parse("seed", "9" * 30)  # a flag's error quotes the flag as typed


@pytest.mark.slow  # trains one tiny epoch
def test_paths_from_the_user_expand_the_home_folder_the_same_way(mnist_root, tmp_path, monkeypatch):
    """`--out ~/x` is the folder in $HOME (not a literal ./~ folder), as `--data-dir ~/...` always was."""
    import shutil

    import train

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    shutil.copytree(mnist_root / "MNIST", home / "mnist" / "MNIST")
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert train.main(["--epochs", "1", "--train-subset", "64", "--no-progress", "--out", "~/x",
                       "--data-dir", "~/mnist"]) in (0, None)
    assert (home / "x" / "last.pt").is_file() and list(cwd.iterdir()) == []
    config = RunConfig.build("seed", out="~/y", data_dir="~/d")
    assert (config.out, config.data_dir) == (str(home / "y"), str(home / "d"))
