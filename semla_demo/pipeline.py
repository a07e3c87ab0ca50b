"""``make demo``: all of SemLA, offline, on a small world, through the project's own tools and files.

Stages (each prints a progress line with its time):

1. **world**: procedural street scenes under 8 conditions ({clear, fog, rain, snow} x {day, night}),
   written in the MUSES layout (``semla_demo.world``) and checked with ``python -m cat_seg.data.validate``;
2. **clip**: a tiny open_clip CLIP pre-trained on the world's training images: contrastively on captions
   that name the objects, the weather and the time of day, and, on clear-day images only, patch tokens
   against class prompts (``semla_demo.clip_pretrain``); it initialises the CAT-Seg's CLIP towers and is
   the retrieval embedder, as OpenAI's CLIP is in the real setup;
3. **base**: CAT-Seg (preset ``tiny-64``) trained on clear-day scenes with ``catseg/run.sh`` (two
   processes);
4. **adapters**: one LoRA per condition with ``catseg/run_lora.sh`` (two at a time);
5. **statistics**: each condition's prototype with ``domain_orchestrator/generate_embeddings.py``;
6. **experiments**: ``experiments.py --experiment zeroshot uniform semla oracle`` twice: with every
   adapter in the library (SemLA must find the target's own without being told the domain) and with
   ``--remove_target_adapter`` (each target a condition never seen);
7. **report**: the tables, the embedder's retrieval confusion, the transfer matrix (every adapter alone
   on every target) and pictures (``semla_demo.report``).

``--model san`` runs every stage on SAN instead (``configs/demo/san_train.yaml`` for the base model and the
adapters, ``configs/demo/san_model.yaml`` as the experiments' and the report's overlay; the CLIP stage's
weights go into SAN's CLIP), into ``demo_output/san/`` unless ``--output`` is given.

Every computing process runs a fixed number of threads (:data:`THREADS`, or one for the processes that
run side by side), so a seed gives the same bytes run after run and on any machine of the same kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (
    DEMO_MODELS,
    EVAL_OPTS,
    METHODS,
    MODEL_OVERLAY,  # noqa: F401 - CAT-Seg's demo config, imported from here by the tests
    REPO_ROOT,
    SEMLA_CONFIG,
    TRAIN_CONFIG,  # noqa: F401 - CAT-Seg's demo config, imported from here by the tests
    DemoModel,
)

CATSEG = REPO_ROOT / "catseg"
BASE_CONDITION = ("clear", "day")
#: Threads of every computing process, whatever the machine: CPU kernels' results can depend on the thread
#: count, so a pinned count makes a seed give the same bytes on any machine of a kind (``--jobs`` only
#: changes how many single-thread processes run side by side, never a result).
THREADS = 2

logger = logging.getLogger(__name__)


class DemoError(RuntimeError):
    """A stage of the demo failed; the message names the stage and its log file."""


@dataclass(frozen=True)
class Sizes:
    """How big the demo is (``--quick`` is the one the tests run)."""

    train: int  # training images per condition
    val: int  # validation images per condition
    clip_epochs: int
    base_iters: int
    lora_iters: int
    clip_batch: int = 64
    conditions: tuple[tuple[str, str], ...] | None = None  # None: all eight

    @classmethod
    def full(cls) -> Sizes:
        return cls(train=150, val=30, clip_epochs=20, base_iters=300, lora_iters=64)

    @classmethod
    def quick(cls) -> Sizes:
        conditions = (("clear", "day"), ("fog", "day"), ("rain", "night"), ("snow", "night"))
        return cls(train=16, val=4, clip_epochs=2, base_iters=10, lora_iters=5, conditions=conditions)


def domain(weather: str, time_: str) -> str:
    """The MUSES domain of a condition: ``muses-fog-night``."""
    return f"muses-{weather}-{time_}"


class Stages:
    """Runs the stages, timing each and keeping every tool's output in ``<output>/logs/``."""

    def __init__(
        self, output: Path, *, seed: int, sizes: Sizes, jobs: int, model: DemoModel = DEMO_MODELS["catseg"]
    ) -> None:
        self.output = output
        self.model = model
        self.seed = seed
        self.sizes = sizes
        self.jobs = max(1, jobs)
        self.logs = output / "logs"
        self.timings: list[tuple[str, float]] = []
        self.started = time.monotonic()

    # -- plumbing ---------------------------------------------------------------------------------------
    def stage(self, name: str, seconds: float, detail: str = "") -> None:
        self.timings.append((name, seconds))
        total = time.monotonic() - self.started
        print(f"[{total:6.1f} s] {name:<12} {seconds:6.1f} s  {detail}", flush=True)

    def env(self, threads: int) -> dict[str, str]:
        return {
            **os.environ,
            "DETECTRON2_DATASETS": str(self.output / "world"),
            "PYTHON": sys.executable,
            # A fixed thread count per process (see THREADS), whatever the machine's cores.
            "OMP_NUM_THREADS": str(threads),
            "TRAIN_NET_ARGS": "--device cpu --no-progress --log-period 100",
        }

    def tool(self, name: str, argv: Sequence[str], *, threads: int) -> None:
        """Run a project command line; its output goes to ``logs/<name>.log``; a failure stops the demo."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "w", encoding="utf-8") as f:
            f.write("$ " + " ".join(str(a) for a in argv) + "\n")
            f.flush()
            done = subprocess.run(
                [str(a) for a in argv],
                cwd=REPO_ROOT,
                env=self.env(threads),
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
            raise DemoError(f"{name} failed (exit {done.returncode}); its log is {log}:\n{tail}")

    # -- the stages -------------------------------------------------------------------------------------
    def world(self) -> dict:
        from .world import CONDITIONS, write_world

        start = time.monotonic()
        summary = write_world(
            self.output / "world",
            train_per_condition=self.sizes.train,
            val_per_condition=self.sizes.val,
            seed=self.seed,
            conditions=self.sizes.conditions or CONDITIONS,
            overwrite=True,
            workers=self.jobs,
        )
        domains = [domain(*c.split("-")) for c in summary["conditions"]]
        self.tool(
            "validate",
            [
                sys.executable,
                "-m",
                "cat_seg.data.validate",
                "--root",
                self.output / "world",
                "--domains",
                *domains,
            ],
            threads=1,
        )
        self.stage(
            "world",
            time.monotonic() - start,
            f"{summary['images']} images, {len(domains)} conditions, validated",
        )
        return summary

    def clip(self) -> Path:
        from PIL import Image

        from cat_seg.modeling.text import prompt_templates

        from .canvas import CLASS_NAMES, IGNORE
        from .clip_pretrain import pretrain, save

        start = time.monotonic()
        entries = [e for e in self._manifest()["entries"] if e["split"] == "train"]
        root = self.output / "world"
        images = np.stack([np.asarray(Image.open(root / e["image"]).convert("RGB")) for e in entries])
        # Region labels of the base condition only: the CLIP learns which words name which image regions
        # on clear days, as web-scale CLIP did on its mostly daytime photos; the other conditions are
        # captions only.
        labels = np.stack(
            [
                np.asarray(Image.open(root / e["label"]))
                if (e["weather"], e["time"]) == BASE_CONDITION
                else np.full(images.shape[1:3], IGNORE, dtype=np.uint8)
                for e in entries
            ]
        )
        model, losses = pretrain(
            images,
            [e["caption"] for e in entries],
            labels=labels,
            class_prompts=[t.format(name) for name in CLASS_NAMES for t in prompt_templates("single")],
            epochs=self.sizes.clip_epochs,
            batch_size=self.sizes.clip_batch,
            seed=self.seed,
        )
        folder = save(model, self.output / "clip")
        self.stage(
            "clip",
            time.monotonic() - start,
            f"{len(entries)} pairs, loss {losses[0]:.2f} -> {losses[-1]:.2f}",
        )
        return folder

    def base(self, clip: Path) -> Path:
        import torch

        from cat_seg.checkpoint import load_clip_weights, save_checkpoint
        from cat_seg.config import load_config
        from cat_seg.modeling import build_model

        start = time.monotonic()
        torch.manual_seed(self.seed)
        model = build_model(load_config(self.model.train_config), "cpu")
        load_clip_weights(
            model, clip / "open_clip_model.safetensors"
        )  # the world's CLIP, as OpenAI's for CAT-Seg (SAN: into its clip_model)
        init = save_checkpoint(model, self.output / "init.pth")
        d = domain(*BASE_CONDITION)
        if (self.output / "base").exists():  # a fresh training (run.sh would resume an earlier run's)
            shutil.rmtree(self.output / "base")
        # Two single-thread processes (DDP over gloo, 4 images each): a quarter faster than one process on
        # two threads, and the same computation on any machine.
        self.tool(
            "base",
            [
                "sh", CATSEG / "run.sh", self.model.train_config, "2", self.output / "base",
                "MODEL.WEIGHTS", init,
                "DATASETS.TRAIN", f"('{d}_sem_seg_train',)",
                "DATASETS.TEST", f"('{d}_sem_seg_val',)",
                "SOLVER.MAX_ITER", str(self.sizes.base_iters),
                "SEED", str(self.seed),
            ],
            threads=1,
        )  # fmt: skip
        self.stage("base", time.monotonic() - start, f"{self.sizes.base_iters} iterations on {d}")
        return self.output / "base" / "model_final.pth"

    def adapters(self, base: Path, conditions: Sequence[str]) -> Path:
        start = time.monotonic()
        library = self.output / "loradb"
        if library.exists():
            shutil.rmtree(library)

        def train(condition: str) -> None:
            d = domain(*condition.split("-"))
            self.tool(
                f"lora-{d}",
                [
                    "sh", CATSEG / "run_lora.sh", self.model.train_config, "1", self.output / "adapters" / d,
                    "MODEL.WEIGHTS", base,
                    "MODEL.LORA.DB_PATH", library,
                    "MODEL.LORA.NAME", d,
                    "DATASETS.TRAIN", f"('{d}_sem_seg_train',)",
                    "DATASETS.TEST", "()",  # not evaluated here: the experiments' oracle is that evaluation
                    "SOLVER.MAX_ITER", str(self.sizes.lora_iters),
                    # LoRA factors start at zero (B) and must move far in a few dozen steps: at the base model's
                    # learning rate (0.002) several adapters did not beat zero-shot on their own condition
                    "SOLVER.BASE_LR", str(self.model.lora_lr),
                    "SOLVER.IMS_PER_BATCH", "4",
                    "SEED", str(self.seed),
                ],
                threads=1,
            )  # fmt: skip

        for folder in (self.output / "adapters").glob("*"):
            shutil.rmtree(folder)  # a fresh training per run (run_lora.sh resumes otherwise)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(train, conditions))
        self.stage(
            "adapters",
            time.monotonic() - start,
            f"{len(conditions)} LoRAs x {self.sizes.lora_iters} iterations",
        )
        return library

    def statistics(self, library: Path, clip: Path, domains_file: Path) -> None:
        start = time.monotonic()
        self.tool(
            "statistics",
            [
                sys.executable, REPO_ROOT / "domain_orchestrator" / "generate_embeddings.py",
                "--source_domains", domains_file, "--lora_library_path", library, "--embedding_model", clip,
                "--datasets_root", self.output / "world", "--device", "cpu", "--num_workers", "0", "--no_progress",
            ],
            threads=THREADS,
        )  # fmt: skip
        self.stage("statistics", time.monotonic() - start, "one prototype per condition")

    def experiments(
        self,
        name: str,
        methods: Sequence[str],
        base: Path,
        library: Path,
        clip: Path,
        domains_file: Path,
        *extra: str,
        threads: int = 1,
    ) -> Path:
        start = time.monotonic()
        out = self.output / "results" / name
        self.tool(
            f"experiments-{name}",
            [
                sys.executable, REPO_ROOT / "experiments.py",
                "--experiment", *methods,
                "--source_domains", domains_file, "--target_domains", domains_file,
                "--model_weights", base, "--lora_library_path", library, "--embedding_model", clip,
                "--config_overlay", self.model.model_overlay, "--datasets_root", self.output / "world",
                "--semla_config", SEMLA_CONFIG, "--output_dir", out, "--overwrite", "--device", "cpu", "--batch_size", "32",
                "--num_workers", "0", "--no_progress", *extra, *EVAL_OPTS,
            ],
            threads=threads,
        )  # fmt: skip
        self.stage("experiments", time.monotonic() - start, name)
        return out

    def _manifest(self) -> dict:
        from .world import MANIFEST

        return json.loads((self.output / "world" / MANIFEST).read_text(encoding="utf-8"))


def run(
    output: Path, *, seed: int = 0, quick: bool = False, jobs: int | None = None, model: str = "catseg"
) -> dict:
    """Run every stage into ``output`` with the demo model ``model`` (``catseg`` or ``san``, see
    :data:`~semla_demo.common.DEMO_MODELS`); returns what the report shows."""
    import torch

    from .report import report

    torch.set_num_threads(THREADS)  # the stages computed in this process (CLIP, report)
    output = Path(output).absolute()
    output.mkdir(parents=True, exist_ok=True)
    sizes = Sizes.quick() if quick else Sizes.full()
    demo_model = DEMO_MODELS[model]
    stages = Stages(
        output, seed=seed, sizes=sizes, jobs=jobs or min(2, os.cpu_count() or 1), model=demo_model
    )
    summary = stages.world()
    conditions = summary["conditions"]
    domains_file = output / "domains.yaml"
    domains_file.write_text("".join(f"- {domain(*c.split('-'))}\n" for c in conditions))
    clip = stages.clip()
    base = stages.base(clip)
    library = stages.adapters(base, conditions)
    stages.statistics(library, clip, domains_file)
    # The two settings run side by side, one thread each (each run's start-up is a good part of its time).
    # Zero-shot and oracle do not depend on the setting: the leave-one-out run computes the other two.
    settings = (
        ("with_target", METHODS, ()),
        ("leave_one_out", ("uniform", "semla"), ("--remove_target_adapter",)),
    )
    with ThreadPoolExecutor(max_workers=stages.jobs) as pool:
        with_target, leave_one_out = pool.map(
            lambda s: stages.experiments(s[0], s[1], base, library, clip, domains_file, *s[2], threads=1),
            settings,
        )
    start = time.monotonic()
    result = report(
        output,
        world=output / "world",
        clip=clip,
        base=base,
        library=library,
        results={"with the target's adapter": with_target, "leave-one-out": leave_one_out},
        seed=seed,
        model_overlay=demo_model.model_overlay,
    )
    stages.stage("report", time.monotonic() - start, f"pictures in {output}")
    result["seconds"] = time.monotonic() - stages.started
    result["timings"] = stages.timings
    return result


def run_seeds(
    output: Path,
    seeds: Sequence[int],
    *,
    quick: bool = False,
    jobs: int | None = None,
    model: str = "catseg",
) -> dict:
    """The whole demo once per seed (``<output>/seed_<n>/``), then ``<output>/seeds.txt`` and
    ``seeds.json``: each seed's mean IoU per method and setting, and their mean +- standard deviation."""
    from .report import format_seeds

    output = Path(output).absolute()
    results = {}
    for seed in seeds:
        print(f"--- seed {seed} ---", flush=True)
        results[seed] = run(output / f"seed_{seed}", seed=seed, quick=quick, jobs=jobs, model=model)
    text, numbers = format_seeds(results)
    output.mkdir(parents=True, exist_ok=True)
    (output / "seeds.txt").write_text(text + "\n", encoding="utf-8")
    (output / "seeds.json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    return {"text": text, "numbers": numbers, "seconds": sum(r["seconds"] for r in results.values())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m semla_demo",
        description="Run all of SemLA on a small procedural world, offline, on CPU.",
    )
    parser.add_argument(
        "--model",
        choices=sorted(DEMO_MODELS),
        default="catseg",
        help="the segmentation model the whole demo trains and evaluates: catseg (CAT-Seg, "
        "configs/demo/train.yaml) or san (SAN, configs/demo/san_train.yaml) (default: catseg)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output folder (default: demo_output; with --model san: demo_output/san)",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=0, help="seed of the world and every training (default: 0)"
    )
    seeds.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="run the demo once per seed into OUTPUT/seed_<n>/ and write the tables of all of them with "
        "their mean +- std (OUTPUT/seeds.txt)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a much smaller world and shorter trainings (tests)"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="adapters trained at a time (default: 2 or the cores)"
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cat_seg.cli import report_errors

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.output is None:  # relative to the working directory, as the flag's values are
        args.output = Path("demo_output") if args.model == "catseg" else Path("demo_output") / args.model

    def body() -> int:
        if args.seeds:
            result = run_seeds(args.output, args.seeds, quick=args.quick, jobs=args.jobs, model=args.model)
        else:
            result = run(args.output, seed=args.seed, quick=args.quick, jobs=args.jobs, model=args.model)
        print(result["text"], flush=True)
        print(f"\nall stages in {result['seconds']:.0f} s; outputs in {args.output}", flush=True)
        return 0

    try:
        return report_errors("semla_demo", body, debug=args.debug)
    except DemoError as e:
        if args.debug:
            raise
        print(f"semla_demo: error: {e}", file=sys.stderr)
        return 1
