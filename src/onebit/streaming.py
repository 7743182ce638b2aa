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
