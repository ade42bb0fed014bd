"""Split record indices over simulated clients: IID, or label-skewed with a Dirichlet prior.

Both are deterministic under ``seed`` (numpy ``default_rng``), assign every index exactly
once, and return each client's indices sorted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import DataError

MAX_DIRICHLET_DRAWS = 100


def partition_iid(n_records: int, n_clients: int, seed: int) -> list[list[int]]:
    """Shuffle the indices and cut them into ``n_clients`` near-equal parts."""
    _check_counts(n_records, n_clients)
    order = np.random.default_rng(seed).permutation(n_records)
    return [sorted(part.tolist()) for part in np.array_split(order, n_clients)]


def partition_dirichlet(
    labels: Sequence[str], n_clients: int, alpha: float, seed: int, min_per_client: int = 1
) -> list[list[int]]:
    """Per label, split its shuffled indices over clients in proportions drawn from Dir(alpha).

    Small ``alpha`` gives each client few labels (strong skew); large ``alpha`` tends to IID.
    Draws are repeated (with the same rng, so still deterministic) until every client holds
    at least ``min_per_client`` records.
    """
    _check_counts(len(labels), n_clients)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}; use e.g. 0.1 (skewed) to 100 (near IID)")
    if min_per_client < 0 or min_per_client * n_clients > len(labels):
        raise DataError(
            f"cannot give {n_clients} clients {min_per_client} records each out of {len(labels)}; "
            "lower min_per_client or the number of clients"
        )
    missing = next((i for i, label in enumerate(labels) if label is None), None)
    if missing is not None:
        raise DataError(
            f"record {missing + 1} has no label; a Dirichlet (label-skew) partition needs a label on every "
            "record, so add labels or use the IID partition"
        )

    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        clients: list[list[int]] = [[] for _ in range(n_clients)]
        for label in sorted(by_label):  # sorted: dict order must not depend on the data's order
            indices = rng.permutation(by_label[label])
            shares = rng.dirichlet(np.full(n_clients, alpha))
            if not np.all(np.isfinite(shares)):
                continue  # underflow at tiny alpha; this draw is rejected below
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for client, part in zip(clients, np.split(indices, cuts)):
                client.extend(part.tolist())
        if sum(map(len, clients)) == len(labels) and min(map(len, clients)) >= min_per_client:
            return [sorted(c) for c in clients]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_DIRICHLET_DRAWS} draws gave every one of {n_clients} clients "
        f"at least {min_per_client} records; raise alpha, lower the number of clients or min_per_client"
    )


def _check_counts(n_records: int, n_clients: int) -> None:
    if n_clients < 1:
        raise DataError(f"number of clients must be at least 1, got {n_clients}")
    if n_clients > n_records:
        raise DataError(
            f"{n_clients} clients but only {n_records} records; every client needs at least one record, "
            "so use fewer clients or more data"
        )
