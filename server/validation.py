"""Check a client's adapter update before it may touch the global adapter.

A reply is aggregated only if its tensors have exactly the global adapter's names and
shapes, the agreed wire dtype, only finite values, and an update norm ‖client − global‖₂
under the configured bound. Anything else is dropped with a reason the server logs.
"""

from __future__ import annotations

import numpy as np


def update_problem(update: dict[str, np.ndarray], reference: dict[str, np.ndarray], wire_dtype: str,
                   max_norm: float, *, nonzero: bool = False, clipped_to: float | None = None) -> str | None:
    """Why ``update`` must not be aggregated, or None when it is acceptable.

    Under central DP: ``nonzero`` refuses an exactly-zero update (Flower's clipping divides by
    its norm), and ``clipped_to`` = C refuses an update a site should have clipped to C but did not.
    """
    missing = sorted(set(reference) - set(update))
    unknown = sorted(set(update) - set(reference))
    if missing:
        return f"missing tensor(s) {missing[:3]}{' …' if len(missing) > 3 else ''}"
    if unknown:
        return f"unknown tensor(s) {unknown[:3]}{' …' if len(unknown) > 3 else ''}"
    for name, ref in reference.items():
        value = update[name]
        if tuple(value.shape) != tuple(ref.shape):
            return f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != np.dtype(wire_dtype):
            return f"tensor {name} has dtype {value.dtype}, expected {wire_dtype}"
        if not np.isfinite(value).all():
            return f"tensor {name} has non-finite values (NaN or Inf)"
    norm = update_norm(update, reference)
    if not norm <= max_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    if nonzero and norm == 0.0:
        return "update is exactly zero (Flower's clipping cannot scale a zero update)"
    if clipped_to is not None and norm > clipped_to * (1 + 1e-5):  # 1e-5: float32 rounding of a clipped update
        return f"update norm {norm:.6g} exceeds central-clip {clipped_to:g}: the site did not clip"
    return None


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """‖update − reference‖₂ over all tensors (float64)."""
    return float(sum(np.sum((update[k].astype(np.float64) - ref.astype(np.float64)) ** 2)
                     for k, ref in reference.items())) ** 0.5
