"""The command lines and the documentation agree: every flag of each tool is in its flag table, and back.

Each tool's table follows a marker line, ``<!-- flags: <tool> -->``, in README.md or one of ``docs/*.md``
(exactly one such line per tool over all of them), and ends at the first blank line. Every long option of the tool's parser must appear in backticks in the first column of a row
(an alias may share its main flag's row); every ``--flag`` written anywhere in the table must be one the
parser accepts (no stale rows). The help of every flag with a default states it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO_ROOT

README = REPO_ROOT / "README.md"
# The documentation: the front page, then every docs/*.md by name.
DOCS = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
CODE = re.compile(r"`([^`]*)`")
CELL = re.compile(r"(?<!\\)\|")
# Spellings argparse accepts as unique prefixes of a flag (``allow_abbrev``) that the docs mention.
ALIASES: dict[str, set[str]] = {}
# Flags of other commands that a table mentions (torchrun's, in experiments.py's --num_processes row).
FOREIGN = {"experiments.py": {"--nproc_per_node"}}


def _script(folder: Path, name: str):  # noqa: ANN202 - a module
    """A script outside the packages (``experiments.py``, ``demo.py``, ``train_net.py``) as a module."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return __import__(name)


def _with_debug(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser as ``main`` uses it: ``cat_seg.data``'s commands add ``--debug`` there."""
    from cat_seg.cli import add_debug_flag

    if "--debug" not in parser._option_string_actions:
        add_debug_flag(parser)
    return parser


def _validate() -> argparse.ArgumentParser:
    from cat_seg.data import validate

    return _with_debug(validate.build_parser())


def _synthetic() -> argparse.ArgumentParser:
    from cat_seg.data import synthetic

    return _with_debug(synthetic.build_parser())


def _generate_embeddings() -> argparse.ArgumentParser:
    from domain_orchestrator import generate_embeddings

    return generate_embeddings.build_parser()


def _web() -> argparse.ArgumentParser:
    from semla_demo import web

    return web.build_parser("demo.py --web")


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "experiments.py": lambda: _script(REPO_ROOT, "experiments").build_parser(),
    "generate_embeddings.py": _generate_embeddings,
    "train_net.py": lambda: _script(REPO_ROOT / "catseg", "train_net").build_parser(),
    "cat_seg.data.validate": _validate,
    "cat_seg.data.synthetic": _synthetic,
    "demo.py": lambda: _script(REPO_ROOT, "demo").build_parser(),
    "demo.py --web": _web,
    "train_library.py": lambda: _script(REPO_ROOT, "train_library").build_parser(),
}


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    """The parser's ``--`` option strings, ``--help`` left out."""
    return {
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def flag_table(docs: dict[str, str], tool: str) -> list[str]:
    """The lines after ``<!-- flags: <tool> -->`` up to the first blank line; ``docs``: ``{file: text}``."""
    marker = f"<!-- flags: {tool} -->"
    found = [
        (where, i)
        for where, text in docs.items()
        for i, line in enumerate(text.splitlines())
        if line.strip() == marker
    ]
    assert len(found) == 1, (
        f"README.md and docs/*.md must have exactly one {marker!r} line, found {len(found)}: "
        f"{[f'{where}:{i + 1}' for where, i in found]}"
    )
    where, start = found[0]
    table = []
    for line in docs[where].splitlines()[start + 1 :]:
        if not line.strip():
            break
        table.append(line)
    assert len(table) >= 3 and all(line.startswith("|") for line in table), (
        f"{where}:{start + 1}: no table after {marker}"
    )
    return table


def documented_flags(table: list[str]) -> set[str]:
    """``--flags`` in backticks in the first column of the table's rows (the header rows have none)."""
    flags: set[str] = set()
    for line in table:
        first = CELL.split(line)[1]
        for code in CODE.findall(first):
            flags.update(FLAG.findall(code))
    return flags


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    """``{file relative to the repository root: text}`` of README.md and docs/*.md."""
    return {path.relative_to(REPO_ROOT).as_posix(): path.read_text(encoding="utf-8") for path in DOCS}


@pytest.mark.parametrize("tool", list(PARSERS))
def test_every_flag_is_in_the_docs_table_of_its_tool(tool: str, docs: dict[str, str]) -> None:
    parser_flags = long_options(PARSERS[tool]())
    missing = sorted(parser_flags - documented_flags(flag_table(docs, tool)))
    assert not missing, f"{tool}: flags without a row in the table after <!-- flags: {tool} -->: {missing}"


@pytest.mark.parametrize("tool", list(PARSERS))
def test_every_flag_of_a_docs_table_exists(tool: str, docs: dict[str, str]) -> None:
    parser = PARSERS[tool]()
    known = long_options(parser)
    for alias in ALIASES.get(tool, ()):  # argparse takes a unique prefix of a flag
        assert parser.allow_abbrev and len([f for f in known if f.startswith(alias)]) == 1, alias
    named = set(FLAG.findall("\n".join(flag_table(docs, tool))))
    stale = sorted(named - known - ALIASES.get(tool, set()) - FOREIGN.get(tool, set()))
    assert not stale, f"{tool}: the table after <!-- flags: {tool} --> names flags the parser lacks: {stale}"


@pytest.mark.parametrize("tool", list(PARSERS))
def test_help_states_every_default(tool: str) -> None:
    undocumented = [
        action.option_strings[0]
        for action in PARSERS[tool]()._actions
        if action.option_strings
        and action.default not in (None, False, [], argparse.SUPPRESS)
        and "default" not in (action.help or "").lower()
    ]
    assert not undocumented, f"{tool}: --help does not give the default of {undocumented}"


def test_the_wrappers_pass_only_train_net_flags() -> None:
    known = long_options(PARSERS["train_net.py"]())
    for script in ("run_lora.sh", "eval_lora.sh", "run.sh", "eval.sh"):
        named = set(FLAG.findall((REPO_ROOT / "catseg" / script).read_text(encoding="utf-8")))
        assert named and named <= known, f"{script}: not train_net.py flags: {sorted(named - known)}"


def test_target_domains_all_lists_every_source_domain_in_order(docs: dict[str, str]) -> None:
    from cat_seg.data.registry import DOMAINS
    from domain_orchestrator.domains import read_domain_list

    configs = REPO_ROOT / "configs"
    everything = read_domain_list(configs / "target_domains_all.yaml")
    assert everything == read_domain_list(configs / "source_domains.yaml")
    assert len(everything) == 20 and set(everything) <= set(DOMAINS)
    # the main-table command, on the front page and in docs/experiments.md, evaluates all 20 domains
    for where in ("README.md", "docs/experiments.md"):
        assert "--target_domains configs/target_domains_all.yaml" in docs[where], where
