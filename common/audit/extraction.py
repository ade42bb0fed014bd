"""Extraction attacks: can an adversary with the model make it print a secret or a training record?

* ``extract_canaries``: prompt with a canary's prefix ("the account number of NAME is") and
  read the first 10-digit run in the completion (greedy, and ``n_samples`` sampled completions).
* ``record_extraction_rate``: Carlini et al. ("Extracting Training Data", 2021 / "Quantifying
  Memorization", 2023) style k-extractability: give the first 32 tokens of a record, greedy-decode
  32 more, and count the records whose true next 32 token ids are reproduced exactly.

Sampling is seeded with ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the
caller's global RNG state is left as it was. Samples are reproducible for the same seed,
batch size, device and library versions, not across them.
"""

from __future__ import annotations

import re

import torch

from common.audit.exposure import canary_prefix
from common.data.generate import SECRET_DIGITS

SECRET_RE = re.compile(rf"\d{{{SECRET_DIGITS}}}")


def parse_secret(completion: str) -> str | None:
    """The first run of 10 consecutive digits in a completion (its first 10 digits), or None."""
    match = SECRET_RE.search(completion)
    return match.group(0) if match else None


def _left_padded(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return input_ids.to(device), mask.to(device)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


@torch.no_grad()
def extract_canaries(model, tokenizer, canaries: list[dict], n_samples: int = 4, temperature: float = 1.0,
                     top_k: int = 40, seed: int = 0, batch_size: int = 32) -> list[dict]:
    """Per canary: {id, repeats, greedy, greedy_hit, samples, sampled_hits}.

    ``greedy`` / ``samples`` are the parsed guesses (10-digit strings or None); ``greedy_hit`` is
    whether the greedy guess equals the secret, ``sampled_hits`` how many of the ``n_samples``
    sampled guesses do (top-k sampling at ``temperature``; top_k=0 samples the full softmax).
    Prefixes are batched with left padding.
    """
    model.eval()
    device = next(model.parameters()).device
    max_new = SECRET_DIGITS + 2  # a digit is at least one byte, so 11 tokens cover " " + 10 digits
    common = dict(max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id)
    rows = []
    for start in range(0, len(canaries), batch_size):
        chunk = canaries[start:start + batch_size]
        input_ids, mask = _left_padded(tokenizer, [canary_prefix(c["name"]) for c in chunk], device)
        width = input_ids.shape[1]
        greedy = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, **common)
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(seed + start)
            sampled = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                                     temperature=temperature, top_k=top_k, num_return_sequences=n_samples,
                                     **common) if n_samples else None
        for i, canary in enumerate(chunk):
            guess = parse_secret(tokenizer.decode(greedy[i, width:], skip_special_tokens=True))
            samples = [] if sampled is None else [
                parse_secret(tokenizer.decode(sampled[i * n_samples + j, width:], skip_special_tokens=True))
                for j in range(n_samples)]
            rows.append({"id": canary["id"], "repeats": canary.get("repeats"), "greedy": guess,
                         "greedy_hit": guess == canary["secret"], "samples": samples,
                         "sampled_hits": sum(s == canary["secret"] for s in samples)})
    return rows


@torch.no_grad()
def record_extraction_rate(model, tokenizer, texts: list[str], prefix_tokens: int = 32, suffix_tokens: int = 32,
                           batch_size: int = 16) -> dict:
    """{rate, extracted, eligible, records}: the fraction of eligible records whose tokens
    [prefix_tokens, prefix_tokens + suffix_tokens) are reproduced exactly (token ids) by greedy
    decoding from their first ``prefix_tokens`` tokens. Eligible: at least prefix + suffix tokens
    (no special tokens added). ``rate`` is NaN when no record is eligible."""
    model.eval()
    device = next(model.parameters()).device
    need = prefix_tokens + suffix_tokens
    # only the first prefix + suffix tokens are used; cutting there also keeps long records quiet
    ids = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=need)["input_ids"] for t in texts]
    eligible = [x[:need] for x in ids if len(x) >= need]
    extracted = 0
    for start in range(0, len(eligible), batch_size):
        chunk = torch.tensor(eligible[start:start + batch_size], dtype=torch.long, device=device)
        prompt = chunk[:, :prefix_tokens]  # all the same length: no padding needed
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=suffix_tokens, min_new_tokens=suffix_tokens,
                             pad_token_id=tokenizer.pad_token_id)
        extracted += int((out[:, prefix_tokens:need] == chunk[:, prefix_tokens:]).all(dim=1).sum())
    rate = extracted / len(eligible) if eligible else float("nan")
    return {"rate": rate, "extracted": extracted, "eligible": len(eligible), "records": len(texts)}
