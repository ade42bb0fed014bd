"""The rationale service: the server's teacher writes a rationale and an answer for each prompt.

Template (configurable by subclassing nothing: three format strings)::

    Question: <public question>          ← few-shot examples from the public split
    Rationale: <its rationale>
    Answer: <its answer>

    Question: <perturbed prompt>
    Rationale:                           ← the teacher continues from here

Greedy decoding, batched (``common.models.generation``). The continuation is parsed up to the
first "Answer:" line; an empty generation or one without an answer is returned as such
(rationale "" / answer ""), never invented, and counted by the caller.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common.models.generation import greedy_settings

EXAMPLE = "Question: {question}\nRationale: {rationale}\nAnswer: {answer}\n"
QUERY = "Question: {question}\nRationale:"
ANSWER_TAG = "Answer:"


def example_text(question: str, rationale: str, answer: str) -> str:
    return EXAMPLE.format(question=question, rationale=rationale, answer=answer)


def few_shot_prefix(public, k: int, seed: int = 0) -> str:
    """k public examples (with rationales), fixed per run: the same prefix for every prompt."""
    usable = [r for r in public if r.rationale]
    chosen = random.Random(seed).sample(usable, min(k, len(usable))) if k else []
    return "".join(example_text(r.question, r.rationale, r.answer) + "\n" for r in chosen)


def warmup_texts(public, k: int, seed: int = 0) -> list[str]:
    """The teacher's public warm-up: each public example after k others, as the service prompts it."""
    rng = random.Random(seed)
    usable = [r for r in public if r.rationale]
    texts = []
    for r in usable:
        shots = "".join(example_text(s.question, s.rationale, s.answer) + "\n" for s in rng.sample(usable, k))
        texts.append(shots + example_text(r.question, r.rationale, r.answer))
    return texts


@dataclass(frozen=True)
class Rationale:
    rationale: str   # "" when the teacher wrote none
    answer: str      # "" when it gave no parseable answer
    raw: str         # the teacher's continuation as generated

    @property
    def usable(self) -> bool:
        return bool(self.rationale) and bool(self.answer)


def parse(continuation: str) -> Rationale:
    head, tag, tail = continuation.partition(ANSWER_TAG)
    rationale = head.strip().split("\n")[0].strip()
    answer = tail.strip().split("\n")[0].strip() if tag else ""
    if not tag:  # no answer line: the rationale is unparseable as well
        rationale = ""
    return Rationale(rationale, answer, continuation)


def write_rationales(generator, prompts: list[str], prefix: str, max_new_tokens: int, batch_size: int) -> list[Rationale]:
    """One Rationale per prompt, in order (greedy, so a prompt always gets the same one)."""
    if not prompts:
        return []
    queries = [prefix + QUERY.format(question=p.strip()) for p in prompts]
    outs = generator.generate(queries, greedy_settings(max_new_tokens, batch_size), seed=0)
    return [parse(o.text) for o in outs]
