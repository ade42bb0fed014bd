"""Search captured wire payloads for private text: whole records, canaries, 8-token windows
(as UTF-8 text, and as token ids packed as 16/32/64-bit integers at any alignment)."""

from __future__ import annotations

import numpy as np


def find_leaks(payloads: dict[str, bytes], texts: list[str], tokenizer, window: int = 8) -> list[str]:
    leaks = []
    needles = [t.encode("utf-8") for t in texts]
    id_windows, text_windows = set(), {}
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for i in range(max(0, len(ids) - window + 1)):
            chunk = tuple(ids[i:i + window])
            id_windows.add(chunk)
            encoded = tokenizer.decode(list(chunk)).encode("utf-8")
            text_windows.setdefault(encoded[:8], set()).add(encoded)
    first_ids = np.array(sorted({w[0] for w in id_windows}))
    for name, payload in payloads.items():
        for needle in needles:
            if needle in payload:
                leaks.append(f"{name}: record text {needle[:40]!r}")
        for pos in range(len(payload) - 7):
            candidates = text_windows.get(payload[pos:pos + 8])
            if candidates and any(payload.startswith(c, pos) for c in candidates):
                leaks.append(f"{name}: 8-token text window at byte {pos}")
        for dtype in (np.int16, np.uint16, np.int32, np.int64):
            size = np.dtype(dtype).itemsize
            for offset in range(size):
                usable = (len(payload) - offset) // size * size
                values = np.frombuffer(payload[offset:offset + usable], dtype=dtype)
                for pos in np.nonzero(np.isin(values, first_ids))[0]:
                    if tuple(int(v) for v in values[pos:pos + window]) in id_windows:
                        leaks.append(f"{name}: 8-token id window as {np.dtype(dtype).name} at {pos}")
    return leaks


def run_leaks(corpus, tokenizer_dir, wire_dir, export_dir, clients: int = 3) -> list[str]:
    """Leaks of any site's record (train or held-out) or canary in the captured site messages
    (``wire_dir/*.bin``) and in the exported student's JSON and Markdown files."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from common.data.loading import load_records

    corpus, export_dir = Path(corpus), Path(export_dir)
    texts = [r.text for i in range(clients) for split in ("train", "heldout")
             for r in load_records(corpus / f"client_{i}" / f"{split}.jsonl")]
    texts += [c["text"] for c in json.loads((corpus / "canaries.json").read_text())["canaries"]]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    payloads = {p.name: p.read_bytes() for p in sorted(Path(wire_dir).glob("*.bin"))}
    if not payloads:
        return [f"no captured messages in {wire_dir}"]
    exported = {p.name: p.read_bytes() for p in export_dir.iterdir() if p.suffix in (".json", ".md")}
    return find_leaks(payloads, texts, tokenizer) + find_leaks(exported, texts, tokenizer)
