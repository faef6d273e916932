import os
import pickle
import random
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_train, zip_bomb

from model import Net
from s5.checkpoints import (
    CHECKPOINT_FORMAT,
    MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_ENTRIES,
    CheckpointError,
    check_archive,
    checkpoint_bytes,
    load_checkpoint,
    read_resumable,
    save_weights,
    set_rng_state,
)
from s5.config import RECIPES, RunConfig
from s5.device import set_seed
from s5.loop import new_history
from s5.mnist import MNISTDataError
from s5.optim import get_optimizer, get_scheduler


def save_checkpoint(path, model, opt, sched, epoch, history=None, config=None, run_id="abc123"):
    """A run's checkpoint as s5.callbacks.Checkpoints writes it, from the parts a Run holds."""
    none = SimpleNamespace(state_dict=lambda: None)  # a checkpoint of weights without an optimizer or schedule
    run = SimpleNamespace(model=model, optimizer=opt or none, scheduler=sched or none, history=history or new_history(),
                          config=config or RunConfig.build("seed"), run_dir=SimpleNamespace(run_id=run_id))
    path.write_bytes(checkpoint_bytes(run, epoch))


def _trained_state(recipe="seed"):
    set_seed(0)
    model = Net()
    opt = get_optimizer(model, RECIPES[recipe])
    sched = get_scheduler(opt, RECIPES[recipe], 100)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _trained_state()
    hist = new_history()
    hist["test_acc"].append(97.5)
    config = RunConfig.build("seed", lr=0.02, out=str(tmp_path))
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 3, hist, config)
    expected = (random.random(), np.random.rand(), torch.rand(1))

    fresh = Net()
    state = load_checkpoint(tmp_path / "last.pt", fresh)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = get_optimizer(fresh, RECIPES["seed"])
    opt2.load_state_dict(state["optimizer"])
    buffers = [o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, opt2)]
    assert torch.equal(*buffers)
    assert state["epoch"] == 3 and state["history"]["test_acc"] == [97.5]
    assert RunConfig.from_dict(state["config"]) == config  # saved whole: every field, resolved
    assert {k: state["config"]["recipe"][k] for k in ("epochs", "batch_size", "lr")} == \
        {"epochs": 20, "batch_size": 512, "lr": 0.02}  # resolved: no None
    assert state["scheduler"]["last_epoch"] == 1
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_bare_state_dict_loads(tmp_path):
    model = Net()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = Net()
    state = load_checkpoint(tmp_path / "model.pt", fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert state["model"].keys() == model.state_dict().keys() and "optimizer" not in state


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"format": CHECKPOINT_FORMAT, "model": _Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load .*could run code"):
        load_checkpoint("evil.pt", Net())
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint(tmp_path):
    model, opt, sched = _trained_state()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        load_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("content,match", [
    (b"hello, I am a text file\n", "not a readable checkpoint"),
    (b"", "not a readable checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, match):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "x.pt")


def test_torch_file_of_another_kind(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this repo"):
        load_checkpoint(tmp_path / "list.pt")


def test_other_architecture(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 26 * 26, 10))
    save_checkpoint(tmp_path / "other.pt", other, None, None, 0)
    with pytest.raises(CheckpointError, match="different architecture than Net"):
        load_checkpoint(tmp_path / "other.pt", Net())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")


def test_nan_weights_are_refused(tmp_path):
    model = Net()
    torch.save({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN or infinite weights"):
        load_checkpoint(tmp_path / "nan.pt", Net())


def one_epoch_history():
    history = new_history()
    for key in history:
        history[key].append(1 if key == "epoch" else 0.5)
    return history


def test_resume_needs_every_key(tmp_path):
    model, opt, sched = _trained_state()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1, one_epoch_history(), RunConfig.build("seed"))
    assert read_resumable(tmp_path / "last.pt", Net()).epoch == 1
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**state, "optimizer": None, "scheduler": None, "history": None}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="cannot be resumed: it lacks optimizer, scheduler, history"):
        read_resumable(tmp_path / "bare.pt", Net())
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="holds weights only"):
        read_resumable(tmp_path / "model.pt", Net())


def _tampered(tmp_path, change, recipe="seed"):
    """A real resumable checkpoint with one field changed the way a hostile or damaged file might have it."""
    model, opt, sched = _trained_state(recipe)
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1, one_epoch_history(), RunConfig.build(recipe))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "last.pt")
    return tmp_path / "last.pt"


@pytest.mark.parametrize("change, match", [
    (lambda s: s["config"].update(seed=-1), "impossible seed"),
    (lambda s: s["config"].update(data_dir=5), "impossible data_dir"),
    (lambda s: s["config"]["recipe"].update(batch_size=0), "impossible batch_size"),
    (lambda s: s["config"]["recipe"].update(lr=float("nan")), "impossible lr"),
    (lambda s: s["config"].update(loader="evil"), "impossible loader"),
    (lambda s: s["config"].update(surprise=1), "unexpected keyword argument 'surprise'"),
    (lambda s: s.update(epoch="1"), "impossible epoch: '1' is not a whole number"),
    (lambda s: s.update(epoch=-5), "impossible epoch: -5 is out of range: give 0 to 20"),
    (lambda s: s.update(epoch=2), "history.epoch: no item 1"),
    (lambda s: s["history"].update(epoch=[1.0]), "impossible history.epoch.0: float where a run has int"),
    (lambda s: s["history"].update(test_acc=["99"]), "impossible history.test_acc.0: str where a run has float"),
    (lambda s: s["history"].update(test_acc=[]), "history.test_acc: no item 0"),
    (lambda s: s["history"].update(epoch=[5]), "history.epoch: not the 1 epochs done"),
    (lambda s: s["history"].update(test_acc=[float("nan")]), "history.test_acc.0: nan is out of range"),
    (lambda s: s["history"].update(surprise=[]), "history: unexpected key surprise"),
    (lambda s: s["history"].update(test_acc=7), "impossible history.test_acc: int where a run has list"),
    (lambda s: s.update(history=[1, 2]), "history: list where a run has dict"),
    (lambda s: s["rng"].update(python="x"), "impossible rng: does not load"),
    (lambda s: s.update(run_id="../x"), "impossible run_id: '../x' is not a run's id"),
    (lambda s: s.update(run_id=5), "impossible run_id: 5 is not a non-empty name"),
])
def test_hostile_or_odd_fields_are_refused_at_load(tmp_path, change, match):
    with pytest.raises(CheckpointError, match=match):
        read_resumable(_tampered(tmp_path, change), Net())


def test_crafted_cuda_states_are_refused_where_they_would_be_restored(tmp_path, monkeypatch):
    path = _tampered(tmp_path, lambda s: s["rng"].update(cuda=["x"]))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # as on a GPU machine
    with pytest.raises(CheckpointError, match="impossible rng: does not load"):
        read_resumable(path, Net())


def train_main(capsys, monkeypatch, *args):
    """train.py's main in this process, as the command line calls it, up to the data: (exit code, stderr, the data
    folders it would have fetched into)."""
    import train

    fetched = []

    def fetch(root=None, *args, **kwargs):
        fetched.append(root)
        raise MNISTDataError("stopped before the data")

    monkeypatch.setattr("s5.run.ensure_mnist", fetch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["--no-progress", *map(str, args)])
    return stop.value.code, capsys.readouterr().err, fetched


def _group(state, **values):
    state["optimizer"]["param_groups"][0].update(values)


# Loadable checkpoints that are not what a run saves: each one reached a traceback when it was resumed.
CRAFTED = [
    ("seed", "rng: does not load (Expected a CPUGeneratorImplState of size 5056",
     lambda s: s["rng"].update(torch=torch.zeros(7, dtype=torch.uint8))),
    ("seed", "scheduler: unexpected key optimizer", lambda s: s["scheduler"].update(optimizer={})),
    ("seed", "scheduler.step_size: str where a run has int", lambda s: s["scheduler"].update(step_size="abc")),
    ("seed", "scheduler.step_size: 0 is out of range", lambda s: s["scheduler"].update(step_size=0)),
    ("seed", "optimizer: no key state", lambda s: s["optimizer"].pop("state")),
    ("seed", "optimizer.state.0.momentum_buffer: torch.float32 [3] where a run has torch.float32 [32, 1, 3, 3]",
     lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3))),
    ("seed", "optimizer.param_groups.0.lr: str where a run has float", lambda s: _group(s, lr="abc")),
    ("seed", "optimizer.param_groups.0.momentum: 1.5 is out of range", lambda s: _group(s, momentum=1.5)),
    ("seed", "optimizer.param_groups.0.params", lambda s: _group(s, params=[0])),
    ("seed", "optimizer.param_groups.0.nesterov: True where a run has False", lambda s: _group(s, nesterov=True)),
    ("fast", "optimizer.state.11.exp_avg_sq: torch.float32 [10, 10] where",
     lambda s: s["optimizer"]["state"][11].update(exp_avg_sq=torch.zeros(10, 10))),
    ("fast", "optimizer.state.0.step: float where a run has Tensor",
     lambda s: s["optimizer"]["state"][0].update(step=1.0)),
    ("fast", "optimizer.param_groups.0.betas", lambda s: _group(s, betas=(0.9,))),
    ("fast", "scheduler.total_steps: str where a run has int", lambda s: s["scheduler"].update(total_steps="abc")),
    ("fast", "scheduler._schedule_phases", lambda s: s["scheduler"].update(_schedule_phases=[])),
    ("fast", "scheduler._schedule_phases.1.end_lr: 'evil' where a run has 'min_lr'",
     lambda s: s["scheduler"]["_schedule_phases"][1].update(end_lr="evil")),
    ("sprint", "optimizer.param_groups.0.muon: False where a run has True", lambda s: _group(s, muon=False)),
    ("sprint", "optimizer.param_groups.1.muon: True where a run has False",
     lambda s: s["optimizer"]["param_groups"][1].update(muon=True)),
]


@pytest.mark.parametrize("recipe, field, change", CRAFTED)
def test_crafted_checkpoints_are_one_line_naming_the_field_before_any_work(tmp_path, capsys, monkeypatch, recipe,
                                                                            field, change):
    path = _tampered(tmp_path, change, recipe)
    code, err, _ = train_main(capsys, monkeypatch, "--resume", path, "--out", tmp_path / "new")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path} ") and field in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_crafted_checkpoint_resumed_from_the_command_line_is_one_line(tmp_path):
    path = _tampered(tmp_path, lambda s: _group(s, lr="abc"))  # was "error: Unknown format code 'g' for ... 'str'"
    assert_one_line_error(run_train("--resume", path, "--out", tmp_path / "new"), 2, str(path),
                          "optimizer.param_groups.0.lr")
    assert not (tmp_path / "new").exists()


def test_resume_never_fetches_into_the_data_folder_a_checkpoint_names(tmp_path, capsys, monkeypatch):
    """A checkpoint naming an existing folder (say ~/Documents) as its data folder made a resume fetch MNIST there."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("my notes")
    path = _tampered(tmp_path, lambda s: s["config"].update(data_dir=str(home)))
    code, err, fetched = train_main(capsys, monkeypatch, "--resume", path, "--out", tmp_path / "new")
    assert code == 2 and f"the run's data folder {home} holds no MNIST: give --data-dir" in err, err
    assert not fetched and os.listdir(home) == ["notes.txt"] and not (tmp_path / "new").exists()


@pytest.mark.parametrize("recipe", ["seed", "fast", "sprint"])  # SGD and StepLR; AdamW, Muon and OneCycleLR
def test_what_we_save_we_load_and_wrapped_models(tmp_path, recipe):
    model, opt, sched = _trained_state(recipe)
    history = one_epoch_history()
    history["test_acc"] = [97.5]
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1, history, RunConfig.build(recipe))
    resumed = read_resumable(tmp_path / "last.pt", Net())
    assert resumed.epoch == 1 and resumed.history["test_acc"] == [97.5]
    # Files other code wrote from wrapped models: names with "module." or "_orig_mod." load into a plain Net.
    for prefix in ("module.", "_orig_mod."):
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "wrapped.pt")
        fresh = Net()
        load_checkpoint(tmp_path / "wrapped.pt", fresh)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_compiled_model_saves_plain_names(tmp_path):
    model = Net()
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    save_weights(tmp_path / "c.pt", compiled)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(state) == set(model.state_dict())


def test_checkpoint_of_an_older_version_predicts_but_does_not_resume(tmp_path):
    model, opt, sched = _trained_state()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1, one_epoch_history())
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state.update(format="s5-checkpoint-1", args={"recipe": "fast", "epochs": 2}, config=None)
    del state["run_id"]
    torch.save(state, tmp_path / "last.pt")
    fresh = Net()
    load_checkpoint(tmp_path / "last.pt", fresh)  # its weights still predict and export
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    state.update(config=RunConfig.build("seed").to_dict(), run_id="abc")
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="earlier version of this repo.*needs a last.pt from this version"):
        read_resumable(tmp_path / "last.pt", Net())


def test_damaged_checkpoint_without_weights(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="it has no model weights"):
        load_checkpoint(tmp_path / "x.pt", Net())


# --- robustness: archives that declare more than a Net checkpoint holds --------------------------------------------

def test_zip_bomb_is_refused_before_torch_inflates_it(tmp_path, monkeypatch):
    (tmp_path / "bomb.pt").write_bytes(zip_bomb(Net()))
    assert (tmp_path / "bomb.pt").stat().st_size < 2 * 2**20  # small on disk, 256 MiB declared

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError, match=r"refusing to load .*bomb\.pt: .* bytes uncompressed: a checkpoint"):
        load_checkpoint(tmp_path / "bomb.pt", Net())


def test_archive_with_too_many_entries_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "many.pt", "w") as archive:
        for k in range(MAX_ARCHIVE_ENTRIES + 1):
            archive.writestr(f"archive/data/{k}", b"")
    with pytest.raises(CheckpointError, match=f" {MAX_ARCHIVE_ENTRIES + 1:,} entries, "):
        load_checkpoint(tmp_path / "many.pt")


def test_real_checkpoints_pass_the_archive_check(tmp_path):
    model, opt, sched = _trained_state()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1)
    check_archive(tmp_path / "last.pt")
    with zipfile.ZipFile(tmp_path / "last.pt") as archive:  # the caps are far above what train.py writes
        assert sum(i.file_size for i in archive.infolist()) * 10 < MAX_ARCHIVE_BYTES


def test_legacy_torch_format_still_loads(tmp_path):
    """torch's pre-1.6 format is not a zip: it is read (bounded by the file-size cap), as before."""
    model = Net()
    torch.save(model.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    load_checkpoint(tmp_path / "old.pt", Net())


def test_oversized_file_is_refused_before_reading(tmp_path):
    with open(tmp_path / "big.pt", "wb") as f:
        f.truncate(MAX_ARCHIVE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="refusing to load .*: 67,108,865 bytes, 0 entries"):
        load_checkpoint(tmp_path / "big.pt")
