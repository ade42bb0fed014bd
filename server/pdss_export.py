"""Phase `pdss-export`: the federated step-by-step student with its privacy card.

RUN_DIR/student/: ``save_pretrained`` of the federated student (and the tokenizer): the base model
with the federated LoRA adapter merged in, or with `student-update = full` the averaged weights;
``privacy.json`` and a README model card. The card names the privatisation strategy (exponential,
or encoder-decoder with what its guarantee is). Both mechanisms that touched a site's data are
stated: the token-level exponential mechanism on its prompts (pure ε per
record, with its guarantee) and DP-SGD on its student; the figure is each site's ledger
composing both (dp-accounting PLD). With `local-only` nothing was federated: no student.
"""

from __future__ import annotations

import math

from common.atomic import atomic_write_bytes, atomic_write_json, json_safe
from common.privacy.exponential import fixed_length_guarantee, guarantee
from common.privacy.ledger import PrivacyLedger, ledger_paths
from server.export import STUDENT_DIR


def privacy_document(run_dir, settings, phases: dict) -> dict:
    p = settings.pdss
    sites = []
    for path in ledger_paths(run_dir / "ledgers"):
        ledger = PrivacyLedger.load(path)
        entries = [e for e in ledger.entries if e["run_id"] == settings.name]
        prompts = [e for e in entries if e["mechanism"] == "pure-epsilon"]
        sites.append({"site": ledger.client_id, "epsilon": ledger.spent_epsilon(), "delta": ledger.delta,
                      "accountant": ledger.accountant, "budget": ledger.epsilon_budget,
                      "prompt_epsilon_per_record": max((e["params"]["epsilon_per_record"] for e in prompts), default=0.0),
                      "dp_sgd_rounds": sum(e["mechanism"] == "dp-sgd" for e in entries)})
    mechanisms = []
    if not p.answer_only:
        mechanisms.append({
            "mechanism": "token-level exponential mechanism on each prompt (local, once per record)",
            "epsilon_token": p.token_epsilon, "utility": p.perturb_utility, "output_set": p.perturb_output_set,
            "candidates": p.perturb_candidates,
            "guarantee": fixed_length_guarantee(p.token_epsilon, p.privatiser_prompt_tokens, p.perturb_candidates,
                                                p.perturb_knn) if p.encoder_decoder
            else guarantee(p.token_epsilon, p.perturb_candidates, p.perturb_knn),
            "charged": (f"ε_token × {p.privatiser_prompt_tokens} per record (the encoder's rewrite, every token)"
                        if p.encoder_decoder else "ε_token × tokens perturbed per record") +
                       "; records disjoint, so the pass costs the largest"})
    if settings.dp.private:
        mechanisms.append({"mechanism": f"DP-SGD (Poisson-subsampled Gaussian) on each site's student "
                                        f"({'all weights' if p.student_update == 'full' else 'LoRA adapter'})",
                           "rounds": settings.rounds, "epsilon_target": settings.dp.epsilon,
                           "max_grad_norm": settings.dp.max_grad_norm})
    private = settings.dp.private and (p.perturbs or p.answer_only)
    return {
        "format": "privdistill-privacy", "version": 1, "model": "student", "method": "pdss", "run": settings.name,
        "privacy": {
            "epsilon": max((s["epsilon"] for s in sites), default=0.0) if private else math.inf,
            "delta": max((s["delta"] for s in sites), default=None),
            "mechanisms": mechanisms,
            "strategy": strategy_of(p),
            "composition": "Each site's ledger composes both with dp-accounting's PLD accountant (the pure-ε pass as an "
                           "ε-DP event); the student's ε is the largest site's",
            "sites": sites,
        },
        "evaluation": {"student_accuracy": phases.get("pdss-evaluation", {}).get("accuracy"),
                       "note": "exact match after normalisation on the sites' held-out splits"},
        "settings": {"privatiser": p.privatiser, "token-epsilon": p.token_epsilon, "rationale-weight": p.rationale_weight,
                     "teacher-few-shot": p.teacher_few_shot, "rounds": settings.rounds,
                     "local-steps": settings.dp.local_steps, "epsilon": settings.dp.epsilon,
                     "student-update": p.student_update, "learning-rate": settings.dp.learning_rate,
                     "batch-size": settings.dp.batch_size, "max-grad-norm": settings.dp.max_grad_norm,
                     **({} if p.student_update == "full" else {"lora-r": settings.dp.lora_r})},
    }


def strategy_of(p) -> dict:
    """The privatisation strategy, as the card states it."""
    if p.answer_only:
        return {"privatiser": "none", "statement": "answer-only: no prompt leaves a site, so nothing is privatised"}
    if not p.encoder_decoder:
        return {"privatiser": "exponential", "statement": "each question is perturbed by the mechanism as it is"}
    length = p.privatiser_prompt_tokens
    return {"privatiser": "encoder-decoder", "prompt_tokens": length, "statement": (
        "a local model trained on public data only rewrites each question before the mechanism and, after the "
        "teacher answered, decodes its rationale into one for the raw question (local post-processing, no "
        f"charge). Each rewrite is cut or padded to exactly {length} tokens and every one of them is perturbed "
        "(the encoder saw the private question, so no token of its output passes as it is): the released "
        f"prompt is ε_token·{length}-DP with respect to any two questions, its length and skeleton included. "
        "The encoder is deterministic pre-processing with no guarantee of its own. The mechanism is always "
        "the last step before anything leaves a site")}


def model_card(doc: dict) -> str:
    priv = doc["privacy"]
    eps = "∞ (prompts sent unperturbed or the student trained without DP)" if not math.isfinite(priv["epsilon"]) \
        else f"{priv['epsilon']:.3f}"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [differential-privacy, distilling-step-by-step, federated-learning, privdistill, pdss]", "---", "",
             f"# privdistill pdss student (run `{doc['run']}`)", "",
             f"A small causal LM trained step by step (`predict:` → answer, `explain:` → rationale) at each site on "
             f"rationales a server teacher wrote for perturbed prompts, federated with FedAvg. **Privacy: ε = {eps}, "
             f"δ = {priv['delta']}** per site (record level), from "
             + {0: "no DP mechanism (a non-private baseline).", 1: "one mechanism:"}.get(len(priv["mechanisms"]),
                                                                                  "two mechanisms, composed:"), ""]
    for m in priv["mechanisms"]:
        lines.append(f"- **{m['mechanism']}**" + (f": {m['guarantee']}; charged {m['charged']}." if "guarantee" in m
                                                   else f": {m['rounds']} rounds, ε target {m['epsilon_target']}."))
    lines += ["", f"**Strategy: {priv['strategy']['privatiser']}**: {priv['strategy']['statement']}.", "",
              priv["composition"] + ".", "", "| site | ε (composed) | prompt ε per record | DP-SGD rounds | δ |",
              "|---|---|---|---|---|"]
    lines += [f"| {s['site']} | {s['epsilon']:.3f} | {s['prompt_epsilon_per_record']:g} | {s['dp_sgd_rounds']} | "
              f"{s['delta']:.1e} |" for s in priv["sites"]]
    acc = doc["evaluation"]["student_accuracy"]
    lines += ["", "## Evaluation", "", f"Answer accuracy (exact match) on the sites' held-out splits: "
              f"{'–' if acc is None else f'{acc:.3f}'}.", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in doc["settings"].items()]
    return "\n".join(lines + [""])


def run(phase) -> dict:
    settings = phase.settings
    students = phase.summary_of("pdss-students")
    if students.get("local_only"):
        return {"skipped": "student-training = local-only: every site keeps its own model; nothing to export"}
    from common.models.student_update import merged_student

    model, tokenizer = merged_student(settings.model_dir, settings, phase.run.load_adapter(students["adapter"]))
    out = phase.run.path / STUDENT_DIR
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    doc = privacy_document(phase.run.path, settings, phase.state().get("phases", {}))
    atomic_write_json(out / "privacy.json", json_safe(doc))
    atomic_write_bytes(out / "README.md", model_card(doc).encode("utf-8"))
    return {"directory": STUDENT_DIR, "epsilon": doc["privacy"]["epsilon"]}
