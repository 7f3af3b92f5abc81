"""Text ↔ token ids with the file's embedded Hugging Face `tokenizer.json`, through the `tokenizers` library: the
exact tokenizer the model was trained with, no reimplementation (spec/EVALUATION.md §5)."""
from __future__ import annotations

from nqfmt import TokenizerInfo

from .errors import NQRunError

# End-of-turn markers of the supported families; each one the vocabulary holds also ends a generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class Tokenizer:
    def __init__(self, info: TokenizerInfo) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self._tok = HFTokenizer.from_str(info.json)
        except Exception as e:  # the Rust side raises its own Exception subclass for a bad JSON
            raise NQRunError(f"the file's tokenizer.json cannot be loaded: {e}") from None
        self.bos_id, self.eos_id, self.add_bos = info.bos_id, info.eos_id, info.add_bos
        stops = {self._tok.token_to_id(t) for t in END_OF_TURN} - {None}
        self.stop_ids = frozenset(stops | ({self.eos_id} if self.eos_id is not None else set()))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text` (special tokens written in the text are recognised); a BOS in front when the file says the
        model expects one (or when add_bos says so)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int | None) -> str:
        """The literal text of a token (for chat templates' bos_token / eos_token), '' when absent."""
        return (self._tok.id_to_token(token_id) or "") if token_id is not None else ""


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
