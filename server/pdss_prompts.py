"""Phase `pdss-prompts`: each site sends its perturbed prompts (`query.pdss_prompts`), once.

A site perturbs every question with the token-level exponential mechanism and pays for it in
its ledger before replying (client/pdss.py); the reply holds only the perturbed strings and
counts. With privatiser = encoder-decoder the request names each site's privatiser (trained in
phase pdss-privatiser), whose encoder rewrites the questions before the mechanism. The server
keeps what it saw in RUN_DIR/pdss/prompts.json (the rationale phase reads it, and the
simulation's leakage metric measures it), keyed by site, with the node that sent them.
"""

from __future__ import annotations

import json
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from common.atomic import atomic_write_json
from common.errors import RoundFailed
from server.server_app import short_reason, wait_for_nodes

PROMPTS_FILE = "pdss/prompts.json"


def ask_every_site(phase, message_type: str, content: dict) -> tuple[list[Message], list[str]]:
    """One ``message_type`` message to every connected site: (the replies without error, the errors)."""
    messages = [Message(content=RecordDict(content), dst_node_id=node, message_type=message_type)
                for node in sorted(phase.grid.get_node_ids())]
    answered, failed = [], []
    for reply in phase.grid.send_and_receive(messages, timeout=phase.settings.round_timeout):
        if reply.has_error():
            failed.append(short_reason(reply.error.reason))
            log(WARNING, "node %s: %s failed: %s", reply.metadata.src_node_id, message_type, failed[-1])
        else:
            answered.append(reply)
    return answered, failed


def digests(phase) -> dict[str, str]:
    """client id → the digest of its privatiser ({} with the plain mechanism: no pdss-privatiser phase)."""
    return {client: s["privatiser"] for client, s in phase.summary_of("pdss-privatiser").get("sites", {}).items()}


def run(phase) -> dict:
    settings = phase.settings
    if not phase.run.exists():  # the first phase of the pipeline opens the run's state
        phase.run.commit(phase.run.new_state(settings.to_run_config()))
    wait_for_nodes(phase.grid, settings.clients, timeout=settings.round_timeout)
    sites, refused, failed, epsilon = collect(phase)
    if len(sites) < settings.min_clients:
        raise RoundFailed(f"pdss prompts: {len(sites)} sites answered, need {settings.min_clients} "
                          f"(refused {len(refused)}, failed {len(failed)}): {refused[:1] or failed[:1]}")
    path = phase.run.path / PROMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"sites": sites})
    log(INFO, "pdss prompts from %d sites (%d prompts)", len(sites), sum(len(s["prompts"]) for s in sites.values()))
    return {"sites": len(sites), "prompts": sum(len(s["prompts"]) for s in sites.values()), "refused": refused,
            "failed": failed, "epsilon_per_record": epsilon, "file": PROMPTS_FILE}


def sites_now(phase) -> dict:
    """The sites that sent prompts, with their node ids in *this* federation. A resumed simulation
    (or a restarted SuperLink) numbers its nodes anew: then every site is asked again, re-sends its
    prompts from its cache at no cost, and is matched by client id; one whose prompts changed is left
    out (its rationales were written for others)."""
    path = phase.run.path / PROMPTS_FILE
    sites = json.loads(path.read_text(encoding="utf-8"))["sites"]
    wait_for_nodes(phase.grid, phase.settings.clients, timeout=phase.settings.round_timeout)
    if {int(s["node"]) for s in sites.values()} <= set(phase.grid.get_node_ids()):
        return sites
    fresh = collect(phase)[0]
    out = {}
    for client, site in sites.items():
        if client in fresh and fresh[client]["prompts"] == site["prompts"]:
            out[client] = {**site, "node": fresh[client]["node"]}
        else:
            log(WARNING, "%s: %s; left out of this phase", client,
                "its prompts changed since they were sent" if client in fresh else "did not answer")
    atomic_write_json(path, {"sites": out})
    log(INFO, "pdss: nodes renumbered; %d of %d sites found again by client id", len(out), len(sites))
    return out


def collect(phase) -> tuple[dict, list, list, dict]:
    """Ask every site for its perturbed prompts: (client id → {node, prompts}, refusals, failures, ε per record)."""
    settings = phase.settings
    config = {"run-name": settings.name}
    privatisers = digests(phase)
    if privatisers:  # encoder-decoder: each site's privatiser, by client id (node ids change on resume)
        config.update({"privatiser-sites": sorted(privatisers), "privatiser-digests": [privatisers[c] for c in
                                                                                        sorted(privatisers)]})
    replies, failed = ask_every_site(phase, "query.pdss_prompts", {"config": ConfigRecord(config)})
    sites, refused, epsilon = {}, [], {}
    for reply in replies:
        client = reply.content["client"]
        if client["refusal"]:
            refused.append({"client": client["client-id"], "reason": client["refusal"]})
            log(WARNING, "%s refused to send prompts: %s", client["client-id"], client["refusal"])
            continue
        counts = reply.content["metrics"]
        sites[client["client-id"]] = {"node": reply.metadata.src_node_id,
                                      "prompts": [str(p) for p in reply.content["prompts"]["prompts"]]}
        epsilon[client["client-id"]] = float(counts["epsilon-per-record"])
    return sites, refused, failed, epsilon
