"""The pdss step-by-step student at a site, without Flower: DP-SGD per-sample gradients of the
multi-task loss, a charged round, local-only, and a round the budget cannot pay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.pdss import release_prompts
from client.pdss_student import heldout_accuracy, kept_model_path, multitask_rows, record_loss, train_round
from common.models.loading import load_lora_model
from common.privacy.dp_sgd import DPSGDPlan, make_private, sample_rate_for
from common.privacy.ledger import PrivacyLedger
from common.settings import RunSettings
from server.server_app import initial_adapter
from tests.helpers import pdss_settings, pdss_site, pdss_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pdss_task(tmp_path_factory.mktemp("pdss_student"), seed=4, public_records=120, train_per_client=16,
                     canaries=1)


def settings_for(task, **changes) -> RunSettings:
    return pdss_settings(task, **{"rounds": 2, "token-epsilon": 1.0, "local-steps": 2, "batch-size": 8,
                                  "max-length": 48, **changes})


def site_for(task, tmp_path, budget: float = 100.0):
    return pdss_site(task, tmp_path / "client_0.json", budget)


def rationales_for(task) -> list[str]:
    rows = [json.loads(x) for x in (task / "task" / "client_0" / "train.jsonl").read_text().splitlines()]
    return [f"it is {r['answer']}" if i % 5 else "" for i, r in enumerate(rows)]  # every 5th: none came back


def test_per_sample_gradients_of_the_multitask_loss_match_a_naive_loop(task):
    settings = settings_for(task)
    model, tokenizer = load_lora_model(task / "base", settings.dp)  # the trainer's wrapping order
    with torch.no_grad():  # lora_B starts at 0, which would zero every lora_A gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    per_sample = per_sample_gradients_match_a_naive_loop(model, tokenizer)
    assert all(g.abs().max() > 0 for g in per_sample.values())


def per_sample_gradients_match_a_naive_loop(model, tokenizer) -> dict:
    """opacus's per-sample gradients of the multi-task loss on three records, each checked against
    that record's own backward pass; returns them by parameter name."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    triples = [("Mia has 3 pens. How many pens does Mia have now?", "3", "3 = 3"),
               ("Omar had 9 eggs and gave 2 to Ada. How many eggs does Omar have left?", "7", "9 - 2 = 7"),
               ("Zoe buys 2 bags with 4 cards in each bag. How many cards does Zoe buy?", "8", "2 * 4 = 8")]
    data = multitask_rows(triples, tokenizer, 0.5, 128)
    plan = DPSGDPlan(8.0, 1e-5, 0.0, sample_rate_for(3, 3), 1, 1, 0.05, "rdp")
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.1)
    _, private, optimizer, _ = make_private(model, optimizer, data, 3, plan)
    private.train()
    record_loss(private, *data.tensors).mean().backward()
    opacus = {n: p.grad_sample.detach().clone() for n, p in trainable}
    private.disable_hooks()
    for i in range(3):
        for _, p in trainable:
            p.grad = None
        record_loss(private, *(t[i:i + 1] for t in data.tensors)).sum().backward()
        for n, p in trainable:
            torch.testing.assert_close(opacus[n][i], p.grad, rtol=1e-4, atol=1e-6)
    private.enable_hooks()
    return opacus


def test_a_dp_round_is_charged_composed_and_replayed(task, tmp_path):
    settings, site = settings_for(task), site_for(task, tmp_path)
    release_prompts(site, settings, "run")
    start = initial_adapter(settings)
    adapter, metrics, refusal = train_round(site, settings, "run", 1, rationales_for(task), start)
    assert refusal == "" and set(adapter) == set(start) and metrics["skipped-records"] == 4
    assert metrics["num-examples"] == 12 and np.isfinite(metrics["train-loss"])
    ledger = PrivacyLedger.load(site.ledger_path)
    assert [e["mechanism"] for e in ledger.entries] == ["pure-epsilon", "dp-sgd"]
    again, replayed, _ = train_round(site, settings, "run", 1, rationales_for(task), start)
    assert replayed["replayed"] == 1 and all(np.array_equal(again[k], adapter[k]) for k in adapter)
    assert len(PrivacyLedger.load(site.ledger_path).entries) == 2  # a repeated round costs nothing


def test_local_only_keeps_the_model_at_the_site_and_charges_no_dp_sgd(task, tmp_path):
    settings, site = settings_for(task, **{"student-training": "local-only"}), site_for(task, tmp_path)
    release_prompts(site, settings, "run")
    adapter, metrics, refusal = train_round(site, settings, "run", 1, rationales_for(task),
                                            initial_adapter(settings))
    assert refusal == "" and adapter == {} and metrics["local-only"] == 1 and kept_model_path(site).is_file()
    assert [e["mechanism"] for e in PrivacyLedger.load(site.ledger_path).entries] == ["pure-epsilon"]
    accuracy, n = heldout_accuracy(site, settings, None)  # the site scores the model it kept
    assert 0.0 <= accuracy <= 1.0 and n == 4


def test_a_round_the_budget_cannot_pay_is_refused_before_training(task, tmp_path):
    settings = settings_for(task, epsilon=8.0)
    site = site_for(task, tmp_path, budget=3.0)  # the student's DP-SGD plan alone needs 8
    adapter, metrics, refusal = train_round(site, settings, "run", 1, rationales_for(task),
                                            initial_adapter(settings))
    assert adapter == {} and metrics["refused"] == 1 and "over the budget" in refusal
    assert PrivacyLedger.load(site.ledger_path).entries == []


def test_answer_only_sends_no_prompt_and_trains_the_answer_task_alone(task, tmp_path):
    settings, site = settings_for(task, **{"rationale-weight": 0.0}), site_for(task, tmp_path)
    prompts, counts, refusal = release_prompts(site, settings, "run")
    assert prompts == [] and refusal == "" and counts["epsilon-charged"] == 0.0
    assert not site.ledger_path.exists() or PrivacyLedger.load(site.ledger_path).entries == []
    adapter, metrics, refusal = train_round(site, settings, "run", 1, [], initial_adapter(settings))
    assert refusal == "" and adapter and metrics["num-examples"] == 16 and metrics["skipped-records"] == 0
    assert [e["mechanism"] for e in PrivacyLedger.load(site.ledger_path).entries] == ["dp-sgd"]
    model, tokenizer = load_lora_model(task / "base", settings.dp)
    rows = multitask_rows([("Mia has 3 pens. How many pens does Mia have now?", "3", "")], tokenizer, 0.0, 128)
    text = tokenizer.decode(rows.tensors[0][0][rows.tensors[1][0].bool()])
    assert text.startswith("predict:") and "explain:" not in text  # one task, no empty rationale to learn


def test_without_dp_the_federated_round_sends_its_update_and_charges_nothing(task, tmp_path):
    settings, site = settings_for(task, private=False, **{"token-epsilon": float("inf")}), site_for(task, tmp_path)
    start = initial_adapter(settings)
    adapter, metrics, refusal = train_round(site, settings, "run", 1, rationales_for(task), start)
    assert refusal == "" and set(adapter) == set(start) and "local-only" not in metrics
    assert any(not np.array_equal(adapter[k], start[k]) for k in start)
    assert not site.ledger_path.exists() or PrivacyLedger.load(site.ledger_path).entries == []


# ---------------------------------------------------------------------------- student-update = full
def test_per_sample_gradients_of_the_full_model_match_a_naive_loop(task):
    """Every trainable GPT-2 weight, the tied input/output embedding included (opacus sums its two
    uses); the position table is frozen (GPT-2 looks it up with batch size 1)."""
    from common.models.student_update import load_full_student

    settings = settings_for(task, **{"student-update": "full"})
    model, tokenizer = load_full_student(task / "base", settings.dp)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "transformer.wte.weight" in dict(trainable) and "transformer.wpe.weight" not in dict(trainable)
    per_sample = per_sample_gradients_match_a_naive_loop(model, tokenizer)
    assert per_sample["transformer.wte.weight"][0].abs().max() > 0


def test_a_full_update_round_changes_every_weight_kind_and_is_charged(task, tmp_path):
    from common.models.student_update import initial_student

    settings, site = settings_for(task, **{"student-update": "full"}), site_for(task, tmp_path)
    start = initial_student(settings)
    assert "transformer.h.0.mlp.c_fc.weight" in start and not any("lora" in k for k in start)
    adapter, metrics, refusal = train_round(site, settings, "run", 1, rationales_for(task), start)
    assert refusal == "" and set(adapter) == set(start) and np.isfinite(metrics["train-loss"])
    for name in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.bias"):
        assert not np.array_equal(adapter[name], start[name]), name  # DP noise alone moves every trained weight
    ledger = PrivacyLedger.load(site.ledger_path)
    assert [e["mechanism"] for e in ledger.entries] == ["dp-sgd"] and ledger.spent_epsilon() > 0
    accuracy, n = heldout_accuracy(site, settings, adapter)
    assert 0.0 <= accuracy <= 1.0 and n == 4


@pytest.mark.parametrize("update", ["lora", "full"])
def test_the_exported_student_loads_with_from_pretrained_and_is_the_trained_one(task, tmp_path, update):
    """What pdss-export writes (``merged_student`` → save_pretrained) in both update modes."""
    from transformers import AutoModelForCausalLM

    from common.models.student_update import initial_student, merged_student, student_model

    settings = settings_for(task, **{"student-update": update})
    trained, _, _ = train_round(site_for(task, tmp_path), settings, "run", 1, rationales_for(task),
                                initial_student(settings))
    model, tokenizer = merged_student(task / "base", settings, trained)
    model.save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = tokenizer("predict: Mia has 3 pens.\n", return_tensors="pt")["input_ids"]
    with student_model(task / "base", settings, trained) as (student, _), torch.no_grad():
        student.eval()
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=1e-4, atol=1e-5)


def test_an_unknown_student_update_is_refused_in_one_line(task):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"student-update must be one of lora, full, got 'adapter'"):
        settings_for(task, **{"student-update": "adapter"})


@pytest.mark.parametrize("key", ["task-train-per-client", "task-heldout-per-client"])
def test_the_generated_task_needs_records_in_both_splits(task, key):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key} must be ≥ 1, got 0"):
        settings_for(task, **{key: 0})
