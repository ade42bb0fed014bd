"""Phase `pdss-rationales`: the server's teacher writes a rationale for every perturbed prompt.

Server-only (the prompts are already here). Batched greedy generation with a public few-shot
prefix (server/rationales.py); an empty or unparseable generation is kept as such, and the sites
skip those records. Written to RUN_DIR/pdss/rationales.json.
"""

from __future__ import annotations

import json
from logging import INFO

from flwr.common.logger import log

from common.atomic import atomic_write_json
from common.data.task import load_task
from server.pdss_prompts import PROMPTS_FILE
from server.rationales import few_shot_prefix, write_rationales

RATIONALES_FILE = "pdss/rationales.json"


def load_teacher_generator(settings):
    from transformers import AutoTokenizer

    from common.models.build import build_model, pick_device
    from common.models.generation import HFGenerator

    directory = settings.pdss.teacher_dir or settings.model_dir
    device, _ = pick_device(settings.dp.device)
    return HFGenerator(build_model(directory).to(device).eval(), AutoTokenizer.from_pretrained(directory), device)


def public_records(settings):
    p = settings.pdss
    return load_task(settings.public_file(), p.question_field, p.answer_field, p.rationale_field)


def run(phase) -> dict:
    settings, p = phase.settings, phase.settings.pdss
    sites = json.loads((phase.run.path / PROMPTS_FILE).read_text(encoding="utf-8"))["sites"]
    generator = load_teacher_generator(settings)
    prefix = few_shot_prefix(public_records(settings), p.teacher_few_shot, settings.seed)
    out, usable, total = {}, 0, 0
    for client, site in sorted(sites.items()):
        written = write_rationales(generator, site["prompts"], prefix, p.teacher_max_new_tokens, p.teacher_batch_size)
        out[client] = [{"rationale": w.rationale, "answer": w.answer, "raw": w.raw} for w in written]
        usable += sum(w.usable for w in written)
        total += len(written)
    atomic_write_json(phase.run.path / RATIONALES_FILE, {"sites": out, "few_shot_prefix": prefix})
    log(INFO, "pdss rationales: %d of %d usable", usable, total)
    return {"prompts": total, "usable": usable, "empty_or_unparseable": total - usable, "file": RATIONALES_FILE}
