"""The CLIP tokens of a prompt as ComfyUI's tokenizer makes them (positions as the conditioning has them)."""
from __future__ import annotations


def prompt_tokens(clip, prompt: str, streams: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """(token strings of the first chunk of ``prompt`` for ``clip``, at the positions the conditioning has them;
    where the prompt's own tokens start).

    ``streams``: the tokenizers whose tokens make a model's text stream, the first the CLIP has is read (FLUX.1:
    T5; FLUX.2: Mistral or Qwen3); empty = the first (SD1.5: CLIP-L; SDXL: CLIP-G and CLIP-L share the
    vocabulary and positions, start token at index 0). A tokenizer that wraps the prompt in a template (FLUX.2's
    chat templates) puts template tokens first: the prompt starts after those shared with an empty prompt."""
    if not callable(getattr(clip, "tokenize", None)):
        raise TypeError(f"clip must come from a checkpoint or CLIP loader, not a {type(clip).__name__}")
    tokenized = clip.tokenize(prompt)
    stream = next((name for name in streams if name in tokenized), None)
    if streams and stream is None:
        raise ValueError(f"RB-Guidance reads this model's prompt as {' or '.join(streams)} tokens, and the connected "
                         f"CLIP has none ({', '.join(tokenized)}): connect the text encoder that encoded the positive "
                         "prompt, or set subject_token, connect a generation_mask, or set mask_source to "
                         "'reference similarity'")
    tokenizer = getattr(clip.tokenizer, stream, None) if stream else None
    untokenize = getattr(tokenizer, "untokenize", None) or clip.tokenizer.untokenize

    def words(result) -> list[str]:
        chunks = result[stream] if stream else next(iter(result.values()))
        return [word for _, word in untokenize(chunks[0])]

    tokens, empty = words(tokenized), words(clip.tokenize(""))
    start = 0
    while start < min(len(tokens), len(empty)) and tokens[start] == empty[start]:
        start += 1
    return tokens, start
