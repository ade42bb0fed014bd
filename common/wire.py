"""Adapter tensors ↔ Flower records (float32 or float16 on the wire; never bfloat16)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

# Flower's legacy stack (used for SecAgg+) sends parameters as a bare list of arrays: the
# adapter's tensor names travel beside it in the fit config, in this (sorted) order.
ADAPTER_NAMES_KEY = "adapter-names"


def to_array_record(tensors: dict[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value, dtype=dtype)) for name, value in tensors.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def payload_bytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(int(v.nbytes) for v in tensors.values())
