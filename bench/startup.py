"""Start-up time of the command-line tools next to torch's own import, measured side by side in one run.

Target (DESIGN.md §6): a tool starts within torch's import time + 1 s. Every command in ``COMMANDS`` runs
as a fresh process; its wall time, from process start to exit (or to the output line where its work
begins, ``Command.until``), is reported as the median over ``--reps`` runs and as "torch import + X s",
X = its median minus that of ``python -c "import torch"`` in the same mode. The runs are interleaved round
by round, so that machine noise hits every command alike.

The tools run on tiny inputs: the evaluation runs the ``tiny`` config on one synthetic image and is timed
until its first forward pass (model built on meta and checked, class names tokenised, model built on the
CPU, checkpoint loaded); the LoRA training (``run_lora.sh``'s command line, 2 iterations on one synthetic
image) is timed until its first step and to its exit; validation checks a synthetic root of every layout,
one image per split, and is timed to its exit.

Two modes:

- ``cache``: with Python's bytecode cache (``.pyc`` files written by earlier runs; a warm-up round writes
  them), the usual case;
- ``no cache``: ``PYTHONPYCACHEPREFIX`` points at an empty folder and ``PYTHONDONTWRITEBYTECODE=1``, so every
  module, the standard library's included, is compiled from source: the first run after a fresh install
  (uv does not compile bytecode by default) is at most this slow. Nothing on disk is deleted.

``--baseline REV`` also runs the tool commands on the code of git revision REV (extracted with ``git
archive`` into a temporary folder and put first on ``PYTHONPATH``), so the gain shows in the same table;
``python -c "import open_clip"`` is timed as well, the cost every tool that tokenised used to pay.

    flock -x /tmp/semla-cpu.lock uv run python bench/startup.py --reps 5 --reps-no-cache 3 --baseline REV
    uv run python bench/startup.py --reps 1 --modes cache   # a quick look
    uv run python bench/startup.py --commands "LoRA training" --baseline REV   # some commands only

To time another tool, append a ``Command`` to ``COMMANDS`` (placeholders are listed in ``Command``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from _common import log, run_description

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0  # DESIGN.md §6: within torch's import time + 1 s


@dataclass(frozen=True)
class Command:
    """One command line to time: ``python <args>``.

    Args:
        name: label in the table.
        args: arguments after ``python``, with placeholders ``{catseg}`` (the ``catseg/`` folder of the code
            under test), ``{data}`` (synthetic dataset root), ``{weights}`` (tiny CAT-Seg checkpoint) and
            ``{out}`` (a fresh, not yet existing output folder per run).
        tool: a command of this project (runs on the baseline code too); False for plain imports.
        target: the start-up target applies to it.
        until: the time reported is when a line of its output first contains this text (the point where
            start-up ends and work begins); None: when the process exits. The process always runs to
            its end and must succeed; its whole run gets a row too.
        until_label: how the table names the ``until`` point.
    """

    name: str
    args: tuple[str, ...]
    tool: bool = True
    target: bool = False
    until: str | None = None
    until_label: str = ""


# A time to a line is compared with torch's time to the end of its import, a time to exit with torch's
# time to exit: interpreter shutdown after ``import torch`` alone takes about 0.5 s.
TORCH = Command(
    'python -c "import torch"',
    ("-c", "import torch; print('torch imported', flush=True)"),
    tool=False,
    until="torch imported",
    until_label="to the end of the import",
)
COMMANDS: list[Command] = [
    TORCH,
    Command('python -c "import open_clip"', ("-c", "import open_clip"), tool=False),
    Command("train_net.py --help", ("{catseg}/train_net.py", "--help")),
    Command(
        "train_net.py --eval-only, tiny config, 1 image",
        (
            "{catseg}/train_net.py",
            "--config-file",
            "{catseg}/configs/tiny/tiny.yaml",
            "--eval-only",
            "--data-root",
            "{data}",
            "OUTPUT_DIR",
            "{out}",
            "MODEL.WEIGHTS",
            "{weights}",
        ),
        target=True,
        # Logged once the model is built on meta and checked, the class names tokenised, the model built
        # on the CPU and the checkpoint loaded: just before the first forward pass.
        until="evaluating on acdc-rain_sem_seg_val",
        until_label="to the first forward",
    ),
    Command(
        "train_net.py LoRA training as run_lora.sh, tiny config, 2 iterations",
        (
            "{catseg}/train_net.py",
            "--config-file",
            "{catseg}/configs/tiny/tiny.yaml",
            "--num-gpus",
            "1",
            "--resume",
            "--no-progress",
            "--data-root",
            "{data}",
            "OUTPUT_DIR",
            "{out}",
            "TEST.SLIDING_WINDOW",
            "True",
            "MODEL.SEM_SEG_HEAD.POOLING_SIZES",
            "[1,1]",
            "MODEL.WEIGHTS",
            "{weights}",
            "MODEL.LORA.ENABLED",
            "True",
            "MODEL.LORA.DB_PATH",
            "{out}/loradb",
            "MODEL.LORA.NAME",
            "x",
            "SOLVER.MAX_ITER",
            "2",
        ),
        # Logged once the model is built and checked, the base checkpoint loaded, the adapter attached and
        # the optimizer built (whose construction imports torch._dynamo, torch's own lazy import).
        until="training from iteration 0",
        until_label="to the first step",
    ),
    Command(
        "python -m cat_seg.data.validate, synthetic root (40 splits)",
        ("-m", "cat_seg.data.validate", "--root", "{data}"),
        target=True,
    ),
    Command("python -m cat_seg.data.synthetic --help", ("-m", "cat_seg.data.synthetic", "--help")),
    # Tools newer than a --baseline revision (tool=False: timed on this tree only).
    Command("experiments.py --help", ("{catseg}/../experiments.py", "--help"), tool=False, target=True),
    Command(
        "generate_embeddings.py --help",
        ("{catseg}/../domain_orchestrator/generate_embeddings.py", "--help"),
        tool=False,
        target=True,
    ),
]
MODES = ("cache", "no cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed runs of each command (median reported)")
    p.add_argument(
        "--reps-no-cache", type=int, default=None, help="timed runs in no-cache mode (default: --reps)"
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="bytecode-cache modes")
    p.add_argument(
        "--baseline", default=None, metavar="REV", help="also time the tools on this git revision (e.g. main)"
    )
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--commands",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="time only the commands whose name contains one of these texts (torch's import is always timed)",
    )
    return p


def make_fixtures(folder: Path) -> dict[str, str]:
    """A synthetic root of every layout (1 image per split) and a seeded tiny CAT-Seg checkpoint."""
    import torch

    from cat_seg.checkpoint import save_checkpoint
    from cat_seg.config import CATSEG_ROOT, load_config
    from cat_seg.data.synthetic import main as write_synthetic_main
    from cat_seg.modeling import build_model

    data = folder / "data"
    if (
        write_synthetic_main(["--layout", "all", "--root", str(data), "--num-images", "1", "--seed", "0"])
        != 0
    ):
        raise RuntimeError("writing the synthetic root failed")
    torch.manual_seed(0)
    weights = save_checkpoint(
        build_model(load_config(CATSEG_ROOT / "configs/tiny/tiny.yaml"), "cpu"), folder / "tiny.pth"
    )
    return {"data": str(data), "weights": str(weights)}


def extract_revision(rev: str, folder: Path) -> Path:
    """The files of git revision ``rev`` under ``folder`` (``git archive``; the repository is not touched)."""
    tar = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(folder, filter="data")
    return folder


def run_once(argv: list[str], env: dict[str, str], cwd: Path, until: str | None) -> tuple[float, float]:
    """Seconds from the start of one process to the first output line containing ``until``, and to its exit.

    Raises:
        RuntimeError: the process failed, or ``until`` never appeared.
    """
    start = time.perf_counter()
    marked = None
    lines = []
    # stderr merged into stdout: the logging handlers write to stderr and flush every record.
    with subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        for line in p.stdout:
            if marked is None and until is not None and until in line:
                marked = time.perf_counter() - start
            lines.append(line)
    total = time.perf_counter() - start
    output = "".join(lines)[-2000:]
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {p.returncode}:\n{output}")
    if until is not None and marked is None:
        raise RuntimeError(f"{' '.join(argv)} never printed {until!r}:\n{output}")
    return (marked if marked is not None else total), total


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="semla-startup-") as tmp:
        tmp_path = Path(tmp)
        log("writing the synthetic root and the tiny checkpoint")
        places = make_fixtures(tmp_path)
        # code label -> (catseg folder, extra PYTHONPATH or None: the installed, current code)
        codes: dict[str, tuple[Path, str | None]] = {"this tree": (REPO_ROOT / "catseg", None)}
        if args.baseline:
            old = extract_revision(args.baseline, tmp_path / "baseline")
            codes[f"baseline {args.baseline[:10]}"] = (old / "catseg", f"{old / 'catseg'}{os.pathsep}{old}")
        work = tmp_path / "cwd"  # a neutral working directory: nothing importable from it
        work.mkdir()
        empty_cache = tmp_path / "no-pycache"
        empty_cache.mkdir()

        commands = selected_commands(args.commands)
        jobs = [(c, code) for c in commands for code in (codes if c.tool else ["this tree"])]
        samples: dict[tuple[str, str, str], list[float]] = {}
        totals: dict[tuple[str, str, str], list[float]] = {}
        counter = 0
        for mode in args.modes:
            reps = args.reps_no_cache if mode == "no cache" and args.reps_no_cache is not None else args.reps
            for round_ in range(reps + 1):  # round 0: warm-up (writes .pyc in cache mode), not timed
                for command, code in jobs:
                    catseg, pythonpath = codes[code]
                    env = {
                        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONPYCACHEPREFIX")
                    }
                    env.pop("PYTHONDONTWRITEBYTECODE", None)
                    if pythonpath:
                        env["PYTHONPATH"] = pythonpath
                    if mode == "no cache":
                        env["PYTHONPYCACHEPREFIX"] = str(empty_cache)
                        env["PYTHONDONTWRITEBYTECODE"] = "1"
                    counter += 1
                    fill = {**places, "catseg": str(catseg), "out": str(tmp_path / "out" / str(counter))}
                    argv_ = [sys.executable, *(a.format(**fill) for a in command.args)]
                    seconds, total = run_once(argv_, env, work, command.until)
                    if round_ > 0:
                        samples.setdefault((mode, command.name, code), []).append(seconds)
                        totals.setdefault((mode, command.name, code), []).append(total)
                log(f"{mode}: round {round_}/{reps} done")
            assert not any(empty_cache.iterdir()), "bytecode was written in no-cache mode"

    results = {
        "rows": [
            {
                "mode": mode,
                "command": name,
                "code": code,
                "median_s": statistics.median(s),
                "samples_s": s,
                "median_whole_run_s": statistics.median(totals[mode, name, code]),
            }
            for (mode, name, code), s in samples.items()
        ],
        "reps": {"cache": args.reps, "no cache": args.reps_no_cache or args.reps},
        **run_description(argv, cpu_count=True),
    }
    print(render(results, args.modes, list(codes), commands))
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=1))
    return 0


def selected_commands(texts: Sequence[str] | None) -> list[Command]:
    """``COMMANDS`` whose name contains one of ``texts`` (all when None), torch's import always first."""
    if texts is None:
        return list(COMMANDS)
    chosen = [c for c in COMMANDS if c is TORCH or any(t in c.name for t in texts)]
    if len(chosen) == 1:
        raise SystemExit(f"--commands {' '.join(texts)}: no command name contains these texts")
    return chosen


def render(
    results: dict, modes: Sequence[str], codes: Sequence[str], commands: Sequence[Command] = tuple(COMMANDS)
) -> str:
    """A Markdown table: one row per (command, code), two columns per mode.

    A command timed ``until`` a line also gets a row for its whole run (same processes).
    """
    rows = {(r["mode"], r["command"], r["code"]): r for r in results["rows"]}
    head = (
        "| command | code |" + "".join(f" {m}: median | {m}: torch import + |" for m in modes) + " target |"
    )
    lines = [head, "|---|---|" + "---:|---:|" * len(modes) + "---|"]

    def line(command: Command, code: str, to_line: bool) -> str:
        key = "median_s" if to_line else "median_whole_run_s"
        cells, met = [], True
        for mode in modes:
            t = rows[mode, command.name, code][key]
            base = rows[mode, TORCH.name, "this tree"][key]
            cells.append(f" {t:.2f} s | {'' if command is TORCH else f'{t - base:+.2f} s'} |")
            met = met and t - base <= TARGET_S
        target = command.target and (to_line or command.until is None)
        goal = f"<= +{TARGET_S:.0f} s: {'met' if met else 'not met'}" if target else ""
        name = (
            command.name
            if command.until is None
            else f"{command.name}: {command.until_label if to_line else 'whole run'}"
        )
        return f"| {name} | {code} |{''.join(cells)} {goal} |"

    for command in commands:
        for code in codes if command.tool else ["this tree"]:
            if command.until is not None:
                lines.append(line(command, code, to_line=True))
            lines.append(line(command, code, to_line=False))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
