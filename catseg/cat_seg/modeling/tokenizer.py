"""CLIP's byte-level BPE tokenizer, without importing ``open_clip``.

The rules are those of OpenAI CLIP as open_clip's default tokenizer applies them (``open_clip.tokenize``,
``SimpleTokenizer(clean="lower")``), and the result equals it token for token (``tests/test_tokenizer.py``):

1. clean: ``ftfy.fix_text``, HTML entities unescaped twice, whitespace runs collapsed to one space and the
   ends stripped, lower case;
2. split into words: the special tokens, the English contractions ``'s 't 're 've 'm 'll 'd``, runs of
   letters, single digits, runs of anything else that is not whitespace;
3. each word as UTF-8 bytes, each byte mapped to a printable character, the last one marked with ``</w>``,
   then merged pair by pair, lowest merge rank first (byte-pair encoding);
4. ``<start_of_text>`` + tokens + ``<end_of_text>``; a longer sequence is cut to the context length with
   ``<end_of_text>`` as its last token; shorter ones are padded with zeros.

Why our own module: ``import open_clip`` imports all of open_clip's models, ``transformers`` and ``timm``
(many seconds, several times torch's own import on a 2-core machine), which every command that tokenises
class names paid for 200 lines of text handling. The vocabulary is the file the installed ``open_clip``
package ships (a declared dependency), found without importing the package, so it is the very file the
oracle reads. ``regex`` (Unicode classes ``\\p{L}``, ``\\p{N}``) and ``ftfy`` are imported when a tokenizer is
first built: together about 0.2 s, paid only by code that tokenises.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
# CLIP's vocabulary: 256 byte symbols, the same 256 ending a word, 48,894 merges, 2 special tokens = 49,408.
_NUM_MERGES = 49152 - 256 - 2


def default_vocab_path() -> Path:
    """The BPE merge list shipped with the installed ``open_clip`` package (the package is not imported).

    Raises:
        FileNotFoundError: ``open_clip_torch`` is not installed, or its package lacks the file.
    """
    # find_spec of a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    where = ", ".join(folders) if folders else "open_clip is not installed"
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILE} not found ({where}); install open_clip_torch or pass vocab_path"
    )


@functools.lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """The printable character standing for each byte value, indexed by the byte (CLIP's reversible map).

    Bytes that are printable Latin-1 characters stand for themselves; the 68 others (control characters,
    space, soft hyphen, ...) get the characters U+0100 onwards, in byte order, so that no symbol is
    whitespace and the BPE merge list can be a plain text file.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return tuple(symbols[b] for b in range(256))


def _vocabulary_order() -> list[str]:
    """The 256 byte symbols in the order CLIP's vocabulary lists them (printable ones first)."""
    symbols = byte_symbols()
    printable = [b for b in range(256) if symbols[b] == chr(b)]
    others = [b for b in range(256) if symbols[b] != chr(b)]
    return [symbols[b] for b in printable + others]


class ClipTokenizer:
    """CLIP BPE tokenizer: texts -> (N, context_length) int64 token ids.

    Args:
        vocab_path: gzipped BPE merge list (CLIP's ``bpe_simple_vocab_16e6.txt.gz``); default: the one
            the installed ``open_clip`` package ships.
    """

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        # Imported here, not at module level: only code that tokenises pays for them (see module docstring).
        import ftfy
        import regex

        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}") from None
        # Line 0 is a version header; CLIP uses the first 48,894 merges of the file.
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: expected {_NUM_MERGES} merges of two symbols after the header line")
        base = _vocabulary_order()
        vocab = [
            *base,
            *(s + END_OF_WORD for s in base),
            *("".join(m) for m in merges),
            START_OF_TEXT,
            END_OF_TEXT,
        ]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.merge_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_id = self.encoder[START_OF_TEXT]
        self.eot_id = self.encoder[END_OF_TEXT]
        self._specials = {START_OF_TEXT: self.sot_id, END_OF_TEXT: self.eot_id}
        self._byte_symbols = byte_symbols()
        self._fix_text: Callable[[str], str] = ftfy.fix_text
        # CLIP's word pattern, case-insensitive as in the original (it matters only for the literal
        # alternatives, the text is lower case by then). Special tokens come first, so that a literal
        # "<end_of_text>" in a text becomes that token, as in CLIP.
        self._words = regex.compile(
            rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|\p{{L}}+|\p{{N}}|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._bpe_cache: dict[str, list[int]] = {}
        logger.debug("CLIP tokenizer: %d tokens from %s", len(self.encoder), path)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49,408 for CLIP)."""
        return len(self.encoder)

    def clean(self, text: str) -> str:
        """CLIP's text normalisation: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _bpe(self, word: str) -> list[int]:
        """Token ids of one pre-tokenised word (cached: class names repeat across prompts)."""
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        if word in self._specials:
            ids = [self._specials[word]]
        else:
            symbols = [self._byte_symbols[b] for b in word.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            ranks = self.merge_ranks
            while len(symbols) > 1:
                # The adjacent pair merged earliest in CLIP's training; stop when no pair is in the list.
                best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, _NUM_MERGES))
                if best not in ranks:
                    break
                merged, i = [], 0
                while i < len(symbols):  # every occurrence of the pair, left to right, non-overlapping
                    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                        merged.append(symbols[i] + symbols[i + 1])
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            ids = [self.encoder[s] for s in symbols]
        self._bpe_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end-of-text tokens and without truncation."""
        ids: list[int] = []
        for word in self._words.findall(self.clean(text)):
            ids.extend(self._bpe(word))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tensor:
        """Token ids of each text, as CLIP's text tower takes them.

        Args:
            texts: one text or a sequence of N texts.
            context_length: tokens per row, >= 1 (CLIP: 77). A longer text is cut to this length and its
                last token replaced by ``<end_of_text>``.
        Returns:
            (N, context_length) int64: ``<start_of_text>``, the text's tokens, ``<end_of_text>``, zeros.
        """
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        result = torch.zeros(len(texts), context_length, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            result[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return result


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The tokenizer with open_clip's vocabulary, built once per process (reading the file takes ~0.1 s)."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tensor:
    """CLIP BPE tokens, (N, context_length) int64; equals ``open_clip.tokenize(texts, context_length)``."""
    return default_tokenizer()(texts, context_length)
