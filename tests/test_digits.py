
import numpy as np
import pytest
import torch
from conftest import as_photo
from PIL import Image

from s5.data import MEAN, STD
from s5.digits import predict_digits, preprocess_digit
from s5.plots import plot_predictions

BACKGROUND = -MEAN / STD


MODES = [("L", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".bmp"), ("LA", ".png")]


@pytest.mark.parametrize("light", [True, False])
@pytest.mark.parametrize("mode,suffix", MODES)
def test_every_mode_and_orientation_is_classified(trained, tmp_path, mode, suffix, light):
    model, _, digits = trained
    for k, (digit, label) in enumerate(digits):
        path = tmp_path / f"d{k}{suffix}"
        Image.fromarray(as_photo(digit, light)).convert(mode).save(path)
        [result] = predict_digits(model, [path])
        assert result["error"] is None and result["digit"] == label, (path, result)
        assert result["probability"] >= result["runner_up_probability"]


def test_transparent_png_with_dark_ink(trained, tmp_path):
    model, _, digits = trained
    digit, label = digits[0]
    ink = as_photo(digit, light_background=False)
    rgba = np.zeros((*ink.shape, 4), np.uint8)
    rgba[..., 3] = ink  # black ink, alpha = ink, transparent paper
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert predict_digits(model, [tmp_path / "t.png"])[0]["digit"] == label


def test_preprocessing_matches_mnist_conventions():
    canvas = np.full((300, 200), 255, np.uint8)
    canvas[40:240, 90:110] = 0  # a tall dark "1" on white paper, off-centre
    x = preprocess_digit(Image.fromarray(canvas))
    assert x.shape == (1, 28, 28)
    ink = (x[0] * STD + MEAN).clamp(0, 1)
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
    results = {r["path"].rsplit("/", 1)[1]: r for r in predict_digits(model, [tmp_path / f for f in files])}
    assert results["good.png"]["digit"] == digits[0][1]
    assert "empty" in results["empty.png"]["error"]
    assert "not an image" in results["notes.png"]["error"]
    assert "no ink" in results["blank.png"]["error"]
    assert "cannot read" in results["cut.png"]["error"]
    assert "pixel limit" in results["huge.png"]["error"]



def test_plot_predictions(trained, tmp_path):
    model, _, digits = trained
    Image.fromarray(as_photo(digits[1][0], True)).save(tmp_path / "a.png")
    fig = plot_predictions(predict_digits(model, [tmp_path]), save_path=tmp_path / "p.png")
    assert len(fig.axes) == 2 and (tmp_path / "p.png").stat().st_size > 0
