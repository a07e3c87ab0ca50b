"""Domains of your own in the orchestrator's tools: domain lists, statistics from a folder, messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import write_tiny_hf_clip
from semla_world import experiments_main

from cat_seg.data.registry import get_dataset
from cat_seg.data.synthetic import write_own_domain
from domain_orchestrator.domains import DomainError, get_domain, read_domain_list, register_spec_folder
from domain_orchestrator.generate_embeddings import main as generate
from domain_orchestrator.prototypes import (
    load_prototypes,
    read_statistics,
    read_statistics_metadata,
    write_statistics,
)


@pytest.fixture
def own(tmp_path: Path) -> Path:
    return write_own_domain(tmp_path / "own", num_train=4, num_val=2, seed=1)


def test_a_domain_list_may_name_spec_files_beside_builtin_domains(own: Path, tmp_path: Path) -> None:
    listing = tmp_path / "domains.yaml"
    listing.write_text(f"- acdc-rain\n- {own.relative_to(tmp_path)}\n")  # relative to the list's folder
    assert read_domain_list(listing) == ["acdc-rain", "floods"]
    domain = get_domain("floods")
    assert domain.config_file == own and domain.val_dataset == "floods_sem_seg_val"
    assert get_dataset(domain.train_dataset).class_names() == ["water", "road", "sky"]
    listing.write_text("- acdc-rain\n- missing.yaml\n- floods\n- flods\n")
    with pytest.raises(DomainError) as e:
        read_domain_list(listing)
    assert (
        "domain spec" in str(e.value)
        and "domain spec not found: " in str(e.value)
        and "missing.yaml" in str(e.value)
    )


def test_a_folder_of_specs_registers_each_and_reports_every_bad_one(own: Path, tmp_path: Path) -> None:
    assert register_spec_folder(own.parent) == ["floods"]
    (own.parent / "bad.yaml").write_text(
        "name: mv\nclasses: floods/classes.json\nval: {images: a, labels: b}\n"
    )
    (own.parent / "worse.yaml").write_text("name: w\n")
    with pytest.raises(ValueError) as e:
        register_spec_folder(own.parent)
    assert (
        "bad.yaml" in str(e.value)
        and "'mv' is a built-in domain" in str(e.value)
        and "worse.yaml" in str(e.value)
    )


def test_one_problem_of_one_file_given_twice_is_reported_once_naming_both_flags(
    tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    listing = tmp_path / "domains.yaml"
    listing.write_text("- acdc-rain\n- floods\n")
    status = experiments_main()(
        ["--experiment", "uniform", "--source_domains", str(listing), "--target_domains", str(listing),
         "--datasets_root", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    lines = [line for line in err.splitlines() if "unknown domain 'floods'" in line]
    assert len(lines) == 1, err
    assert "--source_domains and --target_domains" in lines[0] and str(listing) in lines[0]
    assert "--domain_specs DIR" in lines[0]


def test_statistics_without_an_embedder_mixed_with_ones_that_record_it_are_refused(tmp_path: Path) -> None:
    identity = {"kind": "test", "name": "e", "dim": 4, "digest": "abc"}
    write_statistics(tmp_path / "a", "a", np.ones(4), {"embedder": identity})
    write_statistics(tmp_path / "b", "b", np.zeros(4))  # no identity (the original's files)
    found = load_prototypes(tmp_path, ["a", "b"], identity, spec="E")
    assert found.vectors is None
    assert any(
        "statistics of b" in p and "record no embedder" in p and "--overwrite" in p for p in found.problems
    )
    only_original = load_prototypes(
        tmp_path, ["b"], identity, spec="E"
    )  # all without: accepted, as the original
    assert only_original.problems == [] and only_original.unverified == ["b"]
    missing = load_prototypes(tmp_path, ["a", "c"], identity, spec="E")
    assert any("generate_embeddings.py --images" in p and "--name c" in p for p in missing.problems)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf_clip(tmp_path_factory.mktemp("clip") / "clip")


def _generate(*args: str) -> list[str]:
    return [*args, "--device", "cpu", "--num_workers", "0", "--no_progress"]


def test_statistics_from_a_folder_record_the_embedder_and_equal_those_of_the_spec(
    own: Path,
    tmp_path: Path,
    tiny_clip: Path,
    capsys,  # noqa: ANN001
) -> None:
    library = tmp_path / "loradb"
    images = own.parent / "floods" / "train" / "images"
    common = ["--lora_library_path", str(library), "--embedding_model", str(tiny_clip)]
    assert generate(_generate("--images", str(images), *common)) == 1
    assert "--images needs --name" in capsys.readouterr().err
    assert generate(_generate("--images", str(images), "--name", "floods", *common)) == 0
    assert "floods  written" in capsys.readouterr().out
    metadata = read_statistics_metadata(library / "floods", "floods")
    assert metadata["embedder"]["name"] and metadata["num_images"] == 4 and metadata["dataset"] is None
    assert read_statistics(library / "floods", "floods").shape[0] == metadata["embedder"]["dim"]
    from_folder = read_statistics(library / "floods", "floods")
    # the same statistics through the domain's spec: the same images, the same mean
    listing = tmp_path / "sources.yaml"
    listing.write_text(f"- {own}\n")
    assert generate(_generate("--source_domains", str(listing), *common, "--overwrite")) == 0
    np.testing.assert_allclose(read_statistics(library / "floods", "floods"), from_folder, rtol=1e-6)
    assert read_statistics_metadata(library / "floods", "floods")["dataset"] == "floods_sem_seg_train"
    assert generate(_generate("--source_domains", str(listing), *common, "--name", "x")) == 1
    assert "--name goes with --images" in capsys.readouterr().err


def test_kept_statistics_without_identity_beside_new_ones_are_refused(
    own: Path,
    tmp_path: Path,
    tiny_clip: Path,
    capsys,  # noqa: ANN001
) -> None:
    library = tmp_path / "loradb"
    write_statistics(library / "old", "old", np.ones(8))  # the original's file: no embedder recorded
    listing = tmp_path / "sources.yaml"
    (tmp_path / "old.yaml").write_text(
        "name: old\nclasses: own/floods/classes.json\ntrain: {images: own/floods/train/images, "
        "labels: own/floods/train/labels}\n"
    )
    listing.write_text(f"- old.yaml\n- {own}\n")
    common = ["--lora_library_path", str(library), "--embedding_model", str(tiny_clip)]
    assert generate(_generate("--source_domains", str(listing), *common)) == 1
    err = capsys.readouterr().err
    assert "statistics of old" in err and "record no embedder" in err and "--overwrite" in err
    assert not (library / "floods").exists()  # nothing written
    assert generate(_generate("--source_domains", str(listing), *common, "--overwrite")) == 0
    assert (
        read_statistics_metadata(library / "old", "old")["embedder"]["dim"]
        == read_statistics(library / "old", "old").shape[0]
    )
