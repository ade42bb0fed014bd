"""pdss at a site: its questions leave only as prompts perturbed by the token-level exponential
mechanism, each record perturbed and paid for once.

The mechanism's embedding table, output set and pass-through tokens come from the site's own copy
of the public base model (``model-dir``) and public settings. Per record the ledger is charged
ε_token × tokens perturbed; the records are disjoint, so one pass over them costs the largest of
those (parallel composition, :class:`~common.privacy.charges.PureEpsilonCharge`). The perturbed
prompts are kept beside the ledger (``<ledger stem>.pdss-prompts.json``, atomic writes), keyed by
the question and the mechanism's parameters: a later request, in this run or another, re-sends
them and costs nothing. A site whose budget cannot pay refuses before anything is perturbed or
sent, naming the records and their cost.

With ``privatiser = encoder-decoder`` the site's privatiser (client/pdss_privatiser.py, trained on
public data) first rewrites each question. Every token of a rewrite is a function of the whole
private question (the encoder may turn a name into a template word), so nothing of it may pass
through as it is: the rewrite is cut or padded to exactly ``privatiser-prompt-tokens`` = L tokens
and the mechanism perturbs all of them (``fixed_length``, ``perturbing_every_token``). The released
prompt is then ε_token·L-DP with respect to *any* two questions, its length and skeleton included,
and the ledger charges ε_token × L per record. The encoder has no guarantee of its own and the
mechanism is always the last step. The cache key names the strategy and the privatiser's digest.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_json
from common.data.task import TaskRecord, load_task
from common.errors import BudgetExceeded
from common.privacy.accounting import default_delta
from common.privacy.exponential import (TokenExponentialMechanism, fixed_length, fixed_length_guarantee,
                                        passthrough_ids)
from common.privacy.ledger import PrivacyLedger, PureEpsilonCharge

CACHE_FORMAT = "privdistill-pdss-prompts"


def site_records(path, settings) -> list[TaskRecord]:
    p = settings.pdss
    return load_task(path, p.question_field, p.answer_field, p.rationale_field)


def site_ledger(site, settings, n_records: int) -> PrivacyLedger:
    """The site's ledger; its δ is the student's DP-SGD δ (fixed per site by its record count)."""
    delta = settings.dp.delta or default_delta(n_records)
    return PrivacyLedger.open(site.ledger_path, site.client_id, site.epsilon_budget, delta, settings.dp.accountant)


def cache_path(ledger_path) -> Path:
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(f"{ledger_path.stem}.pdss-prompts.json")


@lru_cache(maxsize=4)
def _public_model_parts(model_dir: str):
    """(tokenizer, input-embedding table) of the public base model: frozen and shared, so a
    simulation actor serving many sites loads them once (never any site's data)."""
    from transformers import AutoTokenizer

    from common.models.build import build_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = build_model(model_dir).get_input_embeddings().weight.detach().float().numpy().copy()
    return tokenizer, table


def build_mechanism(model_dir, settings, seed: int | None = None) -> tuple[TokenExponentialMechanism, object]:
    """(mechanism, tokenizer) from the public base model and the run's public settings."""
    p = settings.pdss
    tokenizer, table = _public_model_parts(str(model_dir))
    passing, special = passthrough_ids(tokenizer, p.allow_words())
    outputs = None
    if p.perturb_output_set == "public-tokens":
        public = load_task(settings.public_file(), p.question_field, p.answer_field, p.rationale_field)
        seen = {t for r in public for t in tokenizer.encode(r.question, add_special_tokens=False)}
        outputs = np.array(sorted(seen - special), dtype=np.int64)
    epsilon = p.token_epsilon if p.perturbs else 1.0  # ε = ∞ never samples; the table still checks out
    mechanism = TokenExponentialMechanism(table, epsilon, outputs, passing, special, p.perturb_utility,
                                          p.perturb_distance_clip, p.perturb_candidates, p.perturb_knn, seed)
    return mechanism, tokenizer


def rewrite_mechanism(mechanism: TokenExponentialMechanism, tokenizer, length: int):
    """(mechanism perturbing every token, ids of a rewrite as released): for the encoder's rewrites,
    each cut or padded to ``length`` public-filler tokens first (the filler: ".", a public token)."""
    everything = mechanism.perturbing_every_token()
    stop = tokenizer.encode(".", add_special_tokens=False)
    filler = stop[0] if len(stop) == 1 and stop[0] in set(mechanism.output_ids.tolist()) else int(mechanism.output_ids[0])
    special = mechanism.special_ids

    def ids_of(text: str) -> list[int]:
        ids = [t for t in tokenizer.encode(text, add_special_tokens=False) if t not in special]
        return fixed_length(ids, length, filler)

    return everything, ids_of


def mechanism_digest(mechanism: TokenExponentialMechanism, settings) -> str:
    """Everything that decides a perturbed prompt's distribution: a changed one is a new release."""
    h = hashlib.sha256(json.dumps({**mechanism.describe(), "epsilon_token": settings.pdss.token_epsilon},
                                  sort_keys=True, default=str).encode())
    for array in (mechanism.embeddings, mechanism.output_ids, np.array(sorted(mechanism.passthrough_ids))):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def release_prompts(site, settings, run_name: str, seed: int | None = None,
                    privatiser: str = "") -> tuple[list[str], dict, str]:
    """(perturbed prompts in record order, counts, refusal reason or "").

    ``privatiser``: with ``privatiser = encoder-decoder``, the digest of the site's trained privatiser
    (client/pdss_privatiser.py); its encoder rewrites each question first, and the mechanism perturbs
    and charges the rewrite. ``seed`` only for tests; a site's mechanism draws from the OS RNG.
    """
    records = site_records(site.train_path, settings)
    if settings.pdss.answer_only:  # no rationale is wanted, so nothing is perturbed, charged or sent
        return [], {"records": len(records), "cached": 0, "perturbed-now": 0, "epsilon-charged": 0.0,
                    "epsilon-per-record": 0.0}, ""
    ledger = site_ledger(site, settings, len(records))
    mechanism, tokenizer = build_mechanism(site.model_dir, settings, seed)
    epsilon = settings.pdss.token_epsilon
    counts = {"records": len(records), "cached": 0, "perturbed-now": 0, "epsilon-charged": 0.0}
    encoder_decoder = settings.pdss.encoder_decoder
    if encoder_decoder:
        counts["encoder-empty"] = 0  # rewrites that came back empty (their questions were perturbed as they are)
    if encoder_decoder and not privatiser:
        return [], counts, f"{site.client_id}: privatiser = encoder-decoder, but no trained privatiser was named"
    if not settings.pdss.perturbs:  # ε = ∞: the non-private baseline sends the questions (or rewrites) as they are
        questions = [r.question for r in records]
        sent = _rewrites(site, settings, privatiser, questions, counts) if encoder_decoder else questions
        return sent, {**counts, "epsilon-per-record": math.inf}, ""

    digest = mechanism_digest(mechanism, settings)
    if encoder_decoder:  # a new strategy or privatiser is a new release
        digest = hashlib.sha256(f"{digest}\0encoder-decoder\0{privatiser}\0"
                                f"{settings.pdss.privatiser_prompt_tokens}".encode()).hexdigest()
    keys = [hashlib.sha256(f"{digest}\0{r.question}".encode()).hexdigest() for r in records]
    cache = _read_cache(site.ledger_path)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    unique = {keys[i]: i for i in todo}  # identical questions are one release
    sources = {r.question: r.question for r in records}  # what the mechanism perturbs: q, or the encoder's q'
    if encoder_decoder and unique:
        questions = [records[i].question for i in unique.values()]
        sources.update(zip(questions, _rewrites(site, settings, privatiser, questions, counts)))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    if encoder_decoder:  # no token of a rewrite passes as it is; each is sent as exactly L tokens
        mechanism, encode = rewrite_mechanism(mechanism, tokenizer, settings.pdss.privatiser_prompt_tokens)
    ids = {keys[i]: encode(sources[records[i].question]) for i in unique.values()}
    perturbed_counts = [cache[k]["tokens_perturbed"] if k in cache else mechanism.tokens_perturbed(ids[k])
                        for k in keys]
    if unique:
        todo_keys = sorted(unique)
        tokens = [perturbed_counts[i] for i in unique.values()]
        charge_id = f"pdss-prompts/{hashlib.sha256(''.join(todo_keys).encode()).hexdigest()[:20]}"
        if ledger.status_of(charge_id) == "released":  # released, then the kept copy was lost
            return [], counts, (f"{site.client_id}: the perturbed prompts of {len(unique)} records were released "
                                f"before ({charge_id}) but not kept in {cache_path(site.ledger_path)}; not "
                                "perturbing and releasing them twice")
        if max(tokens) > 0:
            charge = PureEpsilonCharge.from_tokens(epsilon, tokens)
            refusal = _unpayable(ledger, charge, charge_id, records, perturbed_counts, list(unique.values()),
                                 epsilon, settings.pdss.prompt_epsilon)
            if refusal:
                return [], counts, f"{site.client_id}: {refusal}"
            extra = {"mechanism": "token-exponential", "records": len(tokens), "epsilon_token": epsilon,
                     "max_tokens_perturbed": max(tokens), "guarantee": mechanism.guarantee()}
            if encoder_decoder:
                length = settings.pdss.privatiser_prompt_tokens
                extra.update(privatiser=privatiser, perturbed=f"the encoder's rewrite of each question, as exactly "
                             f"{length} tokens, every one perturbed", guarantee=fixed_length_guarantee(
                                 epsilon, length, mechanism.candidates, mechanism.knn))
            ledger.reserve(charge_id, charge, run_id=run_name, extra=extra)
        new = mechanism.perturb_batch(list(ids.values()))  # one sampling call; the mechanism is the last step
        for key, i, out in zip(unique, unique.values(), new):
            cache[key] = {"prompt": tokenizer.decode(out), "tokens_perturbed": perturbed_counts[i]}
        _write_cache(site.ledger_path, cache)  # kept first: every later request re-sends these
        if max(tokens) > 0:
            ledger.release(charge_id)
            counts["epsilon-charged"] = epsilon * max(tokens)
        counts["perturbed-now"] = len(unique)
    counts["cached"] = len(records) - len(todo)
    counts["epsilon-per-record"] = epsilon * max(perturbed_counts)
    return [cache[k]["prompt"] for k in keys], counts, ""


def _rewrites(site, settings, privatiser: str, questions: list[str], counts: dict) -> list[str]:
    """The encoder's rewrite of each question; an empty rewrite falls back to the question itself
    (counted in ``counts["encoder-empty"]``)."""
    from client.pdss_privatiser import load_privatiser

    rewrites = load_privatiser(site, settings, privatiser).encode(questions)
    counts["encoder-empty"] += sum(not w for w in rewrites)
    return [w or q for w, q in zip(rewrites, questions)]


def _unpayable(ledger, charge, charge_id, records, per_record, todo, epsilon, cap) -> str:
    """"" if the ledger can pay ``charge`` and no record exceeds the per-record cap; else which
    records cannot be paid and what they would cost (nothing is reserved or sent)."""
    try:
        if charge.epsilon_per_record <= cap:
            ledger.check(charge, charge_id)
            return ""
    except BudgetExceeded:
        pass
    costs = sorted({epsilon * per_record[i] for i in todo})
    payable = 0.0  # the largest per-record ε both the cap and the ledger allow (binary search)
    lo, hi = 0, len(costs) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        c = costs[mid]
        ok = c <= cap and (c == 0 or ledger.cost_of(PureEpsilonCharge(c, 1)) <= ledger.epsilon_budget)
        if ok:
            payable, lo = c, mid + 1
        else:
            hi = mid - 1
    over = [i for i in todo if epsilon * per_record[i] > payable]
    listed = ", ".join(f"record {i + 1} ({per_record[i]} tokens: ε {epsilon * per_record[i]:g})" for i in over[:5])
    more = f" and {len(over) - 5} more" if len(over) > 5 else ""
    return (f"cannot pay for {len(over)} of {len(todo)} prompts, nothing was sent: {listed}{more}; at most ε "
            f"{payable:g} per record fits (prompt-epsilon {cap:g}, ledger spent {ledger.spent_epsilon():.4g} of "
            f"{ledger.epsilon_budget:g}). Lower token-epsilon, allow-list more template words or raise the budget")


def _read_cache(ledger_path) -> dict:
    path = cache_path(ledger_path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return dict(data["prompts"]) if data.get("format") == CACHE_FORMAT else {}


def _write_cache(ledger_path, prompts: dict) -> None:
    Path(ledger_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_path(ledger_path), {"format": CACHE_FORMAT, "prompts": prompts})
