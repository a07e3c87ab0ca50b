"""Helpers of the engine tests: a synthetic ACDC-rain root, a tiny base checkpoint, running the wrappers.

(Not named ``conftest.py``: the top-level tests import ``conftest`` by name.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CATSEG = REPO_ROOT / "catseg"
TINY_CONFIG = CATSEG / "configs" / "tiny" / "tiny.yaml"
TRAIN = "acdc-rain_sem_seg_train"
VAL = "acdc-rain_sem_seg_val"
NUM_IMAGES = 4


def make_root(folder: Path) -> tuple[Path, Path]:
    """Write ``folder/data`` (ACDC rain, 4 train + 4 val images, real layout) and ``folder/base.pth``.

    Returns:
        (dataset root, base checkpoint): a tiny CAT-Seg with seed-0 random weights, saved like the
        released ``model_final.pth`` (``{"model": state_dict}``).
    """
    from cat_seg.checkpoint import save_checkpoint
    from cat_seg.config import load_config
    from cat_seg.data.synthetic import write_synthetic
    from cat_seg.modeling import build_model

    root = folder / "data"
    write_synthetic("acdc", root, NUM_IMAGES, seed=0, conditions=["rain"])
    base = folder / "base.pth"
    torch.manual_seed(0)
    save_checkpoint(build_model(load_config(TINY_CONFIG), "cpu"), base)
    return root, base


def lora_opts(out: Path, db: Path, base: Path, *, name: str = "x", max_iter: int = 20) -> list[str]:
    """The ``KEY VALUE`` overrides run_lora.sh appends, plus the test's own (output, weights, library)."""
    return [
        "OUTPUT_DIR", str(out),
        "TEST.SLIDING_WINDOW", "True",
        "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]",
        "MODEL.LORA.ENABLED", "True",
        "SOLVER.MAX_ITER", str(max_iter),
        "MODEL.WEIGHTS", str(base),
        "MODEL.LORA.DB_PATH", str(db),
        "MODEL.LORA.NAME", name,
    ]  # fmt: skip


def run_script(
    script: str,
    args: list[str],
    *,
    data_root: Path,
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``sh catseg/<script> args...`` with this interpreter as ``$PYTHON`` and ``$DETECTRON2_DATASETS``."""
    env = {
        **os.environ,
        "DETECTRON2_DATASETS": str(data_root),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",  # see single_thread(): tiny models, robust to a busy machine
        **(extra_env or {}),
    }
    return subprocess.run(
        ["sh", str(CATSEG / script), *args],
        cwd=cwd or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread while the block runs (restored after).

    The tiny model's operations are far too small to gain from threads, and with two threads on a machine
    where another process holds a core, every operation waits for a descheduled thread (runs get tens of
    times slower). The subprocesses get ``OMP_NUM_THREADS=1`` for the same reason, so in-process and
    subprocess runs also compute with the same thread count.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_net() -> ModuleType:
    """``catseg/train_net.py`` imported as a module (for in-process ``main([...])`` calls)."""
    if str(CATSEG) not in sys.path:
        sys.path.insert(0, str(CATSEG))
    import train_net as module

    return module


#: The architecture overrides run_lora.sh / eval_lora.sh apply (pooling has no weights, but changes outputs).
WRAPPER_OPTS = ("TEST.SLIDING_WINDOW", "True", "MODEL.SEM_SEG_HEAD.POOLING_SIZES", "[1,1]")


def tiny_with_base(base: Path, opts: tuple[str, ...] = WRAPPER_OPTS):  # noqa: ANN201 - CATSeg
    """A fresh tiny CAT-Seg, configured as the wrappers configure it, holding the base checkpoint's weights."""
    from cat_seg.checkpoint import load_checkpoint
    from cat_seg.config import load_config
    from cat_seg.modeling import build_model

    model = build_model(load_config(TINY_CONFIG, list(opts)), "cpu")
    load_checkpoint(model, base)
    return model


def fixed_batch(root: Path) -> list[dict]:
    """The 4 training images through the training mapper with fixed augmentation seeds."""
    from cat_seg.config import load_config
    from cat_seg.data import load_records, mapper_from_cfg

    mapper = mapper_from_cfg(load_config(TINY_CONFIG), is_train=True, num_classes=19)
    return [mapper(r, np.random.default_rng(i)) for i, r in enumerate(load_records(TRAIN, root))]


def eval_inputs(root: Path) -> list[dict]:
    """The validation images through the test mapper."""
    from cat_seg.config import load_config
    from cat_seg.data import load_records, mapper_from_cfg

    mapper = mapper_from_cfg(load_config(TINY_CONFIG), is_train=False, num_classes=19)
    return [mapper(r) for r in load_records(VAL, root)]


def tree_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256 and mtime}`` of every file under ``folder`` (to show nothing changed)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = (
                f"{hashlib.sha256(path.read_bytes()).hexdigest()}@{path.stat().st_mtime_ns}"
            )
    return out
