"""Text ↔ token ids with the file's embedded Hugging Face `tokenizer.json`, through the `tokenizers` library: the
exact tokenizer the model was trained with, no reimplementation (spec/EVALUATION.md §5).

The tokenizer.json comes with the file, so it is checked: under MAX_JSON_CHARS before the library reads it; then
parsed once, by the library (a second parse in Python would add to the time to first token, runtime/README.md),
whose tokenizer must have a model of a known type; its padding and truncation are switched off before anything is
encoded (the runtime encodes one text at a time and never pads or truncates it; a fixed padding length of 2^31 made
the library allocate 8 GiB and abort); it must encode a sample text at load; and whatever the library raises
(including a Rust panic, which is not an Exception, and whose report the library prints itself: dropped while the
tokenizer loads) becomes one NQRunError line.
"""
from __future__ import annotations

import os
import secrets
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nqfmt import TokenizerInfo
from nqfmt.errors import one_line

from .errors import NQRunError

# End-of-turn markers of the supported families; each one the vocabulary holds also ends a generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")
MODEL_TYPES = ("BPE", "WordPiece", "WordLevel", "Unigram")
MAX_JSON_CHARS = 256 << 20
# A text longer than context × (longest token's characters) × this factor cannot fit the context: it is refused
# before tokenization (tokenizing 10 MB takes gigabytes). The factor covers normalizers that shrink text.
_SLACK = 4


def _library_error(e: BaseException) -> bool:
    """Whatever the tokenizers library raises on bad input: any Exception, and pyo3's PanicException (a
    BaseException) for a Rust panic."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def check_size(text: str) -> str:
    """The file's tokenizer.json, refused in one line when it is longer than MAX_JSON_CHARS."""
    if len(text) > MAX_JSON_CHARS:
        raise NQRunError(f"the file's tokenizer.json has {len(text)} characters, more than {MAX_JSON_CHARS}")
    return text


class Tokenizer:
    def __init__(self, info: TokenizerInfo) -> None:
        self._json = check_size(info.json)
        with _library_stderr_dropped():  # a Rust panic prints its own report there before it is raised
            self._tok = _load(self._json)
            self._encode("Hello, world! 123", "the file's tokenizer cannot encode text")
        self.bos_id, self.eos_id, self.add_bos = info.bos_id, info.eos_id, info.add_bos
        stops = {self._tok.token_to_id(t) for t in END_OF_TURN} - {None}
        self.stop_ids = frozenset(stops | ({self.eos_id} if self.eos_id is not None else set()))
        added = self._tok.get_added_tokens_decoder()
        self.special = {tid: t.content for tid, t in added.items() if t.special}  # id -> text of special tokens
        self._plain = None  # the plain-text tokenizer of encode_chat, made on first use
        self._plain_lock = threading.Lock()
        self._longest: int | None = None

    def encode(self, text: str, add_bos: bool | None = None, context: int | None = None) -> list[int]:
        """Ids of `text` (special tokens written in the text are recognised); a BOS in front when the file says the
        model expects one (or when add_bos says so). With `context`, a text too long to fit that many tokens is
        refused before it is tokenized."""
        self.check_length(text, context)
        ids = self._encode(text).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def check_length(self, text: str, context: int | None) -> None:
        if context is not None and len(text) > self.max_chars(context):
            raise NQRunError(f"the prompt has {len(text)} characters, more than a context of {context} tokens can "
                             f"hold (shorten it, or raise --ctx up to the model's)")

    def max_chars(self, context: int) -> int:
        """The most characters a text of `context` tokens can have (with slack): longer ones are refused unread."""
        if self._longest is None:
            self._longest = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        return context * max(self._longest, 1) * _SLACK

    def encode_chat(self, text: str, literals: dict[str, str]) -> list[int]:
        """Ids of a rendered chat prompt whose message strings had their special-token text replaced by the
        placeholders in `literals` (placeholder -> the text it stands for, see `protect`): special tokens the
        template wrote are special tokens; the text in messages is tokenized as plain text, as if special-token
        matching were off for it, so a message cannot forge a turn."""
        if not any(p in text for p in literals):
            return self._encode(text).ids
        enc = self._encode(text)
        ids, offsets = enc.ids, enc.offsets
        out: list[int] = []
        piece_start, char_start = 0, 0
        for i, tid in enumerate([*ids, None]):
            if tid is not None and tid not in self.special:
                continue
            char_end = offsets[i][0] if tid is not None else len(text)
            piece = text[char_start:char_end]
            if any(p in piece for p in literals):
                for placeholder, literal in literals.items():
                    piece = piece.replace(placeholder, literal)
                out += self._plain_ids(piece, first=char_start == 0)
            else:
                out += ids[piece_start:i]
            if tid is not None:
                out.append(tid)
                piece_start, char_start = i + 1, offsets[i][1]
        return out

    def protect(self, value: Any) -> tuple[Any, dict[str, str]]:
        """`value` (chat messages) with the text of every special token in every string replaced by a placeholder
        no text contains, and placeholder -> text (for `encode_chat`)."""
        nonce = secrets.token_hex(8)
        literals = {f"\ue000{nonce}{i}\ue001": text for i, text in enumerate(
            sorted(set(self.special.values()), key=len, reverse=True))}
        by_text = {text: p for p, text in literals.items()}

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                for text, placeholder in by_text.items():
                    v = v.replace(text, placeholder)
                return v
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [walk(x) for x in v]
            return v

        return walk(value), literals

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        try:
            return self._tok.decode(list(ids), skip_special_tokens=skip_special)
        except BaseException as e:
            if not _library_error(e):
                raise
            raise NQRunError(f"the file's tokenizer cannot decode these ids ({one_line(e)})") from None

    def token_text(self, token_id: int | None) -> str:
        """The literal text of a token (for chat templates' bos_token / eos_token), '' when absent."""
        return (self._tok.id_to_token(token_id) or "") if token_id is not None else ""

    def _encode(self, text: str, what: str = "the file's tokenizer cannot encode this text"):
        if not isinstance(text, str):
            raise NQRunError(f"text must be a string, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise NQRunError(f"the text is not valid UTF-8 (an undecodable byte at character {e.start})") from None
        try:
            return self._tok.encode(text, add_special_tokens=False)
        except BaseException as e:
            if not _library_error(e):
                raise
            raise NQRunError(f"{what} ({one_line(e)})") from None

    def _plain_ids(self, text: str, first: bool) -> list[int]:
        """`text` tokenized with special-token matching off, as a piece of a longer text (`first`: its first piece;
        a later piece follows a sentinel token, so pre-tokenizers that treat the start of the text specially see it
        as they do inside the whole)."""
        from tokenizers import AddedToken

        with self._plain_lock:
            if self._plain is None:
                plain = _load(self._json)
                plain.encode_special_tokens = True
                self._sentinel = f"\ue000{secrets.token_hex(8)}\ue001"
                plain.add_tokens([AddedToken(self._sentinel, special=False, normalized=False)])
                self._sentinel_id = plain.token_to_id(self._sentinel)
                self._plain = plain
        ids = self._plain.encode(text if first else self._sentinel + text, add_special_tokens=False).ids
        if first:
            return ids
        if not ids or ids[0] != self._sentinel_id:
            raise NQRunError("the file's tokenizer splits chat text in a way the runtime cannot follow")
        return ids[1:]


@contextmanager
def _library_stderr_dropped() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (the library writes there directly, bypassing sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _load(text: str):
    """The library's tokenizer of `text`, with a model of a known type, never padding or truncating."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_str(text)
    except BaseException as e:
        if not _library_error(e):
            raise
        raise NQRunError(f"the file's tokenizer.json cannot be loaded ({one_line(e)})") from None
    kind = type(tok.model).__name__
    if kind not in MODEL_TYPES:
        raise NQRunError(f"the file's tokenizer.json has no model of a known type (found {kind!r}; known: "
                         f"{', '.join(MODEL_TYPES)})")
    tok.no_padding()
    tok.no_truncation()
    return tok


class TextStream:
    """Turns generated ids into text pieces as they come. Decoding token by token splits multi-byte characters and
    breaks byte-level merges, so each step decodes a short window and emits only text that is complete (a trailing
    U+FFFD means an unfinished UTF-8 sequence: wait for the next token)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids up to here are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self._prefix:self._read])
        now = self.tok.decode(self.ids[self._prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end)."""
        before = self.tok.decode(self.ids[self._prefix:self._read])
        now = self.tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return now[len(before):]
