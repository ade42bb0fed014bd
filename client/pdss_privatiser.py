"""pdss, encoder-decoder strategy: one small local model, two prefixed tasks, trained on public data.

    encode: <raw question>\\n                                   → <the mechanism's output on it>
    decode: <perturbed prompt> | <teacher's rationale> | <raw question>\\n  → <the question's own rationale>

The encoder rewrites a question into a privatisation-shaped form *before* the token-level
exponential mechanism, which still perturbs every non-template token of the rewrite and is
charged for it (client/pdss.py): the encoder is deterministic pre-processing with no guarantee of
its own and is never the last step before anything leaves. The decoder runs at the site after the
teacher answered, on what the site already holds: local post-processing, no new charge.

Training examples are public records only (server/pdss_privatiser.py builds them with the server's
teacher, where raw public questions may be perturbed and sent): one example is two rows, each
weighted over its own target, so its loss is exactly 0.5·L_encode + 0.5·L_decode (each the mean
token loss of its target), the weighting of client/pdss_student.py's ``multitask_rows``. Full
fine-tune of the site's public base model, no DP: nothing private touches it.

The weights are a function of public inputs only (the examples, the public base model, the
training settings), so they are cached on disk under the digest of those inputs and shared by
every site whose ledger directory is the same (simulated sites): sharing public weights reveals
nothing about any site.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common.models.lm import token_losses, weighted_rows

ENCODE, DECODE = "encode: ", "decode: "
ENCODER_SHARE = 0.5  # the reference's 0.5·encoder + 0.5·decoder
MAX_LENGTH = 256
FORMAT = "privdistill-pdss-privatiser/1"


@dataclass(frozen=True)
class PrivatiserExample:
    """One public record: its question, the mechanism's output on it, the teacher's rationale for that
    output, and the record's own (public, gold) rationale."""

    question: str
    perturbed: str
    teacher_rationale: str
    rationale: str


def encoder_prompt(question: str) -> str:
    return f"{ENCODE}{question.strip()}\n"


def decoder_prompt(perturbed: str, teacher_rationale: str, question: str) -> str:
    return f"{DECODE}{perturbed.strip()} | {teacher_rationale.strip()} | {question.strip()}\n"


def training_rows(examples: list[PrivatiserExample], tokenizer) -> TensorDataset:
    """Examples → (input ids, mask, per-target-token weights), each of shape (n, 2, width): row 0 the
    encoder task, row 1 the decoder task; the weights of one example sum to 1."""
    rows, weights = [], []
    for ex in examples:
        for context, target, share in ((encoder_prompt(ex.question), ex.perturbed, ENCODER_SHARE),
                                       (decoder_prompt(ex.perturbed, ex.teacher_rationale, ex.question),
                                        ex.rationale, 1.0 - ENCODER_SHARE)):
            c = tokenizer.encode(context, add_special_tokens=False)
            goal = tokenizer.encode(target.strip(), add_special_tokens=False) + [tokenizer.eos_token_id]
            ids = (c + goal)[:MAX_LENGTH]
            rows.append(ids)
            weights.append(([0.0] * len(c) + [share / len(goal)] * len(goal))[:MAX_LENGTH])
    input_ids, mask, target_w = weighted_rows(rows, weights, tokenizer.pad_token_id)
    width = input_ids.shape[1]
    n = len(examples)
    return TensorDataset(input_ids.view(n, 2, width), mask.view(n, 2, width), target_w.view(n, 2, width - 1))


def example_loss(model, input_ids, mask, weights) -> torch.Tensor:
    """Each example's 0.5·L_encode + 0.5·L_decode (shape [batch])."""
    n = input_ids.shape[0]
    losses, _ = token_losses(model, input_ids.flatten(0, 1), mask.flatten(0, 1))
    return (losses * weights.flatten(0, 1)).sum(1).view(n, 2).sum(1)


def privatiser_digest(examples: list[PrivatiserExample], base_dir, settings) -> str:
    """The digest of everything the privatiser's weights depend on (all of it public)."""
    p = settings.pdss
    h = hashlib.sha256(json.dumps({"format": FORMAT, "examples": [asdict(e) for e in examples],
                                   "steps": p.privatiser_steps, "batch": p.privatiser_batch_size,
                                   "lr": p.privatiser_learning_rate, "seed": settings.seed}).encode())
    for path in sorted(Path(base_dir).iterdir()):  # the public base model: weights, config, tokenizer
        if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}:
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def privatiser_dir(site, digest: str) -> Path:
    return Path(site.ledger_path).parent / "pdss-privatiser" / digest[:24]


def train_privatiser(examples: list[PrivatiserExample], base_dir, settings, out_dir) -> dict:
    """Full fine-tune of the public base on both tasks; saves model + tokenizer to ``out_dir``."""
    from transformers import AutoTokenizer

    from common.models.build import build_model

    p = settings.pdss
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = build_model(base_dir).train()
    data = training_rows(examples, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.privatiser_learning_rate, weight_decay=0.0)
    history = []
    while len(history) < p.privatiser_steps:  # epochs of shuffled batches under the run's seed
        loader = DataLoader(data, batch_size=p.privatiser_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(settings.seed + len(history)))
        for batch in loader:
            loss = example_loss(model, *batch).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(loss.item())
            if len(history) == p.privatiser_steps:
                break
    info = {"format": FORMAT, "examples": len(examples), "steps": len(history), "loss_first": history[0],
            "loss_last": history[-1], "loss_last_10": sum(history[-10:]) / len(history[-10:])}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "privatiser.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_privatiser(site, settings, examples: list[PrivatiserExample]) -> tuple[str, dict]:
    """(digest, training info): trains the privatiser once per digest, else reuses the kept one.
    A lock file makes simulated sites sharing the directory train it once, not once each."""
    digest = privatiser_digest(examples, site.model_dir, settings)
    out = privatiser_dir(site, digest)
    with _locked(out.with_name(out.name + ".lock")):
        if (out / "privatiser.json").is_file():
            return digest, {**json.loads((out / "privatiser.json").read_text()), "cached": 1}
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        info = train_privatiser(examples, site.model_dir, settings, partial)
        partial.rename(out)  # whole or absent: a cut training leaves no half-written privatiser
    return digest, {**info, "cached": 0}


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Privatiser:
    """A trained privatiser: ``encode`` raw questions, ``decode`` rationales (greedy, batched)."""

    def __init__(self, directory, settings):
        from transformers import AutoTokenizer

        from common.models.build import build_model, pick_device
        from common.models.generation import HFGenerator

        if not (Path(directory) / "privatiser.json").is_file():
            raise FileNotFoundError(f"no trained privatiser in {directory}")
        device, _ = pick_device(settings.dp.device)
        self.generator = HFGenerator(build_model(directory).to(device).eval(),
                                     AutoTokenizer.from_pretrained(directory), device)
        self.settings = settings.pdss

    def _first_lines(self, prompts: list[str]) -> list[str]:
        from common.models.generation import greedy_settings

        if not prompts:
            return []
        outs = self.generator.generate(prompts, greedy_settings(self.settings.privatiser_max_new_tokens,
                                                                self.settings.teacher_batch_size), seed=0)
        return [o.text.strip().split("\n")[0].strip() for o in outs]

    def encode(self, questions: list[str]) -> list[str]:
        """Each question rewritten ("" when the encoder wrote nothing: the caller falls back)."""
        return self._first_lines([encoder_prompt(q) for q in questions])

    def decode(self, perturbed: list[str], teacher_rationales: list[str], questions: list[str]) -> list[str]:
        """A rationale for each raw question from its sent prompt and the teacher's rationale for it."""
        return self._first_lines([decoder_prompt(p, r, q) for p, r, q in zip(perturbed, teacher_rationales, questions)])


def load_privatiser(site, settings, digest: str) -> Privatiser:
    return Privatiser(privatiser_dir(site, digest), settings)


def examples_from_config(config) -> list[PrivatiserExample]:
    """The examples of a `train.pdss_privatiser` message (four parallel string lists)."""
    columns = [[str(x) for x in config[k]] for k in ("questions", "perturbed", "teacher-rationales", "rationales")]
    return [PrivatiserExample(*row) for row in zip(*columns)]
