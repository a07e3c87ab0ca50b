"""Class-name prompts and tokenisation (CLIP's BPE tokenizer, ``tokenizer.py``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .tokenizer import tokenize as clip_tokenize

_TEMPLATES_FILE = Path(__file__).with_name("prompt_templates.json")


@functools.lru_cache(maxsize=1)
def _all_templates() -> dict[str, list[str]]:
    with open(_TEMPLATES_FILE, encoding="utf-8") as f:
        data = json.load(f)
    return {k: list(v) for k, v in data.items() if isinstance(v, list)}


def prompt_templates(kind: str) -> list[str]:
    """Prompt templates of ``MODEL.PROMPT_ENSEMBLE_TYPE``.

    Args:
        kind: ``single`` ("A photo of a {} in the scene", CAT-Seg (L)), ``imagenet`` (CLIP's 80
            ImageNet templates) or ``imagenet_select`` (CAT-Seg's subset of 8).
    Returns:
        templates, each with one ``{}`` for the class name.
    """
    templates = _all_templates()
    if kind not in templates:
        raise ValueError(f"MODEL.PROMPT_ENSEMBLE_TYPE must be one of {sorted(templates)}, got {kind!r}")
    return templates[kind]


def tokenize(texts: Sequence[str], context_length: int = 77) -> Tensor:
    """CLIP BPE tokens, (N, context_length) int64, start/end-of-text added, zero padded.

    Equals ``open_clip.tokenize``; our own tokenizer, so that tokenising does not import open_clip.
    """
    return clip_tokenize(list(texts), context_length)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """One prompt per (class, template), class-major.

    A class name with synonyms separated by ``", "`` uses only the first synonym, as CAT-Seg's text
    encoder does at training and test time.

    Returns:
        T * P prompts: ``[t0(c0), t1(c0), ..., t0(c1), ...]``.
    """
    prompts = []
    for name in class_names:
        first = name.split(", ")[0]
        prompts.extend(template.format(first) for template in templates)
    return prompts


def tokenize_class_names(
    class_names: Sequence[str], templates: Sequence[str], context_length: int = 77
) -> Tensor:
    """Tokens of every (class, template) prompt.

    Returns:
        (T, P, context_length) int64.
    """
    if not class_names:
        raise ValueError("the class-name list is empty")
    tokens = tokenize(class_prompts(class_names, templates), context_length)
    return tokens.reshape(len(class_names), len(templates), context_length).to(torch.int64)


def load_class_names(path: str | Path) -> list[str]:
    """Read a class-name JSON list (index = train id = output channel)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"class-name file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: expected a non-empty JSON list of class-name strings")
    return names
