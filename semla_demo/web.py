"""The web demo: one image, your class names, and the domain experts SemLA borrowed from for it.

``python demo.py --web`` (or ``python -m semla_demo.web``) serves a gradio page on 127.0.0.1. By default
it uses what ``make demo`` builds (``demo_output/base/model_final.pth``, the library ``demo_output/loradb``,
the embedder ``demo_output/clip`` and the world's validation images as a gallery); flags point it at the
released checkpoint, adapters and CLIP instead.

The page segments an uploaded (or picked) image with the chosen method (SemLA, uniform fusion or
zero-shot), shows the same image under the zero-shot model beside it, a legend with each class's share of
the pixels, and the weight of every adapter used. Prediction is :class:`semla_demo.inference.Segmenter`'s,
so the library's own retrieval and fusion run, not a copy.

gradio is imported only when the page is built (:func:`build_app`, :func:`main`): importing this module
costs nothing more than numpy, and :class:`WebDemo` (everything the page does, as plain functions) is
usable without it.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domain_orchestrator.settings import COMBINATION_TYPES

from .cli import add_model_arguments, add_run_arguments
from .common import DEMO, METHOD_LABELS, demo_for, make_demo_command

logger = logging.getLogger(__name__)

__all__ = ["InputError", "Limits", "Result", "WebDemo", "build_app", "build_parser", "find_gallery", "main"]

HOST = "127.0.0.1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Results are shown at least this many pixels on their long side (small images are enlarged, nearest).
DISPLAY_SIDE = 384

Progress = Callable[[float, str], None]


class InputError(ValueError):
    """Input from the page that cannot be used; the message is shown on the page."""


@dataclass(frozen=True)
class Limits:
    """What the page accepts.

    Attributes:
        max_side: images longer than this (pixels, either side) are downscaled to it, with a note.
        max_pixels: images with more pixels than this are refused (decoding them would cost too much memory).
        max_classes: at most this many class names.
        max_file_mb: uploads over this many megabytes are refused by the server.
    """

    max_side: int = 1024
    max_pixels: int = 40_000_000
    max_classes: int = 256
    max_file_mb: int = 50

    def __post_init__(self) -> None:
        for key in ("max_side", "max_pixels", "max_classes", "max_file_mb"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class Result:
    """What the page shows after a request.

    Attributes:
        picture: (h, w, 3) uint8 overlay of the chosen method's prediction (enlarged for display).
        zeroshot_picture: the same for the zero-shot model.
        labels, zeroshot_labels: (H, W) class ids of both predictions (at the segmented size).
        class_names: the vocabulary used.
        method: ``semla``, ``uniform`` or ``zeroshot``.
        weights: adapter -> weight of the adapters used (empty for zero-shot), best first.
        changed: fraction of pixels whose class differs from the zero-shot prediction.
        notes: remarks for the status line (downscaling, ignored settings, timings).
    """

    picture: np.ndarray
    zeroshot_picture: np.ndarray
    labels: np.ndarray
    zeroshot_labels: np.ndarray
    class_names: list[str]
    method: str
    weights: dict[str, float]
    changed: float
    notes: list[str] = field(default_factory=list)


# -- input checks -----------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, limits: Limits, workdir: str | os.PathLike) -> tuple[Path, str]:
    """Check an uploaded file and write the RGB image that will be segmented.

    Args:
        path: the uploaded (or picked) file.
        limits: the size limits.
        workdir: folder for the copy.
    Returns:
        the copy (``<workdir>/<stem>.png``: RGB, EXIF orientation applied, downscaled when longer than
        ``limits.max_side``) and a note (empty, or what the downscaling did).
    Raises:
        InputError: not an image, or more than ``limits.max_pixels`` pixels.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    name = path.name
    too_big = (
        f"{name} is too large: at most {limits.max_pixels / 1e6:g} megapixels are accepted "
        f"(images longer than {limits.max_side} px are downscaled)"
    )
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > limits.max_pixels:
                raise InputError(f"{too_big}; this one is {width} x {height}")
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError:
        raise InputError(too_big) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(
            f"{name} is not an image this demo can read ({type(e).__name__}); "
            f"upload a PNG, JPEG, BMP or WebP picture"
        ) from None
    note = ""
    if max(rgb.size) > limits.max_side:
        scale = limits.max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        note = (
            f"{name} was downscaled from {rgb.width} x {rgb.height} to {size[0]} x {size[1]} "
            f"(longest side at most {limits.max_side} px)"
        )
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = Path(workdir) / f"{path.stem or 'image'}.png"
    rgb.save(out)
    return out, note


def parse_classes(text: str | None, max_classes: int) -> list[str]:
    """Class names from the page's text box: one per line (``"a, b"`` on one line are synonyms).

    Raises:
        InputError: no name, too many names, or a name given twice.
    """
    names = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not names:
        raise InputError("the class list is empty: write at least one class name (one per line)")
    if len(names) > max_classes:
        raise InputError(f"{len(names)} class names: at most {max_classes} are accepted")
    seen: set[str] = set()
    for n in names:
        if n.lower() in seen:
            raise InputError(f"class {n!r} is given twice: each line must name a different class")
        seen.add(n.lower())
    return names


def check_settings(
    method: str, methods: Sequence[str], top_k: Any, temperature: Any, num_adapters: int
) -> None:
    """Refuse settings the chosen method cannot use (other methods ignore top-k and temperature).

    Raises:
        InputError: an unknown method, top-k not in 1..N, a temperature that is not a number > 0.
    """
    if method not in methods:
        raise InputError(f"method must be one of {', '.join(methods)}, got {method!r}")
    if method != "semla":
        return
    try:
        k = float(top_k)
    except (TypeError, ValueError):
        raise InputError(f"top-k must be a whole number, got {top_k!r}") from None
    if not k.is_integer() or not 1 <= k <= num_adapters:
        raise InputError(f"top-k must be a whole number from 1 to {num_adapters}, got {top_k!r}")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise InputError(f"the temperature must be a number > 0, got {temperature!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise InputError(
            f"the temperature must be > 0 (SemLA divides the scores by it; the paper uses 0.05), got {temperature!r}"
        )


# -- pictures and HTML ------------------------------------------------------------------------------------
def display_picture(image: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The class colours blended over the image, enlarged (nearest) to about ``DISPLAY_SIDE`` pixels.

    Args:
        image: (H, W, 3) uint8.
        labels: (H, W) class ids.
        colours: (T, 3) uint8.
    Returns:
        (H * f, W * f, 3) uint8, f >= 1 an integer.
    """
    from .visualize import overlay

    return enlarge(overlay(image, labels, colours))


def enlarge(picture: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H * f, W * f, 3), the largest integer f >= 1 with a long side <= ``DISPLAY_SIDE``
    (nearest: every pixel of a small image stays visible as a square)."""
    factor = max(1, DISPLAY_SIDE // max(picture.shape[:2]))
    if factor > 1:
        picture = picture.repeat(factor, axis=0).repeat(factor, axis=1)
    return picture


def status_html(message: str, *, error: bool = False) -> str:
    """The status line: a message, red for errors."""
    kind = "semla-error" if error else "semla-ok"
    return f'<div id="semla-status" class="{kind}">{html.escape(message)}</div>'


def legend_html(
    class_names: Sequence[str], colours: np.ndarray, panels: Mapping[str, np.ndarray], *, limit: int = 24
) -> str:
    """A legend of the classes present in any panel, with each panel's share of the pixels.

    Args:
        class_names: the vocabulary (index = class id).
        colours: (T, 3) uint8 colours of the classes.
        panels: panel title -> (H, W) class ids; classes are ordered by their share in the first panel.
        limit: at most this many rows (the largest).
    """
    titles = list(panels)
    shares = {t: np.bincount(p.ravel(), minlength=len(class_names)) / p.size for t, p in panels.items()}
    present = [i for i in range(len(class_names)) if any(shares[t][i] > 0 for t in titles)]
    present.sort(key=lambda i: (-shares[titles[0]][i], -max(shares[t][i] for t in titles), i))
    head = "".join(f"<th>{html.escape(t)}</th>" for t in titles)
    rows = []
    for i in present[:limit]:
        r, g, b = (int(c) for c in colours[i])
        cells = "".join(f"<td>{100 * shares[t][i]:.1f} %</td>" for t in titles)
        rows.append(
            f'<tr class="semla-class"><td><span class="semla-swatch" style="background: rgb({r}, {g}, {b})">'
            f"</span>{html.escape(class_names[i])}</td>{cells}</tr>"
        )
    more = f"<p>{len(present) - limit} more classes not listed</p>" if len(present) > limit else ""
    return (
        f'<div id="semla-legend-table"><h4>Classes (share of the pixels)</h4><table><tr><th>class</th>{head}</tr>'
        f"{''.join(rows)}</table>{more}</div>"
    )


def weights_html(weights: Mapping[str, float], library_names: Sequence[str], method: str, detail: str) -> str:
    """A bar chart of the adapters' weights for this image, largest first, with their values.

    Each row carries ``data-adapter`` and ``data-weight`` (full precision) for programs reading the page.
    """
    if method == "zeroshot":
        return (
            '<div id="semla-weights-chart"><h4>Adapter weights</h4>'
            "<p>Zero-shot: no adapter is used (the base model alone).</p></div>"
        )
    rows = []
    for name, w in sorted(weights.items(), key=lambda kv: -kv[1]):
        shown = f"{w:.3f}" if w >= 5e-4 else f"{w:.1e}"  # a tiny weight is not written as 0.000
        rows.append(
            f'<tr class="semla-weight" data-adapter="{html.escape(name)}" data-weight="{w!r}">'
            f"<td>{html.escape(name)}</td>"
            f'<td class="semla-bar-cell"><div class="semla-bar" style="width: {100 * w:.1f}%"></div></td>'
            f"<td>{shown}</td></tr>"
        )
    unused = len(library_names) - len(weights)
    rest = f"; the other {unused} weigh 0" if unused else ""
    return (
        f'<div id="semla-weights-chart"><h4>Adapter weights ({html.escape(METHOD_LABELS[method])}, '
        f"{html.escape(detail)})</h4><table>{''.join(rows)}</table>"
        f"<p>{len(weights)} of the library's {len(library_names)} adapters used{rest}; "
        f"the weights sum to {sum(weights.values()):.3f}.</p></div>"
    )


# -- the demo without its page ----------------------------------------------------------------------------
def find_gallery(
    folder: str | os.PathLike | None, per_folder: int = 2, limit: int = 24
) -> list[tuple[Path, str]]:
    """Images to offer on the page: the first ``per_folder`` of every folder of images.

    For the demo world (a folder holding ``muses/frame_camera/val``) the validation images of each
    condition are used and captioned with it (``fog night``); other folders are searched recursively.

    Returns:
        up to ``limit`` (image, caption) pairs, sorted by folder.
    """
    if folder is None:
        return []
    root = Path(folder)
    val = root / "muses" / "frame_camera" / "val"
    base = val if val.is_dir() else root
    if not base.is_dir():
        return []
    by_folder: dict[Path, list[Path]] = {}
    for p in sorted(base.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            by_folder.setdefault(p.parent, []).append(p)
    items = []
    for parent, files in sorted(by_folder.items()):
        caption = " ".join(parent.relative_to(base).parts) or parent.name
        items += [(f, caption) for f in files[:per_folder]]
    return items[:limit]


class WebDemo:
    """What the page does: check the input, segment with the chosen method and under zero-shot, describe.

    Requests are served one at a time (a lock): the segmenter's vocabulary and fused adapters are shared.

    Args:
        segmenter: a :class:`semla_demo.inference.Segmenter` (with a library and an embedder for SemLA).
        gallery: (image, caption) pairs offered on the page.
        limits: what the page accepts.
    """

    def __init__(
        self, segmenter: Any, *, gallery: Sequence[tuple[Path, str]] = (), limits: Limits = Limits()
    ) -> None:
        self.segmenter = segmenter
        self.gallery = [(Path(p), c) for p, c in gallery]
        self.limits = limits
        self._lock = threading.Lock()
        self._vocabulary = list(segmenter.class_names)

    @property
    def library_names(self) -> list[str]:
        library = self.segmenter.library
        return [] if library is None else list(library.names)

    @property
    def methods(self) -> list[str]:
        """The methods this segmenter can run, best first."""
        found = ["zeroshot"]
        if self.segmenter.library is not None:
            found.insert(0, "uniform")
            if self.segmenter.embedder is not None:
                found.insert(0, "semla")
        return found

    @property
    def vocabulary(self) -> list[str]:
        """The model's vocabulary when the page was built (the class names the text box starts with)."""
        return list(self._vocabulary)

    def preview(self, path: str | os.PathLike | None) -> tuple[np.ndarray, str]:
        """The image as it will be segmented (enlarged for display) and a note, for showing a chosen file.

        Raises:
            InputError: no file, not an image, too large.
        """
        from PIL import Image

        if path is None:
            raise InputError("no image: upload one or pick one from the gallery")
        with tempfile.TemporaryDirectory(prefix="semla-web-") as tmp:
            copy, note = load_image(path, self.limits, tmp)
            with Image.open(copy) as im:
                return enlarge(np.asarray(im.convert("RGB"))), note

    def run(
        self,
        path: str | os.PathLike | None,
        classes: str,
        method: str,
        top_k: Any = None,
        temperature: Any = None,
        progress: Progress | None = None,
        combination_type: str | None = None,
    ) -> Result:
        """Segment one image with ``method`` and with the zero-shot model.

        Args:
            path: the image file.
            classes: class names, one per line.
            method: ``semla``, ``uniform`` or ``zeroshot``.
            top_k, temperature: SemLA's settings (ignored by the other methods).
            progress: called with (fraction done, what runs now).
            combination_type: how uniform and SemLA fuse the adapters (PEFT's types; default: the config's).
        Raises:
            InputError: bad input (the message is for the page).
        """
        from .visualize import class_colours

        report = progress or (lambda fraction, what: None)
        if path is None:
            raise InputError("no image: upload one or pick one from the gallery")
        names = parse_classes(classes, self.limits.max_classes)
        check_settings(method, self.methods, top_k, temperature, len(self.library_names))
        if combination_type is not None and combination_type not in COMBINATION_TYPES:
            raise InputError(f"unknown fusion {combination_type!r}; one of {', '.join(COMBINATION_TYPES)}")
        notes: list[str] = []
        k = int(float(top_k)) if method == "semla" else None
        t = float(temperature) if method == "semla" else None
        report(0.05, "reading the image")
        with tempfile.TemporaryDirectory(prefix="semla-web-") as tmp, self._lock:
            image_file, note = load_image(path, self.limits, tmp)
            if note:
                notes.append(note)
            self.segmenter.set_classes(names)
            report(0.2, "zero-shot prediction")
            start = time.perf_counter()
            zeroshot = self.segmenter.predict(image_file, "zeroshot")
            seconds = {"zero-shot": time.perf_counter() - start}
            prediction = zeroshot
            if method != "zeroshot":
                report(0.55, "retrieving and fusing adapters" if method == "semla" else "fusing adapters")
                start = time.perf_counter()
                prediction = self.segmenter.predict(
                    image_file, method, top_k=k, temperature=t, combination_type=combination_type
                )
                seconds[METHOD_LABELS[method]] = time.perf_counter() - start
        report(0.9, "drawing")
        colours = class_colours(prediction.class_names)
        changed = float((prediction.labels != zeroshot.labels).mean())
        notes.append(", ".join(f"{m} {s:.2f} s" for m, s in seconds.items()))
        return Result(
            picture=display_picture(prediction.image, prediction.labels, colours),
            zeroshot_picture=display_picture(zeroshot.image, zeroshot.labels, colours),
            labels=prediction.labels,
            zeroshot_labels=zeroshot.labels,
            class_names=prediction.class_names,
            method=method,
            weights=dict(prediction.weights),
            changed=changed,
            notes=notes,
        )

    def describe(
        self, result: Result, top_k: Any = None, temperature: Any = None
    ) -> tuple[str, str, str, str]:
        """The result's title, status line, legend and weight chart (HTML)."""
        label = METHOD_LABELS[result.method]
        detail = ""
        if result.method == "semla":
            detail = f"top-{int(float(top_k))}, T = {float(temperature):g}"
        elif result.method == "uniform":
            detail = f"all {len(self.library_names)} adapters, 1/{len(self.library_names)} each"
        title = f"{label} ({detail})" if detail else label
        if result.method == "zeroshot":
            summary = f"zero-shot, {len(result.class_names)} classes"
        else:
            summary = (
                f"{title}, {len(result.class_names)} classes: {100 * result.changed:.1f} % of the pixels "
                "change class against zero-shot"
            )
        status = status_html("; ".join([summary, *result.notes]))
        panels = {label: result.labels}
        if result.method != "zeroshot":
            panels["zero-shot"] = result.zeroshot_labels
        from .visualize import class_colours

        legend = legend_html(result.class_names, class_colours(result.class_names), panels)
        chart = weights_html(result.weights, self.library_names, result.method, detail)
        return title, status, legend, chart


# -- the page --------------------------------------------------------------------------------------------
CSS = """
#semla-status { padding: 0.5em 0.8em; border-radius: 6px; }
#semla-status.semla-ok { background: #eef6ee; color: #1b4d1b; }
#semla-status.semla-error { background: #fdecea; color: #8a1c12; font-weight: 600; }
.semla-swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
                border: 1px solid #333; vertical-align: middle; }
#semla-weights-chart table, #semla-legend-table table { width: 100%; border-collapse: collapse; }
#semla-weights-chart td, #semla-legend-table td, #semla-legend-table th { padding: 2px 6px; }
#semla-weights-chart td:first-child { white-space: nowrap; }
.semla-bar-cell { width: 50%; }
.semla-bar { height: 0.9em; background: #e65100; border-radius: 2px; }
"""

INTRO = """# SemLA: which domain experts does this image borrow from?
Upload an image (or pick one of the demo world's validation images), edit the class names and run.
The result is shown beside the same image under the **zero-shot** model (no adapter); the chart gives
the weight of each adapter of the library that SemLA retrieved for this image."""


def build_app(demo: WebDemo) -> Any:
    """The gradio page (a ``gr.Blocks``) around ``demo``; launch it with :func:`launch`."""
    import gradio as gr

    methods = demo.methods
    n = len(demo.library_names)
    limits = demo.limits
    with gr.Blocks(title="SemLA web demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        gr.Markdown(
            f"Images: up to {limits.max_file_mb} MB and {limits.max_pixels / 1e6:g} megapixels; longer than "
            f"{limits.max_side} px is downscaled. Library: {n} adapters"
            + (f" ({', '.join(demo.library_names)})" if n else "")
            + "."
        )
        chosen = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Upload an image", file_count="single", type="filepath", elem_id="semla-upload"
                )
                gallery = None
                if demo.gallery:
                    gallery = gr.Gallery(
                        value=[(str(p), c) for p, c in demo.gallery],
                        label="... or pick a demo-world validation image",
                        columns=6,
                        height=220,
                        allow_preview=False,
                        interactive=False,
                        buttons=[],
                        elem_id="semla-gallery",
                    )
                preview = gr.Image(label="Input", interactive=False, height=256, elem_id="semla-input")
            with gr.Column(scale=1):
                classes = gr.Textbox(
                    value="\n".join(demo.vocabulary),
                    lines=8,
                    max_lines=16,
                    label='Class names (one per line; "a, b" on one line are synonyms)',
                    elem_id="semla-classes",
                )
                method = gr.Radio(
                    choices=[(METHOD_LABELS[m], m) for m in methods],
                    value=methods[0],
                    label="Method",
                    elem_id="semla-method",
                )
                with gr.Row():
                    top_k = gr.Slider(
                        1,
                        max(n, 1),
                        step=1,
                        value=min(max(n, 1), demo.segmenter.top_k),
                        label="top-k (SemLA)",
                        elem_id="semla-topk",
                        interactive=n > 1,
                    )
                    temperature = gr.Number(
                        value=demo.segmenter.temperature,
                        label="temperature (SemLA, > 0)",
                        elem_id="semla-temperature",
                    )
                fusion = gr.Dropdown(
                    choices=list(COMBINATION_TYPES),
                    value=demo.segmenter.combination_type,
                    label="fusion (uniform, SemLA): PEFT's combination type",
                    elem_id="semla-fusion",
                )
                run = gr.Button("Segment", variant="primary", elem_id="semla-run")
        status = gr.HTML(status_html("Choose an image, then press Segment."), elem_id="semla-status-box")
        with gr.Row():
            result = gr.Image(label="Result", interactive=False, elem_id="semla-result", format="png")
            zeroshot = gr.Image(
                label="Zero-shot (same image, no adapter)",
                interactive=False,
                elem_id="semla-zeroshot",
                format="png",
            )
        with gr.Row():
            legend = gr.HTML(elem_id="semla-legend")
            weights = gr.HTML(elem_id="semla-weights")

        # The upload box is a drop zone: it is emptied after each upload (ready for the next one) and the
        # chosen image shows in the Input panel.
        def on_upload(path: str | None) -> tuple:
            try:
                picture, note = demo.preview(path)
            except InputError as e:
                return None, None, None, status_html(str(e), error=True)
            return path, picture, None, status_html(note or f"{Path(path).name}: ready, press Segment.")

        upload.upload(on_upload, inputs=upload, outputs=[chosen, preview, upload, status], queue=False)

        if gallery is not None:

            def on_pick(evt: gr.SelectData) -> tuple:
                path, caption = demo.gallery[evt.index]
                try:
                    picture, _ = demo.preview(path)
                except InputError as e:
                    return None, None, None, status_html(str(e), error=True)
                return (
                    str(path),
                    picture,
                    None,
                    status_html(f"{path.name} ({caption}): ready, press Segment."),
                )

            # gradio finds the event-data argument by its annotation, a string under `from __future__
            # import annotations` that it cannot resolve here (gr is imported in this function).
            on_pick.__annotations__["evt"] = gr.SelectData
            gallery.select(on_pick, inputs=None, outputs=[chosen, preview, upload, status], queue=False)

        def on_run(path, text, how, k, t, fuse, progress=gr.Progress()) -> tuple:  # noqa: ANN001, B008
            def report(fraction: float, what: str) -> None:
                progress(fraction, desc=what)

            try:
                res = demo.run(path, text, how, k, t, progress=report, combination_type=fuse)
                title, line, table, chart = demo.describe(res, k, t)
            except InputError as e:
                return gr.update(value=None), gr.update(value=None), status_html(str(e), error=True), "", ""
            except Exception as e:  # the server keeps serving; the log has the traceback
                logger.exception("request failed")
                return (
                    gr.update(value=None),
                    gr.update(value=None),
                    status_html(f"error: {e}", error=True),
                    "",
                    "",
                )
            zs_title = (
                "Zero-shot (same as the result)"
                if how == "zeroshot"
                else "Zero-shot (same image, no adapter)"
            )
            return (
                gr.update(value=res.picture, label=title),
                gr.update(value=res.zeroshot_picture, label=zs_title),
                line,
                table,
                chart,
            )

        run.click(
            on_run,
            inputs=[chosen, classes, method, top_k, temperature, fusion],
            outputs=[result, zeroshot, status, legend, weights],
            concurrency_limit=1,
        )
    return app


def launch(app: Any, demo: WebDemo, port: int, *, quiet: bool = True) -> str:
    """Serve ``app`` on 127.0.0.1:``port`` in background threads; returns the URL (``app.close()`` stops it)."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: nothing is fetched from outside
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])
    allowed = sorted({str(p.parent) for p, _ in demo.gallery})
    try:
        app.queue(default_concurrency_limit=1)
        app.launch(
            server_name=HOST,
            server_port=port,
            prevent_thread_lock=True,
            quiet=quiet,
            show_error=True,
            ssr_mode=False,
            mcp_server=False,
            allowed_paths=allowed,
            max_file_size=f"{demo.limits.max_file_mb}mb",
            theme=theme,
            css=CSS,
        )
    except OSError as e:
        raise ValueError(f"cannot serve on {HOST}:{port} ({e}); pass another --port") from None
    return f"http://{HOST}:{port}/"


# -- the command line ------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m semla_demo.web") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the SemLA web demo on 127.0.0.1: one image, your class names, the adapters it borrows.",
    )
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default: 7860)")
    add_model_arguments(parser, demo_library=True, initial_classes=True)
    parser.add_argument(
        "--gallery",
        default=str(DEMO / "world"),
        help="demo world (its validation images) or a folder of images to offer (default: demo_output/world)",
    )
    parser.add_argument(
        "--gallery-per-folder", type=int, default=2, help="images offered per folder (default: 2)"
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=Limits.max_side,
        help="downscale longer images to this (px; default: %(default)s)",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=Limits.max_pixels / 1e6,
        help="refuse larger images (default: 40)",
    )
    parser.add_argument(
        "--max-file-mb",
        type=int,
        default=Limits.max_file_mb,
        help="refuse larger uploads (MB; default: %(default)s)",
    )
    add_run_arguments(parser)
    return parser


def check_files(args: argparse.Namespace) -> None:
    """Every model file must exist; the defaults' absence means ``make demo`` has not run.

    Raises:
        FileNotFoundError: naming every missing file, with the hint when they are the demo's.
    """
    wanted = {
        "--weights": (args.weights, Path.is_file),
        "--lora_library_path": (args.lora_library_path, Path.is_dir),
        "--embedding_model": (args.embedding_model, Path.exists),
    }
    missing = [(flag, path) for flag, (path, ok) in wanted.items() if not ok(Path(path))]
    if not missing:
        return
    listed = ", ".join(f"{flag} {path}" for flag, path in missing)
    model = next((m for m in (demo_for(path) for _, path in missing) if m is not None), None)
    if model is not None:
        raise FileNotFoundError(
            f"not found: {listed}. Run `{make_demo_command(model)}` first: it builds the demo model, library "
            f"and CLIP in {model.output} (or pass --weights, --lora_library_path and --embedding_model)"
        )
    raise FileNotFoundError(f"not found: {listed}")


def build_demo(args: argparse.Namespace) -> WebDemo:
    """The :class:`WebDemo` a command line asks for (loads the model, library and embedder)."""
    from .cli import segmenter_from_args

    check_files(args)
    segmenter = segmenter_from_args(args)
    limits = Limits(
        max_side=args.max_side, max_pixels=int(args.max_megapixels * 1e6), max_file_mb=args.max_file_mb
    )
    gallery = find_gallery(args.gallery, per_folder=args.gallery_per_folder)
    if not gallery:
        logger.warning("no gallery images in %s", args.gallery)
    return WebDemo(segmenter, gallery=gallery, limits=limits)


def main(argv: Sequence[str] | None = None, prog: str = "python -m semla_demo.web") -> int:
    from cat_seg.cli import report_errors

    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return report_errors(prog, lambda: _serve(args), debug=args.debug)


def _serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check online
    demo = build_demo(args)
    app = build_app(demo)
    url = launch(app, demo, args.port)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print(f"SemLA web demo on {url} (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()
    print("SemLA web demo stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
