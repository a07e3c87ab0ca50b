"""experiments.py end to end on SAN (``--config_overlay catseg/configs/san/san_tiny_model.yaml``).

A small SAN world of its own (built once for this module, about 20 s): ACDC rain/fog and MUSES fog-day in
their real layouts, 3 train and 3 validation images each; a tiny SAN base checkpoint; adapters of acdc-rain
and muses-fog-day trained with ``run_lora.sh catseg/configs/san/san_tiny.yaml`` and a random acdc-fog
adapter; statistics made by ``generate_embeddings.py`` with SAN's own CLIP image tower
(``--embedding_model catseg``). Oracles: ``eval_lora.sh`` (the PEFT-style single-adapter evaluation), the
retrieval recomputed from the saved statistics, and PEFT's ``add_weighted_adapter``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_testlib import CATSEG, run_script, single_thread
from semla_world import experiments_main, read_json

from cat_seg.checkpoint import load_checkpoint, save_checkpoint
from cat_seg.config import load_config
from cat_seg.data import get_dataset, load_records, mapper_from_cfg
from cat_seg.engine.evaluate import inference_on_dataset
from cat_seg.evaluation import SemSegEvaluator
from cat_seg.modeling import SAN, build_model
from domain_orchestrator.domains import get_domain
from domain_orchestrator.orchestrator import target_config

pytestmark = pytest.mark.slow

SAN_TINY = CATSEG / "configs" / "san" / "san_tiny.yaml"
SAN_MODEL = CATSEG / "configs" / "san" / "san_tiny_model.yaml"
#: Sources in library order: two trained with run_lora.sh, one random.
SOURCES = ["acdc-rain", "muses-fog-day", "acdc-fog"]
TARGETS = ["acdc-rain", "muses-fog-day", "acdc-fog"]
ALL = ("zeroshot", "oracle", "uniform", "semla")
NUM_IMAGES = 3
# As test_experiments: fused (ours) and PEFT / eval_lora.sh add the same terms in another order, so an
# argmax may flip on a near-tie; the adapters move the metrics by far more than this.
TOLERANCE = 0.01  # percentage points


@dataclass(frozen=True)
class SanWorld:
    root: Path  # dataset root
    base: Path  # tiny SAN checkpoint
    library: Path  # adapters + statistics (SAN's image tower)
    sources: Path
    targets: Path
    eval_dir: Path  # eval_lora.sh output of acdc-rain

    def args(self, output: Path, *experiments: str) -> list[str]:
        return [
            "--experiment", *experiments,
            "--source_domains", str(self.sources),
            "--target_domains", str(self.targets),
            "--model_weights", str(self.base),
            "--lora_library_path", str(self.library),
            "--embedding_model", "catseg",
            "--datasets_root", str(self.root),
            "--config_overlay", str(SAN_MODEL),
            "--output_dir", str(output),
            "--device", "cpu",
            "--num_workers", "0",
            "--no_progress",
        ]  # fmt: skip


def _script(name: str, args: list[str], root: Path) -> None:
    done = run_script(name, args, data_root=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def san_world(tmp_path_factory) -> SanWorld:  # noqa: ANN001
    from cat_seg.data.synthetic import write_synthetic
    from cat_seg.lora import semla_target_modules
    from domain_orchestrator.generate_embeddings import main as generate
    from domain_orchestrator.synthetic import linear_shapes, write_random_adapter

    folder = tmp_path_factory.mktemp("san_world")
    root = folder / "data"
    write_synthetic("acdc", root, NUM_IMAGES, seed=0, conditions=["rain", "fog"])
    write_synthetic("muses", root, NUM_IMAGES, seed=1, conditions=["fog-day"])
    base = folder / "base.pth"
    torch.manual_seed(0)
    model = build_model(load_config(SAN_TINY), "cpu")
    save_checkpoint(model, base)
    library = folder / "loradb"
    common = [
        "MODEL.WEIGHTS", str(base),
        "MODEL.LORA.DB_PATH", str(library),
        "SOLVER.MAX_ITER", "3",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "0",  # (the tiny recipe's warm-up would leave the adapters near zero)
        "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    rain = [str(SAN_TINY), "1", str(folder / "out-acdc-rain"), *common, "MODEL.LORA.NAME", "acdc-rain"]
    _script("run_lora.sh", rain, root)
    muses = [
        "DATASETS.TRAIN", "('muses-fog-day_sem_seg_train',)",
        "DATASETS.TEST", "('muses-fog-day_sem_seg_val',)",
        "MODEL.LORA.NAME", "muses-fog-day",
    ]  # fmt: skip
    _script("run_lora.sh", [str(SAN_TINY), "1", str(folder / "out-muses"), *common, *muses], root)
    shapes = linear_shapes(model, semla_target_modules(model))
    write_random_adapter(library / "acdc-fog", shapes, seed=3, std=0.05)
    _script("eval_lora.sh", rain, root)
    sources = folder / "sources.yaml"
    sources.write_text("".join(f"- {s}\n" for s in SOURCES))
    targets = folder / "targets.yaml"
    targets.write_text("".join(f"- {t}\n" for t in TARGETS))
    with single_thread():
        status = generate(
            [
                "--source_domains",
                str(sources),
                "--lora_library_path",
                str(library),
                "--embedding_model",
                "catseg",
                "--model_weights",
                str(base),
                "--config_overlay",
                str(SAN_MODEL),
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
    return SanWorld(root, base, library, sources, targets, folder / "out-acdc-rain" / "eval")


@pytest.fixture(scope="module")
def four(san_world: SanWorld, tmp_path_factory) -> Path:  # noqa: ANN001
    """The four experiments on the three targets in one run (each target's adapter stays in the library)."""
    out = tmp_path_factory.mktemp("san_four")
    with single_thread():
        assert experiments_main()(san_world.args(out, *ALL)) == 0
    return out


def _val_files(world: SanWorld, target: str) -> list[str]:
    return [r["file_name"] for r in load_records(get_domain(target).val_dataset, world.root)]


def _target_model(world: SanWorld, target: str):  # noqa: ANN202
    cfg = target_config(target, model_weights=world.base, overlays=[SAN_MODEL])
    model = build_model(cfg, "cpu")
    assert isinstance(model, SAN)
    load_checkpoint(model, world.base)
    return cfg, model.eval()


def _same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        elif key == "num_images":
            assert a[key] == b[key]
        else:
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE), key


def _differ(a: dict, b: dict) -> bool:
    return any(
        isinstance(a[k], float) and not math.isnan(a[k]) and abs(a[k] - b[k]) > 10 * TOLERANCE for k in a
    )


def test_outputs_are_well_formed(san_world: SanWorld, four: Path) -> None:
    metrics = read_json(four / "metrics.json")
    assert list(metrics) == TARGETS
    for experiment in ALL:
        results = read_json(four / experiment / "results.json")
        assert list(results) == TARGETS
        for target, value in results.items():
            assert value == metrics[target][experiment]["IoU"]  # Cityscapes-convention targets
            assert 0.0 <= value <= 100.0
            assert metrics[target][experiment]["num_images"] == NUM_IMAGES
    uniform = read_json(four / "uniform" / "weights.json")
    assert list(uniform) == TARGETS
    for weights in uniform.values():
        assert list(weights) == SOURCES and weights == pytest.approx({s: 1 / 3 for s in SOURCES}, rel=1e-12)
    semla = read_json(four / "semla" / "weights.json")
    assert list(semla) == TARGETS
    for target in TARGETS:
        images = semla[target]
        expected = [Path(f).relative_to(san_world.root).as_posix() for f in _val_files(san_world, target)]
        assert list(images) == expected
        for entry in images.values():
            assert sorted(entry["adapters"]) == sorted(SOURCES)  # top_k 5 > 3 sources: all kept
            assert math.isclose(sum(entry["weights"]), 1.0, rel_tol=1e-12)
            assert all(w > 0 for w in entry["weights"])
            assert entry["weights"] == sorted(entry["weights"], reverse=True)
    assert not (four / "zeroshot" / "weights.json").exists()
    assert not (four / "oracle" / "weights.json").exists()
    run_config = read_json(four / "run_config.json")
    assert run_config["embedder"]["kind"] == "catseg"
    assert [a["name"] for a in run_config["adapters"]] == SOURCES
    # The adapters matter: the random acdc-fog adapter moves its target's numbers.
    assert _differ(metrics["acdc-fog"]["oracle"], metrics["acdc-fog"]["zeroshot"])


def test_oracle_equals_eval_lora(san_world: SanWorld, four: Path) -> None:
    """The oracle of acdc-rain (its adapter fused with weight 1) = eval_lora.sh with that adapter loaded."""
    evaluated = read_json(san_world.eval_dir / "inference" / "acdc-rain_sem_seg_val" / "metrics.json")
    metrics = read_json(four / "metrics.json")["acdc-rain"]
    _same_metrics(metrics["oracle"], evaluated["sem_seg"])
    assert _differ(metrics["oracle"], metrics["zeroshot"]), "the trained adapter must change the result"


def test_semla_weights_and_statistics_come_from_san_s_image_tower(san_world: SanWorld, four: Path) -> None:
    """weights.json = semla_weights(1 / ||x - p||, top 5, T 0.05), recomputed with SAN's CLIP image tower
    from the saved statistics, which are the mean embeddings of each source's training images."""
    from domain_orchestrator.embedding import load_embedder
    from domain_orchestrator.prototypes import read_statistics, read_statistics_metadata
    from domain_orchestrator.retrieval import scores, semla_weights

    _, model = _target_model(san_world, "acdc-rain")
    embedder = load_embedder("catseg", catseg_model=model)
    assert embedder.dim == 32  # the tiny CLIP's embedding width
    prototypes = []
    for source in SOURCES:
        folder = san_world.library / source
        assert read_statistics_metadata(folder, source)["embedder"] == embedder.identity
        prototypes.append(read_statistics(folder, source))
    files = [r["file_name"] for r in load_records(get_domain("muses-fog-day").train_dataset, san_world.root)]
    mean = embedder.embed_files(files, progress=False).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(prototypes[1], mean, rtol=1e-5, atol=1e-7)
    prototypes = torch.from_numpy(np.stack(prototypes))
    saved = read_json(four / "semla" / "weights.json")
    for target in TARGETS:
        embeddings = torch.from_numpy(
            embedder.embed_files(_val_files(san_world, target), batch_size=1, progress=False)
        )
        weights = semla_weights(scores(embeddings, prototypes, "euclidean"), 5, 0.05)
        for row, entry in zip(weights, saved[target].values()):
            expected = {SOURCES[i]: float(w) for i, w in enumerate(row) if w > 0}
            assert dict(zip(entry["adapters"], entry["weights"])) == pytest.approx(expected, rel=1e-9)


def test_uniform_equals_peft_merge_of_equal_weights(san_world: SanWorld, four: Path) -> None:
    """uniform on acdc-fog = PEFT add_weighted_adapter("cat") of the 3 sources at 1/3 on SAN, evaluated."""
    from peft import PeftModel

    cfg, model = _target_model(san_world, "acdc-fog")
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(model), san_world.library / SOURCES[0], adapter_name=SOURCES[0]
    )
    for name in SOURCES[1:]:
        peft_model.load_adapter(san_world.library / name, adapter_name=name)
    peft_model.add_weighted_adapter(SOURCES, [1 / 3] * 3, "merged", combination_type="cat")
    peft_model.set_adapter("merged")
    peft_model.eval()
    spec = get_dataset("acdc-fog_sem_seg_val")
    loader = [[mapper_from_cfg(cfg, is_train=False)(r)] for r in load_records(spec.name, san_world.root)]
    evaluator = SemSegEvaluator(19, 255, class_names=spec.class_names(), convention=spec.metric_convention)
    with single_thread():
        expected = inference_on_dataset(peft_model, loader, evaluator)["sem_seg"]
    metrics = read_json(four / "metrics.json")["acdc-fog"]
    _same_metrics(metrics["uniform"], expected)
    assert _differ(metrics["uniform"], metrics["zeroshot"])
