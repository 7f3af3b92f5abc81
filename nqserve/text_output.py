"""Generated ids → the text a client receives, one token at a time (pushed, not pulled: the engine produces every
sequence's tokens in its own loop). Text that may be the start of a stop string is held back until it is clear; a
stop string ends the text and is not part of it (the runtime's `generate.text_pieces` rules, for a push API)."""
from __future__ import annotations

from runtime.tokenizer import TextStream, Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._stream = TextStream(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """The text that became final with `token`, and whether a stop string appeared (then the text is what came
        before it, and the output is over)."""
        self._pending += self._stream.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is still held back once generation ends without a stop string (cut at one if it completes)."""
        self._pending += self._stream.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self._pending = self._pending[:cut], ""
            return text, True
        hold = 0 if final else self._held(self._pending)
        text, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        return text, False

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
