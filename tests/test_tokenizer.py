"""Our CLIP BPE tokenizer against ``open_clip.tokenize`` (the oracle), and commands that never import open_clip.

The oracle is open_clip's own ``tokenizer.py`` (where ``open_clip.tokenize`` is defined), loaded from the
installed package by path: importing the ``open_clip`` package would import transformers and all of its
models (many seconds) for a module that needs none of them.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import REPO_ROOT, TINY_CONFIG

from cat_seg.modeling.text import class_prompts, prompt_templates, tokenize_class_names
from cat_seg.modeling.tokenizer import VOCAB_FILE, ClipTokenizer, default_vocab_path, tokenize

CLASS_JSONS = sorted((REPO_ROOT / "catseg" / "datasets").glob("*.json"))
TEMPLATES_FILE = REPO_ROOT / "catseg" / "cat_seg" / "modeling" / "prompt_templates.json"


@pytest.fixture(scope="module")
def oracle() -> Callable[..., torch.Tensor]:
    """``open_clip.tokenize``, from the installed package's ``tokenizer.py`` (see the module docstring)."""
    package = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    # open_clip re-exports this very function as open_clip.tokenize.
    assert "from .tokenizer import SimpleTokenizer, tokenize" in (package / "__init__.py").read_text()
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_oracle", package / "tokenizer.py")
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tokenize


def _assert_same(texts: list[str], oracle: Callable[..., torch.Tensor], context_length: int = 77) -> None:
    ours, theirs = tokenize(texts, context_length), oracle(texts, context_length=context_length)
    assert ours.dtype == theirs.dtype == torch.int64
    assert ours.shape == theirs.shape == (len(texts), context_length)
    differ = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
    assert not differ, (
        f"{len(differ)} texts differ, first {texts[differ[0]]!r}: {ours[differ[0]]} vs {theirs[differ[0]]}"
    )


def _class_names() -> list[str]:
    """Every class name of every class JSON, in file order, without repeats (1,387 names)."""
    names: dict[str, None] = {}
    for path in CLASS_JSONS:
        names.update(dict.fromkeys(json.loads(path.read_text(encoding="utf-8"))))
    return list(names)


def _all_templates() -> list[str]:
    data = json.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))
    return list(
        dict.fromkeys(t for templates in data.values() if isinstance(templates, list) for t in templates)
    )


def test_vocabulary_is_found_without_importing_open_clip() -> None:
    assert default_vocab_path().name == VOCAB_FILE
    assert default_vocab_path().is_file()
    assert ClipTokenizer().vocab_size == 49408


def test_every_class_name_and_every_template(oracle: Callable[..., torch.Tensor]) -> None:
    names, templates = _class_names(), _all_templates()
    assert len(names) > 1000 and len(templates) > 80
    # Every name alone and under three templates (in rotation, so each template meets ~50 names), plus
    # every template applied to the punctuation-laden names: ~5,800 strings, not all 120,000 pairs.
    prompts = list(names)
    for i, name in enumerate(names):
        prompts.extend(templates[(i * k + k) % len(templates)].format(name) for k in (1, 7, 31))
    odd = [n for n in names if any(not c.isalnum() and c != " " for c in n)][:20]
    prompts.extend(t.format(n) for n in odd for t in templates)
    _assert_same(prompts, oracle)


def test_class_prompt_tokens_as_the_model_builds_them(oracle: Callable[..., torch.Tensor]) -> None:
    names = json.loads((REPO_ROOT / "catseg" / "datasets" / "ade150.json").read_text(encoding="utf-8"))
    templates = prompt_templates("imagenet_select")
    tokens = tokenize_class_names(names, templates)
    expected = oracle(class_prompts(names, templates)).reshape(len(names), len(templates), 77)
    assert torch.equal(tokens, expected)


EDGE_CASES = [
    "",
    " ",
    "\t\n\r \u3000\u00a0",
    "a",
    "A",
    "road",
    "Traffic Light",
    "a photo of a road.",
    # unicode: accents (composed and combining), CJK, Korean, Arabic, Hebrew, Devanagari, Thai, emoji
    "café naïve façade résumé Zürich",
    "cafe\u0301 nai\u0308ve",
    "東京タワー 北京 서울",
    "مرحبا بالعالم שלום",
    "नमस्ते दुनिया สวัสดี",
    "🚗🚕🚙 🏳️‍🌈 👩‍👩‍👧‍👦 🇫🇷🇩🇪",
    "ﬁsh ﬂower Ａｂｃ１２３",
    "Ⅻ ½ ² ³ ٣ ๓",
    # text that ftfy repairs (mojibake, curly quotes, control characters)
    "cafÃ© Ã¼ber â€œquotedâ€\x9d",
    "“smart” ‘quotes’ — dashes – …",
    "bell\x07 null\x00 escape\x1b[31m",
    # HTML entities, also double-escaped
    "fish &amp; chips &lt;b&gt; &quot;x&quot; &#39;y&#39; &#x263A; &nbsp;",
    "&amp;amp; &amp;lt;tag&amp;gt;",
    "&amp;amp;amp;lt; three times",  # ftfy unescapes once, then twice more
    "<p> &amp;amp;lt; </p>",  # with markup ftfy leaves entities alone
    "<b>bold</b> <br/>",
    # contractions, digits, punctuation runs
    "it's they'll WE'RE I'd you've I'm can't",
    "'s's'S 't 'T",
    "it'ſ that'ſt",  # long s: matches the contraction 's only case-insensitively, as in CLIP
    "3.14159 2024-01-01 1,000,000 ½",
    "!!!???... ---*** ((([[[{{{}}}]]]))) ,,,;;;:::",
    "a.b.c a-b-c a_b_c a/b\\c",
    "@#$%^&*()_+=~`|<>",
    # special tokens written in the text
    "<start_of_text>",
    "<end_of_text> hi <START_OF_TEXT> there",
    "<<end_of_text>>",
    # odd whitespace
    "  lots\t\tof \n\n spaces  ",
    "zero\u200bwidth\u200cjoiners\u200d",
    "line\u2028separator\u2029paragraph",
]


def _long_texts() -> list[str]:
    words = "the quick brown fox jumps over the lazy dog near a road with cars".split()
    return [
        " ".join(words * 10),
        "x" * 500,
        "supercalifragilisticexpialidocious " * 20,
        "🚗" * 100,
        "東" * 200,
        "a " * 76,  # exactly 76 words: 78 tokens with start and end
        "a " * 75,  # exactly 77 tokens
        "a " * 74,
    ]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Seeded strings drawn from a pool mixing ASCII, accents, CJK, emoji, whitespace and entities."""
    pool = [
        *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        *" .,;:!?'\"-_()[]{}/\\@#$%^&*+=<>|~`",
        *"éèêëàâäôöûüçñßøåæœ",
        *"東京北京서울",
        *"🚗🙂👍🏽",
        "\t", "\n", "\u00a0", "\u3000",
        "&amp;", "&lt;", "&#39;", "'s", "'ll", "<end_of_text>", " road", " sky",
    ]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choices(pool, k=rng.randint(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("context_length", [77, 1, 2, 3, 8, 16, 100])
def test_edge_cases_long_texts_and_context_lengths(
    context_length: int, oracle: Callable[..., torch.Tensor]
) -> None:
    texts = [*EDGE_CASES, *_long_texts(), *_random_texts(150, seed=context_length)]
    _assert_same(texts, oracle, context_length)


def test_random_texts(oracle: Callable[..., torch.Tensor]) -> None:
    _assert_same(_random_texts(1500), oracle)


def test_truncation_keeps_end_of_text_last_and_padding_is_zero() -> None:
    tok = ClipTokenizer()
    long = tok(["word " * 100], 77)[0]
    assert long[0] == tok.sot_id and long[-1] == tok.eot_id and (long != 0).all()
    short = tok("road", 10)[0]
    assert short[0] == tok.sot_id and short[2] == tok.eot_id and (short[3:] == 0).all()
    assert tok([], 77).shape == (0, 77)
    with pytest.raises(ValueError, match="context_length"):
        tok(["road"], 0)


def test_missing_vocabulary_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        ClipTokenizer(tmp_path / "nope.txt.gz")


HEAVY = ("open_clip", "transformers", "peft")

# Each step runs in one fresh interpreter, in order; after each, the heavy modules loaded so far are recorded.
_IMPORT_PROBE = textwrap.dedent(
    """
    import json, runpy, sys
    HEAVY = {heavy!r}
    seen = {{}}

    def record(step):
        seen[step] = sorted(m for m in (*HEAVY, "torch._dynamo") if m in sys.modules)

    def main_of(argv, run):
        sys.argv = argv
        try:
            run()
        except SystemExit:
            pass

    import cat_seg.modeling
    record("import cat_seg.modeling")
    from cat_seg.config import load_config
    from cat_seg.modeling import build_model
    cfg = load_config({config!r})
    build_model(cfg, "meta")
    record("build_model(tiny, 'meta') with class names")
    build_model(cfg, "cpu")
    record("build_model(tiny, 'cpu') with class names")
    main_of(["validate", "--help"], lambda: runpy.run_module("cat_seg.data.validate", run_name="__main__"))
    record("python -m cat_seg.data.validate --help")
    main_of(["train_net.py", "--help"], lambda: runpy.run_path({train_net!r}, run_name="__main__"))
    record("train_net.py --help")
    import domain_orchestrator.fusion, domain_orchestrator.library
    record("import domain_orchestrator.library/fusion")
    print(json.dumps(seen))
    """
)


def test_commands_do_not_import_open_clip_or_transformers() -> None:
    """Start-up (DESIGN.md §6): nothing here loads an open_clip or Hugging Face model, so nothing imports them.

    ``torch._dynamo`` is checked too: on the meta device some random-init ops import it (seconds).
    """
    probe = _IMPORT_PROBE.format(
        heavy=HEAVY, config=str(TINY_CONFIG), train_net=str(REPO_ROOT / "catseg" / "train_net.py")
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) == 6
    assert all(not loaded for loaded in seen.values()), seen
