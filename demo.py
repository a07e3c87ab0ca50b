"""Segment your own images with CAT-Seg and your class names, optionally with SemLA's retrieved adapters.

Examples (from the repository root, after ``make demo``, which builds the demo model, library and CLIP)::

    python demo.py --input demo_output/world/muses/frame_camera/val/fog/night --output demo_predictions
    python demo.py --input photo.jpg --classes "road,sidewalk,car,person,tree,sky" --output out
    python demo.py --input floods/val/images --config-file floods.yaml --weights base.pth --output out  # own domain
    python demo.py --input "images/*.png" --config-file catseg/configs/vitl_336.yaml \\
        --weights catseg/models/model_final.pth --class-json catseg/datasets/cs19.json \\
        --lora_library_path catseg/loradb --embedding_model models/clip-vit-large-patch14 --output out

``python demo.py --web`` serves the same on a web page instead (``semla_demo.web``; see
``python demo.py --web --help``).

Per image it writes ``<name>_overlay.png`` (the image and its coloured prediction with a legend of the
classes present) and ``<name>_label.png`` (8-bit class ids); with a library also ``<name>_weights.png``
(the adapters the image borrowed from and their weights), and prints the same numbers.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def build_parser() -> argparse.ArgumentParser:
    from semla_demo.cli import add_model_arguments, add_run_arguments

    parser = argparse.ArgumentParser(
        prog="demo.py", description="Segment images with CAT-Seg (+ SemLA) and your class names."
    )
    add_model_arguments(parser)  # no library by default: zero-shot
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--output", type=Path, required=True, help="folder for the pictures and label maps")
    parser.add_argument(
        "--method",
        choices=("semla", "uniform", "zeroshot"),
        default=None,
        help="default: semla with a library and an embedder, uniform with a library only, zeroshot otherwise",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (TEST.AUG.ENABLED True): the TEST.AUG.MIN_SIZES scales and their flips, "
        "probabilities averaged (the adapter weights come from the image, once)",
    )
    parser.add_argument(
        "--web", action="store_true", help="serve the web demo instead (its flags: demo.py --web --help)"
    )
    add_run_arguments(parser)
    return parser


def find_images(patterns: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image files; unmatched input is an error."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"--input {pattern}: no such file, folder or matching files")
            found += matches
    return found


def _missing_demo_files(args: argparse.Namespace) -> None:
    from semla_demo.common import demo_for, make_demo_command

    if not Path(args.weights).is_file():
        model = demo_for(args.weights)
        hint = f" (run `{make_demo_command(model)}` first: it trains the demo model)" if model else ""
        raise FileNotFoundError(f"checkpoint {args.weights} not found{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    from cat_seg.cli import report_errors

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--web" in argv:  # the web page has its own flags (no --input / --output)
        from semla_demo.web import main as web_main

        return web_main([a for a in argv if a != "--web"], prog="demo.py --web")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return report_errors("demo.py", lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from cat_seg.data.io import write_label
    from semla_demo.cli import segmenter_from_args
    from semla_demo.visualize import save_overlay, save_weights_chart

    images = find_images(args.input)
    _missing_demo_files(args)
    if args.tta:  # the override TEST.AUG.ENABLED True, before the user's KEY VALUE pairs
        args.opts = ["TEST.AUG.ENABLED", "True", *(args.opts or [])]
    segmenter = segmenter_from_args(args)
    method = args.method or (
        "semla"
        if segmenter.embedder is not None
        else "uniform"
        if segmenter.library is not None
        else "zeroshot"
    )
    if method == "uniform" and args.method is None:
        print(
            "demo.py: warning: --lora_library_path without --embedding_model: every adapter at 1/N (uniform), no "
            "retrieval; pass --embedding_model (the embedder that made the library's statistics) for SemLA",
            file=sys.stderr,
            flush=True,
        )
    if len(segmenter.class_names) > 255:
        raise ValueError(f"{len(segmenter.class_names)} classes do not fit an 8-bit label map (at most 255)")
    args.output.mkdir(parents=True, exist_ok=True)
    summary = []
    for path in images:
        prediction = segmenter.predict(path, method)
        stem = path.stem
        write_label(args.output / f"{stem}_label.png", prediction.labels.astype(np.uint8))
        present = sorted({prediction.class_names[i] for i in np.unique(prediction.labels)})
        save_overlay(args.output / f"{stem}_overlay.png", prediction.image, prediction.labels, prediction.class_names,
                     title=f"{path.name}: {method}")  # fmt: skip
        line = f"{path}: {', '.join(present)}"
        if prediction.weights:
            save_weights_chart(
                args.output / f"{stem}_weights.png", prediction.weights, title=f"{path.name}: {method}"
            )
            line += "\n  weights: " + ", ".join(f"{n} {w:.4f}" for n, w in prediction.weights.items())
        print(line, flush=True)
        summary.append(
            {"image": str(path), "method": method, "classes": present, "weights": prediction.weights}
        )
    (args.output / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(images)} image(s) -> {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
