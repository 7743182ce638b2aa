"""Token ids -> text pieces for streaming output (torch-free; the PyTorch and engine paths share it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

__all__ = ["stream_text", "REPLACEMENT_CHAR", "CONTEXT_TOKENS"]

REPLACEMENT_CHAR = "\ufffd"  # what decode() shows for an incomplete multi-byte UTF-8 sequence
CONTEXT_TOKENS = 8  # prompt tokens decoded in front of the new ones (enough for any UTF-8 char)


def stream_text(tokenizer, tokens: Iterable[int], context: Sequence[int] = ()) -> Iterator[str]:
    """Turn a stream of token ids into text pieces whose concatenation is the text the new ids add
    after ``context`` (the prompt's ids): ``decode(context + ids)`` minus ``decode(context)``
    (for decoders whose output on a prefix is a prefix of the output, as byte-level BPE's is).

    The new ids are decoded behind the last ``CONTEXT_TOKENS`` ids of ``context``, because a
    decoder is not position-free: SentencePiece (llama2) drops the leading space of the first
    token it decodes, so "Once upon" + "▁a" alone would print "Once upona"; and a character whose
    UTF-8 bytes straddle the prompt and the completion only decodes whole with both.

    Decodes the whole list so far at each token and yields the new suffix, holding it back while
    it ends in U+FFFD (a multi-byte character split across byte-level tokens); the remainder is
    flushed at the end. Closing this iterator closes ``tokens`` if it is a generator.
    """
    # O(n²) decode work over a generation, negligible next to the model's forward passes.
    generated = [int(t) for t in list(context)[-CONTEXT_TOKENS:]]
    # the context's text; a character it leaves incomplete is completed by the new ids
    emitted = len(tokenizer.decode(generated).rstrip(REPLACEMENT_CHAR)) if generated else 0
    n_context = len(generated)
    tokens = iter(tokens)
    try:
        for token in tokens:
            generated.append(token)
            text = tokenizer.decode(generated)
            if text.endswith(REPLACEMENT_CHAR) or len(text) <= emitted:
                continue
            yield text[emitted:]
            emitted = len(text)
        text = tokenizer.decode(generated) if len(generated) > n_context else ""
        if len(text) > emitted:
            yield text[emitted:]
    finally:
        close = getattr(tokens, "close", None)  # stopping early frees generate()'s KV cache now
        if close is not None:
            close()


class TextStream:
    """Push-style ``stream_text`` for one request, with stop strings: ``push(token)`` returns
    ``(new text, stopped)``; ``finish()`` the text held back at the end.

    Decodes a sliding window (the tokens since the last emitted piece, after a few of context)
    instead of the whole list, so each token costs O(1). Text that may be the start of a stop
    string is held back; at a stop string the text before it is returned and ``stopped`` is True
    (the stop string itself is not part of the output, as OpenAI's ``stop``)."""

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = self._read = 0     # ids[prefix:read] decoded already (context of the window)
        self._pending = ""                # decoded, not yet returned (may start a stop string)
        self.text = ""                    # everything returned so far
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._ids.append(int(token))
        dec = self.tokenizer.decode
        window = dec(self._ids[self._prefix:])
        if window.endswith(REPLACEMENT_CHAR):  # a multi-byte character split across tokens
            return "", False
        head = dec(self._ids[self._prefix:self._read]) if self._read > self._prefix else ""
        if len(window) > len(head) and window.startswith(head):
            self._pending += window[len(head):]
        elif len(window) > len(head):          # a decoder that rewrote the context: the new tail
            self._pending += window[len(head):]
        self._prefix, self._read = max(self._read - 4, 0), len(self._ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The held-back text (call once the generation has ended)."""
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if self.stop:
            buf = self.text[-self._hold:] + self._pending if self._hold else self._pending
            base = len(buf) - len(self._pending)  # where _pending starts inside buf
            cuts = [buf.find(s) for s in self.stop if s in buf]
            if cuts:
                cut = max(min(cuts) - base, 0)
                out = self._pending[:cut]
                self.text += out
                self._pending = ""
                self.stopped = True
                return out, True
        keep = 0 if final else min(self._hold, len(self._pending))
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        self.text += out
        return out, False
