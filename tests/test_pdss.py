"""The pdss pipeline end to end in Flower's Simulation Engine on tiny models: perturbed prompts →
teacher rationales → DP-SGD step-by-step students → FedAvg → evaluation → export. One session
run (with every site message captured) is read by most tests."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.pdss import build_mechanism, release_prompts
from client.pdss_student import multitask_rows, record_loss, usable
from client.wire_log import wire_capture_mod
from common.data.arithmetic import generate_task
from common.data.task import TaskRecord, load_task
from common.privacy.ledger import PrivacyLedger, ledger_paths
from common.settings import RunSettings
from server.pipeline import PIPELINES
from server.rationales import Rationale, parse
from simulations.run import prepare_run, simulate
from tests.wirecheck import find_leaks

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "pdss.toml"
TOKEN_EPSILON = 1.0


def pdss_overrides(data_dir, **changes) -> dict:
    """2 sites × 2 rounds of 2 DP-SGD steps; tiny teacher and student base, briefly warmed."""
    return {"clients": 2, "rounds": 2, "min-clients": 2, "local-steps": 2, "batch-size": 8, "max-length": 48,
            "data-dir": str(data_dir), "generate-data": False, "warmup-spec": "tiny-gpt2", "warmup-steps": 24,
            "student-warmup-steps": 8, "token-epsilon": TOKEN_EPSILON, "teacher-max-new-tokens": 12,
            "round-timeout": 900.0, **changes}


@pytest.fixture(scope="session")
def pdss_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pdss")
    generate_task(base / "task", n_clients=2, seed=5, public_records=160, train_per_client=24,
                  heldout_per_client=8, canaries_per_client=2)
    return simulated_run(base, pdss_overrides(base / "task"), base / "task")


def simulated_run(base: Path, overrides: dict, data: Path) -> dict:
    """A pdss simulation in BASE/run with every site message captured in BASE/wire."""
    # One torch thread here and in the Ray actors (they read the environment when they start): tiny
    # models gain nothing from a second one, and on a busy 2-core machine OpenMP's spinning costs ~3x.
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        settings = prepare_run(RunSettings.from_toml(CONFIG, overrides), base / "run", False)
        state = simulate(settings, client_mods=(wire_capture_mod(base / "wire"),))
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    return {"run": base / "run", "wire": base / "wire", "state": state, "data": data, "settings": settings}


@pytest.fixture(scope="session")
def pdss_encdec_run(pdss_run, tmp_path_factory):
    """The same task, teacher and student base with privatiser = encoder-decoder (one student round)."""
    settings = pdss_run["settings"]
    return simulated_run(tmp_path_factory.mktemp("pdss-encdec"), pdss_overrides(
        pdss_run["data"], privatiser="encoder-decoder", rounds=1, **{
            "privatiser-steps": 16, "privatiser-max-new-tokens": 32, "teacher-dir": settings.pdss.teacher_dir,
            "model-dir": settings.model_dir}), pdss_run["data"])


def test_every_phase_completes_and_both_mechanisms_are_charged(pdss_run):
    state = pdss_run["state"]
    assert set(state["phases"]) == set(PIPELINES["pdss"])
    assert all(p["complete"] for p in state["phases"].values())
    for path in ledger_paths(pdss_run["run"] / "ledgers"):
        entries = PrivacyLedger.load(path).entries
        assert [e["mechanism"] for e in entries] == ["pure-epsilon", "dp-sgd", "dp-sgd"]
        assert all(e["status"] == "released" for e in entries)
        prompt = entries[0]["params"]["epsilon_per_record"]
        assert prompt == state["phases"]["pdss-prompts"]["epsilon_per_record"][path.stem]
        assert PrivacyLedger.load(path).spent_epsilon() > prompt  # DP-SGD composed on top


def test_accuracy_and_metrics_are_reported_and_finite(pdss_run):
    state = pdss_run["state"]
    accuracy = state["phases"]["pdss-evaluation"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and len(state["phases"]["pdss-evaluation"]["sites"]) == 2
    metrics = state["metrics"]
    for key in ("teacher_accuracy_raw", "teacher_accuracy_perturbed", "leakage"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["canaries"] == 4 and metrics["prompts"] == 48
    assert math.isfinite(state["phases"]["pdss-students"]["train_loss"])


def test_exported_student_loads_and_its_card_states_both_mechanisms(pdss_run):
    out = pdss_run["run"] / "student"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("predict: Mia has 3 pens.\n", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    card = json.loads((out / "privacy.json").read_text())
    ledgers = [PrivacyLedger.load(p) for p in ledger_paths(pdss_run["run"] / "ledgers")]
    assert card["privacy"]["epsilon"] == pytest.approx(max(lg.spent_epsilon() for lg in ledgers))
    kinds = [m["mechanism"] for m in card["privacy"]["mechanisms"]]
    assert any("exponential" in k for k in kinds) and any("DP-SGD" in k for k in kinds)
    assert card["privacy"]["strategy"]["privatiser"] == "exponential"
    readme = (out / "README.md").read_text()
    assert f"{TOKEN_EPSILON:g}-DP per perturbed token" in readme and "DP-SGD" in readme


def _decoded_site_messages(wire: Path) -> list:
    out = []
    for path in sorted(wire.glob("*-out.bin")):
        proto = ProtoMessage()
        proto.ParseFromString(path.read_bytes())
        out.append((path.name, path.read_bytes(), message_from_proto(proto)))
    return out


def test_no_site_message_holds_a_raw_prompt_answer_label_or_canary(pdss_run):
    """What left the sites: no raw question, answer or label field, canary PIN, or 8-token window of a
    raw question that holds three or more private (perturbed) tokens. A window of public template tokens
    alone passes through by design, and a private token may survive the mechanism with the probability
    its ε allows (that is what the leakage metric measures: with a ~100-token output set and ε = 1,
    P(y = x) ≈ 1.5%); the test computes, from the exact distribution, the chance that an honest run
    fails it and requires it below 0.1%."""
    assert_no_private_text_left_the_sites(pdss_run, {"query.pdss_prompts", "train.pdss", "evaluate.pdss_student"})


def assert_no_private_text_left_the_sites(pdss_run, kinds_expected: set[str]) -> None:
    data, settings = pdss_run["data"], pdss_run["settings"]
    records = [r for i in range(2) for split in ("train", "heldout")
               for r in load_task(data / f"client_{i}" / f"{split}.jsonl")]
    canaries = [c["secret"] for c in json.loads((data / "canaries.json").read_text())["canaries"]]
    mechanism, tokenizer = build_mechanism(settings.model_dir, settings)
    stay = np.diag(mechanism.probabilities(mechanism.output_ids))  # P(y = x) for x in the output set
    p_same = dict(zip(mechanism.output_ids.tolist(), stay))
    windows, chance = [], 0.0
    for r in records:
        ids = tokenizer.encode(r.question, add_special_tokens=False)
        for i in range(len(ids) - 7):
            private = [t for t in ids[i:i + 8] if not mechanism.passes(t)]
            if len(private) >= 3:
                windows.append(tokenizer.decode(ids[i:i + 8]))
                chance += float(np.prod([p_same.get(t, 0.0) for t in private]))
    assert windows and chance < 1e-3  # an honest run fails this test with probability < 0.1%

    messages = _decoded_site_messages(pdss_run["wire"])
    kinds = {m.metadata.message_type for _, _, m in messages}
    assert kinds == kinds_expected
    payloads = {name: raw for name, raw, _ in messages}
    assert find_leaks(payloads, windows, tokenizer, window=8) == []  # as text and as token ids
    for name, raw, message in messages:
        assert set(message.content.keys()) <= {"prompts", "metrics", "client", "arrays"}, name
        assert b"answer" not in raw and b"label" not in raw and b"rationale" not in raw, name
        assert not any(secret.encode() in raw for secret in canaries), name
        assert not any(r.question.encode() in raw for r in records), name
        for window in windows:
            assert window.encode() not in raw, (name, window)


def test_infinite_epsilon_reproduces_the_non_private_rationale_path(pdss_run, tmp_path):
    from client.dp_lora import Site
    from server.pdss_rationales import load_teacher_generator, public_records
    from server.rationales import few_shot_prefix, write_rationales

    settings = RunSettings.from_flat({**pdss_run["settings"].to_run_config(), "token-epsilon": math.inf})
    train = pdss_run["data"] / "client_0" / "train.jsonl"
    site = Site("client_0", train, train.with_name("heldout.jsonl"), tmp_path / "l.json", 10.0,
                Path(settings.model_dir))
    prompts, _, refusal = release_prompts(site, settings, "inf")
    raw = [r.question for r in load_task(train)]
    assert refusal == "" and prompts == raw and PrivacyLedger.load(site.ledger_path).entries == []
    generator = load_teacher_generator(settings)
    prefix = few_shot_prefix(public_records(settings), settings.pdss.teacher_few_shot, settings.seed)
    args = (prefix, settings.pdss.teacher_max_new_tokens, settings.pdss.teacher_batch_size)
    assert write_rationales(generator, prompts, *args) == write_rationales(generator, raw, *args)


def test_empty_or_unparseable_generations_are_returned_as_such_and_skipped():
    assert parse("") == Rationale("", "", "")
    assert parse(" 3 + 4 = 7\nAnswer: 7\nQuestion") == Rationale("3 + 4 = 7", "7", " 3 + 4 = 7\nAnswer: 7\nQuestion")
    assert not parse(" 3 + 4 = 7 and so on").usable  # no answer line: nothing is invented
    records = [TaskRecord("q1", "7"), TaskRecord("q2", "3"), TaskRecord("q3", "1")]
    pairs, skipped = usable(records, ["3 + 4 = 7", "", "  "])
    assert pairs == [("q1", "7", "3 + 4 = 7")] and skipped == 2


def test_multitask_loss_is_the_weighted_sum_of_the_two_task_losses(pdss_run):
    tokenizer = AutoTokenizer.from_pretrained(pdss_run["settings"].model_dir)
    model = AutoModelForCausalLM.from_pretrained(pdss_run["settings"].model_dir).eval()
    q, a, why = "Mia has 3 pens. Omar gives her 4 more. How many pens does Mia have now?", "7", "3 + 4 = 7"
    alpha = 0.3
    rows = multitask_rows([(q, a, why)], tokenizer, alpha, 256)
    with torch.no_grad():
        got = record_loss(model, *rows.tensors)[0].item()

        def target_loss(prefix, target):  # mean token loss of the target alone, as a reference
            context = tokenizer.encode(prefix + q + "\n", add_special_tokens=False)
            goal = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
            ids = torch.tensor([context + goal])
            logits = model(input_ids=ids).logits[0, len(context) - 1:-1]
            return torch.nn.functional.cross_entropy(logits, torch.tensor(goal)).item()

        predict = target_loss("predict: ", a)
    # The explain part sees the predict part before it: recompute it in that context.
    with torch.no_grad():
        first = tokenizer.encode(f"predict: {q}\n", add_special_tokens=False) + \
            tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id]
        context = first + tokenizer.encode(f"explain: {q}\n", add_special_tokens=False)
        goal = tokenizer.encode(why, add_special_tokens=False) + [tokenizer.eos_token_id]
        logits = model(input_ids=torch.tensor([context + goal])).logits[0, len(context) - 1:-1]
        explain = torch.nn.functional.cross_entropy(logits, torch.tensor(goal)).item()
    assert got == pytest.approx((1 - alpha) * predict + alpha * explain, rel=1e-5)


def test_a_resumed_run_reuses_prompts_and_replays_rounds_without_new_charges(pdss_run, tmp_path):
    """Rewound into the students' phase after its round 1, in a new simulation (whose nodes are
    numbered anew): the sites are found again by client id, their prompts come from their caches,
    round 2 is re-sent from the release it kept, and no ledger gains an entry."""
    import shutil

    from server.checkpoint import RunDirectory

    run_dir = tmp_path / "run"
    shutil.copytree(pdss_run["run"], run_dir)
    run = RunDirectory(run_dir)
    state = run.load_state()
    state["phases"] = {k: v for k, v in state["phases"].items() if k in ("pdss-prompts", "pdss-rationales")}
    state["pdss"] = {**state["pdss"], "completed_round": 1, "adapter": "adapters/round_1.safetensors",
                     "rounds": state["pdss"]["rounds"][:1]}
    run.commit(state)
    before = {p.name: PrivacyLedger.load(p).entries for p in ledger_paths(run_dir / "ledgers")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = prepare_run(RunSettings.from_flat({**pdss_run["settings"].to_run_config(),
                                                      "run-dir": str(run_dir)}), run_dir, True)
        state = simulate(settings)
    finally:
        torch.set_num_threads(threads)
    assert {p.name: PrivacyLedger.load(p).entries for p in ledger_paths(run_dir / "ledgers")} == before
    original = pdss_run["run"]
    prompts = lambda d: {c: s["prompts"] for c, s in json.loads((d / "pdss" / "prompts.json").read_text())["sites"].items()}  # noqa: E731
    assert prompts(run_dir) == prompts(original)  # the same perturbed prompts (node ids are per simulation)
    nodes = lambda d: {c: s["node"] for c, s in json.loads((d / "pdss" / "prompts.json").read_text())["sites"].items()}  # noqa: E731
    assert nodes(run_dir) != nodes(original)  # renumbered, and every site found again by client id
    assert state["phases"]["pdss-evaluation"]["accuracy"] == pdss_run["state"]["phases"]["pdss-evaluation"]["accuracy"]
    assert (run_dir / "adapters" / "round_2.safetensors").read_bytes() == \
        (original / "adapters" / "round_2.safetensors").read_bytes()


def test_encoder_decoder_trains_one_shared_privatiser_and_charges_every_token_of_its_rewrites(pdss_encdec_run):
    from client.dp_lora import Site
    from client.pdss import cache_path
    from client.pdss_privatiser import load_privatiser
    from server.pipeline import phases_of

    state, settings, run = pdss_encdec_run["state"], pdss_encdec_run["settings"], pdss_encdec_run["run"]
    assert set(state["phases"]) == set(phases_of(settings)) and phases_of(settings)[0] == "pdss-privatiser"
    trained = state["phases"]["pdss-privatiser"]["sites"]
    assert len({s["privatiser"] for s in trained.values()}) == 1  # a function of public inputs only: one for all
    assert sorted(s["cached"] for s in trained.values()) == [False, True]  # trained once, then reused
    length = settings.pdss.privatiser_prompt_tokens
    for path in ledger_paths(run / "ledgers"):
        entries = PrivacyLedger.load(path).entries
        assert [e["mechanism"] for e in entries] == ["pure-epsilon", "dp-sgd"]
        questions = [r.question for r in load_task(pdss_encdec_run["data"] / path.stem / "train.jsonl")]
        site = Site(path.stem, Path("unused"), Path("unused"), path, 1.0, Path(settings.model_dir))
        rewrites = load_privatiser(site, settings, trained[path.stem]["privatiser"]).encode(questions)
        assert len(rewrites) == len(questions)
        # each rewrite was sent as exactly `length` tokens, every one perturbed and charged
        assert entries[0]["params"]["epsilon_per_record"] == TOKEN_EPSILON * length
        kept = json.loads(cache_path(path).read_text())["prompts"]
        assert [v["tokens_perturbed"] for v in kept.values()] == [length] * len(questions)
    assert 0.0 <= state["phases"]["pdss-evaluation"]["accuracy"] <= 1.0


def test_no_encoder_decoder_site_message_holds_a_raw_prompt_answer_label_or_canary(pdss_encdec_run):
    assert_no_private_text_left_the_sites(pdss_encdec_run, {"train.pdss_privatiser", "query.pdss_prompts",
                                                            "train.pdss", "evaluate.pdss_student"})


def test_the_encoder_decoder_card_states_the_strategy_and_what_it_guarantees(pdss_encdec_run):
    out = pdss_encdec_run["run"] / "student"
    card = json.loads((out / "privacy.json").read_text())
    assert card["privacy"]["strategy"]["privatiser"] == "encoder-decoder"
    assert card["settings"]["privatiser"] == "encoder-decoder"
    readme = (out / "README.md").read_text()
    assert "**Strategy: encoder-decoder**" in readme and "no guarantee of its own" in readme
    assert f"ε_token·{pdss_encdec_run['settings'].pdss.privatiser_prompt_tokens}-DP with respect to any two " \
        "questions" in readme
