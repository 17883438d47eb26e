"""Long and weighted prompts, encoded as the reference's full pipeline encodes them (opt-in:
``prompt_weighting``; the default stays diffusers' plain SDXL encoding).

Weighting syntax: ``(words)`` multiplies the words' weight by 1.1, ``[words]`` divides it by
1.1, ``(words:1.3)`` multiplies it by 1.3 (any number, negative too); brackets nest and
multiply; an unclosed bracket weights everything after it; ``\\(``, ``\\)``, ``\\[``,
``\\]`` and ``\\\\`` are the literal characters. ``BREAK`` is an ordinary word (the
reference gives that word the weight -1, an accident we do not copy).

Length: the prompt's tokens (each weighted run tokenized on its own) go in chunks of 75, each
chunk between its own start and end token, so nothing is cut at 77 tokens; the last chunk is
not padded (a prompt of n < 75 tokens makes n + 2 rows). Prompt and negative prompt are padded
with end tokens to the same length first. Each chunk goes through both text encoders (the
reference feeds both the first tokenizer's ids; their vocabularies are the same) and their
penultimate hidden states are joined; a token of weight w != 1 gets ``last + (e - last) * w``,
with ``last`` its chunk's final (end token) row and w in float16, as the reference has it. The
pooled embedding is the second encoder's of the last chunk.

Parsing and counting are pure Python (the HTTP ingress validates prompts with them); only
:func:`encode_weighted` and :func:`encode_prompts` (a batch's rows, weighted or plain) need
torch.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK = 75  # tokens per chunk, between a start and an end token
MAX_TOKENS = 10 * CHUNK  # a bound on the text encoders' runs and the UNet's cross-attention length per request
ROUND = 1.1
SQUARE = 1 / 1.1
_ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}
_SPECIAL = "\\()[]:"


class PromptSyntaxError(ValueError):
    """A weight in a prompt that is not a number."""


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``text`` as runs of (text, weight), neighbours of equal weight joined.

    >>> parse_weights("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    rounds: list[int] = []  # where each open "(" began (an index into runs)
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "\\":
            pair = text[i:i + 2]
            runs.append([_ESCAPES.get(pair, ""), 1.0])  # a lone backslash is dropped, as the reference drops it
            i += 2 if pair in _ESCAPES else 1
        elif char == "(":
            rounds.append(len(runs))
            i += 1
        elif char == "[":
            squares.append(len(runs))
            i += 1
        elif char == ":" and rounds and (weight := _weight_at(text, i + 1)) is not None:
            number, end = weight
            scale(rounds.pop(), number)
            i = end + 1  # past the ")"
        elif char == ")" and rounds:
            scale(rounds.pop(), ROUND)
            i += 1
        elif char == "]" and squares:
            scale(squares.pop(), SQUARE)
            i += 1
        elif char in _SPECIAL:  # an unmatched bracket or a colon: plain text
            runs.append([char, 1.0])
            i += 1
        else:
            end = i
            while end < n and text[end] not in _SPECIAL:
                end += 1
            runs.append([text[i:end], 1.0])
            i = end
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(list(run))
    return [(str(t), float(w)) for t, w in merged]


def _weight_at(text: str, start: int) -> tuple[float, int] | None:
    """A ``number)`` at ``start``: (the number, the index of the ")"), else None. Characters
    that may make up a number but do not (``1.2.3``) are a :class:`PromptSyntaxError`."""
    end = start
    if end < len(text) and text[end] in "+-":
        end += 1
    while end < len(text) and (text[end].isdigit() or text[end] == "."):
        end += 1
    if end == start or end >= len(text) or text[end] != ")" or text[start:end] in "+-":
        return None
    literal = text[start:end]
    try:
        return float(literal), end
    except ValueError:
        raise PromptSyntaxError(f"the weight {literal!r} in '...{text[max(0, start - 20):end + 1]}' "
                                "is not a number") from None


def check_weights(text: str) -> None:
    """Raise :class:`PromptSyntaxError` when ``text`` has a weight that is not a number."""
    parse_weights(text)


@dataclass(frozen=True)
class WeightedTokens:
    ids: list[int]  # without start and end tokens
    weights: list[float]


def tokenize_weighted(tokenizer, text: str) -> WeightedTokens:
    ids: list[int] = []
    weights: list[float] = []
    for run, weight in parse_weights(text):
        tokens = tokenizer(run, truncation=False).input_ids[1:-1]  # each run alone, without its start/end
        ids += tokens
        weights += [weight] * len(tokens)
    return WeightedTokens(ids, weights)


def pad_to(tokens: WeightedTokens, length: int, end_id: int) -> WeightedTokens:
    missing = length - len(tokens.ids)
    return WeightedTokens(tokens.ids + [end_id] * missing, tokens.weights + [1.0] * missing)


def chunks(tokens: WeightedTokens, start_id: int, end_id: int) -> list[WeightedTokens]:
    """Chunks of up to 75 tokens, each between a start and an end token (weight 1). A last,
    shorter chunk always follows the full ones, even an empty one (as the reference has it)."""
    out = []
    full = len(tokens.ids) // CHUNK
    for k in range(full + 1):
        ids = tokens.ids[k * CHUNK:(k + 1) * CHUNK]
        weights = tokens.weights[k * CHUNK:(k + 1) * CHUNK]
        out.append(WeightedTokens([start_id, *ids, end_id], [1.0, *weights, 1.0]))
    return out


class PromptTooLong(ValueError):
    def __init__(self, field: str, tokens: int) -> None:
        super().__init__(f"is {tokens} tokens long; with prompt_weighting at most {MAX_TOKENS}")
        self.field = field


def sequence_length(tokenizer, prompt: str, negative: str | None) -> int:
    """Rows of the text embedding that ``prompt`` and ``negative`` make together (both have
    it). A prompt past :data:`MAX_TOKENS` is a :class:`PromptTooLong` naming its field."""
    counts = {field: len(tokenize_weighted(tokenizer, text or "").ids)
              for field, text in (("prompt", prompt), ("negative_prompt", negative))}
    for field, tokens in counts.items():
        if tokens > MAX_TOKENS:
            raise PromptTooLong(field, tokens)
    count = max(counts.values())
    return (count // CHUNK) * (CHUNK + 2) + count % CHUNK + 2


def encode_weighted(text_encoder, text_encoder_2, tokenizer, prompt: str, negative: str | None, *, cfg: bool,
                    device, lora_scale: float | None = None):
    """(prompt embeds, negative embeds or None, pooled, negative pooled or None), each with a
    batch dimension of 1. ``negative`` None is the empty prompt. ``lora_scale``: a request
    LoRA's text-encoder layers at that scale, as diffusers' plain encoding has them."""
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    encoders = (text_encoder, text_encoder_2)
    scaled = lora_scale is not None and USE_PEFT_BACKEND
    if scaled:
        for encoder in encoders:
            scale_lora_layers(encoder, lora_scale)
    try:
        return _encode(*encoders, tokenizer, prompt, negative, cfg=cfg, device=device)
    finally:
        if scaled:
            for encoder in encoders:
                unscale_lora_layers(encoder, lora_scale)


def encode_prompts(sdxl, prompts: list[tuple[str, str | None]], cfg: bool, lora_scale: float | None, *,
                   weighted: bool, device, dtype):
    """(text embeds, pooled) for ``(prompt, negative)`` pairs, one row each ([negatives...,
    prompts...] under CFG); each distinct pair is encoded once, alone, so a prompt's rows are
    the same in any batch. ``weighted``: :func:`encode_weighted`, else diffusers' plain SDXL
    encoding (``sdxl.encode_prompt``)."""
    import torch

    cache: dict[tuple[str, str | None], tuple] = {}
    cond, uncond, pooled, uncond_pooled = [], [], [], []
    for key in prompts:
        prompt, negative = key
        if key in cache:
            pass
        elif weighted:
            cache[key] = encode_weighted(sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer, prompt, negative,
                                         cfg=cfg, device=device, lora_scale=lora_scale)
        else:
            cache[key] = sdxl.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=cfg, negative_prompt=negative,
                                            lora_scale=lora_scale)
        embeds, negative_embeds, pool, negative_pool = cache[key]
        cond.append(embeds)
        pooled.append(pool)
        if cfg:
            uncond.append(negative_embeds)
            uncond_pooled.append(negative_pool)
    text = torch.cat(uncond + cond) if cfg else torch.cat(cond)
    pool = torch.cat(uncond_pooled + pooled) if cfg else torch.cat(pooled)
    return text.to(dtype), pool.to(dtype)


def _encode(text_encoder, text_encoder_2, tokenizer, prompt: str, negative: str | None, *, cfg: bool, device):
    import torch

    positive = tokenize_weighted(tokenizer, prompt)
    negative_tokens = tokenize_weighted(tokenizer, negative or "")
    length = max(len(positive.ids), len(negative_tokens.ids))
    end_id = tokenizer.eos_token_id
    positive, negative_tokens = pad_to(positive, length, end_id), pad_to(negative_tokens, length, end_id)

    def encode(tokens: WeightedTokens):
        rows, pooled = [], None
        for chunk in chunks(tokens, tokenizer.bos_token_id, end_id):
            ids = torch.tensor([chunk.ids], dtype=torch.long, device=device)
            first = text_encoder(ids, output_hidden_states=True)
            second = text_encoder_2(ids, output_hidden_states=True)
            pooled = second[0]
            embedding = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)[0]
            weights = torch.tensor(chunk.weights, dtype=torch.float16, device=device)
            changed = weights != 1.0
            if bool(changed.any()):
                last = embedding[-1:]
                moved = last + (embedding - last) * weights[:, None]
                embedding = torch.where(changed[:, None], moved.to(embedding.dtype), embedding)
            rows.append(embedding)
        return torch.cat(rows)[None], pooled

    embeds, pooled = encode(positive)
    if not cfg:
        return embeds, None, pooled, None
    negative_embeds, negative_pooled = encode(negative_tokens)
    return embeds, negative_embeds, pooled, negative_pooled
