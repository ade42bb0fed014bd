"""Language-modelling glue: text → fixed-length token tensors, per-record loss, perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def encode_texts(texts: list[str], tokenizer, max_length: int = 128) -> TensorDataset:
    """Tokenise, append EOS, truncate to ``max_length`` and right-pad to the longest record.

    Fixed shapes let opacus's Poisson sampler build empty batches and keep the per-sample
    gradient computation simple.
    """
    # Truncating inside the tokenizer keeps transformers from warning once per long record.
    ids = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
           + [tokenizer.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return TensorDataset(input_ids, mask)


def weighted_rows(rows: list[list[int]], weights: list[list[float]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows with a weight per token → (input ids, attention mask, weight of predicting token
    t+1), right-padded to the longest row; a weight belongs to the token it sits on, so the target
    weights are the rows' weights shifted by one (what ``token_losses`` returns per position)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_w = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (r, w) in enumerate(zip(rows, weights)):
        input_ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        target_w[i, :len(r) - 1] = torch.tensor(w[1:])
    return input_ids, mask, target_w


def token_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position, and the mask of positions that count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].to(logits.dtype)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view_as(targets) * valid, valid


def per_record_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each record (shape [batch]).

    DP-SGD clips per record, so the training loss is the batch mean of these: each record's
    gradient is then exactly the gradient of its own mean token loss, whatever the padding.
    """
    losses, valid = token_losses(model, input_ids, attention_mask)
    return losses.sum(1) / valid.sum(1).clamp(min=1)


@torch.no_grad()
def perplexity(model, dataset: TensorDataset, batch_size: int = 32, device=None) -> float:
    """Token-level perplexity of ``model`` on ``dataset`` (exp of the mean token loss)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0.0
    for input_ids, mask in DataLoader(dataset, batch_size=batch_size):
        losses, valid = token_losses(model, input_ids.to(device), mask.to(device))
        total += losses.sum().item()
        count += valid.sum().item()
    model.train(was_training)
    return math.exp(total / max(count, 1.0))
