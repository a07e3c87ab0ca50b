"""SemLA's whole per-image loop against zero-shot on the same images, side by side in one run.

Per test image, ``experiments.py --experiment semla`` does:

  embedding   read the original file, CLIP preprocessing, the embedder's forward pass (one image)
  weights     scores against the library's prototypes, top-k, softmax
  text        the class prompts encoded under the image's fused adapters (``--text_features per_image``)
  forward     CAT-Seg's sliding-window forward under ``fused_adapters``
  evaluation  argmax at the label's size, confusion-matrix update

while ``--experiment zeroshot`` does the forward (class-text features cached once per target) and the
evaluation. Both read and map the image the same way (the test mapper), which is timed as ``data``.
The parts are timed with the functions ``experiments.py`` calls (``domain_orchestrator.orchestrator``),
interleaved image by image so that machine noise hits both alike; each figure is the median over the
images after ``--warmup`` untimed ones.

Setting (the paper's pairing): ``vitl_336`` CAT-Seg with a ViT-L/14 224-px Hugging Face CLIP embedder;
``--preset vitb_384`` pairs CAT-Seg ViT-B/16 with a ViT-B/16 224-px embedder. All weights are random (the
cost does not depend on them). A library of 20 random rank-8 adapters on the original's targets, top-5,
T = 0.05; 1080x1920 PNG images (ACDC's size) with 19 Cityscapes classes.

    uv run python bench/semla_overhead.py --preset vitb_384 --images 4
    uv run python bench/semla_overhead.py --preset tiny --images 3        # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cat_seg.config import CATSEG_ROOT, load_config
from cat_seg.data import mapper_from_cfg
from cat_seg.engine.evaluate import label_prediction
from cat_seg.evaluation import SemSegEvaluator
from cat_seg.lora import semla_target_modules
from cat_seg.modeling import build_model
from domain_orchestrator.embedding import load_embedder
from domain_orchestrator.fusion import fused_adapters, fused_text_features
from domain_orchestrator.library import AdapterLibrary
from domain_orchestrator.retrieval import scores, semla_weights
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

from _common import log, report, run_description, sync

#: preset -> (CAT-Seg config, embedder vision config (image, patch, width, layers, heads, projection))
PRESETS = {
    "vitl_336": ("vitl_336.yaml", (224, 14, 1024, 24, 16, 768)),
    "vitb_384": ("vitb_384.yaml", (224, 16, 768, 12, 12, 512)),
    "tiny": ("tiny/tiny.yaml", (32, 8, 32, 2, 2, 16)),
}
PARTS = ("data", "embedding", "weights", "text", "forward", "evaluation")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="vitl_336", help="CAT-Seg + embedder pairing")
    p.add_argument("--images", type=int, default=4, help="timed images (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed images first")
    p.add_argument("--num-adapters", type=int, default=20, help="library size")
    p.add_argument("--top-k", type=int, default=5, help="adapters fused per image")
    p.add_argument("--height", type=int, default=1080, help="image height (ACDC: 1080)")
    p.add_argument("--width", type=int, default=1920, help="image width (ACDC: 1920)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return p


class Clock:
    """Seconds spent in named parts (device-synchronised)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name] = time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def write_images(folder: Path, count: int, height: int, width: int) -> list[Path]:
    """Street-like PNGs (smooth gradients with texture), so that decoding costs what a real PNG costs."""
    rng = np.random.default_rng(0)
    paths = []
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        base = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=-1)
        noise = (
            rng.normal(0, 12, size=(-(-height // 8), -(-width // 8), 3))
            .repeat(8, 0)
            .repeat(8, 1)[:height, :width]
        )
        image = np.clip(base + noise + i * 7, 0, 255).astype(np.uint8)
        path = folder / f"image_{i:03d}.png"
        Image.fromarray(image).save(path)
        label = folder / f"label_{i:03d}.png"
        blocks = rng.integers(0, 19, size=(-(-height // 16), -(-width // 16)), dtype=np.uint8)
        Image.fromarray(blocks.repeat(16, 0).repeat(16, 1)[:height, :width]).save(label)
        paths.append(path)
    return paths


def write_hf_clip(folder: Path, vision: tuple[int, int, int, int, int, int]) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    image, patch, width, layers, heads, projection = vision
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
        },
        vision_config={
            "image_size": image,
            "patch_size": patch,
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
        },
        projection_dim=projection,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image}, crop_size={"height": image, "width": image}
    ).save_pretrained(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    config, vision = PRESETS[args.preset]
    opts = ["TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]"]
    # the preset's own config lists COCO's 171 classes: evaluate the 19 Cityscapes classes, as ACDC does
    vocabulary = [
        "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON",
        "datasets/cs19.json",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "19",
    ]
    cfg = load_config(CATSEG_ROOT / "configs" / config, opts + vocabulary)
    torch.manual_seed(0)
    model = build_model(cfg, device).eval()
    mapper = mapper_from_cfg(
        load_config(CATSEG_ROOT / "configs" / "acdc" / "rain" / "lora-rain-acdc.yaml", opts), is_train=False
    )
    names = [f"domain{i:02d}" for i in range(args.num_adapters)]
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        root = Path(tmp)
        shapes = linear_shapes(model, semla_target_modules(model))
        for i, name in enumerate(names):
            write_random_adapter(root / "loradb" / name, shapes, rank=8, alpha=16, seed=i)
        library = AdapterLibrary.open(root / "loradb", names, model=model, device=device)
        embedder = load_embedder(str(write_hf_clip(root / "clip", vision)), device=device)
        log(f"model {args.preset}, embedder {embedder.identity['name']} ({embedder.dim}-d), {library}")
        rng = np.random.default_rng(0)
        files = write_images(root, args.warmup + args.images, args.height, args.width)
        # Prototypes near real embeddings so that the top-5 weights are not degenerate.
        probe = torch.from_numpy(embedder.embed_files(files[:1], batch_size=1, progress=False)).double()
        prototypes = probe + torch.from_numpy(
            rng.normal(0, float(probe.std()), size=(len(names), embedder.dim))
        )
        sq_norms = (prototypes**2).sum(dim=1)
        evaluator = SemSegEvaluator(19, 255)
        text = model.text_features()  # zero-shot: once per target

        zero: dict[str, list[float]] = {k: [] for k in PARTS}
        semla: dict[str, list[float]] = {k: [] for k in PARTS}
        for i, path in enumerate(files):
            record = {"file_name": str(path), "sem_seg_file_name": str(root / f"label_{i:03d}.png")}
            z, s = Clock(device), Clock(device)
            with z.part("data"):
                x = mapper(record)
            with z.part("forward"):
                out = model([x], text_features=text)
            with z.part("evaluation"):
                pred = label_prediction(out[0]["sem_seg"], x["sem_seg"], resize_to_label=False)
                evaluator.process(pred, x["sem_seg"])
            with s.part("data"):  # the same image, read again, as a separate run would
                x = mapper(record)
            with s.part("embedding"):
                emb = torch.from_numpy(embedder.embed_files([path], batch_size=1, progress=False))
            with s.part("weights"):
                w = semla_weights(
                    scores(emb.double(), prototypes, prototype_sq_norms=sq_norms), args.top_k, 0.05
                )
            with s.part("text"):
                ftext = fused_text_features(model, library, w)
            with s.part("forward"), fused_adapters(model, library, w):
                out = model([x], text_features=ftext)
            with s.part("evaluation"):
                pred = label_prediction(out[0]["sem_seg"], x["sem_seg"], resize_to_label=False)
                evaluator.process(pred, x["sem_seg"])
            log(
                f"image {i}: zero-shot {z.total:.2f} s, semla {s.total:.2f} s"
                + (" (warm-up)" if i < args.warmup else "")
            )
            if i < args.warmup:
                continue
            for part in PARTS:
                zero[part].append(z.seconds.get(part, 0.0))
                semla[part].append(s.seconds.get(part, 0.0))
        results["zeroshot_ms"] = {k: 1000 * statistics.median(v) for k, v in zero.items()}
        results["semla_ms"] = {k: 1000 * statistics.median(v) for k, v in semla.items()}
        totals_zero = [sum(zero[k][j] for k in PARTS) for j in range(args.images)]
        totals_semla = [sum(semla[k][j] for k in PARTS) for j in range(args.images)]
        results["total_ms"] = {
            "zeroshot": 1000 * statistics.median(totals_zero),
            "semla": 1000 * statistics.median(totals_semla),
        }
        results["ratio_per_image"] = [s / z for s, z in zip(totals_semla, totals_zero)]
    results["meta"] = {
        "preset": args.preset,
        "embedder": embedder.identity["name"],
        "image": f"{args.height}x{args.width} PNG, sliding window (4 crops + global view), 19 classes",
        "library": f"{args.num_adapters} adapters, rank 8, top-{args.top_k}, T 0.05",
        "images": args.images,
        "warmup": args.warmup,
        **run_description(argv, device=device),
    }
    return report(results, render, args.output)


def render(r: dict) -> str:
    """A markdown table: per part, zero-shot and semla, and the ratio of the totals."""
    z, s, m = r["zeroshot_ms"], r["semla_ms"], r["meta"]
    zt, st = r["total_ms"]["zeroshot"], r["total_ms"]["semla"]
    lines = [
        f"preset {m['preset']} with embedder {m['embedder']}, {m['image']}, {m['library']}; median of "
        f"{m['images']} images after {m['warmup']} warm-up; torch {m['torch']}, {m['device']}, {m['threads']} threads",
        "",
        "| part | zero-shot | semla | semla - zero-shot, share of zero-shot |",
        "|---|---|---|---|",
    ]
    for part in PARTS:
        lines.append(f"| {part} | {z[part]:.0f} ms | {s[part]:.0f} ms | {(s[part] - z[part]) / zt:+.3f} |")
    lines.append(f"| **per image** | **{zt:.0f} ms** | **{st:.0f} ms** | **ratio {st / zt:.3f}** |")
    ratios = ", ".join(f"{x:.3f}" for x in r["ratio_per_image"])
    lines.append("")
    lines.append(f"per-image ratios: {ratios}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
