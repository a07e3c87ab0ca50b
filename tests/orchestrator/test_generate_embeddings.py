"""generate_embeddings.py: what it writes, what it keeps, the catseg embedder, and its errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from engine_testlib import single_thread
from semla_world import TINY_MODEL, World, experiments_main, read_json

from cat_seg.checkpoint import load_checkpoint
from cat_seg.data import load_records
from domain_orchestrator.generate_embeddings import main as generate
from domain_orchestrator.prototypes import read_statistics, read_statistics_metadata, statistics_path

pytestmark = pytest.mark.slow


def _args(world: World, library: Path, embedding_model: str, *extra: str) -> list[str]:
    return [
        "--source_domains", str(world.sources),
        "--lora_library_path", str(library),
        "--embedding_model", embedding_model,
        "--datasets_root", str(world.root),
        "--device", "cpu",
        "--num_workers", "0",
        "--no_progress",
        *extra,
    ]  # fmt: skip


def _row(table: str, domain: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.startswith(domain + " "))


def test_existing_statistics_are_kept_unless_overwrite(world: World, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    library = Path(shutil.copytree(world.library, tmp_path / "loradb"))
    path = statistics_path(library / "a150", "a150")
    before = path.read_bytes()
    (library / "bdd").mkdir()  # a domain without statistics yet
    sources = tmp_path / "sources.yaml"
    sources.write_text("- a150\n- mv\n")
    args = _args(world, library, str(world.clip))
    args[args.index("--source_domains") + 1] = str(sources)
    # mv has no data in this world: refused before any embedding, naming the dataset
    assert generate(args) == 1
    assert "mv: mv_sem_seg_train is not usable" in capsys.readouterr().err
    sources.write_text("- a150\n")
    with single_thread():
        assert generate(args) == 0
    assert _row(capsys.readouterr().out, "a150") == ["a150", "kept", "-"]
    assert path.read_bytes() == before
    with single_thread():
        assert generate([*args, "--overwrite"]) == 0
    assert _row(capsys.readouterr().out, "a150") == ["a150", "written", "3"]
    np.testing.assert_array_equal(
        read_statistics(library / "a150", "a150"), read_statistics(world.library / "a150", "a150")
    )


def test_catseg_statistics_and_a_semla_run_with_them(world: World, tmp_path: Path) -> None:
    """--embedding_model catseg: CAT-Seg's own image tower makes the prototypes and embeds the test images."""
    from domain_orchestrator.embedding import load_embedder
    from domain_orchestrator.orchestrator import target_config

    library = Path(shutil.copytree(world.library, tmp_path / "loradb"))
    args = _args(world, library, "catseg", "--overwrite", "--model_weights", str(world.base))
    args += ["--config_overlay", str(TINY_MODEL)]
    with single_thread():
        assert generate(args) == 0
    from cat_seg.modeling import build_model

    model = build_model(target_config("acdc-rain", model_weights=world.base, overlays=[TINY_MODEL]), "cpu")
    load_checkpoint(model, world.base)
    embedder = load_embedder("catseg", catseg_model=model.eval())
    files = [r["file_name"] for r in load_records("acdc-fog_sem_seg_train", world.root)]
    expected = embedder.embed_files(files, progress=False).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(
        read_statistics(library / "acdc-fog", "acdc-fog"), expected, rtol=1e-5, atol=1e-7
    )
    assert read_statistics_metadata(library / "acdc-fog", "acdc-fog")["embedder"] == embedder.identity
    assert embedder.dim == 32  # the tiny CLIP's embedding width

    out = tmp_path / "out"
    run = world.args(out, "semla")
    run[run.index("--lora_library_path") + 1] = str(library)
    run[run.index("--embedding_model") + 1] = "catseg"
    with single_thread():
        assert experiments_main()(run) == 0
    weights = read_json(out / "weights.json")
    assert set(weights) == {"acdc-rain", "muses-fog-day", "a150"}
    assert read_json(out / "run_config.json")["embedder"]["kind"] == "catseg"
    for images in weights.values():
        for entry in images.values():
            assert sum(entry["weights"]) == pytest.approx(1.0)
