"""The draw-a-digit demo in a real browser: demo.py serves the page, headless Chromium draws on the sketchpad."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

from s5.demo import classify

pytestmark = pytest.mark.slow  # starts the demo server, some tests a browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_classify_uses_the_predict_preprocessing(trained):
    model, _, digits = trained
    from conftest import as_photo

    from s5.digits import preprocess_digit

    photo = Image.fromarray(as_photo(digits[0][0], True))
    probs, seen, note = classify(model, photo)
    assert max(probs, key=probs.get) == str(digits[0][1]) and sum(probs.values()) == pytest.approx(1, abs=1e-5)
    assert seen.size == (280, 280) and f"reads a {digits[0][1]}" in note
    x = preprocess_digit(photo)  # the page shows exactly the input predict.py would use
    assert seen.resize((28, 28), Image.Resampling.NEAREST).tobytes() == bytes(
        ((x[0] * 0.3081 + 0.1307).clamp(0, 1) * 255).byte().flatten().tolist())
    assert classify(model, Image.new("L", (50, 50), 255))[2].startswith("Nothing to classify: no ink")
    assert classify(model, None) == ({}, None, "Draw a digit.")


def test_the_default_checkpoint_is_the_newest_best_pt(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "demo.py")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: no checkpoint given and none in runs/*/best.pt")
    assert len(done.stderr.splitlines()) == 1
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "best.pt").write_bytes(b"x")
        os.utime(tmp_path / "runs" / name / "best.pt", (1_000_000 + ord(name), 1_000_000 + ord(name)))  # b is newer
    done = subprocess.run([sys.executable, str(REPO / "demo.py")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and str(Path("runs", "b", "best.pt")) in done.stderr, done.stderr  # refused: not ours
    assert len(done.stderr.splitlines()) == 1


def stroke(driver, canvas, points):
    """Press at the first point (offsets from the canvas centre), move through the others, release."""
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver).move_to_element_with_offset(canvas, *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        for _ in range(8):  # in small moves, as a hand draws
            chain.move_by_offset((x1 - x0) / 8, (y1 - y0) / 8)
    chain.release().perform()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver packages "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_drawn_digits_are_read_in_the_browser(trained, tmp_path):
    pytest.importorskip("gradio", reason="the demo's packages: pip install -r requirements-demo.txt")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, ckpt, _ = trained
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "demo.py"), str(ckpt), "--port", str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = None
    try:
        started = time.time()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() - started < 120, server.stdout.read()
                time.sleep(0.3)
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        canvas = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sketchpad canvas"))[-1]
        note = ""
        # Strokes of a 1 and of a 7, in canvas pixels from its centre (the drawing area is about 290 px square).
        for digit, strokes in (("1", [[(0, -100), (0, 100)]]),
                               ("7", [[(-80, -100), (80, -100), (-10, 110)]])):
            driver.find_element(By.CSS_SELECTOR, "#sketchpad button[aria-label='Clear canvas']").click()
            driver.find_element(By.CSS_SELECTOR, "#sketchpad button[aria-label=Brush]").click()  # clearing drops it
            for points in strokes:
                stroke(driver, canvas, points)
            before = note
            driver.find_element(By.CSS_SELECTOR, "#predict").click()
            note = wait.until(lambda d, before=before: (t := d.find_element(By.CSS_SELECTOR, "#note").text)
                              .startswith("The Net") and t != before and t)
            assert note.startswith(f"The Net reads a {digit} "), note
            top = [t for t in driver.find_element(By.CSS_SELECTOR, "#probabilities").text.split()
                   if not re.fullmatch(r"[\d.]+s", t)]  # Gradio may still show the request's time ("0.1s")
            assert top[1] == digit, top  # the label's heading, then its bars: the drawn digit first
            assert driver.find_element(By.CSS_SELECTOR, "#seen img").get_attribute("src")  # the 28x28 it saw
            driver.save_screenshot(str(tmp_path / f"demo-{digit}.png"))
        assert Image.open(tmp_path / "demo-7.png").size[0] >= 1000
        if os.environ.get("S5_DEMO_SCREENSHOT"):  # how the README's picture is made
            shutil.copy(tmp_path / "demo-7.png", os.environ["S5_DEMO_SCREENSHOT"])
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


# --- robustness: hostile or many clients, bad addresses, signals ---------------------------------------------------

def start_demo(ckpt, *flags, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, str(REPO / "demo.py"), str(ckpt), *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})


def wait_until_serving(server):
    line = server.stdout.readline()  # printed once the server is up
    assert line.startswith("serving "), (line, server.stderr.read() if server.poll() is not None else "")
    return line


@pytest.mark.parametrize("host", ["no.such.host.invalid", "192.0.2.1"])
def test_an_unusable_host_is_named_before_serving(trained, host):
    _, ckpt, _ = trained
    done = subprocess.run([sys.executable, str(REPO / "demo.py"), str(ckpt), "--host", host, "--port", "7861"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "serving" not in done.stdout and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: argument --host: ") and host in done.stderr and "--port" not in done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_demo_with_one_line_and_exit_130(trained, sig):
    pytest.importorskip("gradio", reason="the demo's packages: pip install -r requirements-demo.txt")
    _, ckpt, _ = trained
    server = start_demo(ckpt, "--port", str(free_port()))
    try:
        wait_until_serving(server)
        server.send_signal(sig)
        _, err = server.communicate(timeout=120)
    finally:
        server.kill()
    assert server.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "error: interrupted: the demo has stopped"


@pytest.fixture(scope="module")
def demo_server(trained, tmp_path_factory):
    """(the URL of a demo.py serving the trained Net, the file its stderr goes to)."""
    pytest.importorskip("gradio", reason="the demo's packages: pip install -r requirements-demo.txt")
    _, ckpt, _ = trained
    port, log = free_port(), tmp_path_factory.mktemp("demo") / "stderr.txt"
    with open(log, "w") as stderr:
        server = start_demo(ckpt, "--port", str(port), stderr=stderr)
    try:
        wait_until_serving(server)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def demo_url(demo_server):
    return demo_server[0]


def drawing(tmp_path, digits):
    from conftest import as_photo

    path = tmp_path / "drawing.png"
    Image.fromarray(as_photo(digits[0][0], True)).save(path)
    return path


def test_concurrent_identical_requests_all_succeed(trained, demo_url, tmp_path):
    """The 28x28 image was one cached file, rewritten while served: 3 to 9 of 50 such requests failed."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    _, _, digits = trained
    path = drawing(tmp_path, digits)

    def requests(k):
        client = Client(demo_url, verbose=False, download_files=str(tmp_path / f"client{k}"))
        return [client.predict({"background": None, "layers": [], "composite": handle_file(str(path))},
                               api_name="/predict") for _ in range(3)]

    with ThreadPoolExecutor(10) as pool:
        answers = [a for batch in pool.map(requests, range(10)) for a in batch]
    assert len(answers) == 30
    for probs, seen, note in answers:
        assert note.startswith(f"The Net reads a {digits[0][1]} ") and probs["label"] == str(digits[0][1])
        assert Image.open(seen).size == (280, 280)


def test_oversized_drawings_are_refused_before_decoding(demo_server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    demo_url, log = demo_server
    Image.new("1", (12000, 12000), 1).save(tmp_path / "huge.png")  # about 150 KB, 144 megapixels
    client = Client(demo_url, verbose=False)
    with pytest.raises(AppError, match="pixel limit"):
        client.predict({"background": None, "layers": [], "composite": handle_file(str(tmp_path / "huge.png"))},
                       api_name="/predict")
    time.sleep(1)  # the server logs the refusal as it answers
    refusals = [line for line in log.read_text().splitlines() if "pixel limit" in line]
    assert len(refusals) == 1 and "Traceback" not in log.read_text(), log.read_text()  # one line, not Gradio's 25
    import httpx  # the server's own check: gradio_client refuses a large file before sending it

    big = httpx.post(demo_url + "gradio_api/upload", files={"files": ("big.png", b"\0" * (6 * 2**20))}, timeout=120)
    assert big.status_code == 413 and "maximum allowed size" in big.text  # refused, not stored in the cache


def test_drawings_sent_in_pieces_are_checked_too():
    """The page sends its canvas as blobs under an id (Gradio's accept_blobs), not as an upload: the same checks."""
    import io

    gr = pytest.importorskip("gradio", reason="the demo's packages: pip install -r requirements-demo.txt")
    from gradio.components.image_editor import EditorData, EditorDataBlobs

    from model import Net
    from s5.demo import build_app

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    [pad] = [block for block in build_app(Net()).blocks.values() if block.elem_id == "sketchpad"]
    payload = EditorData(id="a", background=None, layers=[], composite=None)
    pad.blob_storage["a"] = EditorDataBlobs(background=None, layers=[], composite=png(Image.new("RGBA", (280, 280))))
    assert pad.preprocess(payload).size == (280, 280) and not pad.blob_storage  # consumed
    pad.blob_storage["a"] = EditorDataBlobs(background=None, layers=[], composite=png(Image.new("1", (12000, 12000))))
    with pytest.raises(gr.Error, match="pixel limit"):
        pad.preprocess(payload)
    assert pad.preprocess(None) is None


def test_the_uploads_kept_are_bounded_oldest_out_first(tmp_path, monkeypatch):
    """60 uploads of 5 MB were all kept, for CACHE_SECONDS: the files kept are bounded in bytes and in number."""
    gr = pytest.importorskip("gradio", reason="the demo's packages: pip install -r requirements-demo.txt")
    from fastapi.testclient import TestClient

    from model import Net
    from s5 import demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # Gradio's upload folder
    monkeypatch.setattr(demo, "MAX_KEPT_BYTES", 3 * 2**20)
    monkeypatch.setattr(demo, "MAX_KEPT_FILES", 5)
    app = demo.build_app(Net())
    app.max_file_size = demo.MAX_UPLOAD_BYTES  # as demo.py's launch sets it
    with TestClient(gr.routes.App.create_app(app)) as client:
        def upload(k, size):
            done = client.post("/gradio_api/upload", files={"files": (f"{k}.png", os.urandom(size))})
            assert done.status_code == 200, done.text
            return str(Path(done.json()[0]).resolve())

        def kept():
            return {str(f.resolve()) for f in tmp_path.rglob("*") if f.is_file()}

        big = [upload(k, 2**20) for k in range(8)]
        assert kept() == set(big[-3:])  # 3 MB, the newest
        small = [upload(k, 10) for k in range(10)]
        assert kept() == set(small[-5:])  # 5 files
        assert len([d for d in tmp_path.iterdir() if len(d.name) == 64]) == 5  # their folders went with them
