"""Every Python block of the README and of ``docs/*.md`` runs as written.

The files are read in a fixed order, README.md first, then ``docs/*.md`` by name (``docs/datasets.md``
writes the synthetic dataset that ``docs/library.md`` embeds). Blocks run in that order, each in a fresh
namespace, from the repository root. A block that needs the released weights or real data carries a marker
on the line before it::

    <!-- readme-test {"replace": {"<text in the block>": "<text to run instead>", ...}} -->

and runs with its paths replaced by tiny equivalents: ``{tiny_checkpoint}`` (a tiny CAT-Seg checkpoint),
``{tiny_hf_clip}`` (a tiny random Hugging Face CLIP folder) and ``{tmp}`` (a temporary folder).

A shell block marked ``<!-- readme-test-sh {...} -->`` is run by its own test (the own-domain walk).
Failures name the file and line of the block (``docs/library.md:42``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, build_tiny, write_tiny_hf_clip

README = REPO_ROOT / "README.md"


def documentation_files() -> list[Path]:
    """README.md, then every ``docs/*.md`` by name: the order the blocks run in."""
    return [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]


BLOCK = re.compile(r"(?:<!-- readme-test (?P<marker>\{.*?\}) -->\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks(text: str) -> list[tuple[int, str, dict]]:
    """``(line, code, marker)`` of each fenced Python block, in order."""
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        marker = json.loads(match.group("marker")) if match.group("marker") else {}
        blocks.append((line, match.group("code"), marker))
    return blocks


def _where(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


# (where, line, code, marker) of every Python block, ``where`` the file relative to the repository root.
BLOCKS = [
    (_where(path), line, code, marker)
    for path in documentation_files()
    for line, code, marker in python_blocks(path.read_text(encoding="utf-8"))
]


def test_the_readme_has_its_examples() -> None:
    # The front page holds no Python; the examples live with their topics in docs/.
    assert len(BLOCKS) >= 7
    per_file = Counter(where for where, _, _, _ in BLOCKS)
    for where, at_least in {
        "docs/model.md": 1,
        "docs/configuration.md": 1,
        "docs/datasets.md": 1,
        "docs/library.md": 3,
        "docs/evaluation.md": 1,
    }.items():
        assert per_file[where] >= at_least, f"{where}: {per_file[where]} Python blocks"
    for where, line, _, marker in BLOCKS:
        assert set(marker) <= {"replace"}, (
            f"{where}:{line}: unknown marker keys {sorted(set(marker) - {'replace'})}"
        )


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:  # noqa: ANN001
    """What marked blocks use instead of the released weights and real data."""
    from cat_seg.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("readme")
    save_checkpoint(build_tiny(), folder / "model_final.pth")
    return {
        "tiny_checkpoint": str(folder / "model_final.pth"),
        "tiny_hf_clip": str(write_tiny_hf_clip(folder / "clip")),
        "tmp": str(folder),
    }


@pytest.mark.slow
def test_every_python_block_runs(stand_ins: dict[str, str], monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(REPO_ROOT)
    for where, line, code, marker in BLOCKS:
        for old, new in marker.get("replace", {}).items():
            assert old in code, f"{where}:{line}: marker text {old!r} is not in the block"
            code = code.replace(old, new.format(**stand_ins))
        namespace: dict = {"__name__": "__readme__"}
        try:
            exec(compile(code, f"{where}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as e:  # noqa: BLE001 - name the block that failed
            pytest.fail(f"the Python block at {where}:{line} failed: {type(e).__name__}: {e}")
        if "outputs" in namespace and "fused_adapters" in namespace:  # the fusion example's result
            assert len(namespace["outputs"]) == 2
            assert namespace["outputs"][0]["sem_seg"].shape == (19, 40, 40)
            assert torch.allclose(namespace["w"].sum(dim=1), torch.ones(2, dtype=torch.float64))


SH_BLOCK = re.compile(r"<!-- readme-test-sh (?P<marker>\{.*?\}) -->\n```bash\n(?P<code>.*?)```", re.S)


def shell_blocks(text: str) -> list[tuple[int, str, dict]]:
    """``(line, code, marker)`` of each marked shell block (``<!-- readme-test-sh {...} -->``)."""
    return [
        (text.count("\n", 0, m.start("code")) + 1, m.group("code"), json.loads(m.group("marker")))
        for m in SH_BLOCK.finditer(text)
    ]


@pytest.mark.slow
def test_adding_your_own_domain_runs_as_written(tmp_path) -> None:  # noqa: ANN001
    """The own-domain walk of ``docs/own_domain.md``: validate, run_lora.sh on the spec, statistics from a folder, the four
    experiments over the new domain and two built-in ones, demo.py; run as written (``uv run`` dropped, the
    test's interpreter first on PATH) and checked."""
    import os
    import subprocess
    import sys

    blocks = [
        (_where(path), *block)
        for path in documentation_files()
        for block in shell_blocks(path.read_text(encoding="utf-8"))
        if "--layout own" in block[1]
    ]
    assert len(blocks) == 1, (
        f"one marked shell block with --layout own, found {[f'{w}:{n}' for w, n, _, _ in blocks]}"
    )
    where, line, code, marker = blocks[0]
    for old, new in marker.get("replace", {}).items():
        assert old in code, f"{where}:{line}: marker text {old!r} is not in the block"
        code = code.replace(old, new.format(tmp=tmp_path))
    code = code.replace("uv run ", "")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("DETECTRON2_DATASETS", None)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    done = subprocess.run(
        ["bash", "-e", "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"{where}:{line} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    D = tmp_path / "semla_own"
    domains = ["acdc-rain", "acdc-fog", "floods"]
    for experiment in ("zeroshot", "uniform", "semla", "oracle"):
        assert list(json.loads((D / "results" / experiment / "results.json").read_text())) == domains
    metrics = json.loads((D / "results" / "metrics.json").read_text())
    assert [k for k in metrics["floods"]["zeroshot"] if k.startswith("IoU-")] == [
        "IoU-water",
        "IoU-road",
        "IoU-sky",
    ]
    assert (
        "IoU-road" in metrics["acdc-rain"]["zeroshot"] and "IoU-water" not in metrics["acdc-rain"]["zeroshot"]
    )
    weights = json.loads((D / "results" / "semla" / "weights.json").read_text())["floods"]
    assert len(weights) == 3
    for entry in weights.values():
        assert set(entry["adapters"]) <= set(domains) and abs(sum(entry["weights"]) - 1) < 1e-9
    from domain_orchestrator.prototypes import read_statistics_metadata

    made = read_statistics_metadata(D / "loradb" / "floods", "floods")
    assert made["embedder"]["kind"] and made["num_images"] == 6
    assert (D / "loradb" / "floods" / "adapter_config.json").is_file()
    predictions = json.loads((D / "predictions" / "predictions.json").read_text())
    assert predictions[0]["method"] == "semla" and set(predictions[0]["classes"]) <= {"water", "road", "sky"}
    assert "floods_0000.jpg: " in done.stdout and "weights: " in done.stdout
