"""SAN against CAT-Seg on the same image, zero-shot and under SemLA's per-image step, side by side in one run.

Both models are built with random weights (the cost does not depend on them) by ``build_model`` from their
configs, in eval mode under ``torch.inference_mode``, and run on the same RGB image (default 640x640, uint8)
with the same vocabulary (the 19 Cityscapes classes), batch 1:

  SAN-B       ``san/san_vitb16.yaml``: the first 9 CLIP ViT-B/16 blocks on the image scaled by 0.5, the side
              ViT (width 240, 8 blocks) on the full image, the last 3 CLIP blocks on 100 query tokens with
              the side adapter's attention bias; whole-image inference (SAN has no sliding window)
  CAT-Seg-B   ``vitb_384.yaml`` in the mode SemLA's experiments run it (``EXPERIMENT_OPTS``: sliding window,
              four 384-px crops and a global view, pooling [1, 1]); also, for reference, whole-image
              inference (the padded image resized to the 384-px CLIP input), which SemLA does not use

For each model, per image:

  zero-shot   the forward with the class-text features computed once before the timed loop (as the
              engine's evaluation and ``experiments.py --experiment zeroshot`` do):
              ``model([x], text_features=text)``
  SemLA       the class-text features under the image's fused adapters (``fused_text_features``, SemLA's
              ``per_image`` text policy) + the forward under ``fused_adapters``, i.e. ``step.segment``
              with precomputed weights

Timed: the forward from the uint8 image tensor to the output probabilities (normalisation, padding, the
network, resizing to the image size) and, for SemLA, the per-image class text. Not timed: reading and
mapping the image file, the retrieval embedding and the weights (the same for both models: see
``bench/semla_overhead.py``, which times them), argmax and evaluation, the zero-shot class text (computed once
per vocabulary; reported on its own). The library is ``--num-adapters`` random rank-8 adapters (alpha 16)
on each model's SemLA targets (``cat_seg.lora.semla_target_modules``); each image gets its own top-k
softmax weights (T = 0.05) from random scores. Every repetition runs every model and path in turn, so that
machine noise hits them alike; each figure is the median over ``--reps`` repetitions after ``--warmup``
untimed ones. Simple timers (module hooks; no device to synchronise on the CPU) split each forward into
parts: SAN's CLIP feature extractor, side adapter, recognition head (the last CLIP blocks) and the rest;
CAT-Seg's CLIP image tower and the rest.

    uv run python bench/san_speed.py --threads 2             # the recorded configuration
    uv run python bench/san_speed.py --preset tiny --reps 1  # a quick smoke run (same as --quick)
    uv run python bench/san_speed.py --render FILE           # reprint the tables of a saved run (--output)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cat_seg.config import CATSEG_ROOT, load_config
from cat_seg.lora import semla_target_modules
from cat_seg.modeling import build_model
from domain_orchestrator.fusion import fused_adapters, fused_text_features
from domain_orchestrator.library import AdapterLibrary
from domain_orchestrator.retrieval import semla_weights
from domain_orchestrator.settings import EXPERIMENT_OPTS
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

from _common import log, median_ms, report, run_description, sync

#: preset -> ({model label: config}, image side)
PRESETS = {
    "base": ({"SAN-B": "san/san_vitb16.yaml", "CAT-Seg-B": "vitb_384.yaml"}, 640),
    "tiny": ({"SAN-tiny": "san/san_tiny_model.yaml", "CAT-Seg-tiny": "tiny/tiny_model.yaml"}, 48),
}
CLASSES = "datasets/cs19.json"
#: the configs list COCO's (or ADE's) classes: train and test on the 19 Cityscapes classes instead
VOCABULARY = (
    "MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON",
    CLASSES,
    "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON",
    CLASSES,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "19",
)
TEMPERATURE = 0.05
#: the parts each family's forward is split into: (label, module path or "path:method")
PARTS = {
    "SAN": [
        ("CLIP extractor", "clip_visual_extractor"),
        ("side adapter", "side_adapter_network"),
        ("recognition head", "clip_rec_head"),
    ],
    "CATSeg": [("CLIP image tower", "clip_model.visual:forward_intermediates")],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="base", help="SAN-B + CAT-Seg-B, or the tiny pair"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: --preset tiny --reps 1")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--num-adapters", type=int, default=10, help="library size")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapters")
    p.add_argument("--top-k", type=int, default=3, help="adapters fused per image")
    p.add_argument("--height", type=int, default=None, help="image height (default: the preset's 640 / 48)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the height)")
    p.add_argument(
        "--no-catseg-whole",
        action="store_true",
        help="skip CAT-Seg's whole-image reference (not SemLA's mode)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--render", type=Path, default=None, help="print the tables of a saved --output file and exit"
    )
    return p


class PartTimer:
    """Seconds spent in named parts of a forward: module hooks, or a wrapped method for ``path:method``."""

    def __init__(self, model: nn.Module, parts: Sequence[tuple[str, str]], device: str) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []
        for label, where in parts:
            path, _, method = where.partition(":")
            owner = model
            for attr in path.split("."):
                owner = getattr(owner, attr)
            if method:
                self._wrap(owner, method, label)
            else:
                self._hook(owner, label)

    def _add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def _hook(self, module: nn.Module, label: str) -> None:
        starts: list[float] = []

        def pre(mod: nn.Module, args: object) -> None:
            sync(self.device)
            starts.append(time.perf_counter())

        def post(mod: nn.Module, args: object, out: object) -> None:
            sync(self.device)
            self._add(label, time.perf_counter() - starts.pop())

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo += [h.remove for h in handles]

    def _wrap(self, owner: object, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapped(*args: object, **kwargs: object) -> object:
            sync(self.device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            self._add(label, time.perf_counter() - start)
            return out

        setattr(owner, name, wrapped)
        self._undo.append(lambda: vars(owner).pop(name, None))

    def take(self) -> dict[str, float]:
        """The parts' seconds since the last call (and reset)."""
        seconds, self.seconds = self.seconds, {}
        return seconds

    def remove(self) -> None:
        for undo in self._undo:
            undo()


def _count(params: object) -> int:
    seen: dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters, CLIP's (both towers), the rest (SAN's side adapter / CAT-Seg's aggregator) and the
    trainable ones of the family's own fine-tuning (as built: SAN's side adapter, background embedding and
    CLIP positional embedding; CAT-Seg's ``CLIP_FINETUNE: attention``)."""
    total = _count(model.parameters())
    clip = _count(model.clip_model.parameters())
    trainable = _count(p for p in model.parameters() if p.requires_grad)
    return {"total": total, "clip": clip, "rest": total - clip, "trainable": trainable}


def run_timed(fn: Callable[[], object], timer: PartTimer, device: str) -> tuple[float, dict[str, float]]:
    timer.take()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start, timer.take()


def time_image(
    model: nn.Module,
    library: AdapterLibrary,
    text: torch.Tensor,
    timer: PartTimer,
    x: dict,
    w: torch.Tensor,
    device: str,
) -> tuple[float, dict[str, float], float, float, dict[str, float]]:
    """One image, zero-shot then SemLA.

    Returns:
        (zero-shot s, its parts, SemLA class text s, SemLA fused forward s, its parts)
    """
    zeroshot, zeroshot_parts = run_timed(lambda: model([x], text_features=text), timer, device)
    fused_text: list[torch.Tensor] = []
    text_s, _ = run_timed(lambda: fused_text.append(fused_text_features(model, library, w)), timer, device)

    def fused() -> None:
        with fused_adapters(model, library, w):
            model([x], text_features=fused_text[0])

    forward_s, forward_parts = run_timed(fused, timer, device)
    return zeroshot, zeroshot_parts, text_s, forward_s, forward_parts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        import json

        print(render(json.loads(args.render.read_text(encoding="utf-8"))))
        return 0
    if args.quick:
        args.preset, args.reps = "tiny", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    configs, side = PRESETS[args.preset]
    height = args.height or side
    width = args.width or height
    image = torch.randint(
        0, 256, (3, height, width), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    x = {"image": image, "height": height, "width": width}
    # Each image's weights: top-k softmax of random scores (spread so that every kept weight is non-zero).
    rng = np.random.default_rng(0)
    images = args.warmup + args.reps
    weights = semla_weights(
        torch.from_numpy(rng.normal(0, 0.05, size=(images, args.num_adapters))), args.top_k, TEMPERATURE
    )
    assert bool(((weights > 0).sum(dim=1) == args.top_k).all()), "a kept weight underflowed to 0"

    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for label, config in configs.items():
            torch.manual_seed(0)
            opts = [*EXPERIMENT_OPTS, *VOCABULARY]
            model = build_model(load_config(CATSEG_ROOT / "configs" / config, opts), device).eval()
            family = type(model).__name__
            targets = semla_target_modules(model)
            shapes = linear_shapes(model, targets)
            names = [f"domain{i:02d}" for i in range(args.num_adapters)]
            for i, name in enumerate(names):
                write_random_adapter(
                    Path(tmp) / label / name, shapes, rank=args.rank, alpha=2 * args.rank, seed=i
                )
            library = AdapterLibrary.open(Path(tmp) / label, names, model=model, device=device)
            # zero-shot: the class text once per vocabulary, outside the timed loop; timed on a second call
            # (the first one pays one-time costs)
            text = model.text_features()
            sync(device)
            start = time.perf_counter()
            text = model.text_features()
            sync(device)
            text_once = time.perf_counter() - start
            models[label] = {
                "model": model,
                "family": family,
                "library": library,
                "text": text,
                "timer": PartTimer(model, PARTS.get(family, []), device),
                "info": {
                    "family": family,
                    "config": config,
                    "parameters": parameter_counts(model),
                    "target_layers": len(targets),
                    "lora_parameters_per_adapter": library.num_parameters() // len(library),
                    "prompts": list(text.shape[:2]),
                    "zeroshot_text_once_ms": 1000 * text_once,
                },
            }
            log(
                f"{label} ({config}): {models[label]['info']['parameters']['total'] / 1e6:.1f}M parameters, "
                f"{len(targets)} target layers, text {tuple(text.shape)} in {1000 * text_once:.0f} ms"
            )

        # The rows: (row label, model label, sliding window on/off, or None for the model's only mode)
        runs: list[tuple[str, str, bool | None]] = []
        for label, m in models.items():
            if m["family"] == "CATSeg":
                runs.append((label, label, True))
                if not args.no_catseg_whole:
                    runs.append((f"{label}, whole image", label, False))
            else:
                runs.append((label, label, None))
        samples: dict[str, dict[str, list]] = {
            row: {"zeroshot": [], "zeroshot_parts": [], "text": [], "semla": [], "semla_parts": []}
            for row, _, _ in runs
        }
        for rep in range(images):
            w = weights[rep : rep + 1]
            line = []
            for row, label, sliding in runs:
                m = models[label]
                model, library, timer = m["model"], m["library"], m["timer"]
                if sliding is not None:
                    model.sliding_window = sliding
                zs, zs_parts, t, fw, fw_parts = time_image(model, library, m["text"], timer, x, w, device)
                line.append(f"{row} {zs:.2f} s / {t + fw:.2f} s")
                if rep >= args.warmup:
                    s = samples[row]
                    s["zeroshot"].append(zs)
                    s["zeroshot_parts"].append(zs_parts)
                    s["text"].append(t)
                    s["semla"].append(fw)
                    s["semla_parts"].append(fw_parts)
            log(
                f"rep {rep}{' (warm-up)' if rep < args.warmup else ''}: zero-shot / SemLA: " + ", ".join(line)
            )
        for m in models.values():
            m["timer"].remove()

    rows = {}
    for row, label, sliding in runs:
        s = samples[row]
        part_names = list(s["zeroshot_parts"][0]) if s["zeroshot_parts"] else []
        totals_semla = [t + f for t, f in zip(s["text"], s["semla"])]
        rows[row] = {
            "model": label,
            "family": models[label]["family"],
            # CAT-Seg's whole-image mode resizes the padded image to the CLIP input
            "input_px": getattr(models[label]["model"], "clip_resolution", None)
            if sliding is False
            else None,
            "mode": {None: "whole image", True: "sliding window", False: "whole image"}[sliding],
            "zeroshot_ms": median_ms(s["zeroshot"]),
            "text_ms": median_ms(s["text"]),
            "semla_forward_ms": median_ms(s["semla"]),
            "semla_ms": median_ms(totals_semla),
            "ratio_per_rep": [f / z for f, z in zip(totals_semla, s["zeroshot"])],
            "zeroshot_parts_ms": {
                p: median_ms([d.get(p, 0.0) for d in s["zeroshot_parts"]]) for p in part_names
            },
            "semla_parts_ms": {p: median_ms([d.get(p, 0.0) for d in s["semla_parts"]]) for p in part_names},
            "all_zeroshot_s": s["zeroshot"],
            "all_semla_s": totals_semla,
        }
    wall = time.perf_counter() - started
    results = {
        "models": {label: m["info"] for label, m in models.items()},
        "rows": rows,
        "meta": {
            "preset": args.preset,
            "image": f"{height}x{width} uint8 RGB, batch 1, 19 Cityscapes classes",
            "library": f"{args.num_adapters} random adapters, rank {args.rank} (alpha {2 * args.rank}), "
            f"top-{args.top_k}, T {TEMPERATURE}",
            "reps": args.reps,
            "warmup": args.warmup,
            "wall_s": round(wall, 1),
            # CPU time of this process / (wall time x threads): well below 1 when other processes took
            # the cores
            "cpu_share": round((time.process_time() - cpu_started) / (wall * torch.get_num_threads()), 2),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            **run_description(argv, device=device, cpu_count=True),
        },
    }
    return report(results, render, args.output)


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f} ms".replace(",", " ")
    return f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"


def _m(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"


#: what a family's forward does besides its timed parts
REST_LABELS = {
    "SAN": "the rest: pre-processing, CLIP input resize, classifier, mask resize and combination",
    "CATSeg": "the rest: aggregator (cost volume, spatial and class blocks, decoder), pre/post-processing",
}


def _row_label(row: dict) -> str:
    if row["mode"] == "sliding window":
        return f"{row['model']} (sliding window, as SemLA runs it)"
    if row.get("family") == "CATSeg":
        size = f"{row['input_px']}-px" if row.get("input_px") else "CLIP-size"
        return f"{row['model']} (whole image, {size} input: reference, not SemLA's mode)"
    return f"{row['model']} (whole image)"


def render(r: dict) -> str:
    """Markdown tables: the models, ms per image (zero-shot, SemLA, ratios) and the parts of each forward."""
    m, models, rows = r["meta"], r["models"], r["rows"]
    lines = [
        f"preset {m['preset']}, {m['image']}; {m['library']}; median of {m['reps']} after {m['warmup']} "
        f"warm-up; torch {m['torch']}, {m['device']}, {m['threads']} threads; whole run {m['wall_s']:.0f} s, "
        f"cpu share {m['cpu_share']}, 1-min load average {m['load_average_1min'][0]} at the start, "
        f"{m['load_average_1min'][1]} at the end",
        "",
        "| model | config | parameters | of which CLIP | rest | trainable (family's fine-tuning) | "
        "SemLA target layers | LoRA parameters per "
        "adapter | prompts (classes x templates) | zero-shot class text (once per vocabulary) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, info in models.items():
        p = info["parameters"]
        lines.append(
            f"| {label} | `{info['config']}` | {_m(p['total'])} | {_m(p['clip'])} | {_m(p['rest'])} | "
            f"{_m(p['trainable'])} | "
            f"{info['target_layers']} | {_m(info['lora_parameters_per_adapter'])} | "
            f"{info['prompts'][0]} x {info['prompts'][1]} | {_ms(info['zeroshot_text_once_ms'])} |"
        )
    reference = next(((k, row) for k, row in rows.items() if row["mode"] == "sliding window"), None)
    lines += [
        "",
        "| model (inference mode) | zero-shot | SemLA: class text | SemLA: fused forward | SemLA per image | "
        "SemLA / zero-shot (per repetition) | zero-shot / "
        + (f"{reference[0]} (sliding window) zero-shot |" if reference else "reference |"),
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        ratios = ", ".join(f"{x:.2f}" for x in row["ratio_per_rep"])
        versus = f"{row['zeroshot_ms'] / reference[1]['zeroshot_ms']:.3f}" if reference else ""
        lines.append(
            f"| {_row_label(row)} | {_ms(row['zeroshot_ms'])} | {_ms(row['text_ms'])} | "
            f"{_ms(row['semla_forward_ms'])} | {_ms(row['semla_ms'])} | "
            f"**{row['semla_ms'] / row['zeroshot_ms']:.3f}** ({ratios}) | {versus} |"
        )
    lines += [
        "",
        "| model (inference mode) | part of the forward | zero-shot | share | SemLA fused forward | share |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        zero, fused = dict(row["zeroshot_parts_ms"]), dict(row["semla_parts_ms"])
        rest = REST_LABELS.get(models[row["model"]]["family"], "the rest")
        zero[rest] = row["zeroshot_ms"] - sum(zero.values())
        fused[rest] = row["semla_forward_ms"] - sum(fused.values())
        for part in zero:
            lines.append(
                f"| {_row_label(row)} | {part} | {_ms(zero[part])} | {zero[part] / row['zeroshot_ms']:.0%} | "
                f"{_ms(fused[part])} | {fused[part] / row['semla_forward_ms']:.0%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
