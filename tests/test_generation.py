"""HFGenerator: seeded determinism, max_new_tokens, EOS, batching, prompt encoding (tiny models, offline)."""

from __future__ import annotations

import pytest
import torch

from common.data.control import SEPARATOR, control_prompt
from common.models.build import build_model
from common.models.generation import GeneratedText, HFGenerator, SamplingSettings, TextGenerator
from common.models.tokenizer import EOS_TOKEN, train_tokenizer
from tests.helpers import SAMPLE_TEXTS, tiny_tokenizer

FAST = SamplingSettings(max_new_tokens=12, batch_size=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def generator(tokenizer):
    return HFGenerator(build_model("tiny-gpt2", tokenizer, seed=0), tokenizer, device="cpu")


def eos_biased(tokenizer, bias: float) -> HFGenerator:
    """A tiny GPT-2 whose output layer adds ``bias`` to the EOS logit (untied head with a bias)."""
    model = build_model("tiny-gpt2", tokenizer, seed=0)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = bias
    model.lm_head = biased
    return HFGenerator(model, tokenizer, device="cpu")


def prompts_of(tokenizer, n_bos=5, n_label=5):
    return [tokenizer.bos_token] * n_bos + [control_prompt("billing", tokenizer.bos_token)] * n_label


def test_hf_generator_is_a_text_generator(generator):
    assert isinstance(generator, TextGenerator)


def test_same_seed_same_texts_whatever_ran_before(generator, tokenizer):
    prompts = prompts_of(tokenizer)
    first = generator.generate(prompts, FAST, seed=11)
    torch.manual_seed(999)
    torch.rand(100)
    generator.generate(prompts[:3], FAST, seed=5)  # something else in between
    rng_before = torch.get_rng_state()
    again = generator.generate(prompts, FAST, seed=11)
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG is left alone
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.text for g in first] == [g.text for g in again]
    other = generator.generate(prompts, FAST, seed=12)
    assert [g.token_ids for g in other] != [g.token_ids for g in first]
    assert [g.prompt for g in first] == prompts


def test_respects_max_new_tokens(tokenizer):
    never_eos = eos_biased(tokenizer, -1e4)
    settings = SamplingSettings(max_new_tokens=7, batch_size=4)
    out = never_eos.generate(prompts_of(tokenizer, 3, 3), settings, seed=0)
    assert [g.new_tokens for g in out] == [7] * 6
    assert not any(g.stopped_at_eos for g in out)
    assert all(len(g.token_ids) == 7 and tokenizer.eos_token_id not in g.token_ids for g in out)
    assert never_eos.last_stats["new_tokens"] == 42 and never_eos.last_stats["batches"] == 2


def test_min_new_tokens_suppresses_eos(tokenizer):
    eager = eos_biased(tokenizer, 30.0)  # EOS would be sampled at every step
    out = eager.generate(prompts_of(tokenizer, 2, 2), SamplingSettings(max_new_tokens=6, min_new_tokens=4), seed=0)
    assert [g.new_tokens for g in out] == [5] * 4  # 4 forced tokens, then EOS
    assert all(g.stopped_at_eos and g.token_ids[-1] == tokenizer.eos_token_id for g in out)


def test_stops_at_eos_and_nothing_after_it(tokenizer):
    always = eos_biased(tokenizer, 50.0)
    out = always.generate(prompts_of(tokenizer, 2, 2), FAST, seed=0)
    assert all(g.stopped_at_eos and g.new_tokens == 1 and g.text == "" for g in out)

    sometimes = eos_biased(tokenizer, 1.0)  # EOS in about one step of twenty (top-k 50 of a near-flat head)
    settings = SamplingSettings(max_new_tokens=24, batch_size=8)
    out = sometimes.generate(prompts_of(tokenizer, 8, 8), settings, seed=3)
    stopped = [g for g in out if g.stopped_at_eos]
    assert any(g.new_tokens < 24 for g in stopped), "the biased model should stop early at least once"
    assert any(not g.stopped_at_eos for g in out), "and run to max_new_tokens at least once"
    eos = tokenizer.eos_token_id
    for g in out:
        assert g.new_tokens == len(g.token_ids) <= 24
        if g.stopped_at_eos:
            assert g.token_ids[-1] == eos and eos not in g.token_ids[:-1]  # nothing after the first EOS
            assert g.text == tokenizer.decode(list(g.token_ids[:-1]), skip_special_tokens=True)
        else:
            assert g.new_tokens == 24 and eos not in g.token_ids
    assert sometimes.last_stats["new_tokens"] == sum(g.new_tokens for g in out)


def test_batch_size_1_and_8_give_one_output_per_prompt(generator, tokenizer):
    prompts = prompts_of(tokenizer, 6, 4)
    one = generator.generate(prompts, SamplingSettings(max_new_tokens=5, batch_size=1), seed=0)
    eight = generator.generate(prompts, SamplingSettings(max_new_tokens=5, batch_size=8), seed=0)
    assert len(one) == len(eight) == len(prompts)
    assert [g.prompt for g in one] == [g.prompt for g in eight] == prompts
    assert all(isinstance(g, GeneratedText) and 1 <= g.new_tokens <= 5 for g in one + eight)
    assert generator.last_stats["batches"] == 2 and generator.tokens_per_second > 0


def test_left_padding_keeps_a_prompt_its_own_positions(generator, tokenizer):
    """Greedy (top_k=1): a short prompt batched with a long one continues as when alone."""
    greedy = SamplingSettings(max_new_tokens=6, top_k=1, no_repeat_ngram_size=0, batch_size=2)
    short = control_prompt("billing", tokenizer.bos_token)
    alone = generator.generate([short], greedy, seed=0)[0]
    padded = generator.generate([short, SAMPLE_TEXTS[0]], greedy, seed=0)[0]
    assert alone.token_ids == padded.token_ids
    assert tokenizer.padding_side == "right"  # restored (the trained tokenizer's default)


def test_bos_prompt_encodes_to_the_bos_id(generator, tokenizer):
    assert generator.encode_prompt(tokenizer.bos_token) == [tokenizer.bos_token_id]
    assert tokenizer.bos_token == EOS_TOKEN


def test_control_prompt_is_tokenised_as_inside_a_training_text():
    """A vocabulary that merges a final blank line: the prompt must use the in-text split."""
    texts = [t + "\n\n" for t in SAMPLE_TEXTS] + ["billing" + SEPARATOR + t for t in SAMPLE_TEXTS]
    tok = train_tokenizer(texts, vocab_size=400, min_frequency=1)
    prompt = "billing" + SEPARATOR
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    in_text = tok(prompt + "Customer asks", add_special_tokens=False)["input_ids"]
    assert in_text[: len(alone)] != alone, "precondition: this vocabulary splits the blank line differently"
    gen = HFGenerator(build_model("tiny-gpt2", tok, seed=0), tok, device="cpu")
    ids = gen.encode_prompt(prompt)
    assert in_text[: len(ids)] == ids and tok.decode(ids) == prompt
    assert gen.encode_prompt("Hello ") == tok("Hello ", add_special_tokens=False)["input_ids"]  # fallback


def test_continuation_excludes_the_prompt(generator, tokenizer):
    prompt = control_prompt("billing", tokenizer.bos_token)
    out = generator.generate([prompt] * 3, FAST, seed=1)
    prompt_ids = generator.encode_prompt(prompt)
    for g in out:
        assert g.prompt == prompt and not g.text.startswith(prompt)
        assert list(g.token_ids[: len(prompt_ids)]) != prompt_ids


@pytest.mark.parametrize("change", [
    dict(max_new_tokens=0), dict(temperature=0.0), dict(temperature=float("nan")), dict(top_k=-1),
    dict(top_p=0.0), dict(top_p=1.5), dict(no_repeat_ngram_size=-1), dict(batch_size=0), dict(seed=-1),
    dict(min_new_tokens=20, max_new_tokens=10), dict(batch_size=2.5), dict(max_new_tokens=True),
])
def test_bad_settings_are_value_errors(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        SamplingSettings(**change).validate()


def test_bad_prompts_are_value_errors(generator, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        generator.generate([""], FAST, seed=0)
    with pytest.raises(ValueError, match="positions"):
        generator.generate([tokenizer.bos_token], SamplingSettings(max_new_tokens=300), seed=0)
    with pytest.raises(ValueError, match="seed"):
        generator.generate([tokenizer.bos_token], FAST, seed=-3)
    assert generator.generate([], FAST, seed=0) == []
