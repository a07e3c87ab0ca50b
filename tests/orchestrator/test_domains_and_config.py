"""The domain table, domain lists, semla_config.yaml and the output files' formats (no model needed)."""

from __future__ import annotations

import json

import pytest

from cat_seg.config import load_config
from cat_seg.data import get_dataset, list_domains
from domain_orchestrator.domains import DomainError, UnknownDomainError, get_domain, read_domain_list
from domain_orchestrator.orchestrator import ExperimentError, SemlaConfig, load_semla_config
from domain_orchestrator.reporting import ImageWeights, ResultsBook, format_summary


@pytest.mark.parametrize("name", list_domains())
def test_domain_config_names_its_datasets(name: str) -> None:
    domain = get_domain(name)
    cfg = load_config(domain.config_file)
    assert cfg.DATASETS.TRAIN == (domain.train_dataset,)
    assert cfg.DATASETS.TEST == (domain.val_dataset,)
    assert cfg.MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON == get_dataset(domain.val_dataset).class_json
    assert domain.train_spec.domain == domain.val_spec.domain == name


def test_the_original_table() -> None:
    # Spot checks against the original get_domain_args table (config paths relative to catseg/).
    expected = {
        "acdc-rain": "configs/acdc/rain/lora-rain-acdc.yaml",
        "muses-fog-night": "configs/muses/fog/muses-fog-night.yaml",
        "cs-normal": "configs/cityscapes/normal/lora-normal.yaml",
        "coconutL": "configs/coconutL/coconutL.yaml",
    }
    for name, config in expected.items():
        assert get_domain(name).config_file.as_posix().endswith("catseg/" + config)
    assert len(list_domains()) == 20


def test_unknown_domain_lists_known_ones() -> None:
    with pytest.raises(
        UnknownDomainError,
        match=r"unknown domain 'acdc-rian'; did you mean acdc-rain.*known domains: .*coconutL",
    ):
        get_domain("acdc-rian")
    with pytest.raises(UnknownDomainError, match=r"known domains: acdc-fog"):
        get_domain("cs-rain-25mm")  # unusable in the original (no registered dataset)


def test_read_domain_list(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "d.yaml"
    path.write_text("- acdc-rain\n# - bdd\n- mv\n")
    assert read_domain_list(path) == ["acdc-rain", "mv"]
    path.write_text("- acdc-rain\n- foo\n- acdc-rain\n")
    with pytest.raises(UnknownDomainError, match=r"d.yaml: unknown domain 'foo'.*repeated: acdc-rain"):
        read_domain_list(path)
    path.write_text("acdc-rain: 1\n")
    with pytest.raises(DomainError, match="expected a YAML list"):
        read_domain_list(path)
    path.write_text("[]\n")
    with pytest.raises(DomainError, match="empty"):
        read_domain_list(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        read_domain_list(tmp_path / "nope.yaml")


def test_semla_config_keys(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "semla.yaml"
    # The original's shipped file: distance_measure_name (which its code ignored).
    path.write_text("distance_measure_name: cosine\ntemperature: 0.05\ntop_k: 5\ncombination_type: cat\n")
    assert load_semla_config(path) == SemlaConfig("cosine", 0.05, 5, "cat")
    path.write_text("similarity_measure_name: cosine\n")  # the key the original code read
    assert load_semla_config(path).measure == "cosine"
    path.write_text("distance_measure_name: euclidean\nsimilarity_measure_name: euclidean\ntop_k: 3\n")
    assert load_semla_config(path) == SemlaConfig("euclidean", 0.05, 3, "cat")
    assert load_semla_config(None) == SemlaConfig("euclidean", 0.05, 5, "cat")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("temprature: 0.1\n", r"unknown key 'temprature'; did you mean 'temperature'\?"),
        ("distance_measure_name: cosine\nsimilarity_measure_name: euclidean\n", "disagree"),
        ("distance_measure_name: manhattan\n", "must be 'euclidean' or 'cosine'"),
        ("temperature: 0\n", "temperature must be a number > 0, got 0"),
        ("temperature: fast\n", "temperature must be a number > 0"),
        ("top_k: 0\n", "top_k must be an integer >= 1, got 0"),
        ("top_k: 2.5\n", "top_k must be an integer >= 1"),
        ("combination_type: average\n", "combination_type 'average' is not one of PEFT's: cat, linear, svd"),
        ("combination_type: ties\n", "combination_type ties needs a density"),
        ("combination_type: svd\nsvd_rank: 0\n", "svd_rank must be an integer >= 1, got 0"),
        ("combination_type: dare_ties\ndensity: 1.5\n", r"density must be a number in \[0, 1\], got 1.5"),
        ("combination_type: ties\ndensity: 0.5\nmajority_sign_method: most\n", "must be total or frequency"),
        ("density: 0.5\n", "density do\\(es\\) nothing with combination_type cat"),
        ("- a\n", "expected a mapping"),
    ],
)
def test_semla_config_errors(tmp_path, text: str, message: str) -> None:  # noqa: ANN001
    path = tmp_path / "semla.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError, match=message):
        load_semla_config(path)


def test_semla_config_reports_every_problem(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "semla.yaml"
    path.write_text("topk: 3\ntemperature: -1\ncombination_type: linaer\n")
    with pytest.raises(ExperimentError) as info:
        load_semla_config(path)
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("3 problems:")


def _book() -> ResultsBook:
    book = ResultsBook(["zeroshot", "semla"], ["acdc-rain", "mv", "bdd"], ["acdc-rain", "mv", "bdd"])
    book.add_target(
        "acdc-rain",
        {"zeroshot": {"IoU": 40.0, "mIoU": 41.0}, "semla": {"IoU": 50.0, "mIoU": 52.0}},
        semla=[
            ImageWeights("acdc/a.png", ("mv", "bdd"), (0.75, 0.25)),
            ImageWeights("acdc/b.png", ("bdd",), (1.0,)),
        ],
    )
    book.add_target(
        "mv",
        {"zeroshot": {"mIoU": 20.0}, "semla": {"mIoU": 30.5}},
        semla=[ImageWeights("mv/c.jpg", ("acdc-rain", "bdd"), (0.6, 0.4))],
    )
    return book


def test_results_files(tmp_path) -> None:  # noqa: ANN001
    book = _book()
    book.write(tmp_path)
    # Several experiments: one folder each, files in the original's shapes.
    assert json.loads((tmp_path / "zeroshot" / "results.json").read_text()) == {"acdc-rain": 40.0, "mv": 20.0}
    assert json.loads((tmp_path / "semla" / "results.json").read_text()) == {"acdc-rain": 50.0, "mv": 30.5}
    assert json.loads((tmp_path / "semla" / "weights_reference.json").read_text()) == {
        "mv": [0.75],
        "bdd": [0.25, 1.0, 0.4],
        "acdc-rain": [0.6],
    }
    weights = json.loads((tmp_path / "semla" / "weights.json").read_text())
    assert weights["acdc-rain"]["acdc/a.png"] == {"adapters": ["mv", "bdd"], "weights": [0.75, 0.25]}
    assert (tmp_path / "semla" / "results.json").read_text().startswith('{\n    "acdc-rain"')  # indent=4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mv"]["semla"] == {"mIoU": 30.5}
    again = ResultsBook.load(
        tmp_path, experiments=book.experiments, targets=book.targets, sources=book.sources
    )
    assert again.finished() == ["acdc-rain", "mv"]
    assert again.semla == book.semla and again.metrics == book.metrics
    # One experiment: the files in the folder itself.
    single = ResultsBook(["zeroshot"], ["mv"], [])
    single.add_target("mv", {"zeroshot": {"mIoU": 1.5}})
    single.write(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "results.json").read_text()) == {"mv": 1.5}


def test_summary_table() -> None:
    table = format_summary(_book())
    lines = table.splitlines()
    assert lines[0].split() == ["target", "metric", "zeroshot", "semla"]
    assert lines[2].split() == ["acdc-rain", "IoU", "40.00", "50.00"]
    assert lines[3].split() == ["mv", "mIoU", "20.00", "30.50"]
    assert lines[4].split() == ["bdd", "-", "-", "-"]
    assert lines[6].split() == ["mean", "30.00", "40.25"]  # (40 + 20) / 2, (50 + 30.5) / 2
    assert "2 of 3 targets finished" in lines[7]


def test_semla_config_with_a_merging_type(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "semla.yaml"
    path.write_text("combination_type: ties_svd\ndensity: 0.5\nsvd_rank: 4\ntop_k: 3\n")
    config = load_semla_config(path)
    assert config.combination_type == "ties_svd" and dict(config.merge) == {"svd_rank": 4, "density": 0.5}
    assert config.as_dict()["density"] == 0.5
    spec = config.combination()
    assert (spec.combination_type, spec.density, spec.svd_rank) == ("ties_svd", 0.5, 4)
    assert load_semla_config(None).combination() is None  # cat: fusion's own exact sum
