"""Phase `pdss-evaluation`: each site scores the student on its held-out split (`evaluate.pdss_student`).

Exact-match answer accuracy after normalisation, greedy "predict:" answers. The federated
student travels as its LoRA adapter; with `local-only` each site scores the model it kept.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ConfigRecord
from flwr.common.logger import log

from common.errors import RoundFailed
from common.wire import to_array_record
from server.pdss_prompts import ask_every_site


def run(phase) -> dict:
    settings, run = phase.settings, phase.run
    students = phase.summary_of("pdss-students")
    local_only = bool(students.get("local_only"))
    content = {"config": ConfigRecord({"local-only": local_only, "run-name": settings.name})}
    if not local_only:
        content["arrays"] = to_array_record(run.load_adapter(students["adapter"]), settings.wire_dtype)
    replies, failed = ask_every_site(phase, "evaluate.pdss_student", content)
    per_site = {}
    for reply in replies:
        metrics = reply.content["metrics"]
        per_site[reply.content["client"]["client-id"]] = {"accuracy": float(metrics["accuracy"]),
                                                          "records": int(metrics["num-examples"])}
    if len(per_site) < settings.min_clients:
        raise RoundFailed(f"pdss evaluation: {len(per_site)} sites answered, need {settings.min_clients}: {failed[:1]}")
    records = sum(s["records"] for s in per_site.values())
    accuracy = sum(s["accuracy"] * s["records"] for s in per_site.values()) / records
    log(INFO, "pdss student accuracy %.3f over %d sites", accuracy, len(per_site))
    return {"accuracy": accuracy, "sites": {k: v["accuracy"] for k, v in per_site.items()}, "failed": failed}
