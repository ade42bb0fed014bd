"""Teacher warm-up: non-private training of the base model on the public split.

Public data costs no privacy, so this step uses plain AdamW. Its output directory
(``save_pretrained`` of model and tokenizer) is the shared base model that every client
fine-tunes with DP-SGD LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from common.models.build import build_model, count_parameters
from common.models.lm import encode_texts, per_record_loss, perplexity
from common.models.tokenizer import train_tokenizer


def warmup_teacher(public_texts: list[str], out_dir: str | Path, spec: str = "tiny-gpt2", steps: int = 200,
                   batch_size: int = 16, learning_rate: float = 2e-3, max_length: int = 128,
                   vocab_size: int = 2048, seed: int = 0, progress: bool = True, tokenizer=None) -> dict:
    """Train a tokenizer (unless one is given: e.g. a student sharing its teacher's) and a tiny
    base model on public text; save both to ``out_dir``."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = tokenizer or train_tokenizer(public_texts, vocab_size=vocab_size)
    model = build_model(spec, tokenizer, max_positions=max(256, max_length), seed=seed)
    data = encode_texts(public_texts, tokenizer, max_length)
    n_eval = max(1, len(data) // 10)  # a slice of the public split to report progress on
    train, evaluation = torch.utils.data.random_split(data, [len(data) - n_eval, n_eval],
                                                      generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=max(0.1, 2 / steps))
    model.train()
    step, loss = 0, float("nan")
    with tqdm(total=steps, desc="teacher warm-up (public data)", disable=not progress) as bar:
        while step < steps:
            for input_ids, mask in loader:
                loss = per_record_loss(model, input_ids, mask).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step >= steps:
                    break
    eval_texts = [public_texts[i] for i in evaluation.indices]
    info = {
        "spec": spec, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
        "seed": seed, "public_records": len(public_texts), "final_train_loss": float(loss.item()) if torch.is_tensor(loss) else float(loss),
        "public_eval_perplexity": perplexity(model, encode_texts(eval_texts, tokenizer, max_length)),
        "parameters": count_parameters(model)[1], "max_length": max_length,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "warmup.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
