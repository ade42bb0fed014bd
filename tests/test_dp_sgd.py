"""DP-SGD on LoRA against independent references (opacus issue 820 guards included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.dp_lora import DPLoRAConfig, load_lora_model, train_dp_lora
from common.models.lm import encode_texts, per_record_loss
from common.privacy.dp_sgd import DPSGDPlan, make_private, plan_dp_sgd, sample_rate_for
from common.privacy.ledger import PrivacyLedger
from tests.helpers import SAMPLE_TEXTS, save_tiny_model, write_jsonl


def _randomise_lora_b(model):
    # peft initialises lora_B to zero, which makes every lora_A gradient zero; give both
    # factors non-zero values so the comparison covers every adapter tensor.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_per_sample_gradients_match_naive_loop(tmp_path, spec):
    model_dir = save_tiny_model(tmp_path / spec, spec)
    cfg = DPLoRAConfig()
    model, tokenizer = load_lora_model(model_dir, cfg)  # the trainer's exact wrapping order
    _randomise_lora_b(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)

    dataset = encode_texts(SAMPLE_TEXTS[:6], tokenizer, max_length=48)
    input_ids, mask = dataset.tensors
    clip = 0.05
    plan = DPSGDPlan(8.0, 1e-5, noise_multiplier=0.0, sample_rate=sample_rate_for(6, 6), steps_per_round=1,
                     rounds=1, max_grad_norm=clip, accountant="rdp")
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.1)
    _, private_model, optimizer, _ = make_private(model, optimizer, dataset, 6, plan)

    private_model.train()
    per_record_loss(private_model, input_ids, mask).mean().backward()
    opacus_samples = {n: p.grad_sample.detach().clone() for n, p in trainable}

    # Naive reference: one record at a time, hooks off, plain autograd.
    private_model.disable_hooks()
    naive = {n: [] for n, _ in trainable}
    for i in range(len(input_ids)):
        for _, p in trainable:
            p.grad = None
        per_record_loss(private_model, input_ids[i:i + 1], mask[i:i + 1]).sum().backward()
        for n, p in trainable:
            naive[n].append(p.grad.detach().clone())
    naive = {n: torch.stack(g) for n, g in naive.items()}
    private_model.enable_hooks()

    for n, _ in trainable:
        torch.testing.assert_close(opacus_samples[n], naive[n], rtol=1e-4, atol=1e-6)
        assert naive[n].abs().max() > 0, f"{n}: zero gradient makes the comparison vacuous"

    # Clip each record's whole gradient to `clip`, sum, and compare with opacus's clipped sum.
    norms = torch.sqrt(sum(naive[n].flatten(1).pow(2).sum(1) for n in naive))
    assert (norms > clip).any() and (norms < clip).any() or (norms > clip).all()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    for _, p in trainable:
        p.grad = None
    optimizer.clip_and_accumulate()
    for n, p in trainable:
        expected = (naive[n] * factors.view(-1, *[1] * (naive[n].dim() - 1))).sum(0)
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-4, atol=1e-7)


def test_dp_step_changes_adapter_and_charges_ledger(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", SAMPLE_TEXTS)
    cfg = DPLoRAConfig(epsilon=8.0, local_steps=3, batch_size=8, max_physical_batch_size=4, max_length=48)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", "site-a", 8.0, 1e-4)
    before, _ = load_lora_model(model_dir, cfg)
    from common.models.build import adapter_state
    start = adapter_state(before)
    result = train_dp_lora(model_dir, data, cfg, ledger, run_id="t", round_id=1)
    assert set(result.adapter) == set(start)
    changed = [n for n in start if not np.allclose(start[n], result.adapter[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert all(np.isfinite(a).all() for a in result.adapter.values())
    assert len(result.history) == 3
    assert ledger.has_charge("t/round-1")
    assert 0 < result.metrics["epsilon_spent"] <= 8.0


def test_plan_hits_target_epsilon_for_whole_run():
    plan = plan_dp_sgd(n_records=200, batch_size=16, steps_per_round=20, rounds=3, target_epsilon=8.0)
    assert plan.total_steps == 60
    assert plan.delta <= 1 / (10 * 200)
    assert plan.planned_epsilon() == pytest.approx(8.0, rel=0.01)
    assert plan.planned_epsilon() <= 8.0 * 1.0001
    # Planning more rounds at the same ε needs more noise.
    longer = plan_dp_sgd(n_records=200, batch_size=16, steps_per_round=20, rounds=6, target_epsilon=8.0)
    assert longer.noise_multiplier > plan.noise_multiplier


def test_an_empty_poisson_batch_takes_a_noise_only_step(tmp_path):
    # 3 records at batch 1 (q = 1/3): about 30% of Poisson batches are empty. Each must still take
    # its step, adding noise and nothing else (regression: opacus raised "Per sample gradient is
    # not initialized" and failed the site's round).
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", SAMPLE_TEXTS[:3])
    cfg = DPLoRAConfig(epsilon=50.0, local_steps=12, batch_size=1, max_length=32, rounds=3)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", "site-a", 1000.0, 1e-4)
    histories = [train_dp_lora(model_dir, data, cfg, ledger, run_id="t", round_id=r).history for r in (1, 2, 3)]
    steps = [h for history in histories for h in history]
    assert len(steps) == 36
    assert any(np.isnan(h) for h in steps), "no empty batch was drawn in 36 steps (p ≈ 1e-6)"
    assert all(ledger.has_charge(f"t/round-{r}") for r in (1, 2, 3))
