"""pdss on one machine: the generated task, a teacher and a student base warmed on public data,
and the research metrics that need what no party of a real deployment holds (raw prompts beside
what the server saw).

Warm-ups use the public split only: the teacher learns the service's format (few-shot examples
then a question, its rationale, its answer); the student's base model, sharing the teacher's
tokenizer, learns the student's two prefixed tasks on public rationales.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from common.data.task import load_task, normalise_answer


def prepare_pdss(settings, run_dir: Path) -> None:
    from transformers import AutoTokenizer

    from common.models.warmup import warmup_teacher
    from server.rationales import warmup_texts

    p = settings.pdss
    data_dir = Path(settings.data_dir)
    if settings.generate_data and not (data_dir / "manifest.json").exists():
        from common.data.arithmetic import generate_task

        generate_task(data_dir, n_clients=settings.clients, seed=settings.seed,
                      train_per_client=settings.task_train_per_client,
                      heldout_per_client=settings.task_heldout_per_client)
    public = load_task(settings.public_file(), p.question_field, p.answer_field, p.rationale_field)
    p.teacher_dir = p.teacher_dir or str(run_dir / "teacher")
    if not (Path(p.teacher_dir) / "config.json").exists():
        warmup_teacher(warmup_texts(public, p.teacher_few_shot, settings.seed), p.teacher_dir,
                       spec=settings.warmup_spec, steps=settings.warmup_steps, seed=settings.seed, progress=False)
    settings.model_dir = settings.model_dir or str(run_dir / "student-base")
    if not (Path(settings.model_dir) / "config.json").exists():
        texts = [f"predict: {r.question}\n{r.answer}" for r in public] + \
                [f"explain: {r.question}\n{r.rationale}" for r in public if r.rationale]
        warmup_teacher(texts, settings.model_dir, spec=p.student_spec, steps=p.student_warmup_steps,
                       seed=settings.seed, progress=False, tokenizer=AutoTokenizer.from_pretrained(p.teacher_dir))


def pdss_metrics(settings) -> dict:
    """Teacher accuracy on raw and on perturbed prompts; leakage of private tokens into what the
    server saw; whether a canary's PIN can be read back. Written to RUN_DIR/pdss/metrics.json."""
    from server.pdss_prompts import PROMPTS_FILE
    from server.pdss_rationales import RATIONALES_FILE, load_teacher_generator, public_records
    from server.rationales import few_shot_prefix, write_rationales

    p, run_dir, data_dir = settings.pdss, Path(settings.run_dir), Path(settings.data_dir)
    seen = json.loads((run_dir / PROMPTS_FILE).read_text())["sites"]
    written = json.loads((run_dir / RATIONALES_FILE).read_text())["sites"]
    truth = json.loads((data_dir / "canaries.json").read_text()) if (data_dir / "canaries.json").exists() else None
    generator = load_teacher_generator(settings)
    prefix = few_shot_prefix(public_records(settings), p.teacher_few_shot, settings.seed)
    raw_ok = perturbed_ok = total = 0
    leaks = [0, 0, 0]  # private tokens surviving, private tokens, canaries read back
    for client, site in sorted(seen.items()):
        records = load_task(data_dir / client / "train.jsonl", p.question_field, p.answer_field, p.rationale_field)
        raw = write_rationales(generator, [r.question for r in records], prefix, p.teacher_max_new_tokens,
                               p.teacher_batch_size)
        raw_ok += correct(records, [a.answer for a in raw])
        perturbed_ok += correct(records, [b["answer"] for b in written[client]])
        total += len(records)
        if truth is not None and site["prompts"]:  # answer-only sites send none: nothing can leak
            leaks = [a + b for a, b in zip(leaks, leakage_counts(truth, client, site["prompts"]))]
    sent = not p.answer_only
    metrics = {"teacher_accuracy_raw": raw_ok / total,
               "teacher_accuracy_perturbed": perturbed_ok / total if sent else None,
               "prompts": total if sent else 0, "leakage": leaks[0] / leaks[1] if leaks[1] else (None if sent else 0.0),
               "canaries": len(truth["canaries"]) if truth else 0, "canaries_read_back": leaks[2]}
    (run_dir / "pdss" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def correct(records, answers: list[str]) -> int:
    return sum(normalise_answer(a) == normalise_answer(r.answer) for r, a in zip(records, answers))


def leakage_counts(truth: dict, client: str, prompts: list[str]) -> tuple[int, int, int]:
    """(private tokens still present in the prompts the server saw, private tokens, canary PINs read
    back whole). A private token survives if it is still a word of its perturbed prompt."""
    survived = private = 0
    for words, prompt in zip(truth["private_tokens"][f"{client}/train"], prompts):
        left = set(re.findall(r"\w+", prompt))
        survived += sum(w in left for w in words)
        private += len(words)
    read = sum(c["secret"] in prompts[c["record"]] for c in truth["canaries"] if f"client_{c['client']}" == client)
    return survived, private, read


def pdss_report(state: dict, settings, console) -> None:
    from rich.table import Table

    from common.privacy.ledger import PrivacyLedger, ledger_paths

    phases, metrics = state.get("phases", {}), state.get("metrics", {})
    table = Table(title=f"{settings.name}: pdss, {settings.clients} sites × {settings.rounds} rounds, "
                        f"ε_token = {settings.pdss.token_epsilon:g}, privatiser {settings.pdss.privatiser} "
                        f"({settings.run_dir})", show_header=False)
    rows = [("student answer accuracy (held-out)", phases.get("pdss-evaluation", {}).get("accuracy")),
            ("teacher accuracy, raw prompts", metrics.get("teacher_accuracy_raw")),
            ("teacher accuracy, perturbed prompts", metrics.get("teacher_accuracy_perturbed")),
            ("leakage (private tokens surviving)", metrics.get("leakage")),
            ("canaries read back / planted", f"{metrics.get('canaries_read_back')} / {metrics.get('canaries')}"),
            ("usable rationales", f"{phases.get('pdss-rationales', {}).get('usable')} / "
                                  f"{phases.get('pdss-rationales', {}).get('prompts')}")]
    trained = phases.get("pdss-privatiser", {}).get("sites", {})
    if trained:  # encoder-decoder: its public training, once per digest
        rows.append(("privatiser loss (first → last step)", ", ".join(
            f"{c} {t['loss_first']:.2f} → {t['loss_last']:.2f}{' (kept)' if t['cached'] else ''}"
            for c, t in sorted(trained.items()))))
    for name, value in rows:
        table.add_row(name, f"{value:.3f}" if isinstance(value, float) else str(value))
    for name, phase in phases.items():
        table.add_row(f"phase {name}", f"{phase.get('seconds', 0):.1f}s")
    console.print(table)
    for ledger_path in ledger_paths(Path(settings.run_dir) / "ledgers"):
        console.print(PrivacyLedger.load(ledger_path).describe(), markup=False, highlight=False)
