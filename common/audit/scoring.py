"""Per-token log-probabilities of texts under a causal LM: the raw material of every attack."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def token_logprobs(model, tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128,
                   prefixes: list[str] | None = None) -> list[np.ndarray]:
    """log p(token_t | tokens_<t) for every token of each text after the first (or, with
    ``prefixes``, for the tokens of ``text`` that follow ``prefix``; the prefix itself is
    conditioning only). One float64 array per text."""
    model.eval()
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        pre = prefixes[start:start + batch_size] if prefixes else [""] * len(chunk)
        seqs, firsts = [], []
        for prefix, text in zip(pre, chunk):
            # Truncating in the tokenizer keeps transformers from warning once per long record.
            cut = dict(add_special_tokens=False, truncation=True, max_length=max_length)
            prefix_ids = tokenizer(prefix, **cut)["input_ids"] if prefix else []
            ids = (prefix_ids + tokenizer(text, **cut)["input_ids"])[:max_length]
            seqs.append(ids)
            firsts.append(max(len(prefix_ids), 1))  # first scored position
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
        for i, s in enumerate(seqs):
            out.append(logp[i, firsts[i] - 1 : len(s) - 1].double().cpu().numpy())
    return out


def mean_loss(logprobs: np.ndarray) -> float:
    """Mean next-token negative log-likelihood of one record."""
    return float(-np.mean(logprobs)) if len(logprobs) else float("nan")
