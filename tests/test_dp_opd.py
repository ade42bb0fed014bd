"""dp-opd: the generalised JSD, the continuation-only loss, per-sample gradients against a naive
loop, and one pipeline run in Flower's Simulation Engine (3 sites × 2 rounds, a DP teacher whose
ε composes with the student's in the same ledgers), which most tests read (session fixture)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import dp_lora
from client.dp_opd import OPDBatch, OPDLoss, Sequences, continuation_mask, dp_opd_loss, prefix_lengths, teacher_logits
from client.wire_log import wire_capture_mod
from common.data.loading import load_records
from common.distill.losses import generalized_jsd_per_example, kd_loss, soft_targets
from common.errors import ConfigError
from common.models.build import adapter_state
from common.models.lm import encode_texts
from common.models.loading import build_student, load_lora_model, load_teacher
from common.privacy.accounting import epsilon_of
from common.privacy.dp_sgd import DPSGDPlan, make_private
from common.privacy.ledger import PrivacyLedger, ledger_paths
from common.settings import OPDSettings, RunSettings
from server.checkpoint import RunDirectory
from simulations.run import prepare_run, simulate
from tests.conftest import fed_overrides
from tests.wirecheck import run_leaks

CONFIG = Path(__file__).resolve().parents[1] / "simulations" / "configs" / "dp-opd.toml"
TEACHER_EPSILON, STUDENT_EPSILON = 8.0, 4.0


# ---------------------------------------------------------------------------- the DP teacher run
def dp_teacher_run(root: Path, run_dir: Path) -> Path:
    """A finished one-round dp-lora run made with the real client code (DP-SGD, ledger charges,
    FedAvg of the sites' adapters), without the Simulation Engine: what a dp-opd student reads."""
    # Trained enough to beat the untrained student on the sites' text (the session's public base does not).
    settings = RunSettings.from_flat(fed_overrides(root, **{"name": "teach", "rounds": 1, "local-steps": 8,
                                                            "learning-rate": 0.02,
                                                            "epsilon": TEACHER_EPSILON,
                                                            "run-dir": str(run_dir)}))
    model, _ = load_lora_model(settings.model_dir, settings.dp)
    initial = {k: v.copy() for k, v in adapter_state(model).items()}
    adapters = []
    for i in range(settings.clients):
        site = dp_lora.Site(f"client_{i}", Path(settings.data_dir) / f"client_{i}" / "train.jsonl",
                            Path(settings.data_dir) / f"client_{i}" / "heldout.jsonl",
                            run_dir / "ledgers" / f"client_{i}.json", settings.site_budget(), Path(settings.model_dir))
        adapter, _, refusal = dp_lora.run_round(site, settings.dp, settings.name, 1, initial)
        assert refusal == ""
        adapters.append(adapter)
    run = RunDirectory(run_dir)
    state = run.new_state(settings.to_run_config())
    state["adapter"] = run.save_adapter(1, {k: np.mean([a[k] for a in adapters], axis=0) for k in initial})
    state["completed_round"] = 1
    run.commit(state)
    return run_dir


def opd_overrides(root, teacher_run, **changes) -> dict:
    return fed_overrides(root, **{"name": "opd", "mode": "dp-opd", "epsilon": STUDENT_EPSILON, "local-steps": 4,
                                  "learning-rate": 0.02, "max-length": 64, "student": "from-teacher",
                                  "opd-teacher": str(teacher_run), "opd-max-new-tokens": 16, "audit": False,
                                  **changes})


@pytest.fixture(scope="session")
def opd_run(fed_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("dp_opd")
    teacher_run = dp_teacher_run(fed_root, base / "teacher-run")
    teacher_ledgers = {p.name: PrivacyLedger.load(p).spent_epsilon() for p in ledger_paths(teacher_run / "ledgers")}
    run_dir, wire = base / "run", base / "wire"
    settings = prepare_run(RunSettings.from_toml(CONFIG, opd_overrides(fed_root, teacher_run)), run_dir, False)
    state = simulate(settings, client_mods=(wire_capture_mod(wire),))
    return {"run": run_dir, "wire": wire, "state": state, "root": fed_root, "teacher_run": teacher_run,
            "teacher_epsilon": teacher_ledgers, "settings": settings}


# ---------------------------------------------------------------------------- the loss
def _kl(p_logits, q_logits):
    p, q = F.softmax(p_logits, -1), F.softmax(q_logits, -1)
    return (p * (p.log() - q.log())).sum(-1)


def test_generalized_jsd_limits_symmetric_point_and_sign():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11) * 2, torch.randn(3, 5, 11) * 2
    mask = torch.ones(3, 5, dtype=torch.bool)
    per_record = lambda beta: generalized_jsd_per_example(s, t, mask, beta)  # noqa: E731
    assert torch.allclose(per_record(0.0), _kl(t, s).mean(1), atol=1e-5)  # forward KL(teacher ‖ student)
    assert torch.allclose(per_record(1.0), _kl(s, t).mean(1), atol=1e-5)  # reverse KL(student ‖ teacher)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(per_record(0.5), jsd.mean(1), atol=1e-5)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert (per_record(beta) >= -1e-7).all()


def _records(fed_root, n=3, max_length=24):
    tokenizer = AutoTokenizer.from_pretrained(fed_root / "teacher")
    texts = [r.text for r in load_records(fed_root / "corpus" / "client_0" / "train.jsonl")[:n]]
    return tokenizer, encode_texts(texts, tokenizer, max_length).tensors


def test_loss_counts_continuation_tokens_only(fed_root):
    _, (ids, mask) = _records(fed_root)
    mask[1, 10:] = 0  # a shorter record: the rest is padding
    ids[1, 10:] = 7
    prefix = prefix_lengths(mask.sum(1), 0.5)
    counted = continuation_mask(mask, prefix)
    assert prefix.tolist() == [12, 5, 12] and counted.sum(1).tolist() == [12, 5, 12]
    torch.manual_seed(0)
    student, teacher = torch.randn(3, ids.size(1) - 1, 50), torch.randn(3, ids.size(1) - 1, 50)
    loss = generalized_jsd_per_example(student, teacher, counted, 0.0)
    changed = teacher.clone()
    changed[0, :prefix[0] - 1] += 5 * torch.randn_like(changed[0, :prefix[0] - 1])  # targets inside the prefix
    changed[1, 9:] = float("nan")  # padding
    assert torch.equal(generalized_jsd_per_example(student, changed, counted, 0.0), loss)
    changed[0, prefix[0] - 1, 0] += 5.0  # the first continuation token's target counts
    assert generalized_jsd_per_example(student, changed, counted, 0.0)[0] != loss[0]
    assert prefix_lengths(torch.tensor([1, 2, 30]), 4).tolist() == [1, 1, 4]  # a count, leaving one token


def test_dpkd_is_the_off_policy_setting(fed_root):
    # opd-lambda = 0, opd-beta = 0, opd-ce-weight = 0.6, opd-prefix = 1: DistilDP's KD loss (λ = 0.4) on
    # the record, against the teacher, per record; no rollout is sampled.
    tokenizer, (ids, mask) = _records(fed_root, n=1)
    teacher, _ = load_teacher(fed_root / "teacher", RunSettings().dp, None)
    student = build_student("from-teacher", teacher, tokenizer)
    dpkd = OPDSettings(opd_lambda=0.0, opd_beta=0.0, opd_ce_weight=0.6, opd_prefix=1)
    assert not dpkd.on_policy
    loss = OPDLoss(teacher, tokenizer, dpkd)(student, ids, mask)
    with torch.no_grad():
        targets = soft_targets(teacher(input_ids=ids, attention_mask=mask).logits)
    expected = kd_loss(student(input_ids=ids, attention_mask=mask).logits, ids, mask, targets, lam=0.4).total
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_sample_gradients_match_a_naive_loop(fed_root, tmp_path, one_torch_thread):
    tokenizer, (ids, mask) = _records(fed_root, n=3)
    teacher, _ = load_teacher(fed_root / "teacher", RunSettings().dp, None)
    build_student("from-teacher", teacher, tokenizer).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    cfg = RunSettings(mode="dp-opd").dp
    opd = OPDSettings(opd_lambda=0.5, opd_ce_weight=0.2, opd_beta=0.3, opd_max_new_tokens=6)  # every term
    torch.manual_seed(1)
    random_adapter = {k: np.random.default_rng(1).normal(0, 0.05, v.shape).astype(np.float32)
                      for k, v in adapter_state(load_lora_model(tmp_path / "student", cfg)[0]).items()}

    def student():  # the trainer's order: base → device → LoRA (load_lora_model), then opacus
        model, _ = load_lora_model(tmp_path / "student", cfg, random_adapter)
        return model.train()

    model = student()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    plan = DPSGDPlan(1.0, 1e-5, 0.0, 1.0, 1, 1, 0.05, "rdp")  # σ = 0: the clipped sum is observable
    _, trained, optimizer, _ = make_private(model, optimizer, encode_texts(["x"], tokenizer), 1, plan)
    loss_fn = OPDLoss(teacher, tokenizer, opd)
    prefix = prefix_lengths(mask.sum(1), opd.opd_prefix)
    batch = OPDBatch(loss_fn.rollouts(trained, ids, prefix), Sequences(ids, mask, continuation_mask(mask, prefix)))
    of_teacher = lambda seq: teacher_logits(teacher, seq)  # noqa: E731
    dp_opd_loss(trained, of_teacher, batch, opd).mean().backward()
    params = [(n.removeprefix("_module."), p) for n, p in trained.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample.detach().clone() for n, p in params}
    optimizer.clip_and_accumulate()
    summed = {n: p.summed_grad.detach().clone() for n, p in params}
    trained.to_standard_module()

    naive = student()
    naive_params = dict((n, p) for n, p in naive.named_parameters() if p.requires_grad)
    clipped_sum = {n: 0.0 for n in naive_params}
    for i in range(ids.size(0)):
        naive.zero_grad()
        dp_opd_loss(naive, of_teacher, batch.row(i), opd).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in naive_params.items()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        for name in per_sample:
            assert torch.allclose(per_sample[name][i], grads[name], atol=1e-6, rtol=1e-4)
        for name, g in grads.items():
            clipped_sum[name] = clipped_sum[name] + g * min(1.0, plan.max_grad_norm / (float(norm) + 1e-6))
    assert norm > plan.max_grad_norm  # clipping was active
    assert per_sample and set(summed) == set(clipped_sum)
    for name in summed:
        assert torch.allclose(summed[name], clipped_sum[name], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------- which teacher
def test_a_teacher_trained_without_dp_is_refused(opd_run, tmp_path):
    root = opd_run["root"]
    plain = tmp_path / "plain"
    shutil.copytree(opd_run["teacher_run"], plain, ignore=shutil.ignore_patterns("ledgers"))
    state = RunDirectory(plain).load_state()
    state["settings"]["private"] = False
    RunDirectory(plain).commit(state)
    with pytest.raises(ConfigError, match="without DP.*depend on every other private record.*sensitivity"):
        RunSettings.from_flat(opd_overrides(root, plain))
    # a student that claims no DP either (an ε = ∞ baseline) may learn from it
    assert not RunSettings.from_flat({**opd_overrides(root, plain), "private": False}).dp.private
    with pytest.raises(ConfigError, match="no state.json"):
        RunSettings.from_flat(opd_overrides(root, tmp_path / "nothing"))


# ---------------------------------------------------------------------------- end to end
def test_pipeline_completes_and_the_student_learns(opd_run):
    state = opd_run["state"]
    assert set(state["phases"]) == {"student-rounds", "student-evaluation", "export"}
    assert all(p["complete"] for p in state["phases"].values()) and state["completed_round"] == 2
    evaluation = state["phases"]["student-evaluation"]
    after, before = evaluation["heldout_perplexity"], evaluation["student"]["untrained_heldout_perplexity"]
    assert math.isfinite(after) and evaluation["student"]["sites"] == 3
    assert before == pytest.approx(state["baseline"]["perplexity"])
    assert after < before
    for record in state["rounds"]:  # each part of a round timed at the sites
        assert all(record["train"][k] > 0 for k in ("generation-seconds", "teacher-seconds", "dp-step-seconds"))
    print(f"\nheld-out perplexity: untrained student {before:.3f} → dp-opd student {after:.3f}; rounds: " +
          "; ".join(f"gen {r['train']['generation-seconds']:.2f}s teacher {r['train']['teacher-seconds']:.2f}s "
                    f"DP step {r['train']['dp-step-seconds']:.2f}s" for r in state["rounds"]))


def test_teacher_and_student_compose_in_the_same_ledgers(opd_run):
    run_dir, settings = opd_run["run"], opd_run["settings"]
    assert not (run_dir / "ledgers").exists()  # the student charged the teacher run's ledgers
    card = json.loads((run_dir / "student" / "privacy.json").read_text())
    for path in ledger_paths(opd_run["teacher_run"] / "ledgers"):
        ledger = PrivacyLedger.load(path)
        assert [e["charge_id"] for e in ledger.entries] == ["teach/round-1", "opd/round-1", "opd/round-2"]
        student = [e["params"] for e in ledger.entries if e["run_id"] == "opd"]
        own = epsilon_of([(p["noise_multiplier"], p["sample_rate"], p["steps"]) for p in student], ledger.delta,
                         ledger.accountant)
        assert own <= STUDENT_EPSILON + 1e-9  # the student's ε ≤ its target
        teacher = opd_run["teacher_epsilon"][path.name]
        assert teacher < ledger.spent_epsilon() <= ledger.epsilon_budget == TEACHER_EPSILON + STUDENT_EPSILON
    assert card["privacy"]["epsilon"] == pytest.approx(max(PrivacyLedger.load(p).spent_epsilon()
                                                           for p in ledger_paths(settings.ledger_dir())))
    assert card["privacy"]["epsilon"] > max(opd_run["teacher_epsilon"].values())
    mechanisms = {m["mechanism"] for site in card["privacy"]["sites"] for m in site["mechanisms"]}
    assert any("student rounds (dp-opd)" in m for m in mechanisms) and any("DP teacher" in m for m in mechanisms)
    assert "'teach'" in card["privacy"]["covers"] and "without DP is refused" in card["privacy"]["covers"]


def test_exported_student_loads_and_nothing_private_leaves_a_site(opd_run):
    root, run_dir = opd_run["root"], opd_run["run"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert model.config.n_layer == 1 and (run_dir / "student" / "tokenizer.json").is_file()
    card = json.loads((run_dir / "student" / "privacy.json").read_text())
    assert card["method"] == "dp-opd" and card["privacy"]["delta"] > 0
    assert run_leaks(root / "corpus", root / "teacher", opd_run["wire"], run_dir / "student") == []


def test_a_site_without_the_teachers_ledger_refuses(opd_run, tmp_path):
    # A fresh ledger would leave the DP teacher's ε out of the site's composed figure.
    settings, corpus = opd_run["settings"], opd_run["root"] / "corpus" / "client_0"
    site = dp_lora.Site("client_0", corpus / "train.jsonl", corpus / "heldout.jsonl", tmp_path / "client_0.json",
                        settings.site_budget(), Path(settings.rounds_model_dir()), extends_run="teach")
    adapter, metrics, refusal = dp_lora.run_round(site, settings.dp, "opd-elsewhere", 1, {"a": np.zeros(2)})
    assert metrics["refused"] == 1 and "holds no charges of run 'teach'" in refusal
    assert not site.ledger_path.exists()


def test_the_audit_scores_the_dp_opd_student_against_its_public_base(opd_run, tmp_path):
    """The run's model is its student (the student base + the rounds' adapter), the floor that base;
    the exported student is the same model merged, so both score the same."""
    import shutil

    from common.audit.run import run_audit

    run_dir = tmp_path / "run"
    shutil.copytree(opd_run["run"], run_dir)
    report = run_audit(run_dir, [f"student={run_dir / 'student'}"], max_records=30, candidates=20,
                       block_seeds=(0,), progress=False)
    floor, run, student = report["models"]
    assert "floor" in floor["label"] and run["epsilon"] == pytest.approx(student["epsilon"], rel=1e-6)
    assert run["membership"]["loss"]["auc"] == pytest.approx(student["membership"]["loss"]["auc"], abs=1e-6)
    assert floor["membership"]["loss"]["auc"] != run["membership"]["loss"]["auc"]  # trained, not the base
