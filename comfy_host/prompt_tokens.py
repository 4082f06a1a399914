"""The CLIP tokens of a prompt as ComfyUI's tokenizer makes them (positions as the conditioning has them)."""
from __future__ import annotations


def prompt_tokens(clip, prompt: str, stream: str = "") -> list[str]:
    """Token strings of the first chunk of ``prompt`` for ``clip``, at the positions the conditioning has them.

    ``stream``: the tokenizer whose tokens make the text stream (FLUX: "t5xxl"); empty = the first (SD1.5:
    CLIP-L; SDXL: CLIP-G and CLIP-L share the vocabulary and positions, start token at index 0)."""
    if not callable(getattr(clip, "tokenize", None)):
        raise TypeError(f"clip must come from a checkpoint or CLIP loader, not a {type(clip).__name__}")
    tokenized = clip.tokenize(prompt)
    if stream and stream not in tokenized:
        raise ValueError(f"RB-Guidance reads this model's prompt as {stream} tokens, and the connected CLIP has none "
                         f"({', '.join(tokenized)}): connect the text encoder that encoded the positive prompt, or "
                         "set subject_token, connect a generation_mask, or set mask_source to 'reference similarity'")
    chunks = tokenized[stream] if stream else next(iter(tokenized.values()))
    tokenizer = getattr(clip.tokenizer, stream, None) if stream else None
    untokenize = getattr(tokenizer, "untokenize", None) or clip.tokenizer.untokenize
    return [word for _, word in untokenize(chunks[0])]
