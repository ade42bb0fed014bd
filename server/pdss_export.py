"""Phase `pdss-export`: the federated step-by-step student with its privacy card.

RUN_DIR/student/: ``save_pretrained`` of the federated student (and the tokenizer): the base model
with the federated LoRA adapter merged in, or with `student-update = full` the averaged weights, ``privacy.json`` and a README model card. Both mechanisms that touched
a site's data are stated: the token-level exponential mechanism on its prompts (pure ε per
record, with its guarantee) and DP-SGD on its student; the figure is each site's ledger
composing both (dp-accounting PLD). With `local-only` nothing was federated: no student.
"""

from __future__ import annotations

import math

from common.atomic import atomic_write_bytes, atomic_write_json, json_safe
from common.privacy.exponential import guarantee
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
    return {
        "format": "privdistill-privacy", "version": 1, "model": "student", "method": "pdss", "run": settings.name,
        "privacy": {
            "epsilon": max((s["epsilon"] for s in sites), default=0.0) if p.perturbs else math.inf,
            "delta": max((s["delta"] for s in sites), default=None),
            "mechanisms": [
                {"mechanism": "token-level exponential mechanism on each prompt (local, once per record)",
                 "epsilon_token": p.token_epsilon, "utility": p.perturb_utility, "output_set": p.perturb_output_set,
                 "candidates": p.perturb_candidates, "guarantee": guarantee(p.token_epsilon, p.perturb_candidates,
                                                                              p.perturb_knn),
                 "charged": "ε_token × tokens perturbed per record; records disjoint, so the pass costs the largest"},
                {"mechanism": f"DP-SGD (Poisson-subsampled Gaussian) on each site's student "
                              f"({'all weights' if p.student_update == 'full' else 'LoRA adapter'})", "rounds": settings.rounds,
                 "epsilon_target": settings.dp.epsilon, "max_grad_norm": settings.dp.max_grad_norm},
            ],
            "composition": "Each site's ledger composes both with dp-accounting's PLD accountant (the pure-ε pass as an "
                           "ε-DP event); the student's ε is the largest site's",
            "sites": sites,
        },
        "evaluation": {"student_accuracy": phases.get("pdss-evaluation", {}).get("accuracy"),
                       "note": "exact match after normalisation on the sites' held-out splits"},
        "settings": {"token-epsilon": p.token_epsilon, "rationale-weight": p.rationale_weight,
                     "teacher-few-shot": p.teacher_few_shot, "rounds": settings.rounds,
                     "local-steps": settings.dp.local_steps, "epsilon": settings.dp.epsilon,
                     "student-update": p.student_update, "learning-rate": settings.dp.learning_rate,
                     "batch-size": settings.dp.batch_size, "max-grad-norm": settings.dp.max_grad_norm,
                     **({} if p.student_update == "full" else {"lora-r": settings.dp.lora_r})},
    }


def model_card(doc: dict) -> str:
    priv = doc["privacy"]
    eps = "∞ (prompts sent unperturbed)" if not math.isfinite(priv["epsilon"]) else f"{priv['epsilon']:.3f}"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [differential-privacy, distilling-step-by-step, federated-learning, privdistill, pdss]", "---", "",
             f"# privdistill pdss student (run `{doc['run']}`)", "",
             f"A small causal LM trained step by step (`predict:` → answer, `explain:` → rationale) at each site on "
             f"rationales a server teacher wrote for perturbed prompts, federated with FedAvg. **Privacy: ε = {eps}, "
             f"δ = {priv['delta']}** per site (record level), composing two mechanisms:", ""]
    for m in priv["mechanisms"]:
        lines.append(f"- **{m['mechanism']}**" + (f": {m['guarantee']}; charged {m['charged']}." if "guarantee" in m
                                                   else f": {m['rounds']} rounds, ε target {m['epsilon_target']}."))
    lines += ["", priv["composition"] + ".", "", "| site | ε (composed) | prompt ε per record | DP-SGD rounds | δ |",
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
