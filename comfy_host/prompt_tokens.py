"""The CLIP tokens of a prompt as ComfyUI's tokenizer makes them (positions as the conditioning has them)."""
from __future__ import annotations


def prompt_tokens(clip, prompt: str) -> list[str]:
    """Token strings of the first 77-token chunk of ``prompt`` for ``clip`` (SD1.5: CLIP-L; SDXL: CLIP-G and
    CLIP-L share the vocabulary and positions), start token at index 0."""
    if not callable(getattr(clip, "tokenize", None)):
        raise TypeError(f"clip must come from a checkpoint or CLIP loader, not a {type(clip).__name__}")
    chunks = next(iter(clip.tokenize(prompt).values()))
    return [word for _, word in clip.tokenizer.untokenize(chunks[0])]
