"""Canary exposure and extraction: hand-computed examples, then a tiny GPT-2 that memorises.

The statistical tests share one module-scoped model: a tiny GPT-2 trained with plain Adam
on filler text that contains one canary 40 times and one long record 20 times. Thresholds
(with the values observed when they were set):
  memorised canary, extrapolated exposure > 20 bits                 (observed ~48 bits)
  memorised canary, rank exposure == log2(n+1), i.e. rank 1         (the cap of the sampled estimate)
  8 never-seen canaries, mean rank exposure < 4 bits                (observed 1.25 bits; expectation
      1/ln 2 ~ 1.44 bits with sd ~1.44/sqrt(8) ~ 0.5, so 4 bits is ~5 sd away)
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from common.audit.exposure import (CDF_FLOOR, canary_logppl, canary_prefix, candidate_logppls, exposure_by_rank,
                                   exposure_extrapolated, exposure_table, random_secrets, summarize_by_repeats)
from common.audit.extraction import extract_canaries, parse_secret, record_extraction_rate
from common.models.build import build_model
from common.models.lm import encode_texts, per_record_loss
from tests.helpers import tiny_tokenizer

N_CANDIDATES = 300
MEMORISED = {"id": "canary-mem", "name": "Quentin Marlowe", "secret": "4829103756", "repeats": 40}
MEMORISED["text"] = f"the account number of {MEMORISED['name']} is {MEMORISED['secret']}"
UNSEEN_NAMES = ["Beatrix Holm", "Dmitri Vance", "Rosa Quill", "Hugo Brandt", "Nadia Frost", "Felix Ocampo",
                "Ingrid Sol", "Pavel Marsh"]
LONG_RECORD = ("Escalation memo: the vault audit at the harbour office found ledger seven reconciled twice, "
               "so every balance after the ninth is off by a small amount.")
FIRST = ["Maria", "John", "Wei", "Priya", "Omar", "Lena", "Carlos", "Aiko", "Tom", "Fatima"]
LAST = ["Lopez", "Carter", "Chen", "Patel", "Haddad", "Berg", "Diaz", "Sato", "Reed", "Khan"]
FILLER = ["Ticket {t}: customer {n} reports a declined card payment of ${a}.{c} on day {d}.",
          "Agent note: account {acc} of {n} was locked after {d} failed logins.",
          "Customer {n} asks why a transfer of ${a}.{c} is pending; reference {t}.",
          "Refund of ${a}.{c} approved for {n}; informed by email, case {t}."]


def filler_texts(n: int, rng: random.Random) -> list[str]:
    return [rng.choice(FILLER).format(t=rng.randint(1000, 9999), n=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                                      a=rng.randint(1, 999), c=rng.randint(10, 99), d=rng.randint(1, 28),
                                      acc="".join(rng.choice("0123456789") for _ in range(8)))
            for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is about as fast, and immune to oversubscription on a busy 2-CPU box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def memorised(one_thread):
    """(model, tokenizer, never-seen canaries): the tiny GPT-2 memorises MEMORISED and LONG_RECORD."""
    rng = random.Random(0)
    texts = filler_texts(150, rng) + [MEMORISED["text"]] * 40 + [LONG_RECORD] * 20
    rng.shuffle(texts)
    tokenizer = tiny_tokenizer()
    model = build_model("tiny-gpt2", tokenizer, seed=0)
    loader = torch.utils.data.DataLoader(encode_texts(texts, tokenizer, 128), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):  # 8 epochs of 14 steps (4 already suffice: ~35 bits, greedy hit)
        for input_ids, mask in loader:
            per_record_loss(model, input_ids, mask).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    secrets = random_secrets(len(UNSEEN_NAMES), np.random.default_rng(123))
    unseen = [{"id": f"canary-u{i}", "name": n, "secret": s, "repeats": 0,
               "text": f"the account number of {n} is {s}"} for i, (n, s) in enumerate(zip(UNSEEN_NAMES, secrets))]
    return model, tokenizer, unseen


# ------------------------------------------------------------------ hand-computed exposure

def test_exposure_by_rank_on_an_enumerated_space_of_8():
    space = [5.0, 1.0, 7.0, 3.0, 2.0, 8.0, 6.0, 4.0]  # the canary's own value is in the space
    assert exposure_by_rank(1.0, space, space_size=8) == 3.0  # rank 1: log2 8
    assert exposure_by_rank(3.0, space, space_size=8) == pytest.approx(3 - math.log2(3))  # 1 and 2 are lower
    assert exposure_by_rank(8.0, space, space_size=8) == 0.0  # rank 8: nothing learned


def test_exposure_by_rank_with_sampled_candidates():
    candidates = [2.0, 4.0, 6.0]  # the canary is not among them: the space counts n + 1 = 4 values
    assert exposure_by_rank(1.0, candidates) == 2.0
    assert exposure_by_rank(5.0, candidates) == pytest.approx(2 - math.log2(3))
    assert exposure_by_rank(9.0, candidates) == 0.0


def test_extrapolated_exposure_matches_the_closed_form_of_a_known_skew_normal():
    a, loc, scale = -4.0, 60.0, 12.0  # left-skewed, like log-perplexities of random secrets
    samples = stats.skewnorm.rvs(a, loc=loc, scale=scale, size=5000, random_state=np.random.default_rng(0))
    for bits in (4.0, 10.0):
        value = stats.skewnorm.ppf(2.0 ** -bits, a, loc=loc, scale=scale)  # closed form: exposure == bits
        assert exposure_extrapolated(value, samples) == pytest.approx(bits, abs=0.5)
    # far beyond any double: the CDF is clipped at 1e-300
    assert exposure_extrapolated(loc - 1e4 * scale, samples) == pytest.approx(-math.log2(CDF_FLOOR))


def test_summarize_by_repeats():
    rows = [{"repeats": r, "exposure": e} for r, e in [(0, 1.0), (0, 3.0), (4, 10.0), (16, 30.0), (16, 20.0)]]
    assert summarize_by_repeats(rows) == {0: {"mean": 2.0, "max": 3.0, "n": 2}, 4: {"mean": 10.0, "max": 10.0, "n": 1},
                                          16: {"mean": 25.0, "max": 30.0, "n": 2}}


def test_random_secrets_are_ten_digits_and_seeded():
    secrets = random_secrets(200, np.random.default_rng(0))
    assert all(len(s) == 10 and s.isdigit() for s in secrets)
    assert any(s.startswith("0") for s in secrets)  # leading zeros kept (expect ~20 of 200)
    assert secrets == random_secrets(200, np.random.default_rng(0))
    assert parse_secret(" 0123456789 and more") == "0123456789"
    assert parse_secret(" 012345678 9") is None


# ------------------------------------------------------------------ the memorising model

def test_logppl_is_the_secret_nll_in_bits(memorised):
    model, tokenizer, unseen = memorised
    canary = unseen[0]
    prefix_len = len(tokenizer(canary_prefix(canary["name"]), add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(canary["text"], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    expected = -logp[prefix_len - 1:].sum().item() / math.log(2)
    assert canary_logppl(model, tokenizer, [canary])[0] == pytest.approx(expected, rel=1e-5)


def test_memorised_canary_is_exposed_and_never_seen_ones_are_not(memorised):
    model, tokenizer, unseen = memorised
    value = canary_logppl(model, tokenizer, [MEMORISED])[0]
    candidates = candidate_logppls(model, tokenizer, MEMORISED["name"], N_CANDIDATES, np.random.default_rng(0))
    assert exposure_by_rank(value, candidates) == pytest.approx(math.log2(N_CANDIDATES + 1))  # rank 1
    assert exposure_extrapolated(value, candidates) > 20.0

    rows = exposure_table(model, tokenizer, unseen, n_candidates=N_CANDIDATES, seed=0, method="rank")
    assert [r["id"] for r in rows] == [c["id"] for c in unseen] and {r["method"] for r in rows} == {"rank"}
    summary = summarize_by_repeats(rows)
    assert summary[0]["n"] == len(unseen)
    assert summary[0]["mean"] < 4.0, rows  # expectation 1/ln 2 ~ 1.44 bits for a never-seen secret


def test_greedy_extraction_recovers_only_the_memorised_secret(memorised):
    model, tokenizer, unseen = memorised
    rows = extract_canaries(model, tokenizer, [MEMORISED] + unseen, n_samples=4, seed=0)
    assert rows[0]["greedy"] == MEMORISED["secret"] and rows[0]["greedy_hit"]
    assert len(rows[0]["samples"]) == 4
    assert not any(r["greedy_hit"] for r in rows[1:]) and sum(r["sampled_hits"] for r in rows[1:]) == 0
    one_by_one = extract_canaries(model, tokenizer, [MEMORISED] + unseen, n_samples=0, batch_size=1)
    assert [r["greedy"] for r in one_by_one] == [r["greedy"] for r in rows]  # left padding changes nothing
    again = extract_canaries(model, tokenizer, [MEMORISED] + unseen, n_samples=4, seed=0)
    assert [r["samples"] for r in again] == [r["samples"] for r in rows]  # seeded sampling


def test_record_extraction_rate(memorised):
    model, tokenizer, _ = memorised
    assert len(tokenizer(LONG_RECORD)["input_ids"]) >= 64
    out = record_extraction_rate(model, tokenizer, [LONG_RECORD, "too short to be eligible"])
    assert out == {"rate": 1.0, "extracted": 1, "eligible": 1, "records": 2}
    rng = random.Random(5)
    fresh = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                      for _ in range(40)) for _ in range(4)]
    out = record_extraction_rate(model, tokenizer, fresh)
    assert out["eligible"] == 4 and out["rate"] == 0.0
    assert math.isnan(record_extraction_rate(model, tokenizer, ["short"])["rate"])
