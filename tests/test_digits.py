
import io
import os
import signal
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import as_photo, crafted_pngs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model import Net
from s5.data import MEAN, STD
from s5.digits import ImageInputError, load_digit, open_image, predict_digits, preprocess_digit
from s5.plots import plot_predictions

BACKGROUND = -MEAN / STD


MODES = [("L", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".bmp"), ("LA", ".png")]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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



@pytest.mark.slow
def test_plot_predictions(trained, tmp_path):
    model, _, digits = trained
    Image.fromarray(as_photo(digits[1][0], True)).save(tmp_path / "a.png")
    fig = plot_predictions(predict_digits(model, [tmp_path]), save_path=tmp_path / "p.png")
    results = predict_digits(model, [tmp_path / "a.png"])
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "a.png"
    assert fig.axes[1].get_title().startswith(f"{results[0]['digit']} (")  # the model's answer for that file
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- robustness: what people and hostile files feed predict ------------------------------------------------------

@pytest.mark.slow
def test_crafted_pngs_fail_alone(trained, tmp_path):
    model, _, digits = trained
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    for name, data in crafted_pngs(good).items():
        (tmp_path / name).write_bytes(data)
    results = {Path(r["path"]).name: r for r in predict_digits(model, tmp_path)}
    assert results["good.png"]["digit"] == digits[0][1]
    for name in crafted_pngs(good):  # PIL refuses them at open or at decode, by plugin order: either is per file
        assert results[name]["error"].startswith(("cannot read it (", "not an image PIL can read")), results[name]


def rotated_jpeg_with_orientation(digit, path):
    """The digit stored on its side, with EXIF Orientation=6 saying "turn me 90° clockwise", as phones save photos."""
    upright = Image.fromarray(as_photo(digit, True)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


@pytest.mark.slow
def test_exif_orientation_is_applied(trained, tmp_path):
    model, _, digits = trained
    for k, (digit, label) in enumerate(digits):
        rotated_jpeg_with_orientation(digit, tmp_path / f"{k}.jpg")
        assert predict_digits(model, tmp_path / f"{k}.jpg")[0]["digit"] == label


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["16-bit", "16-bit scan levels", "float tiff"])
def test_deep_images_are_scaled_by_their_own_range(trained, tmp_path, kind):
    model, _, digits = trained
    for k, (digit, label) in enumerate(digits):
        ink = as_photo(digit, light_background=False).astype(np.float64) / 255  # 0 paper .. 1 ink
        if kind == "16-bit":
            image, path = Image.fromarray(np.uint16(65535 - ink * 65535)), tmp_path / f"{k}.png"
        elif kind == "16-bit scan levels":  # grey paper at 56000, ink at 8000: no pixel near either end
            image, path = Image.fromarray(np.uint16(56000 - ink * 48000)), tmp_path / f"{k}.png"
        else:
            image, path = Image.fromarray(np.float32(1 - ink), mode="F"), tmp_path / f"{k}.tiff"
        image.save(path)
        [result] = predict_digits(model, path)
        assert result["error"] is None and result["digit"] == label, (kind, result)


@pytest.mark.slow
def test_white_ink_on_a_transparent_canvas(trained, tmp_path):
    model, _, digits = trained
    digit, label = digits[1]
    ink = as_photo(digit, light_background=False)
    rgba = np.full((*ink.shape, 4), 255, np.uint8)  # white everywhere ...
    rgba[..., 3] = ink  # ... and only the strokes opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "white.png")
    assert predict_digits(model, tmp_path / "white.png")[0]["digit"] == label


@pytest.mark.slow
def test_animated_gif_is_refused_with_a_reason(trained, tmp_path):
    model, _, digits = trained
    frames = [Image.fromarray(as_photo(d, True)) for d, _ in digits[:3]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    [result] = predict_digits(model, tmp_path / "anim.gif")
    assert "animated image (3 frames)" in result["error"]


@pytest.mark.slow
def test_folders_are_searched_recursively_for_every_format_hidden_files_skipped(trained, tmp_path):
    model, _, digits = trained
    photo = Image.fromarray(as_photo(digits[0][0], True))
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ["a.gif", "b.webp", "c.tiff", "d.jfif", "sub/e.png", "sub/deeper/f.JPG", ".hidden/g.png"]:
        jpeg = name.lower().endswith(("jfif", "jpg"))
        photo.convert("RGB" if jpeg else "L").save(tmp_path / name, format="JPEG" if jpeg else None)
    (tmp_path / "._a.png").write_bytes(b"\0\5\26\7 macOS resource fork")
    (tmp_path / "notes.txt").write_text("not an image, not a candidate")
    results = predict_digits(model, tmp_path)
    names = sorted(Path(r["path"]).relative_to(tmp_path).as_posix() for r in results)
    assert names == ["a.gif", "b.webp", "c.tiff", "d.jfif", "sub/deeper/f.JPG", "sub/e.png"]
    assert all(r["error"] is None and r["digit"] == digits[0][1] for r in results)


@pytest.mark.slow
def test_a_single_path_is_one_file_not_its_characters(trained, tmp_path):
    model, _, digits = trained
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "x.png")
    assert len(predict_digits(model, str(tmp_path / "x.png"))) == 1
    assert len(predict_digits(model, tmp_path / "x.png", device="cpu")) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the damage it reads past
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=600), cut=st.integers(0, 400), flips=st.lists(st.integers(0, 10_000), max_size=6))
def test_any_bytes_give_a_digit_or_an_image_input_error(tmp_path, junk, cut, flips):
    """Random bytes, and real PNG/GIF/BMP/TIFF files cut short or with flipped bytes: never anything but one of two."""
    buf = io.BytesIO()
    fmt = ["PNG", "GIF", "BMP", "TIFF"][cut % 4]
    Image.fromarray(np.uint8(np.random.default_rng(cut).integers(0, 255, (30, 20)))).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    for i in flips:
        data[i % len(data)] ^= 0xFF
    for k, content in enumerate([junk, bytes(data[:len(data) - cut]), bytes(data)]):
        path = tmp_path / f"f{k}"
        path.write_bytes(content)
        try:
            x = load_digit(path)
        except ImageInputError:
            continue
        assert x.shape == (1, 28, 28) and torch.isfinite(x).all()


@pytest.mark.slow
def test_in_memory_images_are_classified_like_files(trained, tmp_path):
    """A notebook passes what it has: a PIL image, a numpy array, a torch tensor, or a list mixing them with paths."""
    model, _, digits = trained
    digit, label = digits[0]
    photo = Image.fromarray(as_photo(digit, True))
    photo.save(tmp_path / "a.png")
    normalised = (torch.from_numpy(digit).float().unsqueeze(0) / 255 - MEAN) / STD  # a dataset item, (1, 28, 28)
    inputs = [photo, np.asarray(photo), torch.tensor(np.asarray(photo)), normalised, tmp_path / "a.png",
              np.asarray(photo.convert("RGB"))]
    results = predict_digits(model, inputs)
    assert [r["path"] for r in results] == ["<image 0>", "<image 1>", "<image 2>", "<image 3>",
                                            str(tmp_path / "a.png"), "<image 5>"]
    assert all(r["error"] is None and r["digit"] == label for r in results), results
    file_input = results[4]["input"]
    assert all(torch.equal(r["input"], file_input) for r in results[:3])  # the same preprocessing as the file
    [one] = predict_digits(model, photo)  # one image, not a list
    assert one["digit"] == label and one["path"] == "<image 0>"


@pytest.mark.slow
def test_unusable_in_memory_inputs_get_reasons(trained):
    model, _, _ = trained
    batch = np.zeros((5, 28, 28), np.uint8)
    results = predict_digits(model, [batch, np.zeros((0, 5)), Image.new("L", (6000, 6000))])
    assert "shape (5, 28, 28) is not one image" in results[0]["error"]
    assert "is not one image" in results[1]["error"]
    assert "pixel limit" in results[2]["error"]
    with pytest.raises(TypeError, match="input 0 is a int"):
        predict_digits(model, [5])


@pytest.mark.slow
def test_empty_path_is_an_error_not_the_current_folder(trained, tmp_path, monkeypatch):
    model, _, digits = trained
    Image.fromarray(as_photo(digits[0][0], True)).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    [result] = predict_digits(model, "")
    assert result["error"].startswith("the path is empty")


def test_fifos_and_device_files_are_named_and_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # no writer: opening it would wait for ever
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the FIFO was opened and blocked"))
    signal.alarm(20)
    try:
        results = predict_digits(Net(), [tmp_path / "pipe.png", "/dev/null", tmp_path])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [r["error"] for r in results] == ["it is a FIFO (named pipe), not an image file",
                                             "it is a device file, not an image file",
                                             "it is a FIFO (named pipe), not an image file"]
    with pytest.raises(ImageInputError, match="it is a folder, not an image file"):
        open_image(tmp_path)


def png_declaring(width, height):
    """A 1x1 PNG whose header says width x height: a few bytes on disk, a decompression bomb to PIL."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("side", [6000, 12000, 20000])  # below PIL's warning, above it, above its error
def test_our_pixel_limit_speaks_before_pils(tmp_path, side):
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(side, side))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for read, source in ((load_digit, path), (open_image, path.read_bytes())):  # predict's files, the demo's bytes
            with pytest.raises(ImageInputError, match="over the 25,000,000-pixel limit: scale it down first"):
                read(source)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert ("ignore", None, Image.DecompressionBombWarning, None, 0) not in warnings.filters  # none left behind
