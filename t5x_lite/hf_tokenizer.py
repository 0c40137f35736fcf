"""An HF `tokenizer.json` (GPT-2, Llama 3, Qwen2, ...) as a decoding vocabulary.

`TokenizerJsonVocabulary` reads the file with the `tokenizers` library (HF's own reader of the
format; `pip install tokenizers`, or t5x_lite's `tokenizers` extra), so byte-level BPE,
pre-tokenizer regexes and added tokens behave as in HF. It has the interface `LoadedModel`
uses of a vocabulary (`encode` / `encode_batch` / `decode`, `vocab_size`,
`prompt_start_id`):

- `encode` gives the text's ids without the special tokens the file's post-processor adds.
  Those it puts *before* a text (Llama 3's `<|begin_of_text|>`) are the prompt's start id
  (`prompt_start_id`): at most one is supported. One it puts after a text (an EOS) would end
  every prompt. A tokenizer t5x_lite cannot follow so (that, or no `tokenizers` package) is an
  `UnsupportedTokenizer`: `t5x_lite.load` then warns and goes on with token ids only.
- The file is read as written, as the `tokenizers` package and transformers'
  `PreTrainedTokenizerFast` read it (transformers 5's `GPT2Tokenizer` / `Qwen2Tokenizer`
  classes rebuild parts of it: their own pre-tokenizer, `add_prefix_space`).
- Special tokens spelled in a text (`<|endoftext|>`) are read as those tokens, as in HF.
- `decode` ends at `eos_id` when given and drops special tokens (HF's
  `skip_special_tokens=True`).

Text in, ids out: for loading, decoding, scoring and few-shot evaluation from files; the
training data pipeline takes sentencepiece vocabularies (`t5x_lite.vocab`).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Union

from etils import epath

from t5x_lite import files
from t5x_lite.vocab import VocabularyError, ids_before_eos

PathLike = Union[str, os.PathLike]
_PROBE = "a"  # a text every tokenizer encodes to some ids, to read what the post-processor adds


class UnsupportedTokenizer(VocabularyError):
    """A readable tokenizer.json t5x_lite cannot use here (its post-processor's special tokens,
    no `tokenizers` package): the model still takes and gives token ids."""


class TokenizerJsonVocabulary:
    """An HF tokenizer.json (`path`), with `eos_id` the model's stop id (None: none).

    Picklable: the file's text travels with it.
    """

    extra_ids = 0
    t5_convention = False
    reads_special_tokens = True  # `<|eot_id|>` in a text is that token (chat templates' output)

    def __init__(self, path: PathLike, eos_id: int | None = None):
        path = epath.Path(path)
        if not path.is_file():
            raise VocabularyError(f"tokenizer file not found: {path}")
        self._init_from_text(_read_text(path), eos_id, str(path))
        self.path = path

    def _init_from_text(self, text: str, eos_id: int | None, source: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UnsupportedTokenizer(f"{source} needs the tokenizers package (pip install "
                                       "tokenizers)") from None
        try:
            tok = Tokenizer.from_str(text)
            # a saved file may carry truncation / padding, which HF's AutoTokenizer turns off:
            # kept, they cut prompts and pad rows with ids counted as text
            tok.no_truncation()
            tok.no_padding()
            plain = tok.encode(_PROBE, add_special_tokens=False).ids
            full = tok.encode(_PROBE, add_special_tokens=True).ids
        except Exception as e:  # the Rust reader raises its own Exception subclass
            raise VocabularyError(f"not a tokenizer.json that HF's tokenizers reads: {source} "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                  ) from None
        at = next((i for i in range(len(full) - len(plain) + 1)
                   if full[i:i + len(plain)] == plain), None)
        if not plain:
            raise UnsupportedTokenizer(f"{source}: it encodes the text {_PROBE!r} to no tokens")
        if at is None:
            raise UnsupportedTokenizer(f"{source}: its post-processor changes a text's own "
                                       "tokens; t5x_lite reads tokenizers that add special tokens "
                                       "around them")
        head, tail = full[:at], full[at + len(plain):]
        if len(head) > 1 or tail:
            raise UnsupportedTokenizer(
                f"{source}: its post-processor adds {len(head)} token(s) before a text and "
                f"{len(tail)} after it; t5x_lite supports one start token (a BOS) and none after")
        self._text, self._tok, self._eos = text, tok, eos_id
        self._token_bytes = None
        # the largest id + 1: ids need not be contiguous
        self._size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.add_bos, self.bos_id = bool(head), (head[0] if head else None)
        self.prompt_start_id = self.bos_id

    def __getstate__(self):
        return {"text": self._text, "eos_id": self._eos,
                "path": None if self.path is None else str(self.path)}

    def __setstate__(self, state):
        self._init_from_text(state["text"], state["eos_id"], "<pickle>")
        self.path = None if state["path"] is None else epath.Path(state["path"])

    def __repr__(self):
        return (f"TokenizerJsonVocabulary(path={self.path}, vocab_size={self.vocab_size}, "
                f"add_bos={self.add_bos})")

    @property
    def vocab_size(self) -> int:
        """Its largest id + 1 (added tokens included)."""
        return self._size

    @property
    def eos_id(self) -> int | None:
        return self._eos

    def encode(self, text: str, *, strict: bool = True) -> list[int]:
        """Token ids of `text`, without the post-processor's special tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str) or files.not_unicode(t)), None)
        if bad is not None:
            why = files.not_unicode(bad) if isinstance(bad, str) else "not a str"
            raise VocabularyError(f"Cannot tokenize {bad!r:.40}: {why}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: ends at the first `eos_id`; special tokens and ids past the
        tokenizer's are dropped."""
        ids_L = ids_before_eos(ids, self._eos)
        ids_L = ids_L[ids_L < self.vocab_size]
        return self._tok.decode(ids_L.tolist(), skip_special_tokens=True)

    def decode_batch(self, ids_batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in ids_batch]

    def token_bytes(self) -> tuple[bytes | None, ...]:
        """Each id's text as bytes (what stop strings match), as HF's `StopStringCriteria`
        reads a tokenizer: special tokens spelled as written ("<|im_end|>"); with a
        byte-level decoder (GPT-2's), a token's own bytes; with byte fallback, <0xNN> as its
        byte; else the token's text after a fixed text (so a leading space a decoder strips at
        the start stays). Ids without a token are None. Cached."""
        if self._token_bytes is None:
            tok = self._tok
            special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
            decoders = _types(json.loads(self._text).get("decoder"))
            base = tok.encode(_PREFIX, add_special_tokens=False).ids
            out = []
            for i in range(self._size):
                token = tok.id_to_token(i)
                if token is None:
                    out.append(None)
                elif i in special:
                    out.append(token.encode("utf-8"))
                elif "ByteFallback" in decoders and _BYTE_PIECE.fullmatch(token):
                    out.append(bytes([int(token[3:5], 16)]))
                elif "ByteLevel" in decoders and all(c in _BYTE_OF_CHAR for c in token):
                    out.append(bytes(_BYTE_OF_CHAR[c] for c in token))
                else:
                    text = tok.decode(base + [i], skip_special_tokens=False)
                    at = text.find(_PREFIX)
                    out.append((text[at + len(_PREFIX):] if at >= 0 else tok.decode([i])
                                ).encode("utf-8"))
            self._token_bytes = tuple(out)
        return self._token_bytes


def _types(decoder) -> set[str]:
    """The `type`s of a tokenizer.json decoder and of the decoders it holds."""
    if isinstance(decoder, dict):
        return {decoder.get("type"), *(t for v in decoder.values() for t in _types(v))}
    if isinstance(decoder, list):
        return {t for v in decoder for t in _types(v)}
    return set()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte: printable Latin-1 bytes are their own
    char; the other 68 are chr(256), chr(257), ... in byte order."""
    own = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in own]
    return {**{chr(b): b for b in own}, **{chr(256 + k): b for k, b in enumerate(moved)}}


_BYTE_OF_CHAR = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_PREFIX = "abcdef"  # decoded before a token, so that the token's text keeps its leading space


def _read_text(path: epath.Path) -> str:
    data = path.read_bytes()
    if not data:
        raise VocabularyError(f"vocabulary file is empty: {path}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise VocabularyError(f"not a tokenizer.json (not UTF-8 text): {path}") from None
