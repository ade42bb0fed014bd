"""The offline demo corpus: reproducible bytes, canaries exactly where declared, disjoint persons."""

import json
import re
from pathlib import Path

import pytest

from common.data import CANARY_TEMPLATE, generate_corpus, load_records
from common.errors import ConfigError, DataError

SMALL = dict(n_clients=3, train_per_client=40, heldout_per_client=10, public_records=60,
             canaries_per_repeat=2, repeats=(1, 3, 5))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", params=["support", "clinical"])
def corpus(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    manifest = generate_corpus(root, seed=7, domain=request.param, **SMALL)
    return root, manifest


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        generate_corpus(tmp_path / name, seed=seed, **SMALL)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k != "manifest.json")
    assert str(tmp_path) not in a["manifest.json"].decode()


def test_layout_and_manifest(corpus):
    root, manifest = corpus
    expected = {"public.jsonl", "canaries.json", "manifest.json"}
    expected |= {f"client_{i}/{split}.jsonl" for i in range(3) for split in ("train", "heldout")}
    assert set(tree_bytes(root)) == expected
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 7 and manifest["n_clients"] == 3
    for i, client in enumerate(manifest["files"]["clients"]):
        assert client["train_records"] == len(read_jsonl(root / client["train"]))
        assert client["heldout_records"] == SMALL["heldout_per_client"]


def test_canaries_exactly_where_declared_and_nowhere_else(corpus):
    root, _ = corpus
    doc = json.loads((root / "canaries.json").read_text())
    assert doc["template"] == CANARY_TEMPLATE and doc["secret_digits"] == 10
    canaries = doc["canaries"]
    planted = [c for c in canaries if c["client"] is not None]
    held_out = [c for c in canaries if c["client"] is None]
    assert len(planted) == len(held_out) == 6
    assert sorted(c["repeats"] for c in planted) == [1, 1, 3, 3, 5, 5]
    assert {c["client"] for c in planted} == {0, 1, 2}  # round-robin
    assert len({c["id"] for c in canaries}) == len(canaries)

    files = {p.relative_to(root).as_posix(): read_jsonl(p) for p in root.rglob("*.jsonl")}
    for c in canaries:
        assert re.fullmatch(r"\d{10}", c["secret"])
        assert c["text"] == CANARY_TEMPLATE.format(name=c["name"], secret=c["secret"])
        for name, rows in files.items():
            found = [i for i, row in enumerate(rows) if c["text"] in row["text"]]
            where = c["lines"] if name == c["file"] else []
            assert found == where, (c["id"], name)
        if c["client"] is None:
            assert c["file"] is None and c["lines"] == [] and c["repeats"] == 0
        else:
            assert len(c["lines"]) == c["repeats"]
            rows = files[c["file"]]
            assert all(rows[i] == {"text": c["text"], "label": "canary", "person": c["name"]} for i in c["lines"])


def test_persons_disjoint(corpus):
    root, _ = corpus
    public = {row["person"] for row in read_jsonl(root / "public.jsonl")}
    private = {row["person"] for p in root.glob("client_*/*.jsonl") for row in read_jsonl(p)
               if row["label"] != "canary"}
    canary_names = {c["name"] for c in json.loads((root / "canaries.json").read_text())["canaries"]}
    assert public and private and len(canary_names) == 12
    assert not public & private and not canary_names & (public | private)


def test_labels_lengths_and_loading(corpus):
    root, manifest = corpus
    categories = set(manifest["categories"])
    assert len(categories) == 6
    for path in sorted(root.rglob("*.jsonl")):
        rows = read_jsonl(path)
        records = load_records(path)
        assert [r.text for r in records] == [row["text"] for row in rows]
        for row in rows:
            if row["label"] == "canary":
                continue
            assert row["label"] in categories and row["person"] in row["text"]
            assert 40 <= len(row["text"].split()) <= 90, row["text"]
    public_labels = {row["label"] for row in read_jsonl(root / "public.jsonl")}
    assert public_labels == categories


@pytest.mark.parametrize("kwargs, words", [
    ({"n_clients": 0}, "clients"),
    ({"train_per_client": 0}, "train records"),
    ({"public_records": 0}, "public records"),
    ({"canaries_per_repeat": 0}, "canaries per repeat"),
    ({"repeats": (1, 0)}, "repeats"),
    ({"domain": "legal"}, "unknown domain"),
])
def test_bad_arguments(tmp_path, kwargs, words):
    with pytest.raises(DataError, match=words):
        generate_corpus(tmp_path, **kwargs)


def test_plant_canaries_into_a_users_own_file(tmp_path):
    import json as _json

    from common.cli import main
    from common.data.loading import load_records

    own = tmp_path / "notes.txt"
    own.write_text("".join(f"Visit note {i}: patient stable, follow-up in {i % 7 + 1} weeks.\n" for i in range(40)))
    assert main(["data", "plant-canaries", str(own), "--out", str(tmp_path / "planted"), "--seed", "3"]) == 0
    doc = _json.loads((tmp_path / "planted" / "canaries.json").read_text())
    rows = [r.text for r in load_records(tmp_path / "planted" / "train.jsonl")]
    planted = [c for c in doc["canaries"] if c["repeats"]]
    assert len(rows) == 40 + sum(c["repeats"] for c in planted) == 40 + 2 * (1 + 4 + 16)
    for canary in doc["canaries"]:
        assert [i for i, t in enumerate(rows) if t == canary["text"]] == canary["lines"]
    assert own.read_text().count("\n") == 40  # the original is untouched


@pytest.mark.parametrize("domain", ["support", "clinical"])
def test_site_stamp_switch(tmp_path, domain):
    from common.cli import main

    stamped = generate_corpus(tmp_path / "on", seed=3, domain=domain, **SMALL)
    assert main(["data", "generate", "--out", str(tmp_path / "off"), "--seed", "3", "--domain", domain,
                 "--no-site-stamp", "--clients", "3", "--train-per-client", "40", "--heldout-per-client", "10",
                 "--public-records", "60"]) == 0
    plain = json.loads((tmp_path / "off" / "manifest.json").read_text())
    assert stamped["site_stamp"] is True and plain["site_stamp"] is False
    marker = {"support": "internal CRM export", "clinical": "EHR progress note"}[domain]

    def private_texts(root):
        return [row["text"] for p in sorted(root.glob("client_*/*.jsonl")) for row in read_jsonl(p)
                if row["label"] != "canary"]

    with_stamp, without = private_texts(tmp_path / "on"), private_texts(tmp_path / "off")
    assert len(without) == len(with_stamp) == 3 * 50
    assert all(t.startswith("[") and marker in t for t in with_stamp)  # the marker the switch removes
    assert not any(t.startswith("[") or marker in t for t in without)
    sites = {t[1:].split(" | ")[0] for t in with_stamp}  # "Newtown branch" / "Newtown Medical Center"
    assert len(sites) == 3 and not any(site in t for site in sites for t in without)
    assert all(40 <= len(t.split()) <= 90 for t in without)  # the same kind of record, stamp aside


def test_simulation_generates_the_corpus_without_stamps(tmp_path, fed_root):
    from common.settings import RunSettings
    from simulations.run import prepare_run

    settings = RunSettings.from_flat({"clients": 2, "min-clients": 2, "generate-data": True, "site-stamp": False,
                                      "model-dir": str(fed_root / "teacher")})
    prepare_run(settings, tmp_path / "run", resume=False)
    corpus = tmp_path / "run" / "corpus"
    assert json.loads((corpus / "manifest.json").read_text())["site_stamp"] is False
    assert not any("internal CRM export" in r.text for r in load_records(corpus / "client_0" / "train.jsonl"))
    stamped = RunSettings.from_flat({"clients": 2, "min-clients": 2, "generate-data": True, "data-dir": str(corpus),
                                     "model-dir": str(fed_root / "teacher")})  # site-stamp defaults to true
    with pytest.raises(ConfigError, match="generated with site-stamp = false"):  # never reused silently
        prepare_run(stamped, tmp_path / "run2", resume=False)
