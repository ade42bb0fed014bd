"""The Flower ServerApp: the mode's pipeline (server/pipeline.py), whose first phase is R
rounds of FedAvg over LoRA adapter tensors, read here top to bottom.

Each round: sample clients (Flower's FedAvg) → send each one message carrying the global
adapter once (in `wire-dtype`) → each site scores that incoming adapter on its held-out
split, then trains → collect replies → drop errors, timeouts, refusals and invalid updates
(each logged with its node and reason) → FedAvg of the valid ones weighted by examples (or
equally, under central DP) → write adapter + round state atomically.

Held-out perplexity therefore arrives one round late: the replies of round k score the
model round k−1 produced, and fill that round's figure (round 1's fill `baseline`, the
round-0 model); after the last round one evaluate message per sampled site scores the
final model before that round is committed. `state["rounds"][k]["evaluate"]` is the
held-out perplexity of the model round k produced, as before, at half the messages.

Evaluation sample (`fraction-evaluate`, by default = `fraction-train`): that many sites,
at least min-clients. When it is no larger than the round's training sample, that many of
the sampled sites are asked (`heldout = true`) to score the incoming adapter; when it is
larger, every trained site scores it and the extra sites, not sampled for training, get
one evaluate message in the same exchange. Sites in neither sample get nothing that round.

`resume` continues from the last completed round: a round whose figure is still pending is
filled by the next round's replies (or, after the last round, by the final evaluation), and
no site is charged twice (a site re-sends the update it already released for that round).
Frozen base weights never travel. `secure-aggregation` runs the same round through Flower's
SecAgg+ instead (server/secagg.py).
"""

from __future__ import annotations

import math
import random
import re
import time
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from common.errors import ConfigError, RoundFailed
from common.privacy.central import UNIT_WEIGHT_KEY, wrap_strategy
from common.privacy.ledger import PrivacyLedger
from common.settings import RunSettings
from common.wire import from_array_record, payload_bytes, to_array_record
from server.checkpoint import RunDirectory
from server.pipeline import run_pipeline
from server.validation import update_problem


def build_server_app(overrides: dict | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` take the place of the run config (in-process simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_flat({**dict(context.run_config), **(overrides or {})})
        run_pipeline(grid, context, settings)  # the mode's phases in order (server/pipeline.py)

    return app


HELDOUT_KEY = "heldout"  # train config: score the incoming adapter on the held-out split before training


def run_federation(grid: Grid, settings: RunSettings) -> dict:
    run, state, global_adapter = open_run(settings)
    wait_for_nodes(grid, settings.clients, timeout=settings.round_timeout)
    strategy = FedAvg(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                      min_train_nodes=settings.min_clients, min_evaluate_nodes=settings.min_clients,
                      min_available_nodes=settings.min_clients,
                      weighted_by_key=UNIT_WEIGHT_KEY if settings.central_dp else "num-examples")
    evaluator = make_evaluator(settings)
    server_ledger = None
    if settings.central_dp:  # user-level DP: clip each site's update, noise the mean, account per round
        plan = settings.central_plan()
        strategy = wrap_strategy(strategy, plan)
        server_ledger = open_server_ledger(run, plan)

    for server_round in range(state["completed_round"] + 1, settings.rounds + 1):
        started = time.monotonic()
        config = ConfigRecord({"server-round": server_round, "run-name": settings.name})
        sampled = list(strategy.configure_train(server_round, to_array_record(global_adapter), config, grid))
        messages = one_message_per_site(sampled, global_adapter, settings, server_round, grid)
        replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
        heldout = heldout_of(replies)  # of the model this round started from (round server_round − 1)
        trained = {m.metadata.dst_node_id for m in sampled}
        outcome = sort_train_replies([m for m in messages if m.metadata.dst_node_id in trained],
                                     [r for r in replies if r.metadata.src_node_id in trained], global_adapter,
                                     settings)
        if len(outcome["valid"]) < settings.min_clients:
            if fill_heldout(state, server_round - 1, heldout):
                run.commit(state)  # the previous model's figure is real, whatever this round does
            raise RoundFailed(f"round {server_round}: {len(outcome['valid'])} valid replies, need "
                              f"{settings.min_clients} (dropouts {len(outcome['dropouts'])}, rejected "
                              f"{len(outcome['rejected'])}, refused {len(outcome['refused'])}); "
                              f"state kept at round {state['completed_round']}, resume to retry")
        aggregated, train_metrics = strategy.aggregate_train(server_round, outcome["valid"])
        global_adapter = from_array_record(aggregated)
        outcome["valid"] = len(outcome["valid"])
        commit_round(grid, evaluator, run, state, settings, server_round, global_adapter, outcome,
                     dict(train_metrics or {}), server_ledger, started, heldout)
    finish_evaluation(evaluator, grid, run, state, settings, global_adapter)
    return state


def one_message_per_site(sampled: list[Message], global_adapter, settings: RunSettings, server_round: int,
                         grid: Grid) -> list[Message]:
    """The round's instructions: one per site, the global adapter once, in the wire dtype.

    ``sampled`` are the strategy's train messages (their config, with any central-DP keys,
    is kept). Sites in the evaluation sample score the incoming adapter before training
    (``heldout = true``); sites in it but not sampled for training get an evaluate message.
    """
    arrays = to_array_record(global_adapter, settings.wire_dtype)
    evaluators, extra = evaluation_sample([m.metadata.dst_node_id for m in sampled], list(grid.get_node_ids()),
                                          settings, server_round)
    messages = []
    for message in sampled:
        node = message.metadata.dst_node_id
        config = ConfigRecord({**message.content["config"], HELDOUT_KEY: node in evaluators})
        messages.append(Message(content=RecordDict({**message.content, "arrays": arrays, "config": config}),
                                message_type=message.metadata.message_type, dst_node_id=node))
    for node in extra:
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
        messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node))
    for message in messages:
        message.metadata.group_id = str(server_round)
    return messages


def evaluation_sample(train_nodes: list[int], all_nodes: list[int], settings: RunSettings,
                      server_round: int) -> tuple[set[int], list[int]]:
    """(trained sites that score the incoming adapter, untrained sites that get an evaluate message).

    The sample has Flower's size for `fraction-evaluate`: int(N · fraction), at least
    min-clients, at most N; trained sites are preferred, so with the default
    (fraction-evaluate = fraction-train) it is exactly the training sample.
    """
    wanted = min(len(all_nodes), max(int(len(all_nodes) * settings.fraction_evaluate), settings.min_clients))
    rng = random.Random(f"{settings.seed}/heldout/{server_round}")
    if wanted <= len(train_nodes):
        return set(rng.sample(sorted(train_nodes), wanted)), []
    others = sorted(set(all_nodes) - set(train_nodes))
    return set(train_nodes), rng.sample(others, min(len(others), wanted - len(train_nodes)))


# ------------------------------------------------------------------------ pieces both round loops share
def open_run(settings: RunSettings) -> tuple[RunDirectory, dict, dict]:
    """(run directory, state, global adapter): a resumed run's last commit, or a new run's round 0."""
    run = RunDirectory(settings.run_dir)
    if settings.resume:
        state = run.load_state()
        log(INFO, "resuming %s after round %d of %d", run.path, state["completed_round"], settings.rounds)
        return run, state, run.load_adapter(state["adapter"])
    if run.exists():
        raise ConfigError(f"{run.path} already holds a run; resume it (--resume, or resume=true in --run-config) or pick another run directory")
    state = run.new_state(settings.to_run_config())
    global_adapter = initial_adapter(settings)
    state["adapter"] = run.save_adapter(0, global_adapter)
    run.commit(state)
    return run, state, global_adapter


def make_evaluator(settings: RunSettings) -> FedAvg:
    """Held-out metrics are always weighted by records, whatever weights the training mean uses."""
    return FedAvg(fraction_evaluate=settings.fraction_evaluate, min_evaluate_nodes=settings.min_clients,
                  min_available_nodes=settings.min_clients)


def open_server_ledger(run: RunDirectory, plan) -> PrivacyLedger:
    return PrivacyLedger.open(run.path / "server_ledger.json", "server (user-level)", plan.epsilon_budget,
                              plan.delta)


NO_FIGURE = {"perplexity": math.nan, "eval-loss": math.nan, "clients": 0}


def pending_figure() -> dict:
    """A round's held-out figure before the next round's replies (or the final evaluation) fill it."""
    return {**NO_FIGURE, "pending": True}


def fill_heldout(state: dict, model_round: int, evaluation: dict | None) -> bool:
    """Record the held-out figure of round ``model_round``'s model (0: the baseline) if it is
    still missing; True when the state changed. A figure once recorded is never replaced."""
    if evaluation is None:
        return False
    if model_round == 0:
        if state["baseline"] is None or state["baseline"].get("pending"):
            state["baseline"] = evaluation
            return True
        return False
    for record in state["rounds"]:
        if record["round"] == model_round and (record.get("evaluate") or {}).get("pending"):
            record["evaluate"] = evaluation
            return True
    return False


def commit_round(grid: Grid, evaluator: FedAvg, run: RunDirectory, state: dict, settings: RunSettings,
                 server_round: int, global_adapter, outcome: dict, train_metrics: dict,
                 server_ledger: PrivacyLedger | None, started: float, heldout: dict | None) -> None:
    """Charge the server's user-level ledger, record the previous model's held-out figure (from
    this round's replies), and write adapter + round record atomically. The last round's own
    figure is measured here, before its commit (one evaluate message per sampled site), so a
    run whose state says "all rounds completed" has every figure."""
    if server_ledger is not None:
        server_ledger.charge(f"{settings.name}/round-{server_round}", settings.central_plan().round_charge(),
                             run_id=settings.name, round=server_round)
    fill_heldout(state, server_round - 1, heldout or dict(NO_FIGURE))
    if server_round >= settings.rounds:
        evaluation = evaluate(evaluator, grid, server_round, global_adapter, settings)
    else:
        evaluation = pending_figure()
    record = {
        "round": server_round,
        "train": {k: v for k, v in train_metrics.items() if not k.startswith("heldout-")},
        "evaluate": evaluation,
        "valid": outcome["valid"],
        "dropouts": outcome["dropouts"],
        "rejected": outcome["rejected"],
        "refused": outcome["refused"],
        "epsilon": outcome["epsilon"],
        "user_level_epsilon": server_ledger.spent_epsilon() if server_ledger else None,
        "bytes_per_client": payload_bytes(global_adapter) // (2 if settings.wire_dtype == "float16" else 1),
        "seconds": round(time.monotonic() - started, 3),
    }
    state["adapter"] = run.save_adapter(server_round, global_adapter)
    state["rounds"].append(record)
    state["completed_round"] = server_round
    run.commit(state)
    previous = (state["baseline"] if server_round == 1 else next(
        (r["evaluate"] for r in state["rounds"] if r["round"] == server_round - 1), None)) or {}
    last = f" | held-out perplexity of round {server_round} {evaluation['perplexity']:.3f}" \
        if not evaluation.get("pending") else ""
    log(INFO, "round %d/%d: train loss %.4f | held-out perplexity of round %d %.3f%s | ε spent max %.3f | "
        "valid %d, dropouts %d, rejected %d, refused %d | %.1fs", server_round, settings.rounds,
        record["train"].get("train-loss", math.nan), server_round - 1, previous.get("perplexity", math.nan), last,
        max(outcome["epsilon"].values(), default=0.0), record["valid"], len(record["dropouts"]),
        len(record["rejected"]), len(record["refused"]), record["seconds"])


def finish_evaluation(evaluator: FedAvg, grid: Grid, run: RunDirectory, state: dict, settings: RunSettings,
                      adapter) -> None:
    """Measure the final model's figure if it is still pending (a state written mid-way by an
    older layout, or a run resumed with fewer rounds than it had); a no-op otherwise."""
    if state["rounds"] and state["completed_round"] >= settings.rounds and state["rounds"][-1]["evaluate"].get("pending"):
        state["rounds"][-1]["evaluate"] = evaluate(evaluator, grid, state["completed_round"], adapter, settings)
        run.commit(state)


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> int:
    """Give every expected site a chance to connect before the first sampling (FedAvg itself
    only waits for min-clients, and would otherwise sample whoever connected first)."""
    deadline = time.monotonic() + timeout
    connected = len(list(grid.get_node_ids()))
    while connected < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        connected = len(list(grid.get_node_ids()))
    if connected < expected:
        log(WARNING, "%d of %d expected sites connected after %.0fs; continuing", connected, expected, timeout)
    return connected


def sort_train_replies(messages: list[Message], replies: list[Message], global_adapter, settings) -> dict:
    """Split replies into valid updates and counted failures; convert valid ones to float32."""
    answered = {reply.metadata.src_node_id for reply in replies}
    dropouts = [{"node": m.metadata.dst_node_id, "reason": "no reply before the round timeout"}
                for m in messages if m.metadata.dst_node_id not in answered]
    for dropout in dropouts:
        log(WARNING, "node %s dropped out: %s", dropout["node"], dropout["reason"])
    valid, rejected, refused, epsilon = [], [], [], {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            dropouts.append({"node": node, "reason": f"client error {reply.error.code}: {short_reason(reply.error.reason)}"})
            log(WARNING, "node %s dropped out: %s", node, dropouts[-1]["reason"])
            continue
        client = reply.content["client"]["client-id"] if "client" in reply.content else str(node)
        metrics = reply.content["metrics"] if "metrics" in reply.content else {}
        if "epsilon-spent" in metrics:
            epsilon[client] = float(metrics["epsilon-spent"])
        if metrics.get("refused", 0):
            refused.append({"node": node, "client": client, "reason": reply.content["client"]["refusal"]})
            log(WARNING, "node %s (%s) refused round: %s", node, client, refused[-1]["reason"])
            continue
        problem, update = _reply_problem(reply, global_adapter, settings)
        if problem:
            rejected.append({"node": node, "client": client, "reason": problem})
            log(WARNING, "node %s (%s): update rejected: %s", node, client, problem)
            continue
        reply.content["arrays"] = to_array_record(update, "float32")  # aggregate in float32
        valid.append(reply)
    return {"valid": valid, "dropouts": dropouts, "rejected": rejected, "refused": refused, "epsilon": epsilon}


def short_reason(reason: str) -> str:
    """The exception line of a (possibly Ray-wrapped) client traceback."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in reason.splitlines()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (errors[-1] if errors else " ".join(lines))[:300]


def _reply_problem(reply: Message, global_adapter, settings) -> tuple[str | None, dict | None]:
    """(why the reply must not be aggregated or None, its adapter tensors)."""
    if "arrays" not in reply.content or "metrics" not in reply.content:
        return "reply lacks arrays or metrics", None
    examples = reply.content["metrics"].get("num-examples")
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"num-examples must be positive, got {examples!r}", None
    update = from_array_record(reply.content["arrays"])
    site_clipped = settings.central_dp and settings.central_clip_at == "site"
    problem = update_problem(update, global_adapter, settings.wire_dtype, settings.max_update_norm,
                             nonzero=settings.central_dp, clipped_to=settings.central_clip if site_clipped else None)
    return problem, update


def evaluate(strategy: FedAvg, grid: Grid, server_round: int, adapter, settings: RunSettings) -> dict:
    """Held-out perplexity of ``adapter`` over a sample of sites (`fraction-evaluate`), weighted
    by their held-out record counts; the adapter travels in the wire dtype."""
    arrays = to_array_record(adapter, settings.wire_dtype)
    messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord({}), grid))
    replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
    return heldout_of(replies) or dict(NO_FIGURE)


def heldout_of(replies: list[Message]) -> dict | None:
    """The record-weighted held-out figure of the replies that carry one (train replies:
    ``heldout-loss``/``heldout-examples``; evaluate replies: ``eval-loss``/``num-examples``);
    None when none does."""
    loss, records, sites = 0.0, 0, 0
    for reply in replies:
        if reply.has_error() or "metrics" not in reply.content:
            continue
        metrics = reply.content["metrics"]
        if "heldout-examples" in metrics:
            n, value = metrics["heldout-examples"], metrics.get("heldout-loss")
        elif "eval-loss" in metrics:
            n, value = metrics.get("num-examples"), metrics["eval-loss"]
        else:
            continue
        if not isinstance(n, (int, float)) or not n > 0 or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            continue
        loss += float(value) * int(n)
        records += int(n)
        sites += 1
    if not records:
        return None
    return {"perplexity": math.exp(loss / records), "eval-loss": loss / records, "clients": sites,
            "records": records}


def initial_adapter(settings: RunSettings):
    """The round-0 adapter: peft's initialisation (B = 0) under the run's seed, on the rounds'
    base (the teacher base, or dp-opd's student)."""
    from common.models.build import adapter_state
    from common.models.loading import load_lora_model

    model, _ = load_lora_model(settings.rounds_model_dir(), settings.dp)
    return adapter_state(model)


app = build_server_app()
