"""Phase `label-histogram`: how many synthetic records per control code, from DP counts.

Each site releases once a Gaussian-noised histogram of its records' labels over a fixed,
public label set (client/label_histogram.py; charged to its ledger, composed with its
DP-SGD). The server only sums the noisy counts and clamps negatives (post-processing).
The DistilDP reference takes these counts straight from the private training set, outside
its guarantee; with `label-source = public` the public split's label counts are used instead.
"""

from __future__ import annotations

from collections import Counter
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from common.data.loading import load_records
from common.errors import ConfigError, RoundFailed
from common.privacy.histogram import prompt_weights
from server.server_app import short_reason


def public_labels(settings) -> Counter:
    """Label counts of the public split (costs no privacy)."""
    path = settings.public_file()
    if not path.is_file():
        raise ConfigError(f"the public split {path} is missing; set public-path (the control codes and public "
                          "perplexity come from it)")
    records = load_records(path, field=settings.dp.text_field, label_field=settings.dp.label_field)
    return Counter(r.label for r in records if r.label is not None)


def label_set(settings) -> list[str]:
    """The fixed, public set of control codes: configured, or the labels of the public split."""
    labels = settings.synthesis.labels() or sorted(public_labels(settings))
    if not labels:
        raise ConfigError(f"no control codes: {settings.public_file()} has no {settings.dp.label_field!r} labels and "
                          "label-set is empty; list the public label set (label-set = \"a,b,c\")")
    return labels


def run(phase) -> dict:
    settings = phase.settings
    if settings.mode != "distildp" or settings.synthesis.prompt_source != "control-codes":
        return {"skipped": f"prompt-source = {settings.synthesis.prompt_source}: no control codes"}
    labels = label_set(settings)
    if settings.synthesis.label_source == "public":
        counts = public_labels(settings)
        return {"source": "public", "labels": labels, "weights": {k: float(counts.get(k, 0)) for k in labels}}

    nodes = sorted(phase.grid.get_node_ids())
    config = ConfigRecord({"run-name": settings.name, "label-set": labels})
    messages = [Message(content=RecordDict({"config": config}), dst_node_id=node,
                        message_type="query.label_histogram") for node in nodes]
    replies = list(phase.grid.send_and_receive(messages, timeout=settings.round_timeout))
    total = {k: 0.0 for k in labels}
    sites, refused, failed = 0, [], []
    for reply in replies:
        if reply.has_error():
            failed.append(short_reason(reply.error.reason))
            log(WARNING, "node %s: label histogram failed: %s", reply.metadata.src_node_id, failed[-1])
            continue
        client = reply.content["client"]
        if client["refusal"]:
            refused.append({"client": client["client-id"], "reason": client["refusal"]})
            log(WARNING, "%s refused the label histogram: %s", client["client-id"], client["refusal"])
            continue
        noisy = reply.content["histogram"]
        if list(noisy["labels"]) != labels:
            failed.append(f"{client['client-id']}: histogram over the wrong labels")
            continue
        for label, value in zip(labels, noisy["counts"]):
            total[label] += float(value)
        sites += 1
    if sites < settings.min_clients:
        raise RoundFailed(f"label histogram: {sites} sites answered, need {settings.min_clients} "
                          f"(refused {len(refused)}, failed {len(failed)}); resume to retry")
    weights = prompt_weights(total)  # post-processing of the DP counts: negatives → 0, normalised
    log(INFO, "label histogram from %d sites over %d labels", sites, len(labels))
    return {"source": "dp-histogram", "labels": labels, "weights": weights, "sites": sites,
            "refused": refused, "failed": failed}
