"""web/: the page in headless Chromium (Debian's, driven by Playwright) served from 127.0.0.1 samples an exported
tiny class model, and its pixels match sample.py's for the same noise; its time grid is sample.time_grid's; a
model it does not understand gives a visible message. Skipped without chromium, playwright or
web/node_modules/onnxruntime-web, unless NANODIT_REQUIRE_BROWSER=1 (CI), where their absence fails."""
import functools
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ORT_WEB = REPO / "web" / "node_modules" / "onnxruntime-web" / "dist" / "ort.wasm.min.js"
# without these Chromium waits on network lookups here; Playwright adds a fresh --user-data-dir (a temp dir)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def require(ok, reason):
    if not ok:
        if os.environ.get("NANODIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"NANODIT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason, allow_module_level=True)


require(os.path.exists(CHROMIUM), "no chromium (apt-get install chromium)")
require(ORT_WEB.exists(), "no onnxruntime-web (npm ci --prefix web)")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
require(sync_playwright is not None, "no playwright (pip install playwright)")
pytest.importorskip("onnxruntime")

from checkpoint import load_model  # noqa: E402
from sample import guided_velocity, sample_ode, save_grid, time_grid  # noqa: E402
from test_export import exported_class_model  # noqa: E402

PER_CLASS, STEPS, SCALE = 2, 5, 2.5


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder served on 127.0.0.1 as `python -m http.server` would: the page, onnxruntime-web, the exported
    model, its noise, and models the page must refuse. Yields (base URL, checkpoint, noise)."""
    ckpt, onnx_path = exported_class_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("site")
    for name in ("index.html", "app.js", "node_modules"):
        (root / name).symlink_to(REPO / "web" / name)
    for path in (onnx_path, onnx_path.with_suffix(".json")):
        (root / path.name).symlink_to(path)
    info = json.loads(onnx_path.with_suffix(".json").read_text())
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(info["num_classes"] * PER_CLASS, *info["inputs"]["xt"][1:], generator=g)
    (root / "noise.bin").write_bytes(noise.numpy().astype("<f4").tobytes())
    (root / "latent.json").write_text(json.dumps({**info, "space": "latents", "vae": {"name": "some/vae"}}))
    (root / "other.json").write_text(json.dumps({"format": "something-else"}))
    handler = functools.partial(type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
                                directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", ckpt, noise
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def open_page(browser, url, until=("done", "error")):
    """The page at url, once its state (body's data-state) is one of `until`; and its uncaught errors."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function(f"{list(until)}.includes(document.body.dataset.state)", timeout=60_000)
    return page, errors


def test_the_page_draws_the_python_samplers_pixels_from_the_same_noise(site, browser, tmp_path):
    base, ckpt, noise = site
    page, errors = open_page(browser, f"{base}/index.html?model=model.json&noise=noise.bin&per_class={PER_CLASS}"
                                      f"&steps={STEPS}&scale={SCALE}&autorun=1")
    assert page.evaluate("document.body.dataset.state") == "done", page.inner_text("#message")
    assert not errors and page.evaluate("document.getElementById('progress').value") == 1
    w, h, rgba = page.evaluate("""() => { const c = document.getElementById('grid');
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")
    got = np.array(rgba, dtype=int).reshape(h, w, 4)
    # sample.py's sampler on the same noise: the model's recipe sampler (shift 2, interval 0.3..0.8, temperature
    # 0.9), the page's steps and scale, one row per class
    model, state = load_model(str(ckpt))
    sampler = state["config"]
    y = torch.arange(model.cfg.num_classes).repeat_interleave(PER_CLASS)
    v_fn = guided_velocity(model, {"y": y}, SCALE, 1.0, sampler["sample_guidance_interval"])
    x = sample_ode(v_fn, noise, STEPS, shift=sampler["sample_shift"], temperature=sampler["sample_temperature"])
    save_grid(((x + 1) / 2).clamp(0, 1), str(tmp_path / "python.png"), nrow=PER_CLASS)
    want = np.asarray(Image.open(tmp_path / "python.png")).astype(int)
    assert got.shape[:2] == want.shape and (got[..., 3] == 255).all()
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()     # grey digits
    diff = np.abs(got[..., 0] - want)
    print(f"page vs sample.py: max pixel diff {diff.max()} of 255, {(diff > 0).sum()} of {diff.size} pixels differ")
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01 and want.std() > 10   # one level at most, rarely; not flat


def test_the_pages_controls_and_time_grid(site, browser):
    base, _, _ = site
    page, errors = open_page(browser, f"{base}/index.html", until=("ready", "error"))
    assert page.evaluate("document.body.dataset.state") == "ready" and not errors
    assert page.input_value("#steps") == "12" and page.input_value("#scale") == "3"    # the export's sampler

    def click(seed):
        page.select_option("#class", "1")
        page.fill("#per_class", "3")
        page.fill("#steps", "3")
        page.fill("#seed", str(seed))
        page.click("#go")
        page.wait_for_function("document.body.dataset.state === 'done'", timeout=60_000)
        return page.evaluate("""() => { const c = document.getElementById('grid');
            return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")
    first, again, other = click(1), click(1), click(2)
    assert first[:2] == [3 * 18 + 2, 18 + 2]                      # one row of 3 images of 16x16, padding 2
    assert first == again and first[2] != other[2] and not errors  # the page's noise is a function of the seed
    for steps, shift in ((16, 1.0), (9, 2.0), (13, 0.5), (50, 3.0), (7, 1.7)):
        got = page.evaluate(f"Array.from(nanodit.timeGrid({steps}, {shift}))")
        assert np.array_equal(np.array(got, np.float32), time_grid(steps, shift).numpy()), (steps, shift)


@pytest.mark.parametrize("model, says", [
    ("latent.json", "does not understand /latent.json: it generates latents, which need the VAE decoder"),
    ("other.json", "does not understand /other.json: it is not a NanoDiT ONNX export"),
    ("missing.json", "cannot load /missing.json: HTTP 404"),
])
def test_a_model_the_page_does_not_understand_gives_a_visible_message(site, browser, model, says):
    base, _, _ = site
    page, _ = open_page(browser, f"{base}/index.html?model={model}&autorun=1")
    assert page.evaluate("document.body.dataset.state") == "error"
    assert page.is_visible("#message") and says in page.inner_text("#message")
    assert page.is_disabled("#go")
