"""A small SemLA world for the end-to-end tests: data in three real layouts, a tiny base model, adapters
trained with ``run_lora.sh``, a tiny random Hugging Face CLIP, and the domain statistics.

Built once per test session (it takes about a minute) by the ``world`` fixture (``conftest.py``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS / "engine") not in sys.path:
    sys.path.insert(0, str(TESTS / "engine"))

from engine_testlib import CATSEG, REPO_ROOT, TINY_CONFIG, run_script, single_thread  # noqa: E402
from helpers import write_tiny_hf_clip  # noqa: E402

TINY_MODEL = CATSEG / "configs" / "tiny" / "tiny_model.yaml"
TINY_A150 = CATSEG / "configs" / "tiny" / "tiny_a150.yaml"
#: Sources of the world, in library order; the first three are trained with run_lora.sh.
SOURCES = ["acdc-rain", "muses-fog-day", "a150", "acdc-fog"]
TARGETS = ["acdc-rain", "muses-fog-day", "a150"]
NUM_IMAGES = 3


@dataclass(frozen=True)
class World:
    folder: Path
    root: Path  # dataset root
    base: Path  # tiny CAT-Seg checkpoint
    library: Path  # adapters + statistics (made by the HF CLIP)
    clip: Path  # tiny random CLIPModel folder (save_pretrained)
    sources: Path  # YAML list
    targets: Path  # YAML list
    eval_dir: Path  # eval_lora.sh output of acdc-rain

    def args(self, output: Path, *experiments: str, extra: tuple[str, ...] = ()) -> list[str]:
        """An ``experiments.py`` command line on this world."""
        return [
            "--experiment", *experiments,
            "--source_domains", str(self.sources),
            "--target_domains", str(self.targets),
            "--model_weights", str(self.base),
            "--lora_library_path", str(self.library),
            "--embedding_model", str(self.clip),
            "--datasets_root", str(self.root),
            "--config_overlay", str(TINY_MODEL),
            "--output_dir", str(output),
            "--device", "cpu",
            "--num_workers", "0",
            "--no_progress",
            *extra,
        ]  # fmt: skip


def _train(script_args: list[str], root: Path) -> None:
    done = run_script("run_lora.sh", script_args, data_root=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def build_world(folder: Path) -> World:
    from cat_seg.checkpoint import save_checkpoint
    from cat_seg.config import load_config
    from cat_seg.data.synthetic import write_synthetic
    from cat_seg.lora import resolve_target_modules
    from cat_seg.modeling import build_model
    from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

    root = folder / "data"
    write_synthetic("acdc", root, NUM_IMAGES, seed=0, conditions=["rain", "fog"])
    write_synthetic("muses", root, NUM_IMAGES, seed=1, conditions=["fog-day"])
    write_synthetic("ade20k", root, NUM_IMAGES, seed=2)
    base = folder / "base.pth"
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG), "cpu")
    save_checkpoint(model, base)
    library = folder / "loradb"
    common = [
        "MODEL.WEIGHTS", str(base),
        "MODEL.LORA.DB_PATH", str(library),
        "SOLVER.MAX_ITER", "3",
        "SOLVER.BASE_LR", "0.01",
        "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    muses = [
        "DATASETS.TRAIN",
        "('muses-fog-day_sem_seg_train',)",
        "DATASETS.TEST",
        "('muses-fog-day_sem_seg_val',)",
    ]
    _train(
        [str(TINY_CONFIG), "1", str(folder / "out-acdc-rain"), *common, "MODEL.LORA.NAME", "acdc-rain"], root
    )
    _train(
        [
            str(TINY_CONFIG),
            "1",
            str(folder / "out-muses"),
            *common,
            *muses,
            "MODEL.LORA.NAME",
            "muses-fog-day",
        ],
        root,
    )
    _train([str(TINY_A150), "1", str(folder / "out-a150"), *common, "MODEL.LORA.NAME", "a150"], root)
    shapes = linear_shapes(model, resolve_target_modules([], model))
    write_random_adapter(library / "acdc-fog", shapes, seed=3, std=0.05)
    done = run_script(
        "eval_lora.sh",
        [str(TINY_CONFIG), "1", str(folder / "out-acdc-rain"), *common, "MODEL.LORA.NAME", "acdc-rain"],
        data_root=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    clip = write_tiny_hf_clip(folder / "clip")
    sources = folder / "sources.yaml"
    sources.write_text("".join(f"- {s}\n" for s in SOURCES))
    targets = folder / "targets.yaml"
    targets.write_text("".join(f"- {t}\n" for t in TARGETS))
    world = World(folder, root, base, library, clip, sources, targets, folder / "out-acdc-rain" / "eval")
    from domain_orchestrator.generate_embeddings import main as generate

    with single_thread():
        status = generate(
            [
                "--source_domains",
                str(sources),
                "--lora_library_path",
                str(library),
                "--embedding_model",
                str(clip),
                "--datasets_root",
                str(root),
                "--device",
                "cpu",
                "--num_workers",
                "0",
                "--no_progress",
            ]  # fmt: skip
        )
    assert status == 0
    return world


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def experiments_main():  # noqa: ANN201 - module function
    """``experiments.main`` (the top-level script imported as a module)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import experiments

    return experiments.main


def val_files(world: World, target: str) -> list[str]:
    from cat_seg.data import load_records
    from domain_orchestrator.domains import get_domain

    return [r["file_name"] for r in load_records(get_domain(target).val_dataset, world.root)]
