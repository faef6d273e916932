import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

import utils
from model import Net

BACKGROUND = -utils.MEAN / utils.STD


@pytest.fixture(scope="module")
def trained(mnist_root, tmp_path_factory):
    """A Net trained for one quick epoch on 12k real images, saved as train.py would."""
    utils.set_seed(0)
    device = torch.device("cpu")
    model = Net()
    train_loader = utils.get_MNISTdataset_with_loader("train", {"batch_size": 64, "shuffle": True}, data_dir=mnist_root,
                                                      device=device, subset=12_000)
    opt = utils.get_optimizer(model, "SGD", 0.02, 0.9)
    utils.train(model, device, train_loader, opt, utils.get_loss(), [], [], progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    utils.save_checkpoint(path, model, epoch=1)
    test = utils.get_mnist_dataset(False, mnist_root)
    model.eval()
    with torch.no_grad():
        preds = model((test.data[:200].unsqueeze(1).float() / 255 - utils.MEAN) / utils.STD).argmax(1)
    correct = [i for i in range(200) if preds[i] == test.targets[i]][:6]
    return model, path, [(test.data[i].numpy(), int(test.targets[i])) for i in correct]


def as_photo(digit, light_background, scale=5, pad=(30, 10)):
    """An MNIST digit as a person might photograph it: bigger, off-centre, maybe dark on light."""
    img = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    arr = np.pad(arr, ((pad[0], pad[1]), (pad[1], pad[0] * 2)))
    return 255 - arr if light_background else arr


MODES = [("L", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".bmp"), ("LA", ".png")]


@pytest.mark.parametrize("light", [True, False])
@pytest.mark.parametrize("mode,suffix", MODES)
def test_every_mode_and_orientation_is_classified(trained, tmp_path, mode, suffix, light):
    model, _, digits = trained
    for k, (digit, label) in enumerate(digits):
        path = tmp_path / f"d{k}{suffix}"
        Image.fromarray(as_photo(digit, light)).convert(mode).save(path)
        [result] = utils.predict_digits(model, [path])
        assert result["error"] is None and result["digit"] == label, (path, result)
        assert result["probability"] >= result["runner_up_probability"]


def test_transparent_png_with_dark_ink(trained, tmp_path):
    model, _, digits = trained
    digit, label = digits[0]
    ink = as_photo(digit, light_background=False)
    rgba = np.zeros((*ink.shape, 4), np.uint8)
    rgba[..., 3] = ink  # black ink, alpha = ink, transparent paper
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert utils.predict_digits(model, [tmp_path / "t.png"])[0]["digit"] == label


def test_preprocessing_matches_mnist_conventions():
    canvas = np.full((300, 200), 255, np.uint8)
    canvas[40:240, 90:110] = 0  # a tall dark "1" on white paper, off-centre
    x = utils.preprocess_digit(Image.fromarray(canvas))
    assert x.shape == (1, 28, 28)
    ink = (x[0] * utils.STD + utils.MEAN).clamp(0, 1)
    rows, cols = torch.nonzero(ink > 0.1, as_tuple=True)
    assert rows.max() - rows.min() + 1 <= 21 and rows.max() - rows.min() + 1 >= 19  # fitted into 20 px
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cy, cx = (ink * ys).sum() / ink.sum(), (ink * xs).sum() / ink.sum()
    assert abs(cy - 14) < 1 and abs(cx - 14) < 1  # centre of mass at the centre
    assert x[0, 0, 0].item() == pytest.approx(BACKGROUND, abs=1e-5)


def test_bad_files_get_messages_and_others_still_classified(trained, tmp_path):
    model, ckpt, digits = trained
    Image.fromarray(as_photo(*digits[0][:1], light_background=True)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image")
    Image.new("L", (60, 60), 255).save(tmp_path / "blank.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:60])
    huge = Image.new("1", (6000, 6000), 1)
    huge.save(tmp_path / "huge.png")
    files = ["good.png", "empty.png", "notes.png", "blank.png", "cut.png", "huge.png"]
    results = {r["path"].rsplit("/", 1)[1]: r for r in utils.predict_digits(model, [tmp_path / f for f in files])}
    assert results["good.png"]["digit"] == digits[0][1]
    assert "empty" in results["empty.png"]["error"]
    assert "not an image" in results["notes.png"]["error"]
    assert "no ink" in results["blank.png"]["error"]
    assert "cannot read" in results["cut.png"]["error"]
    assert "pixel limit" in results["huge.png"]["error"]

    done = subprocess.run([sys.executable, str(REPO / "predict.py"), str(ckpt), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 6 and "Traceback" not in done.stderr  # a folder expands to its image files
    assert any(line.endswith(")") and "good.png: " in line and "runner-up" in line for line in lines)


def test_cli_json_and_exit_codes(trained, tmp_path):
    model, ckpt, digits = trained
    for k, (digit, _) in enumerate(digits[:3]):
        Image.fromarray(as_photo(digit, True)).save(tmp_path / f"{k}.png")
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), str(ckpt), str(tmp_path), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["digit"] for r in rows] == [d[1] for d in digits[:3]]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), str(bad), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


def test_plot_predictions(trained, tmp_path):
    model, _, digits = trained
    Image.fromarray(as_photo(digits[1][0], True)).save(tmp_path / "a.png")
    fig = utils.plot_predictions(utils.predict_digits(model, [tmp_path]), save_path=tmp_path / "p.png")
    assert len(fig.axes) == 2 and (tmp_path / "p.png").stat().st_size > 0
