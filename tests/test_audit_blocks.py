"""Per-block risk: block discovery, one-block-only perturbation, bitwise restore, sign convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.audit.blocks import block_scores, per_block_auc, transformer_blocks
from common.audit.mia import AuditError, roc_auc
from common.models.build import add_lora, build_model
from tests.helpers import SAMPLE_TEXTS, tiny_tokenizer

TEXTS = SAMPLE_TEXTS[:6]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def make_model(spec, tokenizer, lora):
    model = build_model(spec, tokenizer, seed=0)
    if lora:
        model = add_lora(model)
        with torch.no_grad():  # non-zero adapters, so LoRA-B noise is not the only adapter effect
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return model


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


CASES = [("tiny-gpt2", False, "transformer.h"), ("tiny-llama", False, "model.layers"),
         ("tiny-gpt2", True, "base_model.model.transformer.h"),
         ("tiny-llama", True, "base_model.model.model.layers")]


@pytest.mark.parametrize("spec,lora,prefix", CASES)
def test_transformer_blocks_found_for_both_families_and_through_peft(tokenizer, spec, lora, prefix):
    model = make_model(spec, tokenizer, lora)
    blocks = transformer_blocks(model)
    assert [name for name, _ in blocks] == [f"{prefix}.0", f"{prefix}.1"]
    modules = dict(model.named_modules())
    assert all(modules[name] is block for name, block in blocks)


def test_transformer_blocks_refuses_a_model_without_blocks():
    with pytest.raises(AuditError, match="cannot find the decoder blocks"):
        transformer_blocks(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("spec,lora,prefix", CASES)
def test_perturbs_only_the_chosen_block_and_restores_bitwise(tokenizer, spec, lora, prefix):
    model = make_model(spec, tokenizer, lora)
    before = snapshot(model)
    seen = []  # parameters as the model sees them at each forward pass
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(snapshot(mod)),
                                             with_kwargs=True)
    sigma = 0.05
    try:
        scores = block_scores(model, tokenizer, TEXTS, block_index=1, sigma=sigma, seeds=(0, 1), batch_size=16)
    finally:
        handle.remove()
    assert scores.shape == (len(TEXTS),) and np.all(np.isfinite(scores)) and np.any(scores != 0)
    assert len(seen) == 3  # original + one pass per seed (one batch each)
    block = f"{prefix}.1."
    block_names = {n for n in before if n.startswith(block)}
    assert block_names and any("lora_" in n for n in block_names) == lora
    assert all(torch.equal(seen[0][n], before[n]) for n in before)  # the original pass is unperturbed
    for during in seen[1:]:
        changed = {n for n in before if not torch.equal(during[n], before[n])}
        assert changed == block_names
        diffs = torch.cat([(during[n] - before[n]).ravel() for n in block_names])
        assert diffs.std().item() == pytest.approx(sigma, rel=0.05)
    first = sorted(block_names)[0]
    assert not torch.equal(seen[1][first], seen[2][first])  # seeds draw different noise
    after = snapshot(model)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_weights_restored_even_when_scoring_fails(tokenizer, monkeypatch):
    import common.audit.blocks as blocks_mod

    model = make_model("tiny-gpt2", tokenizer, False)
    before = snapshot(model)
    real, calls = blocks_mod._losses, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:  # fail while block 0 is perturbed
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(blocks_mod, "_losses", failing)
    with pytest.raises(RuntimeError):
        block_scores(model, tokenizer, TEXTS, block_index=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("spec,lora", [("tiny-gpt2", False), ("tiny-llama", True)])
def test_score_is_exactly_zero_without_noise_and_deterministic_with_it(tokenizer, spec, lora):
    model = make_model(spec, tokenizer, lora)
    assert np.array_equal(block_scores(model, tokenizer, TEXTS, 0, sigma=0.0), np.zeros(len(TEXTS)))
    a = block_scores(model, tokenizer, TEXTS, 0, sigma=0.02, seeds=(3,))
    b = block_scores(model, tokenizer, TEXTS, 0, sigma=0.02, seeds=(3,))
    assert np.array_equal(a, b) and np.any(a != 0)


def test_block_scores_refuses_bad_arguments(tokenizer):
    model = make_model("tiny-gpt2", tokenizer, False)
    with pytest.raises(AuditError, match="has 2 blocks"):
        block_scores(model, tokenizer, TEXTS, block_index=2)
    with pytest.raises(AuditError, match="sigma"):
        block_scores(model, tokenizer, TEXTS, 0, sigma=-1.0)


def test_per_block_auc_uses_the_negated_raw_score(tokenizer, monkeypatch):
    import common.audit.blocks as blocks_mod

    model = make_model("tiny-gpt2", tokenizer, False)
    members, nonmembers = TEXTS[:3], TEXTS[3:]
    raw = {}  # (block, texts) -> raw block score, as per_block_auc computed it
    real = blocks_mod.block_scores

    def recording(model, tokenizer, texts, block_index, *args):
        raw[block_index, tuple(texts)] = real(model, tokenizer, texts, block_index, *args)
        return raw[block_index, tuple(texts)]

    monkeypatch.setattr(blocks_mod, "block_scores", recording)
    result = per_block_auc(model, tokenizer, members, nonmembers, sigma=0.05, seeds=(0, 1))
    assert [r["block"] for r in result] == [0, 1]
    assert [r["name"] for r in result] == ["transformer.h.0", "transformer.h.1"]
    for r in result:
        raw_m, raw_n = raw[r["block"], tuple(members)], raw[r["block"], tuple(nonmembers)]
        assert r["auc"] == roc_auc(-raw_m, -raw_n)
    assert any(r["auc"] != 0.5 for r in result)  # else the sign would go untested
    with pytest.raises(AuditError, match="both members and non-members"):
        per_block_auc(model, tokenizer, TEXTS[:2], TEXTS[1:3])
