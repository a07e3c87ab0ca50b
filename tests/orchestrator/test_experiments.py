"""experiments.py end to end on the small world: outputs, oracles (eval_lora.sh, PEFT), resume, processes.

The world (``semla_world``): ACDC rain/fog, MUSES fog-day and ADE20K in their real layouts, 3 train and
3 validation images each; a tiny CAT-Seg base; adapters of acdc-rain, muses-fog-day and a150 trained
with run_lora.sh and a random acdc-fog adapter; statistics from a tiny random Hugging Face CLIP.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_testlib import single_thread
from semla_world import SOURCES, TARGETS, TINY_MODEL, World, experiments_main, read_json, val_files

from cat_seg.checkpoint import load_checkpoint
from cat_seg.data import get_dataset, load_records, mapper_from_cfg
from cat_seg.engine.evaluate import inference_on_dataset, label_prediction
from cat_seg.evaluation import SemSegEvaluator
from cat_seg.modeling import build_model
from domain_orchestrator.domains import get_domain
from domain_orchestrator.orchestrator import target_config
from domain_orchestrator.prototypes import read_statistics, read_statistics_metadata
from domain_orchestrator.retrieval import scores, semla_weights

pytestmark = pytest.mark.slow
ALL = ("zeroshot", "oracle", "uniform", "semla")


def _run(world: World, output: Path, *experiments: str, extra: tuple[str, ...] = ()) -> int:
    with single_thread():
        return experiments_main()(world.args(output, *experiments, extra=extra))


@pytest.fixture(scope="module")
def four(world: World, tmp_path_factory) -> Path:  # noqa: ANN001
    """All four experiments on the three targets, in one run (the target's adapter stays in the library)."""
    out = tmp_path_factory.mktemp("four")
    assert _run(world, out, *ALL) == 0
    return out


def _metric_key(target: str) -> str:
    return "IoU" if get_dataset(get_domain(target).val_dataset).metric_convention == "cityscapes" else "mIoU"


def test_outputs_are_well_formed(world: World, four: Path) -> None:
    metrics = read_json(four / "metrics.json")
    assert list(metrics) == TARGETS
    for experiment in ALL:
        results = read_json(four / experiment / "results.json")
        assert list(results) == TARGETS
        for target, value in results.items():
            assert value == metrics[target][experiment][_metric_key(target)]
            assert 0.0 <= value <= 100.0
            assert metrics[target][experiment]["num_images"] == 3
    assert "IoU" in metrics["acdc-rain"]["semla"] and "IoU" not in metrics["a150"]["semla"]
    uniform = read_json(four / "uniform" / "weights.json")
    assert uniform == {t: {s: 0.25 for s in SOURCES} for t in TARGETS}
    semla = read_json(four / "semla" / "weights.json")
    flat: dict[str, list[float]] = {}
    for target in TARGETS:
        images = semla[target]
        assert list(images) == [Path(f).relative_to(world.root).as_posix() for f in val_files(world, target)]
        for entry in images.values():
            assert sorted(entry["adapters"]) == sorted(SOURCES)  # top_k 5 > 4 sources: all kept
            assert math.isclose(sum(entry["weights"]), 1.0, rel_tol=1e-12)
            assert entry["weights"] == sorted(entry["weights"], reverse=True)
            for name, weight in zip(entry["adapters"], entry["weights"]):
                flat.setdefault(name, []).append(weight)
    assert read_json(four / "semla" / "weights_reference.json") == flat
    assert not (four / "zeroshot" / "weights.json").exists()
    # The printed table = results.json.
    rows = {line.split()[0]: line.split() for line in (four / "summary.txt").read_text().splitlines()[2:5]}
    for i, experiment in enumerate(ALL):
        for target in TARGETS:
            assert float(rows[target][2 + i]) == round(
                read_json(four / experiment / "results.json")[target], 2
            )
    run_config = read_json(four / "run_config.json")
    assert run_config["embedder"]["kind"] == "hf_clip"
    assert [a["name"] for a in run_config["adapters"]] == SOURCES
    assert not (four / "progress").exists() or not any((four / "progress").iterdir())


# Fused (ours) and PEFT compute the same sums in another order, so probabilities differ at float32
# rounding (~1e-7); the random tiny model has many near-ties between classes, so an argmax can flip on a
# handful of pixels, moving a percentage by ~1e-4. The adapters themselves move the numbers by 0.1-1 point.
TOLERANCE = 0.01  # percentage points


def _same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        elif key == "num_images":
            assert a[key] == b[key]
        else:
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE), key


def test_oracle_equals_eval_lora(world: World, four: Path) -> None:
    """The oracle of acdc-rain (its adapter fused with weight 1) = eval_lora.sh (PEFT-loaded adapter)."""
    evaluated = read_json(world.eval_dir / "inference" / "acdc-rain_sem_seg_val" / "metrics.json")["sem_seg"]
    _same_metrics(read_json(four / "metrics.json")["acdc-rain"]["oracle"], evaluated)


def _target_model(world: World, target: str):  # noqa: ANN202
    cfg = target_config(target, model_weights=world.base, overlays=[TINY_MODEL])
    model = build_model(cfg, "cpu")
    load_checkpoint(model, world.base)
    return cfg, model.eval()


def _peft(model, world: World):  # noqa: ANN001, ANN202
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(model), world.library / SOURCES[0], adapter_name=SOURCES[0]
    )
    for name in SOURCES[1:]:
        peft_model.load_adapter(world.library / name, adapter_name=name)
    return peft_model.eval()


def test_uniform_equals_peft_merge_of_equal_weights(world: World, four: Path) -> None:
    """uniform on a150 = PEFT add_weighted_adapter of the 4 sources at 1/4 ("cat"), evaluated the usual way."""
    expected = _peft_uniform_metrics(world, "cat")
    _same_metrics(read_json(four / "metrics.json")["a150"]["uniform"], expected)


def _peft_uniform_metrics(world: World, combination: str, **options: object) -> dict:
    """a150's metrics under PEFT's add_weighted_adapter of the 4 sources at 1/4, evaluated the usual way."""
    cfg, model = _target_model(world, "a150")
    peft_model = _peft(model, world)
    peft_model.add_weighted_adapter(SOURCES, [0.25] * 4, "merged", combination_type=combination, **options)
    peft_model.set_adapter("merged")
    spec = get_dataset("a150_sem_seg_val")
    records = load_records(spec.name, world.root)
    loader = [[mapper_from_cfg(cfg, is_train=False)(r)] for r in records]
    evaluator = SemSegEvaluator(150, 255, class_names=spec.class_names(), convention=spec.metric_convention)
    with single_thread():
        return inference_on_dataset(peft_model, loader, evaluator)["sem_seg"]


def test_semla_weights_equal_recomputation(world: World, four: Path) -> None:
    """weights.json = semla_weights(1 / ||x - p||, top 5, T 0.05) from the saved statistics and embeddings
    (computed one image per forward pass, as experiments.py does)."""
    from domain_orchestrator.embedding import load_embedder

    embedder = load_embedder(str(world.clip), device="cpu")
    prototypes = torch.from_numpy(np.stack([read_statistics(world.library / s, s) for s in SOURCES]))
    for source in SOURCES:
        assert read_statistics_metadata(world.library / source, source)["embedder"] == embedder.identity
    saved = read_json(four / "semla" / "weights.json")
    for target in TARGETS:
        embeddings = torch.from_numpy(
            embedder.embed_files(val_files(world, target), batch_size=1, progress=False)
        )
        weights = semla_weights(scores(embeddings, prototypes, "euclidean"), 5, 0.05)
        for row, entry in zip(weights, saved[target].values()):
            expected = {SOURCES[i]: float(w) for i, w in enumerate(row) if w > 0}
            assert dict(zip(entry["adapters"], entry["weights"])) == pytest.approx(expected, rel=1e-9)


def test_statistics_are_the_mean_embedding_of_the_training_images(world: World) -> None:
    from domain_orchestrator.embedding import load_embedder

    embedder = load_embedder(str(world.clip), device="cpu")
    files = [r["file_name"] for r in load_records("muses-fog-day_sem_seg_train", world.root)]
    expected = embedder.embed_files(files, progress=False).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(
        read_statistics(world.library / "muses-fog-day", "muses-fog-day"), expected, rtol=1e-6
    )
    metadata = read_statistics_metadata(world.library / "muses-fog-day", "muses-fog-day")
    assert metadata["num_images"] == 3 and metadata["dataset"] == "muses-fog-day_sem_seg_train"


def test_reference_text_policy_equals_the_original_peft_loop(world: World, tmp_path: Path) -> None:
    """--text_features reference on acdc-rain (3 images) = the original's loop: per image a PEFT
    add_weighted_adapter("cat") of the top-k with its weights, set_adapter, forward, delete; class-text
    features computed under the first image's merged adapter and reused."""
    targets = tmp_path / "targets.yaml"
    targets.write_text("- acdc-rain\n")
    args = world.args(
        tmp_path / "out", "semla", extra=("--text_features", "reference", "--remove_target_adapter")
    )
    args[args.index("--target_domains") + 1] = str(targets)
    with single_thread():
        assert experiments_main()(args) == 0
    ours = read_json(tmp_path / "out" / "metrics.json")["acdc-rain"]["semla"]
    saved = read_json(tmp_path / "out" / "weights.json")["acdc-rain"]
    assert all("acdc-rain" not in entry["adapters"] for entry in saved.values())  # leave-one-out

    cfg, model = _target_model(world, "acdc-rain")
    peft_model = _peft(model, world)
    base = peft_model.get_base_model()
    mapper = mapper_from_cfg(cfg, is_train=False)
    spec = get_dataset("acdc-rain_sem_seg_val")
    evaluator = SemSegEvaluator(19, 255, class_names=spec.class_names(), convention="cityscapes")
    text = None
    with single_thread(), torch.no_grad():
        for i, (record, entry) in enumerate(zip(load_records(spec.name, world.root), saved.values())):
            name = f"merged_{i}"
            peft_model.add_weighted_adapter(entry["adapters"], entry["weights"], name, combination_type="cat")
            peft_model.set_adapter(name)
            if text is None:
                text = base.text_features()  # the original's cache: the first image's adapters
            x = mapper(record)
            probs = base([x], text_features=text)[0]["sem_seg"]
            evaluator.process(label_prediction(probs, x["sem_seg"], resize_to_label=False), x["sem_seg"])
            peft_model.set_adapter(SOURCES[0])
            peft_model.delete_adapter(name)
    _same_metrics(ours, evaluator.evaluate()["sem_seg"])


def test_resume_after_an_interruption_gives_the_uninterrupted_outputs(
    world: World, four: Path, tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    import domain_orchestrator.loop as orchestrator

    calls = {"n": 0}
    real = orchestrator.label_prediction

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 4 * 3 + 4 * 1 + 2:  # target 2 (muses-fog-day), image 2, second experiment
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(orchestrator, "label_prediction", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(world, out, *ALL)
    monkeypatch.setattr(orchestrator, "label_prediction", real)
    assert list(read_json(out / "metrics.json")) == ["acdc-rain"]  # target 1 finished and written
    progress = torch.load(out / "progress" / "muses-fog-day.rank0.pt", weights_only=True)
    assert progress["position"] == 1 and progress["embeddings"].shape == (3, 16)
    assert _run(world, out, *ALL, extra=("--resume",)) == 0
    for name in [
        "metrics.json",
        *(f"{e}/results.json" for e in ALL),
        "uniform/weights.json",
        "semla/weights.json",
    ]:
        assert (out / name).read_bytes() == (four / name).read_bytes(), name
    assert not list((out / "progress").glob("*.pt"))
    # A finished run resumed again does nothing and leaves the outputs as they are.
    before = (out / "metrics.json").read_bytes()
    assert _run(world, out, *ALL, extra=("--resume",)) == 0
    assert (out / "metrics.json").read_bytes() == before


def test_two_processes_give_the_one_process_outputs(world: World, four: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(world, out, *ALL, extra=("--num_processes", "2")) == 0
    for name in [
        "metrics.json",
        *(f"{e}/results.json" for e in ALL),
        "uniform/weights.json",
    ]:
        assert (out / name).read_bytes() == (four / name).read_bytes(), name
    # SemLA's weights come from each process's own image embeddings: the same adapters, and weights equal to
    # float precision (on some CPUs a forked process's kernels round the last bits of an embedding
    # differently; the predictions, hence results.json and metrics.json above, are byte-identical).
    two, one = read_json(out / "semla/weights.json"), read_json(four / "semla/weights.json")
    assert two.keys() == one.keys()
    for target in one:
        assert two[target].keys() == one[target].keys()
        for image, entry in one[target].items():
            assert two[target][image]["adapters"] == entry["adapters"], (target, image)
            assert two[target][image]["weights"] == pytest.approx(entry["weights"], rel=1e-5, abs=1e-9)
    assert read_json(out / "run_config.json")["world_size"] == 2


def test_existing_outputs_need_resume_or_overwrite(world: World, four: Path, capsys) -> None:  # noqa: ANN001
    assert _run(world, four, "zeroshot") == 1
    err = capsys.readouterr().err
    assert "already holds results" in err and "--resume" in err and "Traceback" not in err
    assert json.loads((four / "run_config.json").read_text())["experiments"] == list(ALL)


def test_several_semla_configs_in_one_run_equal_separate_runs(world: World, tmp_path: Path) -> None:
    """Ablations: each --semla_config file is a semla-<stem> column of one pass, equal to its own run."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "top1.yaml").write_text("distance_measure_name: euclidean\ntemperature: 0.05\ntop_k: 1\n")
    (configs / "cos.yaml").write_text("distance_measure_name: cosine\ntemperature: 0.5\ntop_k: 2\n")
    together = tmp_path / "together"
    assert _run(world, together, "zeroshot", "semla", extra=("--semla_config", str(configs))) == 0
    metrics = read_json(together / "metrics.json")
    header = (together / "summary.txt").read_text().splitlines()[0].split()
    assert header == ["target", "metric", "zeroshot", "semla-cos", "semla-top1"]
    assert read_json(together / "run_config.json")["semla_config"]["semla-top1"]["top_k"] == 1
    for stem in ("cos", "top1"):
        alone = tmp_path / stem
        assert _run(world, alone, "semla", extra=("--semla_config", str(configs / f"{stem}.yaml"))) == 0
        assert (alone / "weights.json").read_bytes() == (
            together / f"semla-{stem}" / "weights.json"
        ).read_bytes()
        assert (alone / "results.json").read_bytes() == (
            together / f"semla-{stem}" / "results.json"
        ).read_bytes()
        single = read_json(alone / "metrics.json")
        assert {t: m["semla"] for t, m in single.items()} == {
            t: m[f"semla-{stem}"] for t, m in metrics.items()
        }
    # --resume reads the columns back
    assert _run(world, together, "zeroshot", "semla", extra=("--semla_config", str(configs), "--resume")) == 0
    assert read_json(together / "metrics.json") == metrics


@pytest.mark.parametrize(
    ("combination", "options"),
    [("ties", {"density": 0.5}), ("svd", {"svd_rank": 3}), ("linear", {})],
)
def test_uniform_with_a_merging_type_equals_peft(
    world: World, tmp_path: Path, combination: str, options: dict
) -> None:
    """uniform with combination_type ties / svd / linear on a150 = PEFT add_weighted_adapter of the 4
    sources at 1/4 with that type, evaluated the usual way (the merge runs once per target)."""
    config = tmp_path / f"{combination}.yaml"
    config.write_text(
        f"combination_type: {combination}\n" + "".join(f"{k}: {v}\n" for k, v in options.items())
    )
    out = tmp_path / "out"
    targets = tmp_path / "targets.yaml"
    targets.write_text("- a150\n")
    args = world.args(out, "uniform", extra=("--semla_config", str(config)))
    args[args.index("--target_domains") + 1] = str(targets)
    with single_thread():
        assert experiments_main()(args) == 0
    expected = _peft_uniform_metrics(world, combination, **options)
    _same_metrics(read_json(out / "metrics.json")["a150"]["uniform"], expected)
