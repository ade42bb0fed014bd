"""Models: offline tokenizer round trip, tiny configs, LoRA-only training surface."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.dp_lora import DPLoRAConfig, load_lora_model
from common.errors import ConfigError
from common.models.build import adapter_state, build_model, count_parameters, load_adapter_state
from tests.helpers import SAMPLE_TEXTS, save_tiny_model, tiny_tokenizer


def test_tokenizer_round_trip_after_save_pretrained(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS[:6] + ["Ünïcödé 数字 text never seen in training — ok?"]:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text  # byte-level: lossless on any UTF-8
    assert loaded.eos_token_id == tokenizer.eos_token_id and loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.pad_token_id != loaded.eos_token_id


@pytest.mark.parametrize("spec,family", [("tiny-gpt2", "gpt2"), ("tiny-llama", "llama"),
                                         ("small-gpt2", "gpt2"), ("small-llama", "llama")])
def test_tiny_configs_build_and_reload(tmp_path, spec, family):
    tokenizer = tiny_tokenizer()
    model = build_model(spec, tokenizer)
    assert model.config.model_type == family
    _, total = count_parameters(model)
    assert 1e5 < total < 5e6
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer(SAMPLE_TEXTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_only_lora_parameters_are_trainable(tmp_path, spec):
    model, _ = load_lora_model(save_tiny_model(tmp_path, spec), DPLoRAConfig(lora_r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed" in n or "wte" in n for n in frozen)
    assert set(adapter_state(model)) == {n.replace(".default", "") for n in trainable}


def test_adapter_state_round_trip_and_mismatch(tmp_path):
    model_dir = save_tiny_model(tmp_path)
    model, _ = load_lora_model(model_dir, DPLoRAConfig())
    state = {k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32)
             for k, v in adapter_state(model).items()}
    other, _ = load_lora_model(model_dir, DPLoRAConfig(), adapter=state)
    for name, value in adapter_state(other).items():
        np.testing.assert_array_equal(value, state[name])
    wrong = dict(state)
    first = next(iter(wrong))
    wrong[first] = wrong[first][:, :-1]
    with pytest.raises(ConfigError, match="shape"):
        load_adapter_state(other, wrong)
    with pytest.raises(ConfigError, match="missing"):
        load_adapter_state(other, {k: v for k, v in state.items() if k != first})


def test_unknown_model_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="config.json"):
        build_model(str(tmp_path))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_long_records_are_truncated_without_the_length_warning():
    # transformers' own logger does not propagate to the root (caplog cannot see it): listen on it.
    from common.audit.extraction import record_extraction_rate
    from common.audit.scoring import token_logprobs
    from common.data.loading import Record, summarize
    from common.models.lm import encode_texts

    logger, heard = logging.getLogger("transformers"), _Collect()
    logger.addHandler(heard)
    try:
        tokenizer = tiny_tokenizer()  # fresh: transformers warns once per tokenizer object
        long_record = " ".join(SAMPLE_TEXTS * 30)
        full = summarize([Record(long_record)], tokenizer)["max"]
        assert full > tokenizer.model_max_length  # counted whole, not cut

        input_ids, mask = encode_texts([long_record, SAMPLE_TEXTS[0]], tokenizer, max_length=64).tensors
        assert input_ids.shape == (2, 64) and int(mask[0].sum()) == 64
        assert input_ids[0, -1] == tokenizer.eos_token_id
        model = build_model("tiny-gpt2", tokenizer)
        [logprobs] = token_logprobs(model, tokenizer, [long_record], max_length=64)
        assert len(logprobs) == 63
        assert record_extraction_rate(model, tokenizer, [long_record], prefix_tokens=4, suffix_tokens=4)["eligible"] == 1
        assert not [m for m in heard.messages if "sequence length is longer" in m], heard.messages

        tokenizer(long_record)  # the untruncated call does warn: the listener above would have heard it
        assert [m for m in heard.messages if "sequence length is longer" in m]
    finally:
        logger.removeHandler(heard)
