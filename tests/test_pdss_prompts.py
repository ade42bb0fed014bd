"""pdss prompts at a site: charged once per record, cached beside the ledger, refused when unpayable."""

from __future__ import annotations

import json
import math

import pytest

from client.pdss import build_mechanism, cache_path, release_prompts, site_ledger
from common.errors import ConfigError
from common.privacy.ledger import DPSGDCharge, PrivacyLedger
from common.settings import RunSettings
from tests.helpers import pdss_settings, pdss_site, pdss_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pdss_task(tmp_path_factory.mktemp("pdss_prompts"), seed=3, public_records=200, train_per_client=12,
                     canaries=2)


def settings_for(task, **changes) -> RunSettings:
    return pdss_settings(task, **{"token-epsilon": 2.0, **changes})


def site_for(task, tmp_path, budget: float = 200.0):
    return pdss_site(task, tmp_path / "ledgers" / "client_0.json", budget)


def test_charged_once_per_record_and_reused(task, tmp_path):
    settings, site = settings_for(task), site_for(task, tmp_path)
    prompts, counts, refusal = release_prompts(site, settings, "run-a")
    assert refusal == "" and len(prompts) == 12 and counts["perturbed-now"] == 12
    mechanism, tokenizer = build_mechanism(site.model_dir, settings)
    questions = [json.loads(x)["question"] for x in site.train_path.read_text().splitlines()]
    k = [mechanism.tokens_perturbed(tokenizer.encode(q, add_special_tokens=False)) for q in questions]
    ledger = PrivacyLedger.load(site.ledger_path)
    [entry] = ledger.entries
    assert entry["mechanism"] == "pure-epsilon" and entry["status"] == "released"
    assert entry["params"] == {"epsilon_per_record": 2.0 * max(k), "records": 12}  # parallel: the largest record
    assert counts["epsilon-per-record"] == 2.0 * max(k)
    assert math.isclose(ledger.spent_epsilon(), 2.0 * max(k), rel_tol=1e-3, abs_tol=2e-3)

    again, counts2, refusal2 = release_prompts(site, settings, "run-b")  # a later request, even another run
    assert refusal2 == "" and again == prompts and counts2["cached"] == 12 and counts2["epsilon-charged"] == 0
    assert len(PrivacyLedger.load(site.ledger_path).entries) == 1

    # A new record is perturbed and charged alone; the others are re-sent from the cache.
    with site.train_path.open() as f:
        original = f.read()
    try:
        extra = {"question": "Ravi has 2 pens. Ada gives him 5 more. How many pens does Ravi have now?",
                 "answer": "7"}
        site.train_path.write_text(original + json.dumps(extra) + "\n")
        third, counts3, _ = release_prompts(site, settings, "run-c")
        assert third[:12] == prompts and counts3["perturbed-now"] == 1
        entries = PrivacyLedger.load(site.ledger_path).entries
        new_k = mechanism.tokens_perturbed(tokenizer.encode(extra["question"], add_special_tokens=False))
        assert len(entries) == 2 and entries[1]["params"] == {"epsilon_per_record": 2.0 * new_k, "records": 1}
    finally:
        site.train_path.write_text(original)


def test_template_words_pass_and_private_tokens_are_paid(task, tmp_path):
    settings = settings_for(task)
    mechanism, tokenizer = build_mechanism(task / "base", settings)
    ids = tokenizer.encode("Mia has 3 pears. Omar gives her 4 more.", add_special_tokens=False)
    passed = [tokenizer.decode([t]).strip() for t in ids if mechanism.passes(t)]
    assert "has" in passed and "more" in passed and "3" not in passed and "Mia" not in passed


def test_unpayable_site_refuses_before_sending(task, tmp_path):
    settings, site = settings_for(task, **{"prompt-epsilon": 64.0}), site_for(task, tmp_path, budget=5.0)
    prompts, _, refusal = release_prompts(site, settings, "run-a")
    assert prompts == [] and "nothing was sent" in refusal and "record 1 (" in refusal and "ε" in refusal
    assert "\n" not in refusal
    assert PrivacyLedger.load(site.ledger_path).entries == [] and not cache_path(site.ledger_path).exists()
    # The per-record cap binds too, whatever the budget.
    capped = settings_for(task, **{"prompt-epsilon": 4.0})
    assert "prompt-epsilon 4" in release_prompts(site_for(task, tmp_path / "b"), capped, "run-a")[2]


def test_prompts_compose_with_dp_sgd_as_dp_accounting_says(task, tmp_path):
    from dp_accounting.pld import common, privacy_loss_distribution as pld

    settings, site = settings_for(task), site_for(task, tmp_path)
    release_prompts(site, settings, "run-a")
    ledger = site_ledger(site, settings, 12)
    eps_prompt = ledger.entries[0]["params"]["epsilon_per_record"]
    ledger.charge("run-a/round-1", DPSGDCharge(1.0, 0.25, 20, 1.0), run_id="run-a", round=1)
    pure = pld.from_privacy_parameters(common.DifferentialPrivacyParameters(eps_prompt, 0.0),
                                       value_discretization_interval=1e-3)
    sgd = pld.from_gaussian_mechanism(1.0, sampling_prob=0.25, value_discretization_interval=1e-3).self_compose(20)
    expected = pure.compose(sgd).get_epsilon_for_delta(ledger.delta)
    assert math.isclose(ledger.spent_epsilon(), expected, rel_tol=1e-3, abs_tol=1e-2)
    assert eps_prompt < ledger.spent_epsilon() < eps_prompt + 10


def test_lost_cache_is_not_released_twice(task, tmp_path):
    settings, site = settings_for(task), site_for(task, tmp_path)
    release_prompts(site, settings, "run-a")
    cache_path(site.ledger_path).unlink()
    prompts, _, refusal = release_prompts(site, settings, "run-a")
    assert prompts == [] and "not perturbing and releasing them twice" in refusal


def test_infinite_epsilon_sends_questions_and_charges_nothing(task, tmp_path):
    settings, site = settings_for(task, **{"token-epsilon": math.inf}), site_for(task, tmp_path)
    prompts, counts, refusal = release_prompts(site, settings, "run-a")
    assert refusal == "" and prompts[2] == json.loads(site.train_path.read_text().splitlines()[2])["question"]
    assert PrivacyLedger.load(site.ledger_path).entries == []


@pytest.mark.parametrize("key, value, expected", [
    ("token-epsilon", 0.0, "per-token epsilon must be > 0"),
    ("token-epsilon", -1.0, "per-token epsilon must be > 0"),
    ("prompt-epsilon", 0.0, "prompt-epsilon must be in (0, 500]"),
    ("student-training", "central", "student-training must be one of"),
    ("rationale-weight", 1.5, "rationale-weight must be in [0, 1]"),
])
def test_bad_pdss_settings_are_one_line(key, value, expected):
    with pytest.raises(ConfigError) as info:
        RunSettings.from_flat({"mode": "pdss", key: value})
    assert expected in str(info.value) and "\n" not in str(info.value)
