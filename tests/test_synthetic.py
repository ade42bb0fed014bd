"""Control codes, prompt plans, output filtering and the resumable synthetic corpus."""

from __future__ import annotations

import json
import random

import pytest

from common.data.control import (
    SEPARATOR,
    control_prompt,
    strip_control_code,
    validate_label,
    with_control_code,
)
from common.data.synthetic import (
    MANIFEST,
    Filter,
    PromptPlan,
    clean,
    is_degenerate,
    load_synthetic_records,
    load_synthetic_texts,
    shard_name,
    write_synthetic_corpus,
)
from common.models.build import build_model
from common.models.generation import GeneratedText, HFGenerator, SamplingSettings
from tests.helpers import tiny_tokenizer

BOS = "<|endoftext|>"
WORDS = "the card payment was declined refund approved customer agent account locked".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeGenerator:
    """Deterministic in (prompt, seed, position); some outputs empty, degenerate or repeated.

    ``echo`` makes it return the prompt in front of the continuation, as a backend that
    echoes its input would: the saved text must still carry no control code.
    """

    def __init__(self, echo: bool = False, constant: str | None = None):
        self.echo, self.constant, self.calls = echo, constant, []

    def generate(self, prompts, settings, seed):
        self.calls.append((list(prompts), seed))
        out = []
        for i, prompt in enumerate(prompts):
            rng = random.Random(f"{prompt}|{seed}|{i}")
            roll = rng.random()
            if self.constant is not None:
                text = self.constant
            elif roll < 0.1:
                text = "   "
            elif roll < 0.2:
                text = "spam " * 5
            elif roll < 0.35:
                text = "a very common reply"
            else:
                text = " ".join(rng.choice(WORDS) for _ in range(6))
            out.append(GeneratedText(prompt=prompt, text=(prompt if self.echo else "") + text,
                                     new_tokens=len(text.split()) + 1, stopped_at_eos=True))
        return out


# ------------------------------------------------------------------------------ control codes


def test_control_code_round_trip():
    assert with_control_code("billing", "Card declined.") == "billing\n\nCard declined."
    assert with_control_code(None, "Card declined.") == "Card declined."
    assert control_prompt("billing", BOS) == "billing" + SEPARATOR
    assert control_prompt(None, BOS) == BOS
    assert strip_control_code("billing", "billing\n\nCard declined. ") == "Card declined."
    assert strip_control_code("billing", " Card declined.") == "Card declined."
    assert strip_control_code(None, BOS + "Card declined.", bos=BOS) == "Card declined."
    assert strip_control_code("billing", "billing is late") == "billing is late"  # no separator: text


@pytest.mark.parametrize("label", ["", "   ", "a\n\nb", "billing\n", 3])
def test_bad_labels_are_value_errors(label):
    with pytest.raises(ValueError, match="label"):
        validate_label(label)
    with pytest.raises(ValueError):
        with_control_code(label, "text")


def test_control_code_prompts_save_text_without_the_label(tmp_path):
    fake = FakeGenerator(echo=True)  # even a backend that echoes the prompt
    plan = PromptPlan({"billing": 6, "clinic": 4, None: 3})
    manifest = write_synthetic_corpus(fake, plan, tmp_path, SamplingSettings(), BOS, shard_size=8, progress=False)
    prompts = {p for call in fake.calls for p in call[0]}
    assert prompts == {"billing\n\n", "clinic\n\n", BOS}
    rows = load_synthetic_records(tmp_path)
    assert manifest["records"] == len(rows) == 13
    assert {r["label"] for r in rows} == {"billing", "clinic", None}
    for row in rows:
        assert not row["text"].startswith(("billing", "clinic", BOS)) and SEPARATOR not in row["text"]


def test_hf_generator_control_prompts_give_label_free_rows(tmp_path):
    tok = tiny_tokenizer()
    gen = HFGenerator(build_model("tiny-gpt2", tok, seed=0), tok, device="cpu")
    settings = SamplingSettings(max_new_tokens=10, batch_size=8)
    write_synthetic_corpus(gen, PromptPlan({"billing": 4}), tmp_path, settings, tok.bos_token, progress=False)
    rows = load_synthetic_records(tmp_path)
    assert len(rows) == 4 and all(r["label"] == "billing" for r in rows)
    assert not any(r["text"].startswith("billing" + SEPARATOR) for r in rows)


# -------------------------------------------------------------------------------------- plans


def test_allocate_largest_remainder():
    plan = PromptPlan.allocate(10, {"a": 1, "b": 1, "c": 1})
    assert plan.counts == {"a": 4, "b": 3, "c": 3} and plan.total == 10  # tie → first in order
    assert PromptPlan.allocate(10, {"c": 1, "b": 1, "a": 1}).counts == plan.counts  # dict order is irrelevant
    plan = PromptPlan.allocate(7, {None: 0.5, "x": 0.3, "y": 0.2})
    assert plan.counts == {None: 4, "x": 2, "y": 1}  # quotas 3.5, 2.1, 1.4 → floors 3, 2, 1 + one to None
    assert PromptPlan.allocate(5, {"a": 0.0, "b": 2.0}).counts == {"a": 0, "b": 5}
    assert PromptPlan.allocate(0, {"a": 1.0}).total == 0
    for total in (1, 13, 99, 1000):
        assert PromptPlan.allocate(total, {"a": 0.1, "b": 0.2, "c": 0.7}).total == total


@pytest.mark.parametrize("weights", [{"a": -1.0, "b": 2.0}, {"a": 0.0}, {}, {"a": float("inf")}, {"": 1.0}])
def test_allocate_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        PromptPlan.allocate(10, weights)


def test_plan_rejects_bad_counts():
    with pytest.raises(ValueError, match="count"):
        PromptPlan({"a": -1})
    with pytest.raises(ValueError, match="count"):
        PromptPlan({"a": 1.5})


# ------------------------------------------------------------------------------------ filters


def test_filter_counts_each_reason():
    texts = [
        "hello there world",      # kept
        "hello there world",      # duplicate
        "  hello there world \n",  # duplicate (saved texts are stripped)
        "",                        # empty
        "   \n\t ",                # empty
        "aaaaaaa",                 # degenerate: one distinct word
        "ok",                      # degenerate: one word
        "spam spam spam spam",     # degenerate: one word repeated
        "aa aaa a aaaa",           # degenerate: one character (4 distinct words)
        "a b a b a b a b a b",     # degenerate: 2 distinct / 10 words = 0.2 < 0.25
        "a b a b a b a b",         # kept: 2 / 8 = 0.25 is not below 0.25
        "The card was declined.",  # kept
    ]
    kept, counts = clean(texts)
    assert kept == ["hello there world", "a b a b a b a b", "The card was declined."]
    assert counts == {"kept": 3, "duplicate": 2, "empty": 2, "degenerate": 5}
    assert sum(counts.values()) == len(texts)


def test_filter_dedups_against_remembered_texts():
    filt = Filter()
    filt.remember(["from an earlier shard"])
    assert filt.reason("from an earlier shard") == "duplicate"
    assert filt.add("something new here") and not filt.add("something new here")
    assert filt.counts == {"kept": 1, "duplicate": 1, "empty": 0, "degenerate": 0}
    assert is_degenerate("x x x") and not is_degenerate("x y")


# ------------------------------------------------------------------------------------- corpus


class Killed(RuntimeError):
    pass


def kill_after(index):
    def on_shard(k):
        if k == index:
            raise Killed(f"killed after shard {k}")
    return on_shard


def test_killed_run_resumes_to_the_same_corpus_fake(tmp_path):
    plan = PromptPlan({"billing": 20, "clinic": 9, None: 6})
    settings = SamplingSettings(seed=3)
    full_gen = FakeGenerator()
    full = write_synthetic_corpus(full_gen, plan, tmp_path / "full", settings, BOS, shard_size=8,
                                  progress=False)
    with pytest.raises(Killed):
        write_synthetic_corpus(FakeGenerator(), plan, tmp_path / "cut", settings, BOS, shard_size=8,
                               progress=False, on_shard=kill_after(1))
    cut = json.loads((tmp_path / "cut" / MANIFEST).read_text())
    assert len(cut["shards"]) == 2 and not cut["complete"]
    with pytest.raises(ValueError, match="unfinished"):
        load_synthetic_texts(tmp_path / "cut")
    assert len(load_synthetic_texts(tmp_path / "cut", require_complete=False)) == cut["records"]
    again = FakeGenerator()
    resumed = write_synthetic_corpus(again, plan, tmp_path / "cut", settings, BOS, shard_size=8, progress=False)
    assert again.calls == full_gen.calls[2:]  # same prompts and seeds, from shard 2 on
    assert load_synthetic_records(tmp_path / "cut") == load_synthetic_records(tmp_path / "full")
    for key in ("records", "filter", "labels", "tokens_generated", "shortfall", "complete"):
        assert resumed[key] == full[key], key
    assert [s["records"] for s in resumed["shards"]] == [s["records"] for s in full["shards"]]
    assert full["records"] == plan.total and full["complete"] and full["shortfall"] == []
    # the duplicates, empties and spam were dropped and counted, across shards
    assert full["filter"]["duplicate"] > 0 and full["filter"]["empty"] > 0 and full["filter"]["degenerate"] > 0
    assert sum(full["filter"].values()) == sum(s["attempts"] for s in full["shards"])


def test_killed_run_resumes_to_the_same_corpus_hf(tmp_path):
    tok = tiny_tokenizer()
    gen = HFGenerator(build_model("tiny-gpt2", tok, seed=0), tok, device="cpu")
    plan = PromptPlan({"billing": 8, None: 6})
    settings = SamplingSettings(max_new_tokens=10, batch_size=4, seed=1)
    kwargs = dict(bos=tok.bos_token, shard_size=5, progress=False)
    full = write_synthetic_corpus(gen, plan, tmp_path / "full", settings, **kwargs)
    with pytest.raises(Killed):
        write_synthetic_corpus(gen, plan, tmp_path / "cut", settings, on_shard=kill_after(1), **kwargs)
    assert (tmp_path / "cut" / shard_name(1)).exists() and not (tmp_path / "cut" / shard_name(2)).exists()
    resumed = write_synthetic_corpus(gen, plan, tmp_path / "cut", settings, **kwargs)
    assert resumed["records"] == full["records"] == 14
    assert load_synthetic_texts(tmp_path / "cut") == load_synthetic_texts(tmp_path / "full")
    assert resumed["tokens_generated"] == full["tokens_generated"] > 0


def test_mismatched_settings_on_resume_are_value_errors(tmp_path):
    plan = PromptPlan({"billing": 10})
    settings = SamplingSettings(seed=3)
    with pytest.raises(Killed):
        write_synthetic_corpus(FakeGenerator(), plan, tmp_path, settings, BOS, shard_size=4, progress=False,
                               on_shard=kill_after(0))
    with pytest.raises(ValueError, match="different settings; use a new directory"):
        write_synthetic_corpus(FakeGenerator(), plan, tmp_path, SamplingSettings(seed=4), BOS, shard_size=4,
                               progress=False)
    with pytest.raises(ValueError, match="plan"):
        write_synthetic_corpus(FakeGenerator(), PromptPlan({"billing": 11}), tmp_path, settings, BOS,
                               shard_size=4, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        write_synthetic_corpus(FakeGenerator(), plan, tmp_path, settings, BOS, shard_size=5, progress=False)
    done = write_synthetic_corpus(FakeGenerator(), plan, tmp_path, settings, BOS, shard_size=4, progress=False)
    assert done["complete"] and done["records"] == 10


def test_manifest_contents(tmp_path):
    plan = PromptPlan({"billing": 5, None: 2})
    settings = SamplingSettings(max_new_tokens=20, seed=9)
    seen = []
    manifest = write_synthetic_corpus(FakeGenerator(), plan, tmp_path, settings, BOS, shard_size=4,
                                      progress=False, on_shard=seen.append)
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == manifest and seen == list(range(len(manifest["shards"])))
    assert manifest["settings"] == settings.to_dict() and manifest["plan"] == plan.to_json()
    assert manifest["complete"] and manifest["records"] == sum(s["records"] for s in manifest["shards"]) == 7
    assert manifest["tokens_generated"] == sum(s["tokens"] for s in manifest["shards"]) > 0
    assert manifest["tokens_per_second"] > 0 and manifest["seconds"] >= manifest["generation_seconds"] > 0
    assert set(manifest["filter"]) == {"kept", "duplicate", "empty", "degenerate"}
    assert manifest["filter"]["kept"] == 7
    for shard in manifest["shards"]:
        lines = (tmp_path / shard["file"]).read_text().splitlines()
        assert len(lines) == shard["records"] and shard["attempts"] <= 4
        assert all(set(json.loads(line)) == {"text", "label"} for line in lines)
    # a finished corpus is returned as it is, without generating again
    fake = FakeGenerator()
    assert write_synthetic_corpus(fake, plan, tmp_path, settings, BOS, shard_size=4, progress=False) == manifest
    assert fake.calls == []


def test_shortfall_when_attempts_run_out(tmp_path):
    plan = PromptPlan({"billing": 4, "clinic": 2})
    manifest = write_synthetic_corpus(FakeGenerator(constant="always the same reply"), plan, tmp_path,
                                      SamplingSettings(), BOS, shard_size=64, max_attempts_factor=2.5,
                                      progress=False)
    assert manifest["complete"] and manifest["records"] == 1  # the one text, once; the rest are duplicates
    attempts = {row["label"]: row["attempts"] for row in manifest["labels"]}
    assert attempts == {"billing": 10, "clinic": 5}  # ceil(2.5 × count)
    missing = {row["label"]: row["missing"] for row in manifest["shortfall"]}
    assert sum(missing.values()) == 5 and set(missing) == {"billing", "clinic"}
    assert manifest["filter"]["duplicate"] == 14


def test_bad_corpus_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_attempts_factor"):
        write_synthetic_corpus(FakeGenerator(), PromptPlan({"a": 1}), tmp_path, SamplingSettings(), BOS,
                               max_attempts_factor=0.5, progress=False)
    with pytest.raises(ValueError, match="bos"):
        write_synthetic_corpus(FakeGenerator(), PromptPlan({None: 1}), tmp_path, SamplingSettings(), "",
                               progress=False)
    with pytest.raises(ValueError, match="no manifest.json"):
        load_synthetic_texts(tmp_path / "nothing")
