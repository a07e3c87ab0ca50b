"""Cost of SemLA's per-image LoRA fusion, measured side by side in one run.

Measures, on a randomly initialised CAT-Seg (default preset ``vitb_384``) in the inference mode SemLA
uses (sliding window: four crops and a global view, pooling [1, 1]) with cached class-text features,
with a library of random rank-8 adapters on the original's kind of targets (CLIP q/k/v/c_fc/c_proj of
both towers and the aggregator's Linear layers):

  (a) zero-shot forward, batch 1
  (b) our fused forward with top-k weights, batch 1 (modes auto / merged / unmerged)
  (c) the original code's path: PEFT add_weighted_adapter("cat") + set_adapter + forward + delete_adapter
  (d) a batch of B images with B different weight vectors vs a zero-shot batch of B (throughput)
  (e) scoring + top-k + weights for library sizes 20, 1,000 and 10,000 (prototypes only)
  (f) the extra cost per image of re-encoding the class texts under the fused adapters (per-image text
      policy), for 19 and 150 classes

Repetitions of (a), (b) and (c) are interleaved so that machine noise hits them alike; each figure is the
median over ``--reps`` repetitions after ``--warmup`` warm-up runs.

    uv run python bench/fusion_overhead.py                 # the recorded configuration
    uv run python bench/fusion_overhead.py --preset tiny   # a quick smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cat_seg.config import CATSEG_ROOT, load_config
from cat_seg.lora import semla_target_modules
from cat_seg.modeling import build_model
from domain_orchestrator.fusion import fused_adapters, fused_text_features
from domain_orchestrator.library import AdapterLibrary
from domain_orchestrator.prototypes import load_prototypes
from domain_orchestrator.retrieval import scores, semla_weights
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

from _common import log, median_ms, report, run_description

CONFIGS = {
    "vitb_384": ("vitb_384.yaml", "datasets/cs19.json", "datasets/ade150.json", 640),
    "vitl_336": ("vitl_336.yaml", "datasets/cs19.json", "datasets/ade150.json", 640),
    "tiny": ("tiny/tiny.yaml", "datasets/cs19.json", "datasets/ade150.json", 48),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(CONFIGS), default="vitb_384", help="model preset")
    p.add_argument("--num-adapters", type=int, default=20, help="library size for (b)-(d)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapters")
    p.add_argument("--top-k", type=int, default=5, help="adapters fused per image")
    p.add_argument(
        "--batch",
        type=int,
        default=8,
        help="batch size of (d)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    p.add_argument("--image-size", type=int, default=None, help="test image side (default: preset canvas)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return p


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def make_model(preset: str, class_json: str, device: str = "cpu"):  # noqa: ANN201
    config, *_ = CONFIGS[preset]
    opts = ["TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]"]
    opts += [
        "MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON",
        class_json,
        "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON",
        class_json,
    ]
    torch.manual_seed(0)
    return build_model(load_config(CATSEG_ROOT / "configs" / config, opts), device).eval()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, cs19, ade150, canvas = CONFIGS[args.preset]
    side = args.image_size or canvas
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = make_model(args.preset, cs19, device)
    targets = semla_target_modules(model)
    shapes = linear_shapes(model, targets)
    names = [f"domain{i:02d}" for i in range(args.num_adapters)]
    rng = np.random.default_rng(0)
    results: dict[str, object] = {}

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        root = Path(tmp)
        for i, name in enumerate(names):
            write_random_adapter(
                root / name,
                shapes,
                rank=args.rank,
                alpha=2 * args.rank,
                seed=i,
                embedding=rng.normal(size=768),
            )
        library = AdapterLibrary.open(root, names, model=model, device=device)
        log(f"library: {library}")
        g = torch.Generator().manual_seed(0)
        images = [
            torch.randint(0, 256, (3, side, side), generator=g, dtype=torch.uint8) for _ in range(args.batch)
        ]
        one = [{"image": images[0], "height": side, "width": side}]
        batch = [{"image": im, "height": side, "width": side} for im in images]
        text = model.text_features()  # cached once, as the original code does
        embeddings = torch.from_numpy(rng.normal(size=(args.batch, 768))).to(device)
        prototypes = torch.from_numpy(load_prototypes(root, names).vectors).to(device)
        weights = semla_weights(scores(embeddings, prototypes), args.top_k, 0.05)  # (B, N)

        def zero_shot() -> None:
            model(one, text_features=text)

        def fused(mode: str) -> Callable[[], None]:
            def run() -> None:
                with fused_adapters(model, library, weights[:1], mode=mode):
                    model(one, text_features=text)

            return run

        # (c) the original path on a PEFT copy of the same model holding the same adapters.
        from peft import PeftModel

        peft_base = make_model(args.preset, cs19, device)
        peft_model = PeftModel.from_pretrained(peft_base, root / names[0], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(root / name, adapter_name=name)
        top = [i for i in range(len(names)) if weights[0, i] > 0]

        def reference() -> None:
            merged = "merged_" + "_".join(names[i] for i in top)
            peft_model.add_weighted_adapter(
                [names[i] for i in top], [float(weights[0, i]) for i in top], merged, combination_type="cat"
            )
            peft_model.set_adapter(merged)
            peft_base(one, text_features=text)
            peft_model.delete_adapter(merged)

        runs = {
            "zero_shot": zero_shot,
            "fused_auto": fused("auto"),
            "fused_merged": fused("merged"),
            "fused_unmerged": fused("unmerged"),
            "peft_reference": reference,
        }
        samples: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.warmup + args.reps):
            for key, fn in runs.items():
                t = timed(fn)
                log(f"batch 1, rep {rep}, {key}: {t:.2f} s")
                if rep >= args.warmup:
                    samples[key].append(t)
        single = {k: median_ms(v) for k, v in samples.items()}
        results["batch1_ms"] = single

        # (d) batch of B images, B different weight vectors, vs a zero-shot batch of B.
        distinct = int(torch.unique(weights, dim=0).shape[0])

        def batch_zero() -> None:
            model(batch, text_features=text)

        def batch_fused(mode: str) -> Callable[[], None]:
            def run() -> None:
                with fused_adapters(model, library, weights, mode=mode):
                    model(batch, text_features=text)

            return run

        bruns = {"zero_shot": batch_zero, "fused_auto": batch_fused("auto")}
        bsamples: dict[str, list[float]] = {k: [] for k in bruns}
        for rep in range(args.warmup + args.reps):
            for key, fn in bruns.items():
                t = timed(fn)
                log(f"batch {args.batch}, rep {rep}, {key}: {t:.2f} s")
                if rep >= args.warmup:
                    bsamples[key].append(t)
        results["batch_ms"] = {k: median_ms(v) for k, v in bsamples.items()}
        results["batch_distinct_weight_vectors"] = distinct

        # (f) per-image text policy: re-encode the class prompts under each image's adapters.
        text_cost = {}
        for label, class_json in (("19 classes", cs19), ("150 classes", ade150)):
            vocab_model = make_model(args.preset, class_json, device)
            fn = lambda m=vocab_model: fused_text_features(m, library, weights[:1])  # noqa: E731
            for _ in range(args.warmup):
                fn()
            text_cost[label] = median_ms([timed(fn) for _ in range(args.reps)])
            log(f"text under fusion, {label}: {text_cost[label]:.1f} ms")
        results["text_per_image_ms"] = text_cost

    # (e) scoring + top-k + weights, prototypes only.
    scoring = {}
    query = torch.from_numpy(rng.normal(size=(1, 768)))
    for n in (20, 1_000, 10_000):
        protos = torch.from_numpy(rng.normal(size=(n, 768)))
        sq_norms = (protos**2).sum(dim=1)  # cached once by the library, like the stacked adapters
        fn = lambda p=protos, n2=sq_norms: semla_weights(scores(query, p, prototype_sq_norms=n2), 5, 0.05)  # noqa: E731
        for _ in range(5):
            fn()
        scoring[n] = median_ms([timed(fn) for _ in range(50)])
    results["scoring_ms"] = scoring

    results["meta"] = {
        "preset": args.preset,
        "image": f"{side}x{side} uint8, sliding window (4 crops + global view)",
        "library": f"{args.num_adapters} adapters, rank {args.rank}, {len(targets)} target layers",
        "top_k": args.top_k,
        "batch": args.batch,
        "reps": args.reps,
        "warmup": args.warmup,
        **run_description(argv, device=device, cpu_count=True),
    }
    return report(results, render, args.output)


def render(r: dict) -> str:
    """A markdown table of the results."""
    s, b, m = r["batch1_ms"], r["batch_ms"], r["meta"]
    z = s["zero_shot"]
    lines = [
        f"preset {m['preset']}, {m['image']}, {m['library']}, top-{m['top_k']}; "
        f"median of {m['reps']} after {m['warmup']} warm-up; torch {m['torch']}, {m['threads']} threads",
        "",
        "| measurement | time | ratio to zero-shot |",
        "|---|---|---|",
        f"| (a) zero-shot forward, batch 1 | {z:.0f} ms | 1.000 |",
    ]
    for mode in ("auto", "merged", "unmerged"):
        lines.append(
            f"| (b) fused forward, {mode}, batch 1 | {s['fused_' + mode]:.0f} ms | {s['fused_' + mode] / z:.3f} |"
        )
    lines.append(
        f"| (c) PEFT add_weighted_adapter + set + forward + delete | {s['peft_reference']:.0f} ms | "
        f"{s['peft_reference'] / z:.3f} |"
    )
    bz = b["zero_shot"]
    for mode in ("auto",):
        lines.append(
            f"| (d) batch of {m['batch']}, {r['batch_distinct_weight_vectors']} different weight vectors, "
            f"{mode} | {b['fused_' + mode]:.0f} ms (zero-shot batch {bz:.0f} ms) | throughput "
            f"{bz / b['fused_' + mode]:.3f}x zero-shot |"
        )
    for n, t in r["scoring_ms"].items():
        lines.append(f"| (e) scores + top-5 + weights, library of {int(n):,} | {t:.3f} ms | |")
    for label, t in r["text_per_image_ms"].items():
        lines.append(f"| (f) per-image text features under fusion, {label} | {t:.0f} ms | +{t / z:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
