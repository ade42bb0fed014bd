"""Benchmark: bytes a client sends per round (its adapter) as a fraction of the full model.

Prints figures; asserts nothing. For every model (default: tiny-gpt2, tiny-llama, small-gpt2 at
the demo's 2,048-token vocabulary and bench-gpt2-50m at 32,000) it builds the config with
``common.models.build.tiny_config`` + ``AutoModelForCausalLM.from_config``, wraps it with the
project's default LoRA (``add_lora``: r=8, alpha=16, targets per family: GPT-2 ``c_attn``,
Llama ``q_proj``/``v_proj``) and measures, for float32 and float16 on the wire:

  tensor bytes     Σ nbytes of the adapter tensors (``adapter_state``) in the wire dtype: what
                   the ServerApp records as ``bytes_per_client``;
  ArrayRecord      Σ of the serialized ``Array.data`` in ``common.wire.to_array_record(...)``
                   (numpy ``.npy`` bytes: tensor bytes + one header per tensor);
  Fleet API reply  the client's train reply built exactly as ``client/client_app.py`` builds it
                   (arrays + MetricRecord + ConfigRecord), sent the way Flower 1.41's SuperNode
                   sends it: one ``PushMessagesRequest`` (message metadata without content +
                   the object tree) plus one ``PushObjectRequest`` per object of the message
                   (each object deflated by Flower: Message, RecordDict, records, Arrays,
                   ArrayChunks ≤ 5 MiB); protobuf ``ByteSize`` of every request summed. This is
                   the honest figure, short of gRPC/HTTP/TLS framing (a few bytes per request
                   and frame). For reference also ``serde.message_to_proto(reply).ByteSize()``
                   (the whole message as a single protobuf).

The full model is every parameter of the base model (tied embeddings counted once) at 4 bytes
(fp32) and at 2 bytes (fp16); fp32 adapters are compared with the fp32 model and fp16
adapters with the fp16 model. The downlink is shown too: the server always sends the global
adapter in float32 (``to_array_record(global_adapter)``), once in the train instruction and
once more in the evaluate instruction of every round.

The adapter values are filled with random numbers before measuring: peft initialises every
LoRA B to zeros, and Flower deduplicates identical objects (equal arrays get one object id),
which would under-count a real, trained update.

Usage (from the repository root):

    .venv/bin/python benchmarks/wire_bytes.py
    .venv/bin/python benchmarks/wire_bytes.py --models tiny-gpt2,tiny-llama --lora-r 16
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ["tiny-gpt2", "tiny-llama", "small-gpt2", "bench-gpt2-50m"]
DEFAULT_VOCAB = {"bench-gpt2-50m": 32000}
DEMO_VOCAB = 2048          # `teacher warmup --vocab-size` default
MAX_POSITIONS = 256        # what warmup_teacher builds (max(256, max_length))
NODE_ID = 0xC3A5_9E21_7B44_0D18  # 64-bit ids, like the ones Flower draws
RUN_ID = 0x5A5A_1234_9876_0F0F
TASK_ID = 0x7E11_0C3B_52A4_9D01


def build_base(spec: str, vocab: int):
    import torch
    from transformers import AutoModelForCausalLM

    from common.models.build import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(spec, vocab, MAX_POSITIONS, pad_token_id=1, eos_token_id=0))


def reply_messages(adapter: dict, wire_dtype: str):
    """(server's train instruction, client's train reply), built as the apps build them."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from common.wire import to_array_record

    # the ServerApp process's identity (a real run has a random 64-bit run id and task id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 1, TASK_ID
    instruction = Message(RecordDict({"arrays": to_array_record(adapter),
                                      "config": ConfigRecord({"server-round": 1, "run-name": "dp-lora"})}),
                          dst_node_id=NODE_ID, message_type="train", group_id="1")
    instruction.metadata.__dict__["_message_id"] = instruction.object_id  # as the SuperNode does on receipt
    metrics = {"num-examples": 205, "train-loss": 4.8123, "noise-multiplier": 0.6766, "epsilon-spent": 7.99,
               "epsilon-remaining": 0.01, "refused": 0, "replayed": 0}  # the keys run_round sends
    reply = Message(RecordDict({"arrays": to_array_record(adapter, wire_dtype), "metrics": MetricRecord(metrics),
                                "client": ConfigRecord({"client-id": "client_0", "refusal": ""})}),
                    reply_to=instruction)
    evaluate = Message(RecordDict({"arrays": to_array_record(adapter), "config": ConfigRecord({})}),
                       dst_node_id=NODE_ID, message_type="evaluate")
    return instruction, reply, evaluate


def fleet_push_bytes(message) -> tuple[int, int, int]:
    """(Σ request bytes, Σ deflated object bytes, number of objects) of pushing ``message``."""
    from flwr.app.message.message import remove_content_from_message
    from flwr.common import serde
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    node, session = Node(node_id=NODE_ID), str(uuid.UUID(int=0x1234))
    tree = get_object_tree(message)
    objects = get_all_nested_objects(message)
    head = PushMessagesRequest(node=node, messages_list=[serde.message_to_proto(remove_content_from_message(message))],
                               message_object_trees=[tree], clientapp_runtime_list=[12.3]).ByteSize()
    total, deflated = head, 0
    for object_id, obj in objects.items():
        content = obj.deflate()
        deflated += len(content)
        total += PushObjectRequest(node=node, run_id=RUN_ID, object_id=object_id,
                                   object_content=content, session_id=session).ByteSize()
    return total, deflated, len(objects)


def measure(spec: str, vocab: int, lora_r: int, lora_alpha: int) -> dict:
    import numpy as np
    from flwr.common import serde

    from common.models.build import LORA_TARGETS, add_lora, adapter_state, model_family
    from common.wire import payload_bytes, to_array_record

    model = build_base(spec, vocab)
    base_params = sum(p.numel() for p in model.parameters())
    family = model_family(model)
    peft_model = add_lora(model, r=lora_r, alpha=lora_alpha)
    adapter = adapter_state(peft_model)
    rng = np.random.default_rng(0)
    adapter = {k: (rng.standard_normal(v.shape) * 0.02).astype(np.float32) for k, v in adapter.items()}
    lora_params = sum(int(v.size) for v in adapter.values())
    row = {"model": spec, "family": family, "vocab": vocab, "targets": LORA_TARGETS[family], "lora_r": lora_r,
           "base_params": base_params, "lora_params": lora_params, "tensors": len(adapter),
           "full_fp32": base_params * 4, "full_fp16": base_params * 2}
    for dtype in ("float32", "float16"):
        record = to_array_record(adapter, dtype)
        instruction, reply, evaluate = reply_messages(adapter, dtype)
        fleet, deflated, n_objects = fleet_push_bytes(reply)
        row[dtype] = {
            "tensor_bytes": payload_bytes(adapter) // (2 if dtype == "float16" else 1),
            "arrayrecord_bytes": sum(len(a.data) for a in record.values()),
            "reply_fleet_bytes": fleet, "reply_deflated_bytes": deflated, "reply_objects": n_objects,
            "reply_proto_bytes": serde.message_to_proto(reply).ByteSize(),
        }
        if dtype == "float32":  # the downlink is float32 whatever the uplink dtype
            row["downlink_train_bytes"] = fleet_push_bytes(instruction)[0]
            row["downlink_evaluate_bytes"] = fleet_push_bytes(evaluate)[0]
    return row


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(rows: list[dict]) -> None:
    header = ("model", "params", "LoRA params", "wire", "tensor bytes", "ArrayRecord", "Fleet API reply",
              "full model", "tensors / full", "reply / full")
    lines = []
    for r in rows:
        for dtype, full_key in (("float32", "full_fp32"), ("float16", "full_fp16")):
            w, full = r[dtype], r[full_key]
            lines.append((
                f"{r['model']} (vocab {r['vocab']})", f"{r['base_params']:,}",
                f"{r['lora_params']:,} ({r['tensors']} tensors)", "fp32" if dtype == "float32" else "fp16",
                f"{w['tensor_bytes']:,}", f"{w['arrayrecord_bytes']:,}", f"{w['reply_fleet_bytes']:,}",
                f"{human(full)} ({'fp32' if dtype == 'float32' else 'fp16'})",
                f"{100 * w['tensor_bytes'] / full:.3f} %", f"{100 * w['reply_fleet_bytes'] / full:.3f} %",
            ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for line in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths)))
    print()
    print("fp16 adapter against the fp32 model (what a float16 wire saves over shipping fp32 weights):")
    for r in rows:
        w = r["float16"]
        print(f"  {r['model']:<16} tensors {100 * w['tensor_bytes'] / r['full_fp32']:.3f} %, "
              f"Fleet API reply {100 * w['reply_fleet_bytes'] / r['full_fp32']:.3f} %")
    print()
    print("Fleet API reply in detail (fp32 / fp16): deflated objects, object count, single-protobuf message size; "
          "downlink per round (always fp32): train instruction + evaluate instruction:")
    for r in rows:
        a, b = r["float32"], r["float16"]
        print(f"  {r['model']:<16} objects {a['reply_deflated_bytes']:,} / {b['reply_deflated_bytes']:,} B "
              f"in {a['reply_objects']} objects; message_to_proto {a['reply_proto_bytes']:,} / "
              f"{b['reply_proto_bytes']:,} B; downlink {r['downlink_train_bytes']:,} + "
              f"{r['downlink_evaluate_bytes']:,} B")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated TINY_SPECS names")
    parser.add_argument("--vocab", type=int, help=f"vocabulary for every model (default {DEMO_VOCAB}, "
                                                   "32000 for bench-gpt2-50m)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import flwr
    import peft
    import torch
    import transformers

    print(f"flwr {flwr.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; LoRA r={args.lora_r}, alpha={args.lora_alpha}, default targets per family\n")
    rows = []
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        vocab = args.vocab or DEFAULT_VOCAB.get(spec, DEMO_VOCAB)
        rows.append(measure(spec, vocab, args.lora_r, args.lora_alpha))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
