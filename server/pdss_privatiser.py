"""Phase `pdss-privatiser` (privatiser = encoder-decoder only): the public training examples of the
sites' privatiser, built with the server's teacher, then `train.pdss_privatiser` at every site.

For each public record with a rationale: its question q, p̃ = the token-level exponential mechanism's
output on q at the run's ε_token, as a site sends its rewrites (exactly privatiser-prompt-tokens
tokens, every one perturbed) (public data: nothing to charge; the run's seed, so a rerun builds
the same examples and the sites reuse the privatiser they kept), r̃ = the teacher's rationale for p̃
(greedy, the rationale service's own prompt), and q's public rationale. Written to
RUN_DIR/pdss/privatiser-data.json and sent to every site, which trains its privatiser on them
(client/pdss_privatiser.py) and replies with the privatiser's digest; the later phases name that
digest back to each site.
"""

from __future__ import annotations

from dataclasses import asdict
from logging import INFO, WARNING

from flwr.app import ConfigRecord
from flwr.common.logger import log

from client.pdss_privatiser import PrivatiserExample
from common.atomic import atomic_write_json
from common.errors import RoundFailed
from server.pdss_prompts import ask_every_site
from server.pdss_rationales import load_teacher_generator, public_records
from server.rationales import few_shot_prefix, write_rationales
from server.server_app import wait_for_nodes

DATA_FILE = "pdss/privatiser-data.json"


def public_examples(settings, generator) -> list[PrivatiserExample]:
    """(q, mechanism(q), teacher's rationale for it, q's rationale) for each public record with a rationale."""
    from client.pdss import build_mechanism, rewrite_mechanism

    p = settings.pdss
    public = [r for r in public_records(settings) if r.rationale]
    questions = [r.question for r in public]
    perturbed = questions
    if p.perturbs:  # as a site sends a rewrite: exactly privatiser-prompt-tokens tokens, every one perturbed
        mechanism, tokenizer = build_mechanism(settings.model_dir, settings, seed=settings.seed)
        mechanism, ids_of = rewrite_mechanism(mechanism, tokenizer, p.privatiser_prompt_tokens)
        perturbed = [tokenizer.decode(x) for x in mechanism.perturb_batch([ids_of(q) for q in questions])]
    prefix = few_shot_prefix(public_records(settings), p.teacher_few_shot, settings.seed)
    written = write_rationales(generator, perturbed, prefix, p.teacher_max_new_tokens, p.teacher_batch_size)
    return [PrivatiserExample(q, x, w.rationale, r.rationale) for q, x, w, r in zip(questions, perturbed, written, public)]


def run(phase) -> dict:
    settings = phase.settings
    if not phase.run.exists():  # the first phase of the pipeline opens the run's state
        phase.run.commit(phase.run.new_state(settings.to_run_config()))
    examples = public_examples(settings, load_teacher_generator(settings))
    path = phase.run.path / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"examples": [asdict(e) for e in examples]})
    wait_for_nodes(phase.grid, settings.clients, timeout=settings.round_timeout)
    config = ConfigRecord({"run-name": settings.name, "questions": [e.question for e in examples],
                           "perturbed": [e.perturbed for e in examples],
                           "teacher-rationales": [e.teacher_rationale for e in examples],
                           "rationales": [e.rationale for e in examples]})
    replies, failed = ask_every_site(phase, "train.pdss_privatiser", {"config": config})
    sites = {}
    for reply in replies:
        client, metrics = reply.content["client"], reply.content["metrics"]
        sites[client["client-id"]] = {"privatiser": client["privatiser"], "loss_first": metrics["loss-first"],
                                      "loss_last": metrics["loss-last"], "cached": bool(metrics["cached"])}
    if len(sites) < settings.min_clients:
        raise RoundFailed(f"pdss privatiser: {len(sites)} sites trained one, need {settings.min_clients}: {failed[:1]}")
    if len({s["privatiser"] for s in sites.values()}) > 1:
        log(WARNING, "pdss privatiser: sites hold different public base models (%d digests)",
            len({s["privatiser"] for s in sites.values()}))
    log(INFO, "pdss privatiser: %d public examples, trained at %d sites", len(examples), len(sites))
    return {"examples": len(examples), "sites": sites, "failed": failed, "file": DATA_FILE}

