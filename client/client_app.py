"""The Flower ClientApp: what a data-owning site does when the server asks.

train:    global adapter in → (when the server asks, `heldout = true` in the config) its
          perplexity on this site's held-out split, before any training → check the ledger
          → DP-SGD LoRA on this site's private split → adapter + metrics out (or a refusal,
          when the budget would be exceeded), the held-out metrics of the incoming adapter
          among them (`heldout-loss`, `heldout-perplexity`, `heldout-examples`). One message
          per site and round does both. Under secure aggregation the same round runs inside
          Flower's SecAgg+ mod, which masks the adapter before it leaves (client/secagg.py).
evaluate: global adapter in → perplexity on this site's held-out split → metrics out (the
          run's final model, and sites the server asks to evaluate without training).
query.label_histogram: (distildp) the site's DP label histogram, released once per run.
evaluate.student: (distildp, dp-opd) the run's student in → its held-out perplexity out.

In mode dp-opd the train route runs ``client/dp_opd.py`` instead: the round's adapter is the
student's LoRA (its base, RUN_DIR/student-base, is built once by the server), trained with
DP-SGD on the student's own continuations of private prefixes against a frozen teacher.
query.pdss_prompts: (pdss) the site's questions, perturbed by the token-level exponential
          mechanism and charged once per record (client/pdss.py) → the perturbed strings out.
train.pdss_privatiser: (pdss, privatiser = encoder-decoder) public examples in → the site's
          privatiser trained on them (or the one it kept for them) → its digest and losses out.
train.pdss: (pdss) the student adapter + the teacher's rationales for this site's prompts in →
          one round of the step-by-step student (DP-SGD, or local-only) → adapter + metrics out
          (encoder-decoder: the site's sent prompts too, for its decoder).
evaluate.pdss_student: (pdss) the student in → its held-out answer accuracy out.

The site's paths, id and budget come from Flower's node config, so the same app runs at a
real site (`flower-supernode --node-config ...`) and in the Simulation Engine (where each
node only knows its partition id and the paths follow the simulation's layout).
"""

from __future__ import annotations

import math
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import dp_lora, dp_opd, pdss, pdss_privatiser, pdss_student, secagg
from client.label_histogram import release_histogram
from common.models.loading import student_from_arrays
from common.settings import RunSettings
from common.wire import from_array_record, to_array_record


def build_client_app(overrides: dict | None = None, mods: tuple = ()) -> ClientApp:
    """A ClientApp; ``overrides`` take the place of the run config (in-process simulation)."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)

        def train_round(global_adapter, server_round, config):
            if settings.injected_failure(site.client_id, server_round):
                raise RuntimeError(f"fault injected: {site.client_id} fails in round {server_round}")
            # The incoming adapter's held-out figures come first, so they describe the model
            # the server sent (the previous round's), not what this site makes of it.
            heldout = dp_lora.heldout_metrics(site, settings.dp, global_adapter) if config.get("heldout") else {}
            # dp-opd trains the student (the round's base) on its rollouts against the teacher
            trainer = dp_opd.trainer_for(settings) if settings.mode == "dp-opd" else None
            adapter, metrics, refusal = dp_lora.run_round(site, settings.dp, settings.name, server_round,
                                                          global_adapter, train=trainer)
            return adapter, {**metrics, **heldout}, refusal

        if secagg.is_secagg_message(msg):  # one of SecAgg+'s four stages (Flower's legacy workflow)
            return secagg.secagg_train(msg, context, train_round, site.client_id)
        config = msg.content["config"]
        adapter, metrics, refusal = train_round(from_array_record(msg.content["arrays"]),
                                                int(config["server-round"]), config)
        content = RecordDict({
            "arrays": to_array_record(adapter, settings.wire_dtype),
            "metrics": MetricRecord(metrics),
            "client": ConfigRecord({"client-id": site.client_id, "refusal": refusal}),
        })
        reply = Message(content=content, reply_to=msg)
        if KEY_CLIPPING_NORM in msg.content["config"] and not refusal:
            # User-level central DP with clipping at the site: Flower's mod clips this reply's
            # update (adapter − global) to the server's C before it leaves.
            reply = fixedclipping_mod(msg, context, lambda _msg, _context: reply)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)
        adapter = from_array_record(msg.content["arrays"])
        ppl, n = dp_lora.heldout_perplexity(site.model_dir, site.heldout_path, settings.dp, adapter)
        metrics = MetricRecord({"num-examples": n, "eval-loss": math.log(ppl), "perplexity": ppl})
        content = RecordDict({"metrics": metrics, "client": ConfigRecord({"client-id": site.client_id})})
        return Message(content=content, reply_to=msg)

    @app.query("label_histogram")
    def label_histogram(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)
        labels = [str(x) for x in msg.content["config"]["label-set"]]
        counts, refusal = release_histogram(site, settings, labels, str(msg.content["config"]["run-name"]))
        content = RecordDict({"histogram": ConfigRecord({"labels": labels, "counts": counts}),
                              "client": ConfigRecord({"client-id": site.client_id, "refusal": refusal})})
        return Message(content=content, reply_to=msg)

    @app.evaluate("student")
    def evaluate_student(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)
        student = student_from_arrays(str(msg.content["config"]["student-config"]),
                                      from_array_record(msg.content["arrays"]))
        ppl, n = dp_lora.heldout_perplexity(site.model_dir, site.heldout_path, settings.dp, model=student)
        metrics = MetricRecord({"num-examples": n, "eval-loss": math.log(ppl), "perplexity": ppl})
        content = RecordDict({"metrics": metrics, "client": ConfigRecord({"client-id": site.client_id})})
        return Message(content=content, reply_to=msg)

    @app.query("pdss_prompts")
    def pdss_prompts(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)
        config = msg.content["config"]
        prompts, counts, refusal = pdss.release_prompts(site, settings, str(config["run-name"]),
                                                        privatiser=_privatiser_of(config, site.client_id))
        content = RecordDict({"prompts": ConfigRecord({"prompts": prompts}), "metrics": MetricRecord(counts),
                              "client": ConfigRecord({"client-id": site.client_id, "refusal": refusal})})
        return Message(content=content, reply_to=msg)

    @app.train("pdss_privatiser")
    def pdss_train_privatiser(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)
        examples = pdss_privatiser.examples_from_config(msg.content["config"])
        digest, info = pdss_privatiser.ensure_privatiser(site, settings, examples)
        metrics = {"loss-first": info["loss_first"], "loss-last": info["loss_last"], "steps": info["steps"],
                   "cached": info["cached"]}
        content = RecordDict({"metrics": MetricRecord(metrics),
                              "client": ConfigRecord({"client-id": site.client_id, "privatiser": digest})})
        return Message(content=content, reply_to=msg)

    @app.train("pdss")
    def pdss_train(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)
        config = msg.content["config"]
        prompts = [str(x) for x in config["prompts"]] if "prompts" in config else None
        adapter, metrics, refusal = pdss_student.train_round(
            site, settings, str(config["run-name"]), int(config["server-round"]),
            [str(r) for r in config["rationales"]], from_array_record(msg.content["arrays"]),
            prompts=prompts, privatiser=str(config.get("privatiser", "")))
        content = RecordDict({"metrics": MetricRecord({**metrics, "refused": int(bool(refusal))}),
                              "client": ConfigRecord({"client-id": site.client_id, "refusal": refusal})})
        if adapter:  # local-only sites send no model
            content["arrays"] = to_array_record(adapter, settings.wire_dtype)
        return Message(content=content, reply_to=msg)

    @app.evaluate("pdss_student")
    def pdss_evaluate(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        site = site_from_context(context, settings)
        local = bool(msg.content["config"]["local-only"])
        adapter = None if local else from_array_record(msg.content["arrays"])
        accuracy, n = pdss_student.heldout_accuracy(site, settings, adapter)
        content = RecordDict({"metrics": MetricRecord({"accuracy": accuracy, "num-examples": n}),
                              "client": ConfigRecord({"client-id": site.client_id})})
        return Message(content=content, reply_to=msg)

    return app


def _privatiser_of(config, client_id: str) -> str:
    """This site's privatiser digest in a pdss request ("" when the request names none)."""
    sites = [str(x) for x in config.get("privatiser-sites", [])]
    return str(config["privatiser-digests"][sites.index(client_id)]) if client_id in sites else ""


def _settings(context: Context, overrides: dict | None) -> RunSettings:
    return RunSettings.from_flat({**dict(context.run_config), **(overrides or {})})


def site_from_context(context: Context, settings: RunSettings) -> dp_lora.Site:
    """Node config keys: client-id, data-path, heldout-path, ledger-path, epsilon-budget, model-dir.

    Missing keys fall back to the simulation layout under data-dir / run-dir by partition id.
    """
    node = dict(context.node_config)
    index = node.get("partition-id")
    client_id = str(node.get("client-id") or f"client_{index}")
    simulated = Path(settings.data_dir) / f"client_{index}"
    train_path = Path(node.get("data-path") or simulated / "train.jsonl")
    heldout_path = Path(node.get("heldout-path") or train_path.with_name("heldout.jsonl"))
    ledger_path = Path(node.get("ledger-path") or settings.ledger_dir() / f"{client_id}.json")
    budget = float(node.get("epsilon-budget") or settings.site_budget())
    # dp-opd: the rounds train the student (RUN_DIR/student-base); the teacher is loaded separately
    model_dir = Path(node.get("student-dir" if settings.mode == "dp-opd" else "model-dir")
                     or settings.rounds_model_dir())
    teacher = settings.teacher_run()
    return dp_lora.Site(client_id, train_path, heldout_path, ledger_path, budget, model_dir,
                        extends_run=teacher.name if teacher else "")


app = build_client_app()
