"""Long and weighted prompts (`prompt_weighting`): the reference's syntax, its chunks of 75
tokens, what a weight does to the text embedding, renders at every length class (one chunk,
exactly one full chunk, several), batching, and the switch's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import InvalidParameter
from pipeline.params import GenerationParams, parse_params
from pipeline.prompts import (
    CHUNK,
    chunks,
    encode_weighted,
    parse_weights,
    sequence_length,
    tokenize_weighted,
)
from tests.conftest import pixels

# the reference's own examples of its syntax (its parser's docstring), and a few more
SYNTAX = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("[quiet] words", [("quiet", 1 / 1.1), (" words", 1.0)]),
    ("(away:-1) and (zero:0)", [("away", -1.0), (" and ", 1.0), ("zero", 0.0)]),
    ("smile :-) (now)", [("smile :-) ", 1.0), ("now", 1.1)]),  # a colon and a stray bracket are text
    ("time: 1.5) later", [("time: 1.5) later", 1.0)]),  # a weight outside brackets is text
    ("a BREAK b \\\\ c", [("a BREAK b \\ c", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", SYNTAX)
def test_the_reference_syntax(text, expected):
    runs = parse_weights(text)
    assert [t for t, _ in runs] == [t for t, _ in expected]
    assert [w for _, w in runs] == pytest.approx([w for _, w in expected], rel=1e-9)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_weight_that_is_not_a_number_is_refused_naming_its_field(field):
    with pytest.raises(InvalidParameter) as caught:
        parse_params(GenerationParams, prompt_weighting=True, **{field: "a (face:1.2.3) here"})
    assert caught.value.field == field and "'1.2.3'" in caught.value.reason and "not a number" in caught.value.reason
    assert parse_params(GenerationParams, **{field: "a (face:1.2.3) here"})  # without the switch: plain text


def words(n: int, word: str = "a") -> str:
    return " ".join([word] * n)


@pytest.mark.parametrize("count,rows", [(0, 2), (10, 12), (74, 76), (75, 79), (80, 84), (150, 156), (160, 166)])
def test_chunks_of_75_tokens_each_between_a_start_and_an_end(pipe, count, rows):
    tokenizer = pipe.sdxl.tokenizer
    tokens = tokenize_weighted(tokenizer, words(count))
    assert len(tokens.ids) == count  # one token per word in the fixture vocabulary, as in CLIP's
    parts = chunks(tokens, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert [len(p.ids) for p in parts] == [CHUNK + 2] * (count // CHUNK) + [count % CHUNK + 2]
    assert all(p.ids[0] == tokenizer.bos_token_id and p.ids[-1] == tokenizer.eos_token_id for p in parts)
    assert sequence_length(tokenizer, words(count), None) == rows
    assert sequence_length(tokenizer, "a", words(count)) == max(rows, 3)  # the longer of the two decides


def encode(pipe, prompt: str, negative: str | None = None, cfg: bool = True):
    sdxl = pipe.sdxl
    return encode_weighted(sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer, prompt, negative, cfg=cfg,
                           device=pipe.device)


@torch.inference_mode()
def test_a_weight_moves_only_its_own_tokens_relative_to_the_chunks_end(pipe):
    plain, _, pooled, _ = encode(pipe, "a red cat")
    weighted, _, weighted_pooled, _ = encode(pipe, "a (red:1.5) cat")
    red = len(tokenize_weighted(pipe.sdxl.tokenizer, "a ").ids) + 1  # after the start token
    width = len(tokenize_weighted(pipe.sdxl.tokenizer, "red").ids)
    moved = list(range(red, red + width))
    others = [k for k in range(plain.shape[1]) if k not in moved]
    assert torch.equal(weighted[0, others], plain[0, others])
    last = plain[0, -1]
    factor = torch.tensor(1.5, dtype=torch.float16).float()
    torch.testing.assert_close(weighted[0, moved], last + (plain[0, moved] - last) * factor)
    assert torch.equal(weighted_pooled, pooled)  # the pooled embedding carries no weights
    # a weight of 1 is no weight at all
    assert torch.equal(encode(pipe, "(a red cat:1.0)")[0], plain)


@torch.inference_mode()
def test_words_past_77_tokens_count_only_with_weighting(pipe):
    head = words(90)
    one, two = f"{head} cat", f"{head} dog"
    assert encode(pipe, one)[0].shape[1] == sequence_length(pipe.sdxl.tokenizer, one, None) > 77
    assert not torch.equal(encode(pipe, one)[0], encode(pipe, two)[0])
    plain = [pipe.sdxl.encode_prompt(prompt=p, device=pipe.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)[0] for p in (one, two)]
    assert torch.equal(plain[0], plain[1])  # diffusers' plain encoding cuts at 77 tokens


@torch.inference_mode()
def test_prompt_and_negative_are_padded_to_one_length(pipe):
    embeds, negative, _, _ = encode(pipe, "a (red:1.2) cat", words(100, "b"))
    assert embeds.shape == negative.shape and embeds.shape[1] == 77 + 25 + 2
    embeds, negative, _, negative_pooled = encode(pipe, "a cat", None, cfg=False)
    assert negative is None and negative_pooled is None
    assert embeds.shape[1] == len(tokenize_weighted(pipe.sdxl.tokenizer, "a cat").ids) + 2


SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 7, "prompt_weighting": True}


@pytest.mark.parametrize("prompt", ["a (portrait:1.3) [photo]", words(75, "b"), words(160, "c") + " (end:1.4)"])
def test_weighted_renders_at_every_length_alone_and_batched(pipe, face, prompt):
    """One chunk, exactly one full chunk (two chunks of 77 and 2 rows), several chunks: the
    render works with CFG (negative padded to the prompt) and without it, and an image is the
    same alone and batched with another of the same length."""
    from service.batching import RenderRequest, plan_groups, render_requests

    alone = pipe(face, prompt, **SMALL).images[0]
    without_cfg = pipe(face, prompt, **{**SMALL, "guidance_scale": 1.0}).images[0]
    assert alone.size == without_cfg.size == (64, 64)
    same_length = "d" + prompt[1:]  # its first word, one token, another
    requests = [RenderRequest("one", parse_params(GenerationParams, prompt=prompt, **SMALL), face),
                RenderRequest("two", parse_params(GenerationParams, prompt=same_length, **{**SMALL, "seed": 8}), face)]
    groups, errors = plan_groups(pipe, requests)
    assert not errors and len(groups) == 1  # equal lengths share a batch
    together = render_requests(pipe, requests)
    assert together[0].batch_size == 2
    assert np.abs(pixels(alone) - together[0].images[0].astype(np.int16)).max() <= 1


def test_different_lengths_or_plain_prompts_do_not_share_a_batch(pipe, face):
    from service.batching import RenderRequest, plan_groups

    bodies = [{"prompt": "a cat"}, {"prompt": words(80)}, {"prompt": "a cat", "prompt_weighting": False}]
    requests = [RenderRequest(str(k), parse_params(GenerationParams, **{**SMALL, **body}), face)
                for k, body in enumerate(bodies)]
    groups, errors = plan_groups(pipe, requests)
    assert not errors and len(groups) == 3
    short = len(tokenize_weighted(pipe.sdxl.tokenizer, "a cat").ids) + 2
    assert sorted(options.text_tokens or 0 for options in groups) == [0, short, 84]


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_past_the_token_bound_is_refused_before_any_model_work(pipe, face, field):
    from pipeline.prompts import MAX_TOKENS

    assert pipe.plan(parse_params(GenerationParams, **{**SMALL, field: words(MAX_TOKENS)}), face)[0].text_tokens
    with pytest.raises(InvalidParameter) as caught:
        pipe.plan(parse_params(GenerationParams, **{**SMALL, field: words(MAX_TOKENS + 1)}), face)
    assert caught.value.field == field and f"{MAX_TOKENS + 1} tokens long" in caught.value.reason
    # without the switch, diffusers' plain encoding cuts it at 77 tokens, as SDXL always has
    assert pipe.plan(parse_params(GenerationParams, **{**SMALL, "prompt_weighting": False,
                                                       field: words(MAX_TOKENS + 1)}), face)


def test_the_switch_is_off_by_default_and_changes_the_render(pipe, face):
    prompt = "a (portrait:1.5) of a person"
    plain = pipe(face, prompt, **{**SMALL, "prompt_weighting": False}).images[0]
    default = pipe(face, prompt, **{k: v for k, v in SMALL.items() if k != "prompt_weighting"}).images[0]
    weighted = pipe(face, prompt, **SMALL).images[0]
    assert np.array_equal(pixels(plain), pixels(default))
    assert not np.array_equal(pixels(plain), pixels(weighted))


def test_a_request_lora_renders_with_weighted_prompts(weights_dir, tmp_path, face):
    from pipeline.pipeline import InstantIDPipeline
    from tests.test_pipeline import write_lora

    lora = write_lora(weights_dir, tmp_path)
    own = InstantIDPipeline.from_weights(weights_dir, load_face=False)  # LoRAs stay out of the shared one
    prompt = "a (portrait:1.4) " + words(80)
    plain = own(face, prompt, **SMALL).images[0]
    assert not np.array_equal(pixels(plain), pixels(own(face, prompt, lora=str(lora), **SMALL).images[0]))
    off = own(face, prompt, lora=str(lora), lora_scale=0.0, **SMALL).images[0]
    assert np.abs(pixels(plain) - pixels(off)).max() <= 1
