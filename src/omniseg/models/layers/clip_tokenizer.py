"""CLIP's byte-level BPE tokeniser (Radford et al. 2021), the one OneFormer's task and class texts use.

The vocabulary is data, not code: the ``bpe_simple_vocab_16e6.txt.gz`` merges file that
``open_clip_torch`` installs (found without importing ``open_clip``, whose import is slow), or any
path given. Texts are cleaned as CLIP does (HTML unescaped, whitespace collapsed, lower-cased),
split by CLIP's pattern, byte-encoded and merged; :meth:`ClipTokenizer.tokenize` frames them with
start / end of text and zero-pads to ``context_length`` -- the ids Hugging Face's
``OneFormerProcessor`` feeds the model (its CLIP tokeniser's ids times the attention mask).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ClipTokenizer", "default_bpe_path", "default_tokenizer"]

_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def default_bpe_path() -> Path:
    """The merges file shipped in ``open_clip_torch`` (``FileNotFoundError`` without it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CLIP's BPE vocabulary comes with open_clip_torch: pip install open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip_torch installation")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible map of the 256 bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


class ClipTokenizer:
    """``encode(text) -> ids`` and ``tokenize(texts) -> (N, context_length) int64``."""

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        import regex  # CLIP's pattern needs Unicode classes (\p{L}); a dependency of open_clip_torch

        lines = gzip.open(bpe_path or default_bpe_path()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP's 48,894 merges
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        self._bpe = functools.lru_cache(maxsize=10000)(self._merge)

    def _merge(self, token: str) -> tuple[str, ...]:
        """The BPE pieces of one pre-token: lowest-rank pair merged first, ``</w>`` ends the word."""
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:], strict=True))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    @staticmethod
    def clean(text: str) -> str:
        try:  # CLIP repairs mojibake with ftfy when it is there (it is a dependency of open_clip_torch)
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).lower()

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token))
        return ids

    def tokenize(self, texts: str | Sequence[str], context_length: int = 77) -> Tensor:
        """Start of text, the ids, end of text, zeros: ``(len(texts), context_length)``; a text too
        long is cut and still ends with end of text (as CLIP's and HF's truncation do)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text)][: context_length - 1] + [self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """One shared tokeniser of :func:`default_bpe_path` (reading the merges takes a moment)."""
    return ClipTokenizer()
