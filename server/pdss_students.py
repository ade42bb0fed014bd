"""Phase `pdss-students`: R rounds of `train.pdss`; FedAvg of the sites' step-by-step students.

Each round every site that sent prompts gets one message: the global student (its LoRA adapter,
or with `student-update = full` all its trainable weights) and the teacher's rationales for *its own* prompts (only rationale strings: a site needs nothing
else). It trains its student on its records (client/pdss_student.py: DP-SGD, charged to its
ledger) and replies with its update and metrics; Flower's FedAvg (weighted by records used)
averages the valid replies. With privatiser = encoder-decoder the message also carries the site's
own sent prompts and its privatiser's digest: the site's decoder turns each teacher rationale into
one for its raw question before training. With `student-training = local-only` no adapter leaves
a site: the rounds only pace the sites' local training, and the replies carry metrics.
"""

from __future__ import annotations

import json
import time
from logging import INFO

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from common.errors import RoundFailed
from common.models.student_update import initial_student
from common.wire import from_array_record, to_array_record
from server.pdss_prompts import digests, sites_now
from server.pdss_rationales import RATIONALES_FILE
from server.server_app import sort_train_replies


def run(phase) -> dict:
    settings, run = phase.settings, phase.run
    local_only = settings.pdss.student_training == "local-only"
    sites = sites_now(phase)  # node ids as this federation numbers them (a resumed one renumbers)
    rationales = json.loads((run.path / RATIONALES_FILE).read_text(encoding="utf-8"))["sites"]
    state = run.load_state()
    progress = state.setdefault("pdss", {"completed_round": 0, "adapter": None, "rounds": []})
    adapter = run.load_adapter(progress["adapter"]) if progress["adapter"] else initial_student(settings)
    strategy = FedAvg(weighted_by_key="num-examples")
    privatisers = digests(phase)
    for server_round in range(progress["completed_round"] + 1, settings.rounds + 1):
        started = time.monotonic()
        arrays = to_array_record(adapter, settings.wire_dtype)
        messages = []
        for client, site in sorted(sites.items()):
            config = {"server-round": server_round, "run-name": settings.name,
                      "rationales": [r["rationale"] for r in rationales[client]]}
            if client in privatisers:  # encoder-decoder: the site decodes from what it sent, with its privatiser
                config.update({"prompts": site["prompts"], "privatiser": privatisers[client]})
            config = ConfigRecord(config)
            messages.append(Message(content=RecordDict({"arrays": arrays, "config": config}),
                                    dst_node_id=int(site["node"]), message_type="train.pdss"))
        replies = list(phase.grid.send_and_receive(messages, timeout=settings.round_timeout))
        record = {"round": server_round}
        if local_only:
            ok = [r for r in replies if not r.has_error() and r.content["metrics"].get("local-only")]
            record.update(valid=len(ok), train_loss=_mean([r.content["metrics"]["train-loss"] for r in ok]))
            if len(ok) < settings.min_clients:
                raise RoundFailed(f"pdss round {server_round}: {len(ok)} sites trained, need {settings.min_clients}")
        else:
            outcome = sort_train_replies(messages, replies, adapter, settings)
            if len(outcome["valid"]) < settings.min_clients:
                raise RoundFailed(f"pdss round {server_round}: {len(outcome['valid'])} valid replies, need "
                                  f"{settings.min_clients} (refused {outcome['refused'][:1]}, dropouts "
                                  f"{outcome['dropouts'][:1]}, rejected {outcome['rejected'][:1]}); resume to retry")
            metrics = [r.content["metrics"] for r in outcome["valid"]]
            aggregated, _ = strategy.aggregate_train(server_round, outcome["valid"])
            adapter = from_array_record(aggregated)
            progress["adapter"] = run.save_adapter(server_round, adapter)
            record.update(valid=len(metrics), train_loss=_mean([m["train-loss"] for m in metrics]),
                          skipped_records=sum(int(m["skipped-records"]) for m in metrics),
                          epsilon=outcome["epsilon"], refused=outcome["refused"], rejected=outcome["rejected"],
                          dropouts=outcome["dropouts"])
        record["seconds"] = round(time.monotonic() - started, 2)
        progress["rounds"].append(record)
        progress["completed_round"] = server_round
        state["pdss"] = progress
        run.commit(state)
        log(INFO, "pdss round %d: %d sites, train loss %.4f", server_round, record["valid"], record["train_loss"])
    last = progress["rounds"][-1] if progress["rounds"] else {}
    return {"rounds": progress["completed_round"], "adapter": progress["adapter"], "local_only": local_only,
            "train_loss": last.get("train_loss"), "skipped_records": last.get("skipped_records", 0)}


def _mean(values) -> float:
    finite = [float(v) for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")
