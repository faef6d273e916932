"""The static page (make web): web/preprocess.js against preprocess_digit under node; then the page built by
web/build.py from the tests' Net, served on 127.0.0.1 and drawn on in headless Chromium with real pointer events: its
28x28 input must be Python's preprocess_digit of the same canvas, its probabilities PyTorch's, and each failure a
visitor can meet must be said on the page."""
import base64
import fcntl
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image, ImageDraw

from s5.data import MEAN, STD
from s5.digits import ImageInputError, preprocess_digit

CHROMIUM, CHROMEDRIVER, NODE = shutil.which("chromium"), shutil.which("chromedriver"), shutil.which("node")
ORT = REPO / "web" / "node_modules" / "onnxruntime-web" / "dist"
RUNTIME_WASM = "ort-wasm-simd-threaded.wasm"
PIXELS, PROBS = 2 / 255, 1e-4  # the bounds: per pixel in [0, 1], per probability
RUN_PREPROCESS = """
const P = require(process.argv[1]); let text = '';
process.stdin.on('data', (chunk) => { text += chunk; }).on('end', () => {
  process.stdout.write(JSON.stringify(JSON.parse(text).map(({width, height, rgba}) => {
    const r = P.preprocess(Buffer.from(rgba, 'base64'), width, height);
    return r.empty ? r : {pixels: Array.from(r.pixels), input: Array.from(r.input)};
  })));
});"""


def drawings(seed=0, n=60):
    """Strokes and rings drawn big and scaled down (soft edges), in black on white, white on black or a colour, on
    canvases of any shape; then bars of every width, centred, whose centre of mass falls on a .5 (round's ties)."""
    rng, images = np.random.default_rng(seed), []
    for _ in range(n):
        w, h, light = int(rng.integers(40, 300)), int(rng.integers(40, 300)), bool(rng.random() < 0.5)
        paper, ink = ((255,) * 3, (0,) * 3) if light else ((0,) * 3, (255,) * 3)
        ink = tuple(int(c) for c in rng.integers(0, 256, 3)) if rng.random() < 0.2 else ink
        big = Image.new("RGB", (4 * w, 4 * h), paper)
        draw, width = ImageDraw.Draw(big), 4 * int(rng.integers(1, 12))
        for _ in range(int(rng.integers(1, 4))):
            points = [(rng.uniform(0.1, 0.9) * 4 * w, rng.uniform(0.1, 0.9) * 4 * h) for _ in range(4)]
            if rng.random() < 0.3:
                (x0, x1), (y0, y1) = sorted([points[0][0], points[1][0]]), sorted([points[0][1], points[1][1]])
                draw.ellipse([x0, y0, x1, y1], outline=ink, width=width)
            else:
                draw.line(points[:int(rng.integers(2, 5))], fill=ink, width=width, joint="curve")
        images.append(big.resize((w, h), Image.Resampling.LANCZOS).convert("RGBA"))
    for width in range(2, 30):
        bar = np.full((280, 280, 4), 255, np.uint8)
        bar[40:240, 140 - width // 2:140 - width // 2 + width, :3] = 0
        images += [Image.fromarray(bar), Image.fromarray(np.ascontiguousarray(bar.transpose(1, 0, 2)))]
    return images


@pytest.mark.skipif(not NODE, reason="needs node (Node.js) to run web/preprocess.js")
def test_the_page_preprocesses_as_python():
    images = [*drawings(), Image.new("RGBA", (90, 60), (255, 255, 255, 255))]  # and a blank one
    payload = [dict(width=i.width, height=i.height, rgba=base64.b64encode(i.tobytes()).decode()) for i in images]
    done = subprocess.run([NODE, "-e", RUN_PREPROCESS, str(REPO / "web" / "preprocess.js")], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    compared = 0
    for k, (image, page) in enumerate(zip(images, json.loads(done.stdout))):
        try:
            x = preprocess_digit(image)[0].numpy().ravel()
        except ImageInputError:
            assert page == {"empty": "blank"}, k
            continue
        if page.get("empty") == "dot":  # the page's own rule: ink under a tenth of the canvas (Python reads it)
            continue
        assert np.abs(np.asarray(page["pixels"]) - (x * STD + MEAN)).max() < 1e-6, k  # the same, not just close
        assert np.abs(np.asarray(page["input"], np.float32) - x).max() < 1e-6, k
        compared += 1
    assert compared >= len(images) - 5


# --- the page in Chromium ------------------------------------------------------------------------------------------

def other_net():
    """A valid ONNX model that is not the Net: it takes (1, 784) and gives ten log-probabilities."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("LogSoftmax", ["z"], ["y"])], "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 784])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()


@pytest.fixture(scope="module")
def site(trained, tmp_path_factory):
    """(the base URL, the built folder): web/build.py's page for the tests' Net, and beside it the same page without
    its model, with a damaged one and without ONNX Runtime's WebAssembly file, served on 127.0.0.1 by a thread."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name, reason="the export's packages: pip install -r requirements-export.txt")
    if not (ORT / "ort.wasm.min.mjs").is_file():
        pytest.skip("onnxruntime-web is not installed: npm ci in web/ (make test runs it where npm is)")
    root = tmp_path_factory.mktemp("site")
    build = [sys.executable, str(REPO / "web" / "build.py"), str(trained[1]), "--out", str(root / "page")]
    done = subprocess.run(build, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith(f"built {root / 'page'} "), done.stderr
    for variant, lost in (("no-model", "model.onnx"), ("damaged", "model.onnx"), ("no-runtime", RUNTIME_WASM),
                          ("other-net", "model.onnx"), ("huge", "model.onnx"), ("no-script", "preprocess.js")):
        shutil.copytree(root / "page", root / variant, copy_function=os.link)
        (root / variant / lost).unlink()
    (root / "damaged" / "model.onnx").write_bytes(b"\x08\x07not an ONNX model")
    (root / "other-net" / "model.onnx").write_bytes(other_net())
    with open(root / "huge" / "model.onnx", "wb") as f:  # sparse: 68 MB that take no room
        f.truncate(65 * 2**20)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", root / "page"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver packages (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, url):
    """Load the page and wait until it is ready or has said what is wrong: (state, the status line)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    state = WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "const s = document.body.dataset.state; return s !== 'loading' && s"))
    return state, driver.find_element("id", "status").text


def draw(driver, strokes):
    """Each stroke pressed at its first point (offsets from the canvas centre, in CSS pixels), moved through the
    others in small steps as a hand draws, released; then the page's prediction once every one asked for is made."""
    from selenium.webdriver.common.action_chains import ActionChains

    pad = driver.find_element("id", "pad")
    for points in strokes:
        chain = ActionChains(driver, duration=10).move_to_element_with_offset(pad, *points[0]).click_and_hold()
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            for _ in range(8):
                chain.move_by_offset((x1 - x0) / 8, (y1 - y0) / 8)
        chain.release().perform()
    return settled(driver)


def settled(driver):
    """What the page shows once every prediction asked for is made: its state, its status line, the digit shown, the
    canvas as PNG, the 28x28 image shown, and window.s5Last."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        window.s5Settled().then(() => {
          const last = window.s5Last, seen = document.getElementById('seen').getContext('2d');
          done({state: document.body.dataset.state, status: document.getElementById('status').textContent,
                shown: document.getElementById('digit').textContent,
                png: document.getElementById('pad').toDataURL('image/png'),
                seen: Array.from(seen.getImageData(0, 0, 28, 28).data.filter((v, i) => i % 4 === 0)),
                last: last && {input: Array.from(last.input), pixels: Array.from(last.pixels), probs: last.probs,
                               digit: last.digit, count: last.count, ms: last.ms}});
        });""")


def click(driver, element_id):
    driver.find_element("id", element_id).click()


def ring(rx, ry, n=24):
    return [[(rx * np.sin(2 * np.pi * k / n), -ry * np.cos(2 * np.pi * k / n)) for k in range(n + 1)]]


# digit, strokes (offsets from the canvas centre; the canvas is 280 px square), light ink on dark
DIGITS = [("1", [[(0, -100), (0, 100)]], False),
          ("4", [[(-20, -100), (-75, 35), (75, 35)], [(35, -40), (35, 110)]], False),
          ("0", ring(60, 95), True),
          ("7", [[(-80, -100), (80, -100), (-10, 110)]], False)]


@pytest.mark.slow
def test_drawn_digits_are_read_as_python_and_pytorch_read_them(site, browser, trained):
    url, folder = site
    model = trained[0].eval()
    state, status = open_page(browser, url + "page/")
    assert state == "ready" and status.startswith("Draw a digit"), status
    ready_ms = browser.execute_script("return window.s5Timing.ready")
    worst = {"pixel": 0.0, "probability": 0.0}

    def check(got, light):
        """The page's answer against Python's preprocess_digit of its canvas and PyTorch's Net on its input."""
        assert got["state"] == "predicted" and got["last"], got["status"]
        last = got["last"]
        drawn = Image.open(io.BytesIO(base64.b64decode(got["png"].split(",", 1)[1])))
        assert drawn.getpixel((2, 2))[:3] == ((0, 0, 0) if light else (255, 255, 255))
        python = preprocess_digit(drawn)[0].numpy().ravel() * STD + MEAN  # the same canvas, as predict.py reads it
        page_input = torch.tensor(last["input"], dtype=torch.float32)
        pixels = page_input.numpy() * STD + MEAN
        worst["pixel"] = max(worst["pixel"], float(np.abs(pixels - python).max()))
        assert np.abs(pixels - python).max() <= PIXELS
        assert np.abs(np.asarray(last["pixels"]) - pixels).max() < 1e-6
        with torch.no_grad():
            torch_probs = model(page_input.view(1, 1, 28, 28)).exp()[0].numpy()
        worst["probability"] = max(worst["probability"], float(np.abs(np.asarray(last["probs"]) - torch_probs).max()))
        assert np.abs(np.asarray(last["probs"]) - torch_probs).max() <= PROBS
        assert got["shown"] == str(last["digit"]) == str(int(torch_probs.argmax()))
        assert got["status"] == f"The Net reads a {last['digit']}."
        assert np.abs(np.asarray(got["seen"]) - np.round(pixels * 255)).max() <= 1  # the 28x28 it shows is its input
        return last

    first_ms = None
    for digit, strokes, light in DIGITS:
        click(browser, "clear")
        if browser.find_element("id", "invert").is_selected() != light:
            click(browser, "invert")
        last = check(draw(browser, strokes), light)
        first_ms = first_ms or last["ms"]
        if digit in ("1", "7"):  # the strokes the Gradio demo's test draws, read there too
            assert last["digit"] == int(digit), last["probs"]
        if light:  # the same drawing turned dark on light is read again, as Python reads it
            click(browser, "invert")
            assert check(settled(browser), False)["count"] == last["count"] + 1
    if os.environ.get("S5_WEB_SCREENSHOT"):  # how docs/web.png is made: the last digit's answer
        browser.save_screenshot(os.environ["S5_WEB_SCREENSHOT"])

    click(browser, "clear")
    cleared = browser.execute_script("""
        const pad = document.getElementById('pad'), data = pad.getContext('2d').getImageData(0, 0, 280, 280).data;
        return [window.s5Last, document.body.dataset.state, document.getElementById('status').textContent,
                document.getElementById('digit').textContent, data.every((v) => v === 255)];""")
    assert cleared[:2] == [None, "ready"] and cleared[2].startswith("Draw a digit") and cleared[3:] == ["–", True]
    dot = draw(browser, [[(30, 30)]])  # a tap
    assert dot["state"] == "empty" and dot["last"] is None and dot["status"].startswith("That is only a dot: draw")
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"\nweb page: {size / 1e6:.1f} MB in {len(list(folder.iterdir()))} files; ready {ready_ms:.0f} ms after "
          f"navigation, first prediction {first_ms:.0f} ms after the pen lifted; max pixel difference "
          f"{worst['pixel'] * 255:.3g}/255, max probability difference {worst['probability']:.2g}")


@pytest.mark.slow
def test_what_goes_wrong_is_said_on_the_page(site, browser):
    url, folder = site
    cases = {"no-model/": ("model.onnx is missing from this folder", "make web"),
             "damaged/": ("model.onnx is damaged or not an ONNX model", "make web"),
             "no-runtime/": ("ONNX Runtime Web could not start", "make web"),
             "other-net/": ("model.onnx is not an export of this repo's Net", "make web"),
             "huge/": ("model.onnx is 68 MB, so it is not this repo's Net", "make web"),
             "no-script/": ("preprocess.js did not load", "make web")}
    for path, (says, fix) in cases.items():
        state, status = open_page(browser, url + path)
        assert state == "error" and status.startswith(says) and fix in status, status
    hide = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.WebAssembly;"})
    try:
        state, status = open_page(browser, url + "page/")
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": hide["identifier"]})
    assert state == "error" and status.startswith("This browser cannot run WebAssembly"), status
    state, status = open_page(browser, (folder / "index.html").as_uri())
    assert state == "error" and status.startswith("This page was opened as a file") and "make web-serve" in status
    assert open_page(browser, url + "page/")[0] == "ready"  # and, served again, it works


@pytest.mark.slow
def test_the_build_refuses_a_folder_it_did_not_make_and_says_why_an_export_failed(tmp_path):
    if not (ORT / "ort.wasm.min.mjs").is_file():
        pytest.skip("onnxruntime-web is not installed: npm ci in web/ (make test runs it where npm is)")
    build = [sys.executable, str(REPO / "web" / "build.py")]
    (tmp_path / "mine.txt").write_text("keep me")
    done = subprocess.run([*build, "x.pt", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [f"error: argument --out: {tmp_path} is not a folder "
                                                                 "this script built (it holds mine.txt): give a new "
                                                                 "folder, or remove it first"]
    pytest.importorskip("onnxruntime", reason="the export's packages: pip install -r requirements-export.txt")
    done = subprocess.run([*build, str(tmp_path / "none.pt"), "--out", str(tmp_path / "page")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "none.pt" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # nothing left behind


def test_the_build_says_in_one_line_what_is_wrong_with_out_before_any_work(tmp_path):
    """No export runs (a missing checkpoint would be said after the --out checks): each a line, exit 2."""
    if not (ORT / "ort.wasm.min.mjs").is_file():
        pytest.skip("onnxruntime-web is not installed: npm ci in web/ (make test runs it where npm is)")
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cases = {"": "an empty path", str(tmp_path / "file"): "is a file, not a folder",
             str(tmp_path / "link"): f"is a link: give the folder itself ({tmp_path / 'real'})",
             str(REPO / "web"): "is not a folder this script built", str(REPO): "is not a folder this script built"}
    for out, says in cases.items():
        done = subprocess.run([sys.executable, str(REPO / "web" / "build.py"), "x.pt", "--out", out],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and says in done.stderr, (out, done.stderr)
    lock = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:  # another build of a folder there holds the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run([sys.executable, str(REPO / "web" / "build.py"), "x.pt", "--out", str(tmp_path / "page")],
                              capture_output=True, text=True, timeout=60)
    finally:
        os.close(lock)
    assert done.returncode == 2 and done.stderr == f"error: another build is writing into {tmp_path}: wait for it to " \
                                                   "finish, then build again\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link", "real"]  # nothing made


def test_serving_says_in_one_line_what_is_wrong(tmp_path):
    (tmp_path / "index.html").write_text("<p>page</p>")
    serve = [sys.executable, str(REPO / "web" / "serve.py")]
    taken = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    try:
        for args, says in ((["80a"], "'80a' is not a port"), (["70000"], "'70000' is not a port"),
                           (["--directory", str(tmp_path / "none")], "has no page: build it first with make web"),
                           ([str(taken.server_port), "--directory", str(tmp_path)], "cannot serve on 127.0.0.1:")):
            done = subprocess.run([*serve, *args], capture_output=True, text=True, timeout=60)
            assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and says in done.stderr, done.stderr
    finally:
        taken.server_close()


def gesture(driver, ticks):
    """Pointers acting together, tick by tick: each tick {source name: (kind, action, args)}; a source not named in a
    tick waits. kind: "touch" or "mouse"; action: "move" (x, y, element: an offset from its centre), "down", "up"."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.support.ui import WebDriverWait

    builder, sources = ActionBuilder(driver), {}
    for tick in ticks:
        for name, (kind, _, _) in tick.items():
            if name not in sources:
                sources[name] = builder.add_pointer_input(kind, name)
    for tick in ticks:
        for name, source in sources.items():
            _, action, args = tick.get(name, (None, "pause", ()))
            if action == "move":
                x, y, element = args
                source.create_pointer_move(duration=10, x=int(x), y=int(y), origin=element)
            elif action in ("down", "up"):
                getattr(source, f"create_pointer_{action}")(button=0)
            else:
                source.create_pause(0.01)
    assert all(isinstance(s, PointerInput) for s in sources.values())
    driver.execute_script("""window.s5Ups = 0;  // touch input reaches the page after perform() returns: count it in
        const up = (e) => { window.s5Ups += e.pointerType === 'touch'; };
        if (!window.s5CountsUps) document.addEventListener('pointerup', up);
        window.s5CountsUps = true;""")
    builder.perform()
    ups = sum(kind == "touch" and action == "up" for tick in ticks for kind, action, _ in tick.values())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.s5Ups") >= ups)
    return settled(driver)


@pytest.mark.slow
def test_a_second_finger_draws_nothing_and_clear_ends_the_stroke_being_drawn(site, browser):
    url, _ = site
    assert open_page(browser, url + "page/")[0] == "ready"
    pad, clear = browser.find_element("id", "pad"), browser.find_element("id", "clear")
    touch = lambda action, *args: ("touch", action, args)  # noqa: E731
    line = lambda x0, y0, x1, y1, n: [touch("move", x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n, pad)  # noqa: E731
                                      for k in range(1, n + 1)]
    # one finger draws a 1; a second one lands and moves beside it meanwhile: only the first draws
    first = [touch("move", -60, -100, pad), touch("down"), *line(-60, -100, -60, 100, 12), touch("up")]
    second = [touch("move", 80, -80, pad), touch("down"), *line(80, -80, 100, 0, 6), touch("up")]
    got = gesture(browser, [{"first": a, **({"second": second[k - 2]} if 2 <= k < 2 + len(second) else {})}
                            for k, a in enumerate(first)])
    pixels = browser.execute_script("""
        const c = document.getElementById('pad').getContext('2d');
        return [[80, 140], [220, 60], [235, 110], [240, 140]].map(([x, y]) => c.getImageData(x, y, 1, 1).data[0]);""")
    assert got["state"] == "predicted" and pixels == [0, 255, 255, 255], (got["status"], pixels)
    # another stroke: Clear, pressed (with the mouse) half-way, empties the canvas, and the rest of the stroke draws
    # nothing (it used to bring back the drawing from before the stroke)
    stroke = [touch("move", 0, -100, pad), touch("down"), *line(0, -100, 0, 0, 6)]
    rest = line(0, 0, 0, 100, 6) + [touch("up")]
    press = [("mouse", "move", (0, 0, clear)), ("mouse", "down", ()), ("mouse", "up", ())]
    got = gesture(browser, [{"first": a} for a in stroke] + [{"mouse": a} for a in press] +
                  [{"first": a} for a in rest])
    blank = browser.execute_script("const c = document.getElementById('pad').getContext('2d');"
                                   "return c.getImageData(0, 0, 280, 280).data.every((v) => v > 250)")
    assert blank and got["state"] == "ready" and got["last"] is None, got["status"]
    assert got["status"].startswith("Draw a digit"), got["status"]
