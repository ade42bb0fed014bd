"""The encoder-decoder privatiser without Flower: its loss is exactly 0.5·encoder + 0.5·decoder, a few
steps lower it, it is kept under its inputs' digest, and the site's prompts charge its rewrite."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.pdss import build_mechanism, cache_path, release_prompts
from client.pdss_privatiser import (PrivatiserExample, decoder_prompt, encoder_prompt, ensure_privatiser,
                                    example_loss, load_privatiser, privatiser_dir, training_rows)
from common.errors import ConfigError
from common.privacy.ledger import PrivacyLedger
from common.settings import RunSettings
from tests.helpers import pdss_settings, pdss_site, pdss_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return pdss_task(tmp_path_factory.mktemp("pdss_privatiser"), seed=6, public_records=60, train_per_client=8,
                     canaries=1)


def settings_for(task, **changes) -> RunSettings:
    return pdss_settings(task, **{"token-epsilon": 2.0, "privatiser": "encoder-decoder", "privatiser-steps": 12,
                                  "privatiser-batch-size": 8, "privatiser-learning-rate": 3e-3,
                                  "privatiser-max-new-tokens": 24, **changes})


def public_examples(task, settings) -> list[PrivatiserExample]:
    """Public records as the server phase builds them, with the mechanism's output standing in for p̃
    and a fixed string for the teacher's rationale (no teacher needed to test the privatiser)."""
    mechanism, tokenizer = build_mechanism(task / "base", settings, seed=0)
    rows = [json.loads(x) for x in (task / "task" / "public.jsonl").read_text().splitlines()][:40]
    ids = [tokenizer.encode(r["question"], add_special_tokens=False) for r in rows]
    perturbed = [tokenizer.decode(x) for x in mechanism.perturb_batch(ids)]
    return [PrivatiserExample(r["question"], p, "1 + 1 = 2", r["rationale"]) for r, p in zip(rows, perturbed)]


def mean_target_loss(model, tokenizer, context: str, target: str) -> float:
    c = tokenizer.encode(context, add_special_tokens=False)
    goal = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    logits = model(input_ids=torch.tensor([c + goal])).logits[0, len(c) - 1:-1]
    return F.cross_entropy(logits, torch.tensor(goal)).item()


def test_the_loss_is_half_the_encoder_loss_plus_half_the_decoder_loss(task):
    tokenizer = AutoTokenizer.from_pretrained(task / "base")
    model = AutoModelForCausalLM.from_pretrained(task / "base").eval()
    short = PrivatiserExample("Mia has 3 pens.", "Ada has 7 pens.", "7 + 1 = 8", "3 + 0 = 3")
    long = PrivatiserExample("Omar had 9 cards and gave 4 to Zoe. How many cards does Omar have left?",
                             "Leo had 2 cards and gave 6 to Mia. How many cards does Leo have left?", "", "9 - 4 = 5")
    rows = training_rows([short, long], tokenizer)  # padded together: the padding must not count
    with torch.no_grad():
        got = example_loss(model, *rows.tensors)
        for i, ex in enumerate((short, long)):
            encode = mean_target_loss(model, tokenizer, encoder_prompt(ex.question), ex.perturbed)
            decode = mean_target_loss(model, tokenizer, decoder_prompt(ex.perturbed, ex.teacher_rationale,
                                                                       ex.question), ex.rationale)
            assert got[i].item() == pytest.approx(0.5 * encode + 0.5 * decode, rel=1e-5)


def test_a_few_steps_lower_the_loss_and_the_privatiser_is_kept_under_its_digest(task, tmp_path):
    settings, site = settings_for(task), pdss_site(task, tmp_path / "ledgers" / "client_0.json", 100.0)
    examples = public_examples(task, settings)
    tokenizer = AutoTokenizer.from_pretrained(task / "base")
    rows = training_rows(examples, tokenizer)

    def loss_of(directory) -> float:
        with torch.no_grad():
            return example_loss(AutoModelForCausalLM.from_pretrained(directory).eval(), *rows.tensors).mean().item()

    digest, info = ensure_privatiser(site, settings, examples)
    assert info["cached"] == 0 and info["steps"] == 12
    assert loss_of(privatiser_dir(site, digest)) < loss_of(task / "base") - 0.3  # on the whole training set
    again, info2 = ensure_privatiser(site, settings, examples)
    assert again == digest and info2["cached"] == 1  # same public inputs: the kept weights
    other, _ = ensure_privatiser(site, settings_for(task, **{"privatiser-steps": 1}), examples)
    assert other != digest  # another training setting is another privatiser
    rewrites = load_privatiser(site, settings, digest).encode([e.question for e in examples[:3]])
    decoded = load_privatiser(site, settings, digest).decode([e.perturbed for e in examples[:3]],
                                                              ["", "", ""], [e.question for e in examples[:3]])
    assert len(rewrites) == len(decoded) == 3 and all(isinstance(x, str) for x in rewrites + decoded)


def test_the_ledger_charges_every_token_of_the_encoders_fixed_length_rewrite(task, tmp_path):
    settings, site = settings_for(task), pdss_site(task, tmp_path / "ledgers" / "client_0.json", 200.0)
    digest, _ = ensure_privatiser(site, settings, public_examples(task, settings))
    assert release_prompts(site, settings, "run-a")[2].startswith("client_0: privatiser = encoder-decoder")
    prompts, counts, refusal = release_prompts(site, settings, "run-a", privatiser=digest)
    assert refusal == "" and len(prompts) == 8
    questions = [json.loads(x)["question"] for x in site.train_path.read_text().splitlines()]
    length = settings.pdss.privatiser_prompt_tokens
    # every rewrite goes out as exactly `length` tokens, all perturbed: its length and template words show nothing
    [entry] = PrivacyLedger.load(site.ledger_path).entries
    assert entry["params"]["epsilon_per_record"] == counts["epsilon-per-record"] == 2.0 * length
    assert entry["extra"]["privatiser"] == digest and f"{2.0 * length:g}-DP with respect to any two" in \
        entry["extra"]["guarantee"]
    kept = json.loads(cache_path(site.ledger_path).read_text())["prompts"]
    assert [v["tokens_perturbed"] for v in kept.values()] == [length] * len(questions)
    assert release_prompts(site, settings, "run-b", privatiser=digest)[:2] == (prompts, {**counts, "cached": 8,
                                                                                   "perturbed-now": 0,
                                                                                   "epsilon-charged": 0.0})
    # the plain mechanism is another release: its own keys, its own charge
    plain, _, _ = release_prompts(site, pdss_settings(task, **{"token-epsilon": 2.0}), "run-c")
    assert len(plain) == 8 and len(PrivacyLedger.load(site.ledger_path).entries) == 2


def test_a_bad_privatiser_is_a_one_line_config_error(task):
    with pytest.raises(ConfigError, match="^privatiser must be one of exponential, encoder-decoder, got 'rnn'$"):
        pdss_settings(task, privatiser="rnn")
    with pytest.raises(ConfigError, match="^privatiser-steps must be ≥ 1"):
        pdss_settings(task, **{"privatiser-steps": 0})


def test_the_student_trains_on_the_decoders_rationales_and_needs_what_the_site_sent(task, tmp_path):
    from client.pdss_student import train_round
    from server.server_app import initial_adapter

    settings = settings_for(task, **{"rounds": 1, "local-steps": 1, "batch-size": 4, "max-length": 48})
    site = pdss_site(task, tmp_path / "ledgers" / "client_0.json", 200.0)
    digest, _ = ensure_privatiser(site, settings, public_examples(task, settings))
    prompts, _, _ = release_prompts(site, settings, "run", privatiser=digest)
    questions = [json.loads(x)["question"] for x in site.train_path.read_text().splitlines()]
    teacher = [""] * len(prompts)  # the decoder writes a rationale even where the teacher wrote none
    decoded = load_privatiser(site, settings, digest).decode(prompts, teacher, questions)
    start = initial_adapter(settings)
    _, metrics, refusal = train_round(site, settings, "run", 1, teacher, start, prompts=prompts, privatiser=digest)
    empty = sum(not d.strip() for d in decoded)
    assert refusal == ("" if empty < len(decoded) else "no record has a usable rationale; nothing to train on")
    assert metrics["decoder-empty"] == metrics["skipped-records"] == empty
    assert metrics["num-examples"] == len(decoded) - empty
    _, _, refusal = train_round(site, settings, "run", 1, teacher, start)  # no sent prompts, no privatiser
    assert refusal.startswith("privatiser = encoder-decoder needs this site's sent prompts")
