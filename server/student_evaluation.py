"""Phase `student-evaluation`: the student and the teacher scored on the same data.

"The run's student" (``load_student``, ``student_dir``) is the distilled model (distildp) or
the student base with the rounds' final LoRA adapter merged (dp-opd); "the run's teacher" is
the DP teacher (distildp) or dp-opd's frozen teacher (the public base or a DP teacher run's).

Held-out perplexity comes from the sites (`evaluate.student` messages carry the student's
config and weights; each site scores it on its held-out split and replies with the loss and
record count; the mean is weighted by records). The teacher's held-out figure is its last
round's. Public perplexity of both is computed here on the public split.
"""

from __future__ import annotations

import json
import math
import random
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from transformers import AutoModelForCausalLM

from common.data.control import load_model_texts
from common.models.lm import encode_texts, perplexity
from common.models.loading import load_teacher, student_arrays
from common.settings import STUDENT_BASE_DIR
from common.wire import to_array_record
from server.checkpoint import RunDirectory
from server.server_app import short_reason

PUBLIC_EVAL_RECORDS = 500  # enough for a stable figure, cheap on CPU


def student_dir(phase) -> Path:
    """The directory the run's student (or, dp-opd, its base) and its tokenizer were saved to."""
    if phase.settings.mode == "dp-opd":
        return phase.run.path / STUDENT_BASE_DIR
    return phase.run.path / phase.summary_of("distillation")["student"]


def load_student(phase):
    if phase.settings.mode == "dp-opd":  # base + the final federated adapter, merged: one plain model
        student, _ = load_teacher(student_dir(phase), phase.settings.dp, phase.run.path / phase.state()["adapter"])
        return student.cpu().eval()
    return AutoModelForCausalLM.from_pretrained(student_dir(phase), local_files_only=True).eval()


def load_run_teacher(phase):
    """(teacher, tokenizer, its held-out perplexity at the sites or None)."""
    settings, state = phase.settings, phase.state()
    if settings.mode == "dp-opd":
        teacher_dir, teacher_adapter = settings.opd_teacher_model()
        teacher, tokenizer = load_teacher(teacher_dir, settings.dp, teacher_adapter)
        run = settings.teacher_run()
        last = _last_figure(RunDirectory(run.run_dir).load_state()) if run else None
        return teacher, tokenizer, last
    teacher, tokenizer = load_teacher(settings.model_dir, settings.dp, phase.run.path / state["adapter"])
    return teacher, tokenizer, _last_figure(state)


def _last_figure(state: dict) -> float | None:
    last = state["rounds"][-1]["evaluate"] if state["rounds"] else state["baseline"]
    return last["perplexity"] if last else None


def federated_perplexity(phase, student) -> dict:
    """Held-out perplexity of ``student`` over a sample of sites, weighted by their records."""
    settings = phase.settings
    nodes = sorted(phase.grid.get_node_ids())
    count = max(settings.min_clients, math.ceil(settings.fraction_evaluate * len(nodes)))
    nodes = random.Random(f"{settings.seed}/student-evaluation").sample(nodes, min(count, len(nodes)))
    config = ConfigRecord({"student-config": json.dumps(student.config.to_dict())})
    arrays = to_array_record(student_arrays(student))
    messages = [Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                        message_type="evaluate.student") for node in nodes]
    replies = list(phase.grid.send_and_receive(messages, timeout=settings.round_timeout))
    loss, records, sites = 0.0, 0, 0
    for reply in replies:
        if reply.has_error():
            log(WARNING, "node %s: student evaluation failed: %s", reply.metadata.src_node_id,
                short_reason(reply.error.reason))
            continue
        metrics = reply.content["metrics"]
        loss += float(metrics["eval-loss"]) * int(metrics["num-examples"])
        records += int(metrics["num-examples"])
        sites += 1
    if not records:
        return {"perplexity": math.nan, "sites": 0, "records": 0}
    return {"perplexity": math.exp(loss / records), "sites": sites, "records": records}


def public_perplexity(settings, models: dict, tokenizer) -> dict:
    path = settings.public_file()
    if not path.is_file():
        return {}
    texts = load_model_texts(path, settings.dp.text_field, settings.dp.label_field)[:PUBLIC_EVAL_RECORDS]
    data = encode_texts(texts, tokenizer, settings.dp.max_length)
    return {name: perplexity(model, data) for name, model in models.items()}


def run(phase) -> dict:
    settings = phase.settings
    student = load_student(phase)
    held_out = federated_perplexity(phase, student)
    teacher, tokenizer, teacher_heldout = load_run_teacher(phase)
    public = public_perplexity(settings, {"teacher": teacher, "student": student.to(teacher.device)}, tokenizer)
    summary = {"heldout_perplexity": held_out["perplexity"],  # the student's, record-weighted over the sites
               "student": {"heldout_perplexity": held_out["perplexity"], "public_perplexity": public.get("student"),
                           "sites": held_out["sites"], "records": held_out["records"]},
               "teacher": {"heldout_perplexity": teacher_heldout, "public_perplexity": public.get("teacher")}}
    if settings.mode == "dp-opd":  # the round-0 model is the untrained student (LoRA B = 0)
        summary["student"]["untrained_heldout_perplexity"] = (phase.state()["baseline"] or {}).get("perplexity")
    log(INFO, "student held-out perplexity %.3f (teacher %s) | public %.3f (teacher %.3f)",
        held_out["perplexity"], "–" if teacher_heldout is None else f"{teacher_heldout:.3f}",
        public.get("student", math.nan), public.get("teacher", math.nan))
    return summary
