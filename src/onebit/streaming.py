"""Token ids -> text pieces for streaming output (torch-free; the PyTorch and engine paths share it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["stream_text", "REPLACEMENT_CHAR"]

REPLACEMENT_CHAR = "\ufffd"  # what decode() shows for an incomplete multi-byte UTF-8 sequence


def stream_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Turn a stream of token ids into text pieces whose concatenation is ``decode(all ids)``
    (for decoders whose output on a prefix is a prefix of the output, as byte-level BPE's is).

    Decodes the whole list so far at each token and yields the new suffix, holding it back while
    it ends in U+FFFD (a multi-byte character split across byte-level tokens); the remainder is
    flushed at the end. Closing this iterator closes ``tokens`` if it is a generator.
    """
    # O(n²) decode work over a generation, negligible next to the model's forward passes.
    generated: list[int] = []
    emitted = 0
    tokens = iter(tokens)
    try:
        for token in tokens:
            generated.append(token)
            text = tokenizer.decode(generated)
            if text.endswith(REPLACEMENT_CHAR) or len(text) <= emitted:
                continue
            yield text[emitted:]
            emitted = len(text)
        text = tokenizer.decode(generated) if generated else ""
        if len(text) > emitted:
            yield text[emitted:]
    finally:
        close = getattr(tokens, "close", None)  # stopping early frees generate()'s KV cache now
        if close is not None:
            close()
