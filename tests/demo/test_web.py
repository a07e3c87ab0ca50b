"""The web demo (``python demo.py --web``): its checks and pictures, and the page in a real headless browser.

A small demo in ``make demo``'s layout is built in seconds (a few world images, a one-epoch tiny CLIP, a
random tiny CAT-Seg, random adapters with real statistics); the browser test serves it with
``demo.py --web`` in a child process and drives Debian's chromium with Playwright.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # demo.py is a script at the repository root
    sys.path.insert(0, str(REPO_ROOT))
CHROMIUM = Path("/usr/bin/chromium")
CONDITIONS = (("clear", "day"), ("fog", "night"), ("snow", "day"))

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class TinyDemo:
    world: Path
    base: Path
    library: Path
    clip: Path

    def flags(self) -> list[str]:
        return [
            "--weights", str(self.base),
            "--lora_library_path", str(self.library),
            "--embedding_model", str(self.clip),
            "--gallery", str(self.world),
        ]  # fmt: skip

    def val_image(self, weather: str = "fog", time_: str = "night") -> Path:
        return sorted((self.world / "muses" / "frame_camera" / "val" / weather / time_).glob("*.png"))[0]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> TinyDemo:  # noqa: ANN001
    """``make demo``'s outputs in small: world, clip/, base checkpoint, loradb/ with statistics."""
    from cat_seg.checkpoint import load_clip_weights, save_checkpoint
    from cat_seg.config import load_config
    from cat_seg.lora import resolve_target_modules
    from cat_seg.modeling import build_model
    from domain_orchestrator.generate_embeddings import main as generate_embeddings
    from domain_orchestrator.synthetic import linear_shapes, write_random_adapter
    from semla_demo.clip_pretrain import pretrain, save
    from semla_demo.pipeline import TRAIN_CONFIG, domain
    from semla_demo.world import MANIFEST, write_world

    folder = tmp_path_factory.mktemp("webdemo")
    world = folder / "world"
    write_world(world, train_per_condition=2, val_per_condition=1, conditions=CONDITIONS, workers=1)
    entries = [e for e in json.loads((world / MANIFEST).read_text())["entries"] if e["split"] == "train"]
    images = np.stack([np.asarray(Image.open(world / e["image"]).convert("RGB")) for e in entries])
    clip_model, _ = pretrain(images, [e["caption"] for e in entries], epochs=1, seed=0)
    clip = save(clip_model, folder / "clip")
    torch.manual_seed(0)
    model = build_model(load_config(TRAIN_CONFIG), "cpu")
    load_clip_weights(model, clip / "open_clip_model.safetensors")
    base = save_checkpoint(model, folder / "base" / "model_final.pth")
    library = folder / "loradb"
    shapes = linear_shapes(model, resolve_target_modules([], model))
    domains = [domain(*c) for c in CONDITIONS]
    for i, d in enumerate(domains):
        write_random_adapter(library / d, shapes, rank=4, alpha=8, seed=i, std=0.05)
    (folder / "domains.yaml").write_text("".join(f"- {d}\n" for d in domains))
    status = generate_embeddings(
        [
            "--source_domains",
            str(folder / "domains.yaml"),
            "--lora_library_path",
            str(library),
            "--embedding_model",
            str(clip),
            "--datasets_root",
            str(world),
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--no_progress",
        ]  # fmt: skip
    )
    assert status == 0
    return TinyDemo(world, Path(base), library, clip)


@pytest.fixture(scope="module")
def web_demo(tiny_demo: TinyDemo):  # noqa: ANN201
    from semla_demo import web

    return web.build_demo(web.build_parser().parse_args(tiny_demo.flags()))


# -- without a browser -----------------------------------------------------------------------------------
def test_importing_the_demos_does_not_import_gradio() -> None:
    code = "import sys, demo, semla_demo.web; assert 'gradio' not in sys.modules, 'gradio imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_demo_files_say_to_run_make_demo(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    import demo
    from semla_demo import web

    assert demo.main(["--web", "--weights", str(web.DEMO / "nothing" / "model_final.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("demo.py --web: error: not found: --weights") and "make demo" in err
    assert "Traceback" not in err
    args = [
        "--weights",
        str(tmp_path / "x.pth"),
        "--lora_library_path",
        str(tmp_path),
        "--embedding_model",
        "e",
    ]
    assert web.main(args) == 1
    err = capsys.readouterr().err
    assert "x.pth" in err and "--embedding_model e" in err and "make demo" not in err


def test_semla_request_uses_the_library_weights(web_demo, tiny_demo: TinyDemo) -> None:  # noqa: ANN001
    """The page's SemLA weights are semla_weights on the image's embedding; pictures and legend follow."""
    from domain_orchestrator.retrieval import scores, semla_weights

    image = tiny_demo.val_image()
    result = web_demo.run(image, "road\nsky\ncar\nbuilding\nvegetation", "semla", 2, 0.1)
    names = web_demo.library_names
    assert set(result.weights) <= set(names) and len(result.weights) == 2
    assert sum(result.weights.values()) == pytest.approx(1.0)
    embedding = torch.from_numpy(
        web_demo.segmenter.embedder.embed_files([image], batch_size=1, progress=False)
    )
    expected = semla_weights(scores(embedding.double(), web_demo.segmenter.prototypes.double()), 2, 0.1)[0]
    assert result.weights == pytest.approx({n: float(w) for n, w in zip(names, expected) if w > 0})
    assert result.class_names == ["road", "sky", "car", "building", "vegetation"]
    assert result.labels.shape == result.zeroshot_labels.shape == (64, 64)
    assert result.picture.shape == (384, 384, 3) and result.picture.std() > 10
    assert result.changed == pytest.approx(float((result.labels != result.zeroshot_labels).mean()))
    title, status, legend, chart = web_demo.describe(result, 2, 0.1)
    assert title == "SemLA (top-2, T = 0.1)" and "semla-ok" in status
    assert chart.count('class="semla-weight"') == 2 and "the other 1 weigh 0" in chart
    assert legend.count('class="semla-class"') >= 1
    uniform = web_demo.run(image, "road\nsky", "uniform", 2, 0)  # temperature and top-k unused
    assert uniform.weights == pytest.approx(dict.fromkeys(names, 1 / 3))
    zeroshot = web_demo.run(image, "road\nsky", "zeroshot")
    assert zeroshot.weights == {} and zeroshot.changed == 0.0
    assert web_demo.segmenter.class_names == ["road", "sky"]


def test_the_page_fuses_with_any_combination_type(web_demo, tiny_demo: TinyDemo) -> None:  # noqa: ANN001
    """A fusion chosen on the page changes how the retrieved adapters are merged, not which ones."""
    import torch

    from domain_orchestrator.fusion import fused_adapters, fused_text_features
    from domain_orchestrator.merging import merged_library
    from semla_demo.web import InputError

    image = tiny_demo.val_image()
    cat = web_demo.run(image, "road\nsky\ncar", "semla", 2, 0.1)
    svd = web_demo.run(image, "road\nsky\ncar", "semla", 2, 0.1, combination_type="svd")
    assert svd.weights == cat.weights
    segmenter = web_demo.segmenter
    w = segmenter.weights(image, "semla", top_k=2, temperature=0.1)
    merged = merged_library(segmenter.library, w, segmenter.combination("svd"))
    x = segmenter.mapper({"file_name": str(image)})
    eye = torch.eye(1, dtype=torch.float64)
    with torch.no_grad():
        text = fused_text_features(segmenter.model, merged, eye)
        with fused_adapters(segmenter.model, merged, eye):
            expected = segmenter.model([x], text_features=text)[0]["sem_seg"].argmax(dim=0).numpy()
    assert (svd.labels == expected).all()
    with pytest.raises(InputError, match="unknown fusion 'average'"):
        web_demo.run(image, "road", "semla", 2, 0.1, combination_type="average")


def test_a_domain_spec_gives_the_initial_class_names(tiny_demo: TinyDemo, tmp_path: Path) -> None:
    from cat_seg.data.synthetic import write_own_domain
    from semla_demo import web

    spec = write_own_domain(tmp_path / "own", num_train=1, num_val=1)
    demo = web.build_demo(web.build_parser().parse_args([*tiny_demo.flags(), "--domain_spec", str(spec)]))
    assert demo.segmenter.class_names == ["water", "road", "sky"]


def test_bad_requests_are_messages(web_demo, tiny_demo: TinyDemo, tmp_path: Path) -> None:  # noqa: ANN001
    from semla_demo.web import InputError

    image = tiny_demo.val_image()
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bad = [
        (dict(path=None), "no image"),
        (dict(path=text), "notes.png is not an image"),
        (dict(classes=" \n\n"), "class list is empty"),
        (dict(classes="car\nroad\nCar"), "given twice"),
        (dict(temperature=0), "temperature must be > 0"),
        (dict(temperature=float("nan")), "temperature must be > 0"),
        (dict(temperature=None), "temperature must be a number"),
        (dict(top_k=0), "top-k must be a whole number from 1 to 3"),
        (dict(top_k=2.5), "top-k must be a whole number"),
        (dict(method="oracle"), "method must be one of"),
    ]
    for change, message in bad:
        request = dict(path=image, classes="road\ncar", method="semla", top_k=2, temperature=0.05) | change
        with pytest.raises(InputError, match=message):
            web_demo.run(**request)
    assert web_demo.run(image, "road\ncar", "semla", 2, 0.05).weights  # still serving


def test_huge_images_are_downscaled_or_refused(web_demo, tmp_path: Path) -> None:  # noqa: ANN001
    from semla_demo.web import InputError, Limits, load_image

    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 1200, 3), dtype=np.uint8)).save(big)
    copy, note = load_image(big, Limits(max_side=600), tmp_path)
    assert Image.open(copy).size == (600, 150)
    assert "downscaled from 1200 x 300 to 600 x 150" in note
    with pytest.raises(InputError, match=r"too large: at most 0.2 megapixels.*1200 x 300"):
        load_image(big, Limits(max_pixels=200_000), tmp_path)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(small)  # grey: converted to RGB
    (tmp_path / "out").mkdir()
    copy, note = load_image(small, Limits(), tmp_path / "out")
    assert note == "" and Image.open(copy).mode == "RGB"
    demo_limits = web_demo.limits
    web_demo.limits = Limits(max_side=100)
    try:
        result = web_demo.run(big, "road\nsky", "zeroshot")
    finally:
        web_demo.limits = demo_limits
    assert result.labels.shape == (25, 100) and any("downscaled" in n for n in result.notes)


# -- in the browser -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> str:
    """Read the child's output until a line holds ``text``; fails with the output on exit or timeout."""
    seen: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
            if text in line:
                return line
        elif process.poll() is not None:
            break
    pytest.fail(f"the server did not print {text!r} (exit {process.poll()}):\n{''.join(seen)[-3000:]}")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_page_in_a_real_browser(tiny_demo: TinyDemo, tmp_path: Path) -> None:
    """Serve demo.py --web, upload a non-image (a message), then a world image; SemLA's result appears with
    weights of the library's adapters summing to 1; the server stops and leaves no process behind."""
    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, str(REPO_ROOT / "demo.py"), "--web", "--port", str(port), *tiny_demo.flags()]
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    outside: list[str] = []
    try:
        url = _wait_for_line(server, "SemLA web demo on", timeout=150).split(" on ")[1].split()[0]
        assert url == f"http://127.0.0.1:{port}/"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1400})
                page.on(
                    "request",
                    lambda r: (
                        outside.append(r.url)
                        if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                        else None
                    ),
                )
                page.goto(url)
                upload = page.locator("#semla-upload input[type=file]")
                status = page.locator("#semla-status")
                # a file that is not an image: a message on the page
                notes = tmp_path / "notes.txt"
                notes.write_text("these are notes, not a picture")
                upload.set_input_files(str(notes))
                expect(status).to_have_class("semla-error", timeout=30_000)
                expect(status).to_contain_text("notes.txt is not an image")
                # then a valid request works
                image = tiny_demo.val_image()
                upload.set_input_files(str(image))
                expect(status).to_contain_text("ready", timeout=30_000)
                expect(page.locator("#semla-input img")).to_be_visible()
                page.locator("#semla-classes textarea").fill("road\nsidewalk\nbuilding\nvegetation\nsky\ncar")
                page.locator("#semla-method").get_by_label("SemLA").check()
                page.locator("#semla-run").click()
                rows = page.locator("#semla-weights .semla-weight")
                expect(rows.first).to_be_attached(timeout=60_000)
                expect(status).to_have_class("semla-ok")
                expect(status).to_contain_text(
                    "SemLA (top-3, T = 0.02), 6 classes"
                )  # configs/demo/semla_config.yaml
                weights = {
                    rows.nth(i).get_attribute("data-adapter"): float(rows.nth(i).get_attribute("data-weight"))
                    for i in range(rows.count())
                }
                library = {d.name for d in tiny_demo.library.iterdir() if d.is_dir()}
                assert weights and set(weights) <= library, weights
                assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
                for panel in ("#semla-result img", "#semla-zeroshot img"):
                    picture = page.locator(panel)
                    expect(picture).to_be_visible()
                    assert picture.evaluate("img => img.complete && img.naturalWidth") == 384
                expect(page.locator("#semla-legend .semla-class").first).to_be_visible()
                page.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
                assert (tmp_path / "web_demo.png").stat().st_size > 10_000
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            output, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    assert server.returncode == 0, output[-3000:]
    assert "SemLA web demo stopped" in output
    assert not outside, f"the page fetched from outside the machine: {outside}"
