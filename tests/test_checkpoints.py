import io
import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch

from model import Net
from s5.checkpoints import (
    CHECKPOINT_FORMAT,
    MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_ENTRIES,
    CheckpointError,
    check_archive,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from s5.device import set_seed
from s5.engine import get_optimizer, get_scheduler, new_history


def _trained_state():
    set_seed(0)
    model = Net()
    opt = get_optimizer(model, "SGD", 0.01, 0.9)
    sched = get_scheduler(opt, 15, 0.1)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _trained_state()
    hist = new_history()
    hist["test_acc"].append(97.5)
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 3, hist, {"lr": 0.01, "out": tmp_path})
    expected = (random.random(), np.random.rand(), torch.rand(1))

    fresh = Net()
    state = load_checkpoint(tmp_path / "last.pt", fresh)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = get_optimizer(fresh, "SGD", 0.01, 0.9)
    opt2.load_state_dict(state["optimizer"])
    buffers = [o.state_dict()["state"][0]["momentum_buffer"] for o in (opt, opt2)]
    assert torch.equal(*buffers)
    assert state["epoch"] == 3 and state["history"]["test_acc"] == [97.5] and state["args"]["out"] == str(tmp_path)
    assert state["scheduler"]["last_epoch"] == 1
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_bare_state_dict_loads(tmp_path):
    model = Net()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    load_checkpoint(tmp_path / "model.pt", Net())


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
    save_checkpoint(tmp_path / "other.pt", other)
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


def test_resume_needs_every_key(tmp_path):
    model, opt, sched = _trained_state()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1, {"epoch": [1]}, {"lr": 0.01})
    check_resumable(load_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt")
    save_checkpoint(tmp_path / "bare.pt", model, epoch=1, args={"lr": 0.01})
    with pytest.raises(CheckpointError, match="cannot be resumed: it lacks optimizer, scheduler, history"):
        check_resumable(load_checkpoint(tmp_path / "bare.pt"), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="holds weights only"):
        check_resumable({"model": {}}, "model.pt")


def test_damaged_checkpoint_without_weights(tmp_path):
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="it has no model weights"):
        load_checkpoint(tmp_path / "x.pt", Net())


# --- robustness: archives that declare more than a Net checkpoint holds --------------------------------------------

def zip_bomb(model, declared=256 * 2**20):
    """A real checkpoint of `model` whose largest tensor entry is replaced by `declared` bytes of DEFLATE-compressed
    zeros (about 1000:1): the file stays small, torch.load would inflate all of it into memory."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with zipfile.ZipFile(buffer) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    biggest = max(entries, key=lambda e: len(e[1]))[0].filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info, data in entries:
            if info.filename != biggest:
                dst.writestr(info, data)
                continue
            bomb = zipfile.ZipInfo(info.filename)
            bomb.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(bomb, "w", force_zip64=True) as f:
                zeros = bytes(2**24)
                for _ in range(declared // len(zeros)):
                    f.write(zeros)
    return out.getvalue()


def test_zip_bomb_is_refused_before_torch_inflates_it(tmp_path, monkeypatch):
    (tmp_path / "bomb.pt").write_bytes(zip_bomb(Net()))
    assert (tmp_path / "bomb.pt").stat().st_size < 2 * 2**20  # small on disk, 256 MiB declared

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError, match=r"refusing to load .*bomb\.pt: it declares .* bytes uncompressed"):
        load_checkpoint(tmp_path / "bomb.pt", Net())


def test_archive_with_too_many_entries_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "many.pt", "w") as archive:
        for k in range(MAX_ARCHIVE_ENTRIES + 1):
            archive.writestr(f"archive/data/{k}", b"")
    with pytest.raises(CheckpointError, match=f"declares {MAX_ARCHIVE_ENTRIES + 1:,} entries"):
        load_checkpoint(tmp_path / "many.pt")


def test_real_checkpoints_pass_the_archive_check(tmp_path):
    model, opt, sched = _trained_state()
    save_checkpoint(tmp_path / "last.pt", model, opt, sched, 1, history=new_history())
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
    with pytest.raises(CheckpointError, match="refusing to load .* larger than a checkpoint"):
        load_checkpoint(tmp_path / "big.pt")
