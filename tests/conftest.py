"""Shared fixtures: one small generated corpus and one warmed-up tiny teacher per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def fed_root(tmp_path_factory):
    """3 sites' corpus (generated) + a tiny GPT-2 teacher warmed up on its public split."""
    from common.data.generate import generate_corpus
    from common.data.loading import load_records
    from common.models.warmup import warmup_teacher

    root = tmp_path_factory.mktemp("federation")
    generate_corpus(root / "corpus", n_clients=3, seed=7, public_records=200, train_per_client=60,
                    heldout_per_client=20)
    public = [r.text for r in load_records(root / "corpus" / "public.jsonl")]
    warmup_teacher(public, root / "teacher", spec="tiny-gpt2", steps=30, progress=False)
    return root


def fed_overrides(root, **changes) -> dict:
    """Small, fast settings for 3 simulated sites on the session corpus."""
    overrides = {"clients": 3, "rounds": 2, "min-clients": 2, "local-steps": 4, "batch-size": 16,
                 "data-dir": str(root / "corpus"), "model-dir": str(root / "teacher"), "generate-data": False,
                 "round-timeout": 900.0}
    overrides.update(changes)
    return overrides


@pytest.fixture
def flower_identity():
    # Messages are stamped with the run/node identity Flower's runtime normally sets.
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, getattr(TaskIdentity, "_node_id", None), getattr(TaskIdentity, "_task_id", None))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def five_sites(tmp_path_factory, fed_root):
    """A 5-site corpus (the SecAgg+ tests need five sites); the teacher is fed_root's."""
    from common.data.generate import generate_corpus

    root = tmp_path_factory.mktemp("five_sites")
    generate_corpus(root / "corpus", n_clients=5, seed=11, public_records=60, train_per_client=40,
                    heldout_per_client=10)
    return {"data-dir": str(root / "corpus"), "model-dir": str(fed_root / "teacher")}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models' matmuls are too small to gain from a second thread, and on a busy 2-core
    machine OpenMP's waiting threads made each one ~100x slower (7.7 ms against 33 µs measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
