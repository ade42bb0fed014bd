"""Secure-aggregation rounds: the server learns only the mean of the sampled sites' adapters.

Flower 1.41 ships SecAgg+ only on its legacy stack, so this mode runs Flower's
`DefaultWorkflow` with `SecAggPlusWorkflow` as its fit step, a legacy `FedAvg`, and a
`LegacyContext`. Each round:

  SecAgg+ setup → share keys → collect masked adapters (each site first scores the incoming
  global adapter on its held-out split, then trains here) → unmask
  → legacy FedAvg sees the unmasked mean only (+ Gaussian noise under central DP)
  → [our evaluate step] check the mean, charge the server ledger, record the previous
    model's held-out figure from the replies' metrics, checkpoint (after the last round:
    one evaluate message per sampled site scores the final model first).

So SecAgg+ rounds carry the held-out evaluation in their training message too (no separate
evaluate message per round, and no round-0 evaluation: round 1's replies score the initial
adapter). The held-out metrics travel in the clear in each site's FitRes metrics, as its ε
and loss do and as a per-site evaluate reply did; only the adapter is masked. A site that
refuses or fails after the key exchange sends no metrics, so it is missing from that
figure as from the mean. Every sampled site scores the incoming adapter (the evaluation
sample within rounds is the training sample; `fraction-evaluate` sizes the final evaluation).

What changes against the plain mode, and why:
- every site weighs the same (it sends weight 1, SecAgg+ max-weight 1): exact weights
  keep SecAgg+'s quantisation error at one step per site, and central DP needs them anyway;
- the server cannot check one site's update (it never sees one): it checks the mean instead
  (finite, right shapes, norm bound), and under central DP each site clips its own update
  (Flower's client-side fixed clipping, `fixedclipping_mod`) before it is masked;
- a site that refuses (budget spent) or fails after the key exchange drops out of the round;
  SecAgg+ recovers its masks as long as `secagg-threshold` of the shares are still there.
"""

from __future__ import annotations

import math
import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from common.errors import RoundFailed
from common.settings import RunSettings
from common.wire import ADAPTER_NAMES_KEY
from server.server_app import (HELDOUT_KEY, commit_round, fill_heldout, finish_evaluation, make_evaluator, open_run,
                               open_server_ledger, short_reason, wait_for_nodes)
from server.validation import update_problem


def run_secagg_federation(grid: Grid, context: Context, settings: RunSettings) -> dict:
    run, state, global_adapter = open_run(settings)
    names = sorted(global_adapter)
    wait_for_nodes(grid, settings.clients, timeout=settings.round_timeout)
    evaluator = make_evaluator(settings)
    remaining = settings.rounds - state["completed_round"]
    if remaining <= 0:
        finish_evaluation(evaluator, grid, run, state, settings, global_adapter)
        return state

    offset = state["completed_round"]  # DefaultWorkflow counts its rounds from 1; a resumed run does not
    strategy = SecAggFedAvg(settings, names, offset, global_adapter)
    top, server_ledger = strategy, None
    if settings.central_dp:  # user-level DP: sites clip their own update, the server noises the mean
        plan = settings.central_plan()
        top = DropoutTolerantClientSideClipping(strategy, plan.noise_multiplier, plan.clipping_norm,
                                                num_sampled_clients=plan.min_clients)
        server_ledger = open_server_ledger(run, plan)

    def finish_round(grid: Grid, legacy: LegacyContext) -> None:
        """DefaultWorkflow's evaluate step: our checks, ledger, evaluation and checkpoint."""
        nonlocal global_adapter
        server_round = offset + int(legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        outcome = strategy.outcomes.pop(server_round, None)
        if outcome is None or not outcome["aggregated"]:
            valid = outcome["valid"] if outcome else 0
            if outcome and fill_heldout(state, server_round - 1, outcome.get("heldout")):
                run.commit(state)  # the previous model's figure is real, whatever this round does
            raise RoundFailed(f"round {server_round}: secure aggregation did not complete ({valid} masked adapters, "
                              f"need {settings.min_clients} and the unmasking threshold); state kept at round "
                              f"{state['completed_round']}, resume to retry")
        arrays = parameters_to_ndarrays(arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD],
                                                                  keep_input=True))
        mean = {name: np.asarray(a, dtype=np.float32) for name, a in zip(names, arrays, strict=True)}
        problem = update_problem(mean, global_adapter, "float32", settings.max_update_norm)
        if problem:
            raise RoundFailed(f"round {server_round}: the securely aggregated mean is unusable ({problem}); "
                              f"state kept at round {state['completed_round']}")
        global_adapter = mean
        commit_round(grid, evaluator, run, state, settings, server_round, global_adapter, outcome,
                     outcome.pop("train"), server_ledger, outcome.pop("started"), outcome.pop("heldout"))

    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(num_shares=float(settings.secagg_shares),
                                        reconstruction_threshold=float(settings.secagg_threshold),
                                        max_weight=1.0, clipping_range=settings.secagg_clip_range,
                                        timeout=settings.round_timeout),
        evaluate_workflow=finish_round)
    workflow(grid, LegacyContext(context, config=ServerConfig(num_rounds=remaining), strategy=top))
    return state


class SecAggFedAvg(FedAvg):
    """Flower's legacy FedAvg that also keeps what each round's replies said (ε, failures).

    Under SecAgg+ every reply it receives carries the same, already unmasked mean, so its
    average is that mean; the per-site metrics are still each site's own.
    """

    def __init__(self, settings: RunSettings, names: list[str], offset: int, initial: dict):
        self.settings, self.offset, self.outcomes = settings, offset, {}
        super().__init__(fraction_fit=settings.fraction_train, fraction_evaluate=0.0,
                         min_fit_clients=settings.min_clients, min_evaluate_clients=0,
                         min_available_clients=settings.min_clients, accept_failures=True,
                         initial_parameters=ndarrays_to_parameters([initial[n] for n in names]),
                         on_fit_config_fn=lambda rnd: {"server-round": offset + rnd, "run-name": settings.name,
                                                       ADAPTER_NAMES_KEY: ",".join(names), HELDOUT_KEY: True})

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.outcomes[self.offset + server_round] = {
            "started": time.monotonic(), "sampled": len(instructions), "valid": 0, "aggregated": False,
            "dropouts": [], "rejected": [], "refused": [], "epsilon": {}, "train": {}, "heldout": None}
        return instructions

    def note_failures(self, server_round: int, failures) -> None:
        """Keep each failure's reason once (SecAggPlusWorkflow lists a stage-2 failure twice)."""
        reasons = self.outcomes[self.offset + server_round].setdefault("reasons", [])
        for failure in failures:
            reason = short_reason(getattr(getattr(failure, "args", [None])[0], "reason", "") or str(failure))
            if reason not in reasons:
                reasons.append(reason)
                log(WARNING, "round %d: a site left the round: %s", self.offset + server_round, reason)

    def aggregate_fit(self, server_round, results, failures):
        self.note_failures(server_round, failures)
        outcome = self.outcomes[self.offset + server_round]
        outcome["valid"] = len(results)
        # Sampled sites missing from the secure sum: refusals (budget) and dropouts, with reasons.
        reasons = outcome.pop("reasons", [])
        refused = [r for r in reasons if "refused:" in r]
        others = [r for r in reasons if r not in refused] or ["no masked adapter before the round timeout"]
        missing = outcome["sampled"] - len(results)
        outcome["refused"] = [{"reason": r} for r in refused[:missing]]
        outcome["dropouts"] = [{"reason": others[min(i, len(others) - 1)]}
                               for i in range(missing - len(outcome["refused"]))]
        losses, loss, records = [], 0.0, 0
        for _, fit_res in results:
            metrics = fit_res.metrics
            outcome["epsilon"][str(metrics["client-id"])] = float(metrics["epsilon-spent"])
            losses.append(float(metrics["train-loss"]))
            n, value = metrics.get("heldout-examples", 0), metrics.get("heldout-loss", math.nan)
            if n and math.isfinite(value):  # the incoming (previous round's) model on this site's held-out split
                loss, records = loss + float(value) * int(n), records + int(n)
        if records:
            outcome["heldout"] = {"perplexity": math.exp(loss / records), "eval-loss": loss / records,
                                  "clients": sum(1 for _, r in results if r.metrics.get("heldout-examples")),
                                  "records": records}
        finite = [x for x in losses if math.isfinite(x)]
        outcome["train"] = {"train-loss": float(np.mean(finite)) if finite else math.nan}
        if len(results) < self.settings.min_clients:
            log(WARNING, "round %d: %d sites in the secure sum, need %d", self.offset + server_round, len(results),
                self.settings.min_clients)
            return None, {}
        aggregated = super().aggregate_fit(server_round, results, [])
        outcome["aggregated"] = aggregated[0] is not None
        return aggregated


class DropoutTolerantClientSideClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper, letting a round with dropouts through.

    Flower's wrapper drops a whole round when any site failed, since its noise is calibrated
    for `num_sampled_clients`. Ours is calibrated for min-clients, the fewest sites a round
    is ever aggregated from (SecAggFedAvg refuses fewer), so the noise stays large enough.
    """

    def aggregate_fit(self, server_round, results, failures):
        self.strategy.note_failures(server_round, failures)
        if len(results) < self.strategy.settings.min_clients:
            return self.strategy.aggregate_fit(server_round, results, [])  # records and refuses
        aggregated = super().aggregate_fit(server_round, results, [])
        log(INFO, "round %d: central DP noise added to the secure mean", self.strategy.offset + server_round)
        return aggregated
