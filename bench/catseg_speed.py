"""CAT-Seg's forward, part by part: the padded (original) computation vs the current one, in one run.

On a randomly initialised CAT-Seg (default preset ``vitb_384``) in the inference mode SemLA uses (sliding
window: four crops and a global view, pooling [1, 1]) with cached class-text features, for each
vocabulary size and batch size, times

  padded   the original computation (``cat_seg.modeling._padded``: class axis padded to ``pad_len``
           with materialised copies, guidance repeated per class, copying window partition)
  current  the model as it is

and reports the time per part (CLIP image tower, aggregator spatial blocks, class attention, decoder,
the rest of the aggregator, pre- and post-processing) and the peak memory of the forward. Repetitions of
the two computations are interleaved so that machine noise hits them alike; times are medians over
``--reps`` after ``--warmup`` warm-up runs.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set
(``VmHWM``, reset before every forward through ``/proc/self/clear_refs`` after returning freed heap to the
system), reported as the peak of the whole process (model included) and as the forward's own share
(peak minus the resident set before the forward). A computation whose peak, extrapolated from the batch
it has already run, would exceed ``--max-memory-gb`` (or the memory the machine has available) is run at
the largest batch that fits instead, and the table says so.

    uv run python bench/catseg_speed.py --classes 19             # one vocabulary per run on a 2-core CPU
    uv run python bench/catseg_speed.py --preset tiny --reps 1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from cat_seg.config import CATSEG_ROOT, load_config, resolve_catseg_path
from cat_seg.modeling import build_model
from cat_seg.modeling._padded import padded_computation
from cat_seg.modeling.aggregator import Aggregator, ClassTransformerLayer
from cat_seg.modeling.text import load_class_names

from _common import log, report, run_description

CONFIGS = {
    "vitb_384": ("vitb_384.yaml", 640),
    "vitl_336": ("vitl_336.yaml", 640),
    "tiny": ("tiny/tiny.yaml", 48),
}
VOCABULARIES = {19: "datasets/cs19.json", 150: "datasets/ade150.json", 59: "datasets/pc59.json"}
PARTS = ("tower", "swin", "class_attention", "decoder", "aggregator_rest", "network_rest", "pre", "post")
PART_LABELS = {
    "tower": "CLIP image tower",
    "swin": "spatial blocks",
    "class_attention": "class attention",
    "decoder": "decoder",
    "aggregator_rest": "rest of aggregator",
    "network_rest": "guidance upsampling",
    "pre": "pre-processing",
    "post": "post-processing",
}
GB = 1e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(CONFIGS), default="vitb_384", help="model preset")
    p.add_argument(
        "--classes", type=int, nargs="+", default=[19, 150], choices=sorted(VOCABULARIES), help="vocabularies"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (images)")
    p.add_argument(
        "--computations",
        nargs="+",
        default=["padded", "current"],
        choices=["padded", "current"],
        help="which computations to run",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs")
    p.add_argument("--image-size", type=int, default=None, help="test image side (default: preset canvas)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--max-memory-gb",
        type=float,
        default=16.0,
        help="run a computation at a smaller batch when its extrapolated peak exceeds this",
    )
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return p


# -- memory ------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def available_memory() -> float:
    """Bytes the machine can still give (``MemAvailable``), inf where unknown."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return math.inf
    return int(match.group(1)) * 1024 if match else math.inf


class PeakMemory:
    """Peak memory of one forward: CUDA allocator statistics, or the CPU process's peak resident set."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.can_reset = self.cuda
        self.libc = None
        if not self.cuda:
            with contextlib.suppress(OSError):
                self.libc = ctypes.CDLL("libc.so.6")
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.can_reset = _status_kb("VmHWM") is not None
            except OSError:
                self.can_reset = False
        self.before = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)  # give freed heap back, so that the resident set is the live set
        if self.can_reset:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.before = (_status_kb("VmRSS") or 0) * 1024

    def stop(self) -> tuple[float, float]:
        """(peak of the process or allocator, peak minus what was resident before), in bytes."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        return float(peak), float(peak - self.before)


# -- timing ------------------------------------------------------------------------------------------


class PartTimer:
    """Wall time spent in parts of CAT-Seg's forward, from module hooks and wrapped methods."""

    def __init__(self, model: nn.Module, device: str) -> None:
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.totals: dict[str, float] = {}
        self.handles = []
        self.starts: dict[int, float] = {}
        aggregators = [m for m in model.modules() if isinstance(m, Aggregator)]
        for agg in aggregators:
            self._hook(agg, "aggregator")
            for layer in agg.layers:
                self._hook(layer.swin_block, "swin")
                self._hook(layer.attention, "class_attention")
            for module in (agg.decoder1, agg.decoder2, agg.head):
                self._hook(module, "decoder")
        self._wrap(model.clip_model.visual, "forward_intermediates", "tower")
        self._wrap(model, "_predict_logits", "network")

    def _hook(self, module: nn.Module, part: str) -> None:
        def pre(mod: nn.Module, args: object) -> None:
            self.sync()
            self.starts[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, args: object, out: object) -> None:
            self.sync()
            self.totals[part] = self.totals.get(part, 0.0) + time.perf_counter() - self.starts.pop(id(mod))

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def _wrap(self, owner: object, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def wrapped(*args: object, **kwargs: object) -> object:
            self.sync()
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.sync()
            end = time.perf_counter()
            self.totals[part] = self.totals.get(part, 0.0) + end - start
            if part == "network":
                self.marks.append((start, end))
            return out

        setattr(owner, name, wrapped)
        self.handles.append(_Unwrap(owner, name))

    def run(self, fn: Callable[[], object]) -> dict[str, float]:
        """Run ``fn`` once; seconds per part (see :data:`PARTS`) plus ``total`` and ``aggregator``."""
        self.totals = {}
        self.marks: list[tuple[float, float]] = []
        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        end, cpu = time.perf_counter(), time.process_time() - cpu
        t = self.totals
        first, last = self.marks[0][0], self.marks[-1][1]
        agg = t.get("aggregator", 0.0)
        return {
            "total": end - start,
            "aggregator": agg,
            "tower": t.get("tower", 0.0),
            "swin": t.get("swin", 0.0),
            "class_attention": t.get("class_attention", 0.0),
            "decoder": t.get("decoder", 0.0),
            "aggregator_rest": agg
            - t.get("swin", 0.0)
            - t.get("class_attention", 0.0)
            - t.get("decoder", 0.0),
            "network_rest": t.get("network", 0.0) - t.get("tower", 0.0) - agg,
            "pre": first - start,
            "post": end - last,
            # CPU seconds of this process per wall second and thread: well below 1 when other
            # processes took the cores (on CUDA, the host thread mostly waits: not meaningful).
            "cpu_share": cpu / ((end - start) * torch.get_num_threads()),
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Unwrap:
    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        vars(self.owner).pop(self.name, None)


# -- the benchmark -----------------------------------------------------------------------------------


def make_model(preset: str, device: str) -> nn.Module:
    config, _ = CONFIGS[preset]
    opts = ["TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]"]
    torch.manual_seed(0)
    model = build_model(load_config(CATSEG_ROOT / "configs" / config, opts), device).eval()
    with torch.no_grad():  # a non-zero learnt padding, as a trained model has
        for m in model.modules():
            if isinstance(m, ClassTransformerLayer) and m.padding_tokens is not None:
                m.padding_tokens.normal_(generator=torch.Generator().manual_seed(1))
                if m.padding_guidance is not None:
                    m.padding_guidance.normal_(generator=torch.Generator().manual_seed(2))
    return model


def computation(model: nn.Module, name: str) -> contextlib.AbstractContextManager:
    return padded_computation(model) if name == "padded" else contextlib.nullcontext()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    _, canvas = CONFIGS[args.preset]
    side = args.image_size or canvas
    model = make_model(args.preset, device)
    timer = PartTimer(model, device)
    memory = PeakMemory(device)
    if not memory.can_reset:
        log("cannot reset the peak resident set on this system: peaks are cumulative")
    budget = min(args.max_memory_gb * GB, available_memory() * 0.9 if not memory.cuda else math.inf)
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, side, side), generator=g, dtype=torch.uint8) for _ in range(max(args.batch))
    ]
    rows = []
    # The forward's own peak per image of each (vocabulary, computation), from the smallest batch run.
    per_image_peak: dict[tuple[int, str], float] = {}
    # The first image's probabilities of each computation, to check that they agree.
    first_output: dict[str, torch.Tensor] = {}

    def forward_once(name: str, run_batch: int, text: torch.Tensor) -> tuple[dict[str, float], tuple]:
        inputs = [{"image": im, "height": side, "width": side} for im in images[:run_batch]]
        outputs = []

        def forward() -> None:
            with torch.inference_mode():
                outputs.append(model(inputs, text_features=text)[0]["sem_seg"])

        memory.start()
        with computation(model, name):
            parts = timer.run(forward)
        peak = memory.stop()
        first_output[name] = outputs[0]
        return parts, peak

    def largest_batch(classes: int, name: str, batch: int, text: torch.Tensor) -> int:
        """``batch``, or the largest smaller one whose extrapolated peak fits the budget."""
        if batch > 1 and (classes, name) not in per_image_peak:
            _, peak = forward_once(name, 1, text)  # an untimed probe of the memory one image needs
            per_image_peak[(classes, name)] = peak[1]
            log(f"{classes} classes, {name}: one image needs {peak[1] / GB:.2f} GB (probe)")
        known = per_image_peak.get((classes, name))
        resident = (_status_kb("VmRSS") or 0) * 1024 if not memory.cuda else torch.cuda.memory_allocated()
        while known is not None and batch > 1 and resident + batch * known > budget:
            batch -= 1
        return batch

    for classes in args.classes:
        model.set_class_names(test=load_class_names(resolve_catseg_path(VOCABULARIES[classes])))
        with torch.inference_mode():
            text = model.text_features()  # cached once, as the original code does
        for batch in sorted(args.batch):
            plan = {name: largest_batch(classes, name, batch, text) for name in args.computations}
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in plan}
            peaks: dict[str, tuple[float, float]] = {}
            difference = None
            for rep in range(args.warmup + args.reps):
                for name, run_batch in plan.items():
                    parts, peak = forward_once(name, run_batch, text)
                    peaks[name] = max(peaks.get(name, (0.0, 0.0)), peak)
                    log(
                        f"{classes} classes, batch {run_batch}, {name}, rep {rep}: {parts['total']:.2f} s, "
                        f"peak {peak[0] / GB:.2f} GB (forward {peak[1] / GB:.2f} GB), "
                        f"cpu share {parts['cpu_share']:.2f}"
                    )
                    if rep >= args.warmup:
                        samples[name].append(parts)
                if difference is None and {"padded", "current"} <= first_output.keys():
                    difference = float((first_output["padded"] - first_output["current"]).abs().max())
                first_output.clear()
            for name, run_batch in plan.items():
                per_image_peak.setdefault((classes, name), peaks[name][1] / run_batch)
                median = {k: statistics.median(s[k] for s in samples[name]) for k in samples[name][0]}
                rows.append(
                    {
                        "classes": classes,
                        "batch": batch,
                        "run_batch": run_batch,
                        "computation": name,
                        "seconds": median,
                        "min_total_seconds": min(x["total"] for x in samples[name]),
                        "all_total_seconds": [x["total"] for x in samples[name]],
                        "peak_bytes": peaks[name][0],
                        "forward_peak_bytes": peaks[name][1],
                        "max_probability_difference": difference if name == "current" else None,
                    }
                )
    timer.remove()
    results = {
        "rows": rows,
        "meta": {
            "preset": args.preset,
            "image": f"{side}x{side} uint8, sliding window (4 crops + global view), pooling [1, 1]",
            "reps": args.reps,
            "warmup": args.warmup,
            "max_memory_gb": args.max_memory_gb,
            **run_description(argv, device=device),
        },
    }
    return report(results, render, args.output)


def render(r: dict) -> str:
    """A markdown table of the results: times per image, parts, peak memory and ratios."""
    m = r["meta"]
    lines = [
        f"preset {m['preset']}, {m['image']}; median (and minimum) of {m['reps']} after {m['warmup']} "
        f"warm-up; torch {m['torch']}, {m['device']}, {m['threads']} threads",
        "",
        "| classes | batch | computation | forward per image, median (min) | "
        + " | ".join(PART_LABELS[p] for p in PARTS)
        + " | aggregator share | peak memory (forward's own) | speed-up, median (min) | forward memory ratio "
        "| max abs probability difference | cpu share |",
        "|---" * (10 + len(PARTS)) + "|",
    ]
    by_key = {(row["classes"], row["batch"], row["computation"]): row for row in r["rows"]}
    for row in r["rows"]:
        s, n = row["seconds"], row["run_batch"]
        batch = str(row["batch"]) if n == row["batch"] else f"{row['batch']} (run at {n}: does not fit)"
        cells = [f"{s[p] / n:.2f} s" for p in PARTS]
        padded = by_key.get((row["classes"], row["batch"], "padded"))
        speedup = memory_ratio = diff = ""
        if row.get("max_probability_difference") is not None:
            diff = f"{row['max_probability_difference']:.1e}"
        if row["computation"] == "current" and padded is not None:
            median = padded["seconds"]["total"] / padded["run_batch"] / (s["total"] / n)
            fastest = padded["min_total_seconds"] / padded["run_batch"] / (row["min_total_seconds"] / n)
            speedup = f"{median:.2f}x ({fastest:.2f}x)"
            if padded["run_batch"] == n:
                memory_ratio = f"{row['forward_peak_bytes'] / padded['forward_peak_bytes']:.3f}"
        lines.append(
            f"| {row['classes']} | {batch} | {row['computation']} | {s['total'] / n:.2f} s "
            f"({row['min_total_seconds'] / n:.2f} s) | "
            + " | ".join(cells)
            + f" | {s['aggregator'] / s['total']:.0%} | {row['peak_bytes'] / GB:.2f} GB "
            f"({row['forward_peak_bytes'] / GB:.2f} GB) | {speedup} | {memory_ratio} | {diff} | "
            f"{s['cpu_share']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
