"""Per-image cost of every PEFT combination type in our fusion, side by side with PEFT, in one run.

With a library of random rank-8 adapters (default 20) and each image's top-5 SemLA weights, for each of
PEFT's ``add_weighted_adapter`` combination types (``cat``, ``linear``, ``svd``, ``ties``, ``ties_svd``,
``dare_linear``, ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune``,
``magnitude_prune_svd``; density 0.5 where a type prunes, svd_rank 8 for the SVD types):

  (1) the merge, on the real target layers of ``--preset`` (default ``vitl_336``: its 214 SemLA target
      layers; shapes from a model built on the meta device): ours, ``merged_library(library, weights, spec)``
      for one image and for a batch of ``--batch`` images (time / batch; not timed for a type whose
      one-image merge takes longer than ``--batch-limit-s``: its SVDs run per image, so a batch costs
      about batch x one image on the CPU), against PEFT's
      ``add_weighted_adapter`` + ``set_adapter`` + ``delete_adapter`` on a PEFT-wrapped model of the same
      module tree holding the same adapters (its base weights allocated but never read: the merge does
      not touch them). Repetitions of the three are interleaved.
  (2) SemLA's whole per-image loop on a model that can run on this machine (``--loop-preset``, default
      ``vitb_384``, random weights, whole-image inference: sliding window off, ``--image-size`` default the
      preset's CLIP resolution, 19 Cityscapes classes): zero-shot forward with class-text features cached
      once, against, per type, merge (``merged_library``) + class-text features under the merged adapter
      (``fused_text_features``) + fused forward (``fused_adapters`` with the identity weights), i.e.
      ``step.segment`` on the merged library, plus SemLA's default path without a merge step
      (``segment`` on the library itself, which is ``cat``). Every repetition runs zero-shot and every
      type in turn, so that machine noise hits them alike.

Each figure is the median over ``--reps`` repetitions after ``--warmup`` untimed ones; a warm-up run that
takes longer than ``--long-call-s`` counts as the first repetition (its one-time costs are negligible next to
it: PEFT's SVD merges, our pruned SVD merges on large layers), so that such calls are not run for nothing.
With ``--warmup`` the loop (2) first runs one zero-shot and one fused forward untimed, so that the model
is warm even where the rule keeps a first run.

    uv run python bench/merging_speed.py                                              # the full run
    uv run python bench/merging_speed.py --preset tiny --loop-preset tiny --reps 1    # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import random
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
from domain_orchestrator.merging import (
    COMBINATION_TYPES,
    FACTOR_TYPES,
    SVD_TYPES,
    CombinationSpec,
    merged_library,
)
from domain_orchestrator.prototypes import load_prototypes
from domain_orchestrator.retrieval import scores, semla_weights
from domain_orchestrator.step import segment
from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

from _common import log, median_ms, report, run_description, sync

# preset -> (config, image side of the loop: the preset's CLIP resolution)
CONFIGS = {
    "vitb_384": ("vitb_384.yaml", 384),
    "vitl_336": ("vitl_336.yaml", 336),
    "tiny": ("tiny/tiny.yaml", 32),
}
CLASSES = "datasets/cs19.json"
PRUNING_TYPES = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude")))
TEMPERATURE = 0.05
EMBEDDING_DIM = 768


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", choices=sorted(CONFIGS), default="vitl_336", help="layer shapes of the merge (1)"
    )
    p.add_argument(
        "--loop-preset", choices=sorted(CONFIGS), default="vitb_384", help="model of the per-image loop (2)"
    )
    p.add_argument("--num-adapters", type=int, default=20, help="library size")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the random adapters")
    p.add_argument("--top-k", type=int, default=5, help="adapters merged per image")
    p.add_argument("--density", type=float, default=0.5, help="density of the pruning types")
    p.add_argument("--svd-rank", type=int, default=8, help="svd_rank of the SVD types")
    p.add_argument("--batch", type=int, default=8, help="images merged at once in (1)'s batched figure")
    p.add_argument(
        "--types", nargs="+", choices=COMBINATION_TYPES, default=list(COMBINATION_TYPES), help="types to run"
    )
    p.add_argument(
        "--batch-limit-s",
        type=float,
        default=5.0,
        help="(1): do not time the batched merge of a type whose one-image merge took longer (0: always time it)",
    )
    p.add_argument("--skip-peft", action="store_true", help="do not time PEFT in (1)")
    p.add_argument("--skip-loop", action="store_true", help="do not run (2)")
    p.add_argument("--image-size", type=int, default=None, help="(2)'s image side (default: CLIP resolution)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    p.add_argument(
        "--long-call-s",
        type=float,
        default=10.0,
        help="a warm-up run longer than this (seconds) counts as a timed repetition",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only print the tables of a run saved by --output",
    )
    return p


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class Samples:
    """The timed repetitions of one measurement (with what else a repetition reports)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.reps, self.warmup, self.long_s = args.reps, args.warmup, args.long_call_s
        self.seconds: list[float] = []
        self.parts: dict[str, list[float]] = {}

    @property
    def wanted(self) -> bool:
        return len(self.seconds) < self.reps

    def add(self, rep: int, seconds: float, parts: dict[str, float] | None = None) -> None:
        """Keep a run from repetition ``rep`` unless it is a warm-up shorter than ``--long-call-s``."""
        if rep < self.warmup and seconds < self.long_s:
            return
        self.seconds.append(seconds)
        for key, value in (parts or {}).items():
            self.parts.setdefault(key, []).append(value)

    def median_ms(self) -> float:
        return median_ms(self.seconds)

    def parts_ms(self) -> dict[str, float]:
        return {key: median_ms(v) for key, v in self.parts.items()}


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def spec_for(kind: str, args: argparse.Namespace) -> CombinationSpec:
    """Our spec of a type: density where it prunes, svd_rank where it decomposes, PEFT's defaults otherwise."""
    return CombinationSpec(
        kind,
        svd_rank=args.svd_rank if kind in SVD_TYPES else None,
        density=args.density if kind in PRUNING_TYPES else None,
    )


def peft_kwargs(spec: CombinationSpec) -> dict[str, object]:
    """The same arguments for PEFT's ``add_weighted_adapter``."""
    kwargs: dict[str, object] = {"combination_type": spec.combination_type}
    if spec.svd_rank is not None:
        kwargs["svd_rank"] = spec.svd_rank
    if spec.density is not None:
        kwargs["density"] = spec.density
    return kwargs


def family(kind: str) -> str:
    if kind == "cat":
        return "cat"
    return "SVD" if kind in SVD_TYPES else "factors" if kind in FACTOR_TYPES else "?"


def model_config(preset: str, opts: Sequence[str] = ()):  # noqa: ANN201
    config, _ = CONFIGS[preset]
    return load_config(CATSEG_ROOT / "configs" / config, list(opts))


def write_library(root: Path, shapes: dict, args: argparse.Namespace) -> list[str]:
    """``--num-adapters`` random adapters (alpha 2 x rank) with random prototypes; their names."""
    names = [f"domain{i:02d}" for i in range(args.num_adapters)]
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        write_random_adapter(
            root / name,
            shapes,
            rank=args.rank,
            alpha=2 * args.rank,
            seed=i,
            embedding=rng.normal(size=EMBEDDING_DIM),
        )
    return names


def top_k_weights(root: Path, names: list[str], batch: int, top_k: int, device: str) -> torch.Tensor:
    """(batch, N) SemLA weights of random image embeddings: top-k softmax(score / 0.05), float64."""
    rng = np.random.default_rng(1)
    embeddings = torch.from_numpy(rng.normal(size=(batch, EMBEDDING_DIM)))
    prototypes = torch.from_numpy(load_prototypes(root, names).vectors)
    return semla_weights(scores(embeddings, prototypes), top_k, TEMPERATURE).to(device)


# -- (1) the merge on the real layer shapes -----------------------------------------------------------


def merge_costs(args: argparse.Namespace, device: str) -> dict[str, object]:
    meta_model = build_model(model_config(args.preset), "meta", class_names=False)
    targets = semla_target_modules(meta_model)
    shapes = linear_shapes(meta_model, targets)
    result: dict[str, object] = {
        "preset": args.preset,
        "layers": len(targets),
        "params_per_adapter": sum(args.rank * (i + o) for i, o in shapes.values()),
    }
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        root = Path(tmp)
        names = write_library(root, shapes, args)
        library = AdapterLibrary.open(root, names, model=meta_model, device=device)
        log(f"(1) {library} on {args.preset}'s shapes")
        weights = top_k_weights(root, names, args.batch, args.top_k, device)
        row = weights[:1]
        top = [i for i in range(len(names)) if row[0, i] != 0]
        result["active_per_image"] = [int((w != 0).sum()) for w in weights]

        peft_model = None
        if not args.skip_peft:
            from peft import PeftModel

            # The same module tree with real (uninitialised) storage: PEFT's merge reads only the adapters.
            base = build_model(model_config(args.preset), "meta", class_names=False).to_empty(device=device)
            start = time.perf_counter()
            peft_model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
            for name in names[1:]:
                peft_model.load_adapter(root / name, adapter_name=name)
            peft_model.eval()
            result["peft_load_s"] = time.perf_counter() - start
            log(f"(1) PEFT: {len(names)} adapters loaded in {result['peft_load_s']:.1f} s")

        adapters = [names[i] for i in top]
        values = [float(row[0, i]) for i in top]
        per_type = {}
        for kind in args.types:
            spec = spec_for(kind, args)

            def peft_call(s: CombinationSpec = spec) -> dict[str, float]:
                split = {
                    "add_weighted_adapter": timed(
                        lambda: peft_model.add_weighted_adapter(adapters, values, "merged", **peft_kwargs(s)),
                        device,
                    ),
                    "set_adapter": timed(lambda: peft_model.set_adapter("merged"), device),
                    "delete_adapter": timed(lambda: peft_model.delete_adapter("merged"), device),
                }
                peft_model.set_adapter(names[0])  # untimed: back to a loaded adapter, as before the call
                return split

            runs: dict[str, Callable[[], dict[str, float]]] = {
                "ours_1": lambda s=spec: {"": timed(lambda: merged_library(library, row, s), device)},
            }
            if args.batch > 1:
                runs["ours_batch"] = lambda s=spec: {
                    "": timed(lambda: merged_library(library, weights, s), device)
                }
            if peft_model is not None:
                runs["peft"] = peft_call
            samples = {key: Samples(args) for key in runs}
            ours_1_seen: list[float] = []  # every run of ours_1, warm-ups included
            for rep in range(args.warmup + args.reps):
                now = {}
                for key, fn in runs.items():  # interleaved, repetition by repetition
                    if key == "ours_batch" and 0 < args.batch_limit_s < max(ours_1_seen, default=0):
                        continue  # one image is already slow: a batch costs batch x that (per-image SVDs)
                    if samples[key].wanted:
                        parts = fn()
                        now[key] = sum(parts.values())
                        samples[key].add(rep, now[key], {k: v for k, v in parts.items() if k})
                        if key == "ours_1":
                            ours_1_seen.append(now[key])
                if now:
                    log(
                        f"(1) {kind}, rep {rep}: "
                        + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in now.items())
                    )
            figures: dict[str, object] = {"ours_1": samples["ours_1"].median_ms()}
            batch = samples.get("ours_batch")
            figures["ours_batch"] = batch.median_ms() / args.batch if batch and batch.seconds else None
            if peft_model is not None:
                figures["peft"] = samples["peft"].median_ms()
                figures["peft_parts"] = samples["peft"].parts_ms()
            figures["reps"] = {key: len(v.seconds) for key, v in samples.items()}
            per_type[kind] = figures
        result["types"] = per_type
    return result


# -- (2) SemLA's per-image loop -----------------------------------------------------------------------


def loop_costs(args: argparse.Namespace, device: str) -> dict[str, object]:
    _, clip_side = CONFIGS[args.loop_preset]
    side = args.image_size or clip_side
    opts = [
        "TEST.SLIDING_WINDOW",
        "False",
        "MODEL.SEM_SEG_HEAD.POOLING_SIZES",
        "[1,1]",
        "MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON",
        CLASSES,
        "MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON",
        CLASSES,
    ]
    seed_everything(0)
    model = build_model(model_config(args.loop_preset, opts), device).eval()
    targets = semla_target_modules(model)
    shapes = linear_shapes(model, targets)
    result: dict[str, object] = {
        "preset": args.loop_preset,
        "image": f"{side}x{side} uint8, whole image (sliding window off), {CLASSES}",
        "layers": len(targets),
    }
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        root = Path(tmp)
        names = write_library(root, shapes, args)
        library = AdapterLibrary.open(root, names, model=model, device=device)
        log(f"(2) {library} on {args.loop_preset}")
        weights = top_k_weights(root, names, 1, args.top_k, device)
        eye = torch.eye(1, dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        image = torch.randint(0, 256, (3, side, side), generator=g, dtype=torch.uint8)
        one = [{"image": image, "height": side, "width": side}]
        text = model.text_features()  # cached once, as the original code does

        def zero_shot() -> dict[str, float]:
            return {"forward": timed(lambda: model(one, text_features=text), device)}

        def no_merge() -> dict[str, float]:  # SemLA's default: segment() on the library itself
            return {"total": timed(lambda: segment(model, library, one, weights), device)}

        def merged_loop(spec: CombinationSpec) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:  # segment(model, merged, one, eye), part by part
                box: dict[str, object] = {}
                out = {"merge": timed(lambda: box.update(m=merged_library(library, weights, spec)), device)}
                merged = box["m"]
                out["text"] = timed(lambda: box.update(t=fused_text_features(model, merged, eye)), device)

                def forward() -> None:
                    with fused_adapters(model, merged, eye):
                        model(one, text_features=box["t"])

                out["forward"] = timed(forward, device)
                return out

            return run

        runs: dict[str, Callable[[], dict[str, float]]] = {"zero_shot": zero_shot, "library": no_merge}
        runs.update({kind: merged_loop(spec_for(kind, args)) for kind in args.types})
        samples = {key: Samples(args) for key in runs}
        if args.warmup:  # warm the model up (its first forwards), whatever the long-call rule keeps below
            zero_shot()
            no_merge()
        for rep in range(args.warmup + args.reps):
            seed_everything(rep)
            for key, fn in runs.items():
                if not samples[key].wanted:
                    continue
                parts = fn()
                total = parts.setdefault("total", sum(parts.values()))
                samples[key].add(rep, total, parts)
                log(f"(2) rep {rep}, {key}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in parts.items()))
        figures = {key: {**s.parts_ms(), "reps": len(s.seconds)} for key, s in samples.items()}
        zero = figures["zero_shot"]["total"]
        for parts in figures.values():
            parts["ratio"] = parts["total"] / zero
        result["runs"] = figures
    return result


# -- report -------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        import json

        print(render(json.loads(args.render.read_text(encoding="utf-8"))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    seed_everything(0)
    results: dict[str, object] = {}
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    results["merge"] = merge_costs(args, device)
    log(f"(1) done after {time.perf_counter() - started:.0f} s")
    if not args.skip_loop:
        results["loop"] = loop_costs(args, device)
        log(f"(2) done after {time.perf_counter() - started:.0f} s")
    results["meta"] = {
        "library": f"{args.num_adapters} random adapters, rank {args.rank} (alpha {2 * args.rank})",
        "top_k": args.top_k,
        "density": args.density,
        "svd_rank": args.svd_rank,
        "batch": args.batch,
        "batch_limit_s": args.batch_limit_s,
        "peft": None if args.skip_peft else _peft_version(),
        "reps": args.reps,
        "warmup": args.warmup,
        "long_call_s": args.long_call_s,
        "wall_s": round(time.perf_counter() - started, 1),
        # CPU time of this process / (wall time x threads): well below 1 when other processes took the cores
        "cpu_share": round(
            (time.process_time() - cpu_started) / ((time.perf_counter() - started) * torch.get_num_threads()),
            2,
        ),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **run_description(argv, device=device, cpu_count=True),
    }
    return report(results, render, args.output)


def _peft_version() -> str:
    import peft

    return peft.__version__


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f} ms".replace(",", " ")
    return f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"


def render(r: dict) -> str:
    """Markdown tables of the results."""
    m, merge = r["meta"], r["merge"]
    peft = m["peft"] is not None
    lines = [
        f"{m['library']}, top-{m['top_k']} per image, density {m['density']}, svd_rank {m['svd_rank']}; "
        f"median of {m['reps']} after {m['warmup']} warm-up (a warm-up run over {m['long_call_s']:g} s counts "
        f"as a repetition); torch {m['torch']}"
        + (f", peft {m['peft']}" if peft else "")
        + f", {m['device']}, {m['threads']} threads; whole run {m['wall_s']:.0f} s, cpu share {m['cpu_share']}, "
        f"1-min load average {m['load_average_1min'][0]} at the start, {m['load_average_1min'][1]} at the end",
        "",
        f"(1) merge per image on {merge['preset']}'s {merge['layers']} target layers"
        + (" (ours vs PEFT add_weighted_adapter + set_adapter + delete_adapter)" if peft else ""),
        "",
    ]
    batched = m["batch"] > 1
    header = ["type", "family", "ours, 1 image"]
    header += [f"ours, batch of {m['batch']} / {m['batch']}"] if batched else []
    if peft:
        header += ["PEFT per call (add / set / delete)", "PEFT / ours (1 image)"]
        header += [f"PEFT / ours (batch {m['batch']})"] if batched else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, f in merge["types"].items():
        cells = [f"`{kind}`", family(kind), _ms(f["ours_1"])]
        skipped = f["ours_batch"] is None
        cells += ["not timed (1 image > limit)" if skipped else _ms(f["ours_batch"])] if batched else []
        if peft:
            p = f["peft_parts"]
            cells += [
                f"{_ms(f['peft'])} ({_ms(p['add_weighted_adapter'])} / {_ms(p['set_adapter'])} / "
                f"{_ms(p['delete_adapter'])})",
                f"{f['peft'] / f['ours_1']:.1f}x",
            ]
            cells += ["" if skipped else f"{f['peft'] / f['ours_batch']:.1f}x"] if batched else []
        lines.append("| " + " | ".join(cells) + " |")
    if "loop" in r:
        loop = r["loop"]
        lines += [
            "",
            f"(2) SemLA's per-image loop on {loop['preset']} ({loop['layers']} target layers), {loop['image']}",
            "",
            "| per image | merge | class text | forward | total | ratio to zero-shot |",
            "|---|---|---|---|---|---|",
        ]
        labels = {
            "zero_shot": "zero-shot (text cached once)",
            "library": "`cat` as `experiments.py` and `demo.py` run it (no merge step): `segment(model, library, ...)`",
            "cat": "`cat` through `merged_library` (not what the tools run): merge + text + fused forward",
        }
        for key, f in loop["runs"].items():
            label = labels.get(key, f"`{key}`: merge + text + fused forward")
            cell = lambda part, f=f: _ms(f[part]) if part in f else ""  # noqa: E731
            lines.append(
                f"| {label} | {cell('merge')} | {cell('text')} | {cell('forward')} | {_ms(f['total'])} | "
                f"{f['ratio']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
