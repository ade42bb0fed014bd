"""The distillation losses (common/distill/losses.py) against independent hand computations.

Reference values are computed with NumPy in explicit loops over (record, position), never by
calling the code under test, so a shared mistake (a wrong shift, pad positions counted, a
missing T², the KL the wrong way round) cannot cancel out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.distill import (
    HiddenProjector,
    KDLoss,
    SoftTargets,
    generalized_jsd,
    generalized_jsd_per_example,
    kd_loss,
    soft_targets,
    uniform_layer_map,
)

B, L, V = 2, 4, 5
# Record 0 is full; record 1 ends after 3 tokens (its last position is padding).
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
IDS = np.array([[0, 3, 1, 4], [2, 2, 0, 0]])  # the trailing 0 of record 1 is a pad token


# --- NumPy references -------------------------------------------------------------------------

def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


def np_kd_parts(student, teacher, ids, mask, temperature, kl_start=0, top_k=None):
    """(CE, KL) by explicit loops: logits position j predicts token j+1, counted iff mask[b, j+1]."""
    ce_terms, kl_terms = [], []
    for b in range(student.shape[0]):
        for j in range(student.shape[1] - 1):
            if not mask[b, j + 1]:
                continue
            ce_terms.append(-np_log_softmax(student[b, j])[ids[b, j + 1]])
            if j < kl_start:
                continue
            log_q = np_log_softmax(student[b, j] / temperature)
            log_p = np_log_softmax(teacher[b, j] / temperature)
            if top_k is not None:  # keep the teacher's k best tokens, renormalise the teacher only
                keep = np.argsort(-teacher[b, j])[:top_k]
                log_p, log_q = np_log_softmax(teacher[b, j][keep] / temperature), log_q[keep]
            kl_terms.append(sum(np.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q)))
    return float(np.mean(ce_terms)), float(np.mean(kl_terms))


def np_hidden_mse(student_hidden, teacher_hidden, layer_map, weights, biases, mask):
    """Mean over pairs of: mean over valid positions of mean over dims of (W·h_s + b − h_t)²."""
    per_layer = []
    for (si, ti), w, bias in zip(layer_map, weights, biases):
        terms = []
        for b in range(mask.shape[0]):
            for i in range(mask.shape[1]):
                if mask[b, i]:
                    pred = w @ student_hidden[si][b, i] + bias
                    terms.append(np.mean((pred - teacher_hidden[ti][b, i]) ** 2))
        per_layer.append(np.mean(terms))
    return float(np.mean(per_layer))


def np_kl(p, q):
    return float(sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


# --- fixtures ---------------------------------------------------------------------------------

def tiny_batch(seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(B, L, V)) * 2
    teacher = rng.normal(size=(B, L, V)) * 2
    return student, teacher


def tiny_hidden(seed=1, ds=3, dt=4):
    """Embeddings + 2 blocks for the student (width ds) and teacher (width dt)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(B, L, ds)) for _ in range(3)], [rng.normal(size=(B, L, dt)) for _ in range(3)]


def t(x, grad=False):
    return torch.tensor(np.asarray(x), dtype=torch.float32, requires_grad=grad)


def set_projection(projector, seed=2):
    """Known W and b for every pair; returned as NumPy for the reference."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    with torch.no_grad():
        for lin in projector.proj:
            w = rng.normal(size=tuple(lin.weight.shape))
            bias = rng.normal(size=tuple(lin.bias.shape))
            lin.weight.copy_(torch.tensor(w))
            lin.bias.copy_(torch.tensor(bias))
            weights.append(w)
            biases.append(bias)
    return weights, biases


# --- kd_loss ----------------------------------------------------------------------------------

def test_kd_loss_matches_hand_computation():
    student, teacher = tiny_batch()
    s_hidden, t_hidden = tiny_hidden()
    lam, temperature, beta = 0.4, 2.0, 0.5
    layer_map = [(1, 1), (2, 2)]
    projector = HiddenProjector(3, 4, layer_map)
    weights, biases = set_projection(projector)

    hidden = projector(tuple(t(h) for h in s_hidden), tuple(t(h) for h in t_hidden), torch.tensor(MASK))
    out = kd_loss(t(student), torch.tensor(IDS), torch.tensor(MASK), soft_targets(t(teacher), temperature),
                  lam=lam, temperature=temperature, hidden_loss=hidden, beta=beta)

    ce, kl = np_kd_parts(student, teacher, IDS, MASK, temperature)
    mse = np_hidden_mse(s_hidden, t_hidden, layer_map, weights, biases, MASK)
    assert isinstance(out, KDLoss)
    assert out.ce.item() == pytest.approx(ce, rel=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.hidden.item() == pytest.approx(mse, rel=1e-5)
    expected = (1 - lam) * ce + lam * temperature ** 2 * kl + beta * mse
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_pure_hard_and_pure_soft_ends():
    student, teacher = tiny_batch()
    ce, kl = np_kd_parts(student, teacher, IDS, MASK, 1.0)
    targets = soft_targets(t(teacher))
    hard = kd_loss(t(student), torch.tensor(IDS), torch.tensor(MASK), targets, lam=0.0)
    soft = kd_loss(t(student), torch.tensor(IDS), torch.tensor(MASK), targets, lam=1.0)
    assert hard.total.item() == pytest.approx(ce, rel=1e-5)
    assert soft.total.item() == pytest.approx(kl, rel=1e-5)
    assert hard.hidden.item() == 0.0


def test_kd_loss_kl_is_zero_when_the_student_is_the_teacher():
    _, teacher = tiny_batch()
    for temperature in (1.0, 2.0):
        out = kd_loss(t(teacher), torch.tensor(IDS), torch.tensor(MASK), soft_targets(t(teacher), temperature),
                      temperature=temperature)
        assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    # β = 0 reports a given hidden loss but does not add it.
    out = kd_loss(t(teacher), torch.tensor(IDS), torch.tensor(MASK), soft_targets(t(teacher)), lam=0.0,
                  hidden_loss=torch.tensor(3.0), beta=0.0)
    assert out.hidden.item() == 3.0 and out.total.item() == pytest.approx(out.ce.item())


def test_pad_positions_change_nothing():
    student, teacher = tiny_batch()
    s_hidden, t_hidden = tiny_hidden()
    projector = HiddenProjector(3, 4, [(1, 1), (2, 2)])

    def loss(student, teacher, ids, s_hidden, t_hidden):
        hidden = projector(tuple(t(h) for h in s_hidden), tuple(t(h) for h in t_hidden), torch.tensor(MASK))
        return kd_loss(t(student), torch.tensor(ids), torch.tensor(MASK), soft_targets(t(teacher), 2.0),
                       temperature=2.0, hidden_loss=hidden, beta=1.0)

    before = loss(student, teacher, IDS, s_hidden, t_hidden)
    # Record 1's position 3 is padding: its token, the logits predicting it (position 2), the
    # logits after it (position 3) and its hidden states are all garbage by construction.
    student2, teacher2, ids2 = student.copy(), teacher.copy(), IDS.copy()
    student2[1, 2:] = 1e4 * np.arange(V)
    teacher2[1, 2:] = -1e4 * np.arange(V)
    ids2[1, 3] = 4
    s_hidden2 = [h.copy() for h in s_hidden]
    t_hidden2 = [h.copy() for h in t_hidden]
    for h in s_hidden2 + t_hidden2:
        h[1, 3] = 1e3
    after = loss(student2, teacher2, ids2, s_hidden2, t_hidden2)
    for name in ("total", "ce", "kl", "hidden"):
        assert getattr(after, name).item() == pytest.approx(getattr(before, name).item(), rel=1e-6), name
    # ...whereas a real position does count.
    student2[1, 1, 0] += 1.0  # (a constant shift of all logits would not change a softmax)
    assert loss(student2, teacher2, ids2, s_hidden2, t_hidden2).total.item() != pytest.approx(before.total.item())


def test_kl_start_excludes_early_positions():
    student, teacher = tiny_batch()
    args = (torch.tensor(IDS), torch.tensor(MASK))
    out = kd_loss(t(student), *args, soft_targets(t(teacher)), kl_start=2)
    ce, kl = np_kd_parts(student, teacher, IDS, MASK, 1.0, kl_start=2)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.ce.item() == pytest.approx(ce, rel=1e-5)  # CE still counts every position
    teacher2 = teacher.copy()
    teacher2[:, :2] = np.random.default_rng(9).normal(size=(B, 2, V)) * 5
    assert kd_loss(t(student), *args, soft_targets(t(teacher2)), kl_start=2).kl.item() == pytest.approx(out.kl.item())
    assert kd_loss(t(student), *args, soft_targets(t(teacher2))).kl.item() != pytest.approx(out.kl.item())


def test_gradients_reach_student_and_projector_only():
    student, teacher = tiny_batch()
    s_hidden, t_hidden = tiny_hidden()
    s_logits = t(student, grad=True)
    s_h = tuple(t(h, grad=True) for h in s_hidden)
    t_logits, t_h = t(teacher), tuple(t(h) for h in t_hidden)
    projector = HiddenProjector(3, 4, uniform_layer_map(2, 2))
    hidden = projector(s_h, t_h, torch.tensor(MASK))
    kd_loss(s_logits, torch.tensor(IDS), torch.tensor(MASK), soft_targets(t_logits), hidden_loss=hidden,
            beta=1.0).total.backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert s_logits.grad[1, 3].abs().sum() == 0  # the last position predicts nothing
    assert s_logits.grad[1, 2].abs().sum() == 0  # it predicts a pad token
    for i in (1, 2):
        assert s_h[i].grad.abs().sum() > 0
        assert s_h[i].grad[1, 3].abs().sum() == 0  # pad position
    assert s_h[0].grad is None  # embeddings are not mapped
    for lin in projector.proj:
        assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0
    assert t_logits.grad is None and all(h.grad is None for h in t_h)


def test_teacher_under_inference_mode_is_accepted_and_teacher_with_grad_is_refused():
    student, teacher = tiny_batch()
    s_hidden, t_hidden = tiny_hidden()
    with torch.inference_mode():  # how the distillation loop computes the teacher
        targets = soft_targets(t(teacher), top_k=3)
        t_h = tuple(t(h) for h in t_hidden)
    s_logits = t(student, grad=True)
    projector = HiddenProjector(3, 4, [(2, 2)])
    hidden = projector(tuple(t(h, grad=True) for h in s_hidden), t_h, torch.tensor(MASK))
    kd_loss(s_logits, torch.tensor(IDS), torch.tensor(MASK), targets, hidden_loss=hidden, beta=1.0).total.backward()
    assert s_logits.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="require grad"):
        kd_loss(s_logits, torch.tensor(IDS), torch.tensor(MASK), soft_targets(t(teacher, grad=True)))
    with pytest.raises(ValueError, match="requires grad"):
        projector(tuple(t(h) for h in s_hidden), tuple(t(h, grad=True) for h in t_hidden), torch.tensor(MASK))


# --- soft targets, top-k ----------------------------------------------------------------------

def test_topk_equal_to_vocab_is_the_full_distribution():
    student, teacher = tiny_batch()
    args = (torch.tensor(IDS), torch.tensor(MASK))
    full = soft_targets(t(teacher), 2.0)
    assert full.indices is None and full.logprobs.shape == (B, L - 1, V)
    assert soft_targets(t(teacher), 2.0, top_k=V).indices is None
    # The gather path with all V tokens (in the teacher's sorted order) gives the same KL.
    values, indices = (t(teacher)[:, :-1] / 2.0).topk(V, dim=-1)
    sorted_full = SoftTargets(logprobs=torch.log_softmax(values, -1), indices=indices)
    kl_full = kd_loss(t(student), *args, full, temperature=2.0).kl.item()
    kl_gathered = kd_loss(t(student), *args, sorted_full, temperature=2.0).kl.item()
    assert kl_gathered == pytest.approx(kl_full, rel=1e-6)
    assert kl_full == pytest.approx(np_kd_parts(student, teacher, IDS, MASK, 2.0)[1], rel=1e-5)


def test_topk_renormalises_over_the_teachers_best_tokens():
    student, teacher = tiny_batch()
    k, temperature = 3, 1.5
    targets = soft_targets(t(teacher), temperature, top_k=k)
    assert targets.logprobs.shape == targets.indices.shape == (B, L - 1, k)
    assert torch.allclose(targets.logprobs.exp().sum(-1), torch.ones(B, L - 1), atol=1e-6)
    for b in range(B):
        for j in range(L - 1):
            keep = np.argsort(-teacher[b, j])[:k]
            assert targets.indices[b, j].tolist() == keep.tolist()
            expected = np_softmax(teacher[b, j][keep] / temperature)
            assert np.allclose(targets.logprobs[b, j].exp().numpy(), expected, atol=1e-6)
    out = kd_loss(t(student), torch.tensor(IDS), torch.tensor(MASK), targets, temperature=temperature)
    kl = np_kd_parts(student, teacher, IDS, MASK, temperature, top_k=k)[1]
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.kl.item() >= 0


def test_soft_targets_drop_the_last_position_and_compute_in_float32():
    teacher = torch.randn(2, 6, 7).to(torch.bfloat16)
    targets = soft_targets(teacher, 1.0)
    assert targets.logprobs.shape == (2, 5, 7) and targets.logprobs.dtype == torch.float32
    assert torch.allclose(targets.logprobs, torch.log_softmax(teacher[:, :-1].float(), -1))


# --- hidden-state alignment -------------------------------------------------------------------

def test_hidden_projection_when_widths_differ_matches_hand_computation():
    s_hidden, t_hidden = tiny_hidden(ds=3, dt=4)
    layer_map = [(1, 1), (2, 2)]
    projector = HiddenProjector(3, 4, layer_map)
    assert [tuple(lin.weight.shape) for lin in projector.proj] == [(4, 3), (4, 3)]
    weights, biases = set_projection(projector, seed=5)
    got = projector(tuple(t(h) for h in s_hidden), tuple(t(h) for h in t_hidden), torch.tensor(MASK)).item()
    assert got == pytest.approx(np_hidden_mse(s_hidden, t_hidden, layer_map, weights, biases, MASK), rel=1e-5)


def test_equal_widths_start_at_the_plain_masked_mse():
    s_hidden, t_hidden = tiny_hidden(ds=4, dt=4)
    projector = HiddenProjector(4, 4, [(2, 2)])
    got = projector(tuple(t(h) for h in s_hidden), tuple(t(h) for h in t_hidden), torch.tensor(MASK)).item()
    eye = [np.eye(4)], [np.zeros(4)]
    assert got == pytest.approx(np_hidden_mse(s_hidden, t_hidden, [(2, 2)], *eye, MASK), rel=1e-5)


@pytest.mark.parametrize("student,teacher,expected", [
    (2, 4, [(1, 2), (2, 4)]),
    (3, 12, [(1, 4), (2, 8), (3, 12)]),
    (4, 4, [(1, 1), (2, 2), (3, 3), (4, 4)]),
    (6, 12, [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]),  # DistilGPT2 ← GPT-2
    (4, 10, [(1, 3), (2, 5), (3, 8), (4, 10)]),  # halves round up
    (1, 2, [(1, 2)]),
])
def test_uniform_layer_map(student, teacher, expected):
    mapping = uniform_layer_map(student, teacher)
    assert mapping == expected
    assert mapping[-1] == (student, teacher)
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(mapping, mapping[1:]))


def test_uniform_layer_map_student_deeper_than_teacher_never_maps_to_embeddings():
    mapping = uniform_layer_map(4, 1)
    assert mapping == [(1, 1), (2, 1), (3, 1), (4, 1)]


# --- generalised JSD --------------------------------------------------------------------------

def jsd_batch(seed=3, b=2, n=3, v=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, n, v)) * 2, rng.normal(size=(b, n, v)) * 2, np.array([[1, 1, 1], [1, 1, 0]])


def np_jsd_positions(student, teacher, mask, fn, temperature=1.0):
    """{(b, j): fn(P_teacher, P_student)} over masked positions."""
    return {(b, j): fn(np_softmax(teacher[b, j] / temperature), np_softmax(student[b, j] / temperature))
            for b in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[b, j]}


@pytest.mark.parametrize("beta,fn", [
    (0.0, lambda p, q: np_kl(p, q)),                       # forward KL(teacher ‖ student)
    (1.0, lambda p, q: np_kl(q, p)),                       # reverse KL(student ‖ teacher)
    (0.5, lambda p, q: 0.5 * np_kl(p, (p + q) / 2) + 0.5 * np_kl(q, (p + q) / 2)),  # symmetric JSD
    (0.2, lambda p, q: 0.2 * np_kl(p, 0.2 * p + 0.8 * q) + 0.8 * np_kl(q, 0.2 * p + 0.8 * q)),
])
def test_generalized_jsd_matches_direct_computation(beta, fn):
    student, teacher, mask = jsd_batch()
    temperature = 1.3
    ref = np_jsd_positions(student, teacher, mask, fn, temperature)
    got = generalized_jsd(t(student), t(teacher), torch.tensor(mask), beta=beta, temperature=temperature)
    assert got.item() == pytest.approx(np.mean(list(ref.values())), rel=1e-5)
    per_example = generalized_jsd_per_example(t(student), t(teacher), torch.tensor(mask), beta=beta,
                                              temperature=temperature)
    for b in range(mask.shape[0]):
        expected = np.mean([v for (bb, _), v in ref.items() if bb == b])
        assert per_example[b].item() == pytest.approx(expected, rel=1e-5)


def test_generalized_jsd_nonnegative_and_zero_for_equal_distributions():
    student, teacher, mask = jsd_batch()
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert generalized_jsd(t(student), t(teacher), torch.tensor(mask), beta=beta).item() >= 0
        same = generalized_jsd(t(teacher), t(teacher), torch.tensor(mask), beta=beta).item()
        assert same == pytest.approx(0.0, abs=1e-6)
    # A masked position never counts; an example with none scores 0.
    student2 = student.copy()
    student2[1, 2] = 1e4
    assert generalized_jsd(t(student2), t(teacher), torch.tensor(mask)).item() == pytest.approx(
        generalized_jsd(t(student), t(teacher), torch.tensor(mask)).item())
    empty = np.array([[1, 1, 1], [0, 0, 0]])
    assert generalized_jsd_per_example(t(student), t(teacher), torch.tensor(empty))[1].item() == 0.0


def test_generalized_jsd_gradient_reaches_student_only():
    student, teacher, mask = jsd_batch()
    s, tt = t(student, grad=True), t(teacher)
    generalized_jsd_per_example(s, tt, torch.tensor(mask), beta=0.5).sum().backward()
    assert s.grad.abs().sum() > 0 and s.grad[1, 2].abs().sum() == 0 and tt.grad is None


# --- argument validation ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(lam=-0.1), r"lam .* \[0, 1\]"),
    (dict(lam=1.5), r"lam .* \[0, 1\]"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=1.0), "hidden_loss is None"),
    (dict(kl_start=-1), "kl_start"),
])
def test_kd_loss_rejects_bad_settings(kwargs, match):
    student, teacher = tiny_batch()
    with pytest.raises(ValueError, match=match):
        kd_loss(t(student), torch.tensor(IDS), torch.tensor(MASK), soft_targets(t(teacher)), **kwargs)


def test_shape_and_vocabulary_mismatches_name_both_shapes():
    student, teacher = tiny_batch()
    ids, mask = torch.tensor(IDS), torch.tensor(MASK)
    with pytest.raises(ValueError, match=r"teacher vocabulary 7 != student vocabulary 5"):
        kd_loss(t(student), ids, mask, soft_targets(torch.randn(B, L, 7)))
    with pytest.raises(ValueError, match=r"beyond the student vocabulary 5"):
        kd_loss(t(student), ids, mask, soft_targets(torch.randn(B, L, 9) + torch.arange(9.0) * 10, top_k=2))
    with pytest.raises(ValueError, match=r"soft targets \(2, 4, 5\) do not match student_logits \(2, 4, 5\): expected \[2, 3, K\]"):
        kd_loss(t(student), ids, mask, soft_targets(torch.randn(B, L + 1, V)))
    with pytest.raises(ValueError, match=r"input_ids \(2, 3\)"):
        kd_loss(t(student), ids[:, :3], mask, soft_targets(t(teacher)))
    with pytest.raises(ValueError, match=r"teacher vocabulary 7 != student vocabulary 5"):
        generalized_jsd(torch.randn(2, 3, 5), torch.randn(2, 3, 7), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 4, 5\) and student_logits \(2, 3, 5\)"):
        generalized_jsd(torch.randn(2, 3, 5), torch.randn(2, 4, 5), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask \(2, 2\)"):
        generalized_jsd(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(2, 2))
    for beta in (-0.1, 1.1):
        with pytest.raises(ValueError, match=r"beta .* \[0, 1\]"):
            generalized_jsd(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(2, 3), beta=beta)
    with pytest.raises(ValueError, match="temperature"):
        soft_targets(t(teacher), temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        soft_targets(t(teacher), top_k=0)
    s_hidden, t_hidden = tiny_hidden()
    with pytest.raises(ValueError, match=r"out of range"):
        HiddenProjector(3, 4, [(3, 1)])(tuple(t(h) for h in s_hidden), tuple(t(h) for h in t_hidden), mask)
    with pytest.raises(ValueError, match=r"hidden widths 3 \(student\) and 4 \(teacher\)"):
        HiddenProjector(8, 4, [(1, 1)])(tuple(t(h) for h in s_hidden), tuple(t(h) for h in t_hidden), mask)
    with pytest.raises(ValueError, match="positive integer"):
        uniform_layer_map(0, 4)


# --- end to end on two tiny GPT-2 models ------------------------------------------------------

def test_one_kd_step_on_tiny_gpt2_lowers_the_loss():
    from transformers import AutoModelForCausalLM, GPT2Config

    def gpt2(layers, width, seed):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=64, n_positions=32, n_layer=layers, n_embd=width, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return AutoModelForCausalLM.from_config(config)

    teacher, student = gpt2(2, 64, seed=0).eval(), gpt2(1, 32, seed=1)
    torch.manual_seed(2)
    input_ids = torch.randint(0, 64, (4, 16))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 10:] = 0
    attention_mask[3, 5:] = 0
    with torch.inference_mode():
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        targets = soft_targets(t_out.logits, temperature=2.0, top_k=16)
    assert len(t_out.hidden_states) == 3
    projector = HiddenProjector(32, 64, uniform_layer_map(1, 2))
    params = list(student.parameters()) + list(projector.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step_loss():
        s_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = projector(s_out.hidden_states, t_out.hidden_states, attention_mask)
        return kd_loss(s_out.logits, input_ids, attention_mask, targets, lam=0.4, temperature=2.0,
                       hidden_loss=hidden, beta=1.0)

    before = step_loss()
    optimizer.zero_grad()
    before.total.backward()
    assert all(p.grad is not None for p in projector.parameters())
    assert not any(p.requires_grad for p in teacher.parameters() if p.grad is not None)
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    with torch.no_grad():
        after = step_loss()
    assert torch.isfinite(before.total) and after.total.item() < before.total.item()
