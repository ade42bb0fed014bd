"""Batched text generation behind a small interface, so a faster backend can plug in later.

``TextGenerator`` is the contract the synthesis phase codes against: prompts in, one
``GeneratedText`` per prompt out (same order), deterministic for a given ``seed``.
``HFGenerator`` is the default backend: transformers ``model.generate`` with the KV cache,
left padding and an attention mask, sampling with temperature / top-k / top-p /
no-repeat-ngram. A vLLM backend (GPU) only has to implement ``generate`` with the same
semantics: the returned text is the continuation alone, decoded with special tokens skipped,
cut at the first EOS.

Determinism: batch ``b`` of a call is sampled under the seed derived from ``(seed, b)``
inside ``torch.random.fork_rng``, so the same prompts, settings and seed give the same texts
whatever ran before, and the caller's global RNG state is left as it was. Changing
``batch_size`` changes which prompts share a batch (and the padding), hence the texts; it
never changes how many outputs come back. Bit-identical texts are promised on one machine
and software stack, not across devices (CUDA kernels and bf16 differ from CPU fp32).

Prompt tokenisation: a control prompt ``label + "\\n\\n"`` is encoded as it is tokenised
*inside* a training text ``label + "\\n\\n" + text`` (the GPT-2 pre-tokeniser splits trailing
whitespace differently at the end of a string, e.g. GPT-2's own vocabulary encodes a final
"\\n\\n" as one token but "\\n\\nHello" as "\\n", "\\n", "Hello"); see ``HFGenerator.encode_prompt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from common.errors import ConfigError


class GenerationError(ConfigError, ValueError):
    """Bad sampling settings or prompts (a ``ValueError`` and a one-line ``ConfigError``)."""


@dataclass(frozen=True)
class SamplingSettings:
    """How synthetic text is sampled (DistilDP's reference: top-k 50, top-p 0.9, no-repeat-ngram 2).

    ``top_k = 0`` and ``top_p = 1.0`` switch those filters off; ``no_repeat_ngram_size = 0``
    allows repeats. ``min_new_tokens`` (EOS suppressed until then) exists for benchmarks that
    need every sequence to run to the same length; synthesis leaves it at 0.
    """

    max_new_tokens: int = 96
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    no_repeat_ngram_size: int = 2
    batch_size: int = 32
    seed: int = 0
    min_new_tokens: int = 0

    def validate(self) -> "SamplingSettings":
        """``self`` when every value is usable, else ``GenerationError`` naming the field."""
        _whole(self.max_new_tokens, "max_new_tokens", 1)
        _whole(self.min_new_tokens, "min_new_tokens", 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise GenerationError(f"min_new_tokens={self.min_new_tokens} is above max_new_tokens="
                                  f"{self.max_new_tokens}; lower it or raise max_new_tokens")
        if not _real(self.temperature) or self.temperature <= 0:
            raise GenerationError(f"temperature={self.temperature!r} is invalid: it must be a number > 0 "
                                  "(1.0 samples from the model's distribution)")
        _whole(self.top_k, "top_k", 0, "(0 switches top-k off)")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p!r} is invalid: it must be in (0, 1] (1.0 switches it off)")
        _whole(self.no_repeat_ngram_size, "no_repeat_ngram_size", 0, "(0 allows repeats)")
        _whole(self.batch_size, "batch_size", 1)
        _whole(self.seed, "seed", 0)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GeneratedText:
    """One prompt's continuation: ``text`` excludes the prompt and every special token.

    ``new_tokens`` counts the generated tokens up to and including the first EOS (none after
    it); ``token_ids`` are those tokens; ``stopped_at_eos`` says whether EOS was generated
    (else the sequence ran to ``max_new_tokens``).
    """

    prompt: str
    text: str
    new_tokens: int
    stopped_at_eos: bool
    token_ids: tuple[int, ...] = field(default=(), repr=False)


@runtime_checkable
class TextGenerator(Protocol):
    """A generation backend: one ``GeneratedText`` per prompt, in order, deterministic per seed."""

    def generate(self, prompts: list[str], settings: SamplingSettings, seed: int) -> list[GeneratedText]:
        ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from whole numbers (numpy ``SeedSequence``: well mixed, platform-independent)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


class HFGenerator:
    """transformers ``generate`` with the KV cache, left padding, batches of ``settings.batch_size``.

    ``device`` None → CUDA when available, else CPU (the model is moved there). ``dtype`` None →
    bf16 autocast on CUDA with bf16 support, fp32 otherwise; the weights keep their dtype.
    After each ``generate`` call ``last_stats`` holds ``prompts``, ``batches``, ``new_tokens``,
    ``seconds`` and ``tokens_per_second`` (new tokens, EOS included, over wall seconds of the
    call); ``total_tokens`` / ``total_seconds`` accumulate over calls.
    """

    def __init__(self, model, tokenizer, device=None, dtype=None):
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if dtype is None:
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if bf16 else torch.float32
        self.dtype = dtype
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise GenerationError("the tokenizer has neither a pad nor an EOS token; batched generation "
                                  "needs one to pad with")
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = getattr(model, "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self._prompt_ids: dict[str, list[int]] = {}
        self.last_stats: dict = {}
        self.total_tokens = 0
        self.total_seconds = 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of the last ``generate`` call (0.0 before the first)."""
        return float(self.last_stats.get("tokens_per_second", 0.0))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as it is tokenised at the start of a longer text.

        ``prompt + "x"`` is encoded and its shortest token prefix that decodes exactly to
        ``prompt`` is used; when there is none (e.g. a trailing space, which merges into the
        next word), ``prompt`` is encoded alone. No special tokens are added; a prompt that is
        the BOS text encodes to the BOS id.
        """
        cached = self._prompt_ids.get(prompt)
        if cached is not None:
            return cached
        if not isinstance(prompt, str) or not prompt:
            raise GenerationError(f"prompt {prompt!r} is empty; prompt with the BOS token's text for "
                                  "unconditional generation")
        tok = self.tokenizer
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        longer = tok(prompt + "x", add_special_tokens=False)["input_ids"]
        for k in range(1, len(longer)):
            if tok.decode(longer[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False) == prompt:
                ids = longer[:k]
                break
        if not ids:
            raise GenerationError(f"prompt {prompt!r} encodes to no tokens")
        self._prompt_ids[prompt] = list(ids)
        return self._prompt_ids[prompt]

    def generate(self, prompts: list[str], settings: SamplingSettings, seed: int) -> list[GeneratedText]:
        """One ``GeneratedText`` per prompt, in the order given."""
        settings.validate()
        _whole(seed, "seed", 0)
        prompts = list(prompts)
        encoded = [self.encode_prompt(p) for p in prompts]
        if self.max_positions and encoded:
            longest = max(len(ids) for ids in encoded)
            if longest + settings.max_new_tokens > self.max_positions:
                raise GenerationError(
                    f"a prompt of {longest} tokens + max_new_tokens={settings.max_new_tokens} exceeds the "
                    f"model's {self.max_positions} positions; shorten the prompts or lower max_new_tokens")
        # Longest prompts first (stable): batches of similar length pad less. Deterministic in the prompts.
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        results: list[GeneratedText | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        new_tokens = 0
        batches = 0
        try:
            for b, lo in enumerate(range(0, len(order), settings.batch_size)):
                idx = order[lo: lo + settings.batch_size]
                outs = self._generate_batch([encoded[i] for i in idx], settings, derive_seed(seed, b))
                for i, (ids, stopped) in zip(idx, outs):
                    text = self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True,
                                                 clean_up_tokenization_spaces=False)
                    results[i] = GeneratedText(prompt=prompts[i], text=text, new_tokens=len(ids),
                                               stopped_at_eos=stopped, token_ids=tuple(ids))
                    new_tokens += len(ids)
                batches += 1
        finally:
            self.model.train(was_training)
        seconds = time.perf_counter() - start
        self.total_tokens += new_tokens
        self.total_seconds += seconds
        self.last_stats = {"prompts": len(prompts), "batches": batches, "new_tokens": new_tokens,
                           "seconds": seconds, "tokens_per_second": new_tokens / seconds if seconds > 0 else 0.0}
        return results  # type: ignore[return-value]

    def continue_ids(self, prefixes: list[list[int]], settings: SamplingSettings, seed: int
                     ) -> list[tuple[list[int], bool]]:
        """Continuations of token-id prefixes (dp-opd's student rollouts): per prefix, the new
        ids up to and including the first EOS, and whether EOS came; batches of
        ``settings.batch_size``, seeded like ``generate``."""
        settings.validate()
        was_training = self.model.training
        self.model.eval()
        try:
            return [row for b, lo in enumerate(range(0, len(prefixes), settings.batch_size))
                    for row in self._generate_batch(prefixes[lo: lo + settings.batch_size], settings,
                                                    derive_seed(seed, b))]
        finally:
            self.model.train(was_training)

    def _generation_config(self, settings: SamplingSettings):
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
            temperature=float(settings.temperature), top_k=settings.top_k, top_p=float(settings.top_p),
            no_repeat_ngram_size=settings.no_repeat_ngram_size, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, bos_token_id=self.tokenizer.bos_token_id, use_cache=True,
        )

    def _generate_batch(self, batch: list[list[int]], settings: SamplingSettings, seed: int):
        """Left-pad, sample, and return (continuation ids up to and including EOS, stopped) per row."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, ids in enumerate(batch):  # left padding: the prompt ends where generation starts
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[r, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        padding_side = getattr(self.tokenizer, "padding_side", None)
        try:
            if padding_side is not None:  # for anything inside generate that reads it
                self.tokenizer.padding_side = "left"
            with torch.random.fork_rng(devices=devices), torch.inference_mode(), autocast, _quiet_pad_warning():
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=self._generation_config(settings))
        finally:
            if padding_side is not None:
                self.tokenizer.padding_side = padding_side
        rows = []
        for row in out[:, width:].tolist():
            if self.eos_token_id is not None and self.eos_token_id in row:
                cut = row.index(self.eos_token_id) + 1
                rows.append((row[:cut], True))
            else:
                rows.append((row, False))
        return rows


class _DropPadMaskWarning(logging.Filter):
    """transformers warns "passing in an `attention_mask`" when a finished row feeds a pad token
    on a step where it dropped an all-ones mask itself; the mask *is* passed here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


@contextlib.contextmanager
def _quiet_pad_warning():
    logger = logging.getLogger("transformers.modeling_utils")
    flt = _DropPadMaskWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _whole(x, name: str, minimum: int, hint: str = "") -> None:
    if isinstance(x, bool) or not isinstance(x, Integral) or x < minimum:
        raise GenerationError(f"{name}={x!r} is invalid: it must be a whole number ≥ {minimum}"
                              + (f" {hint}" if hint else ""))


def greedy_settings(max_new_tokens: int, batch_size: int = 32) -> SamplingSettings:
    """Greedy decoding through the sampling interface: top-k 1 keeps only the most likely token
    (the pdss teacher's rationales and the students' answers are scored, not sampled)."""
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=1.0, top_k=1, top_p=1.0,
                            no_repeat_ngram_size=0, batch_size=batch_size)
