"""PassageStore: build/open round trip, titles, and the errors a user sees for bad passage files."""

import json
import os
import pickle

import pytest
import torch

from src.distributed import World
from src.errors import UserError
from src.passages import PassageStore, passage_title


def write_jsonl(path, items):
    with open(path, "w") as handle:
        for item in items:
            handle.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return str(path)


PASSAGES = [
    {"id": "a", "title": "Paris", "section": "History", "text": "Paris was founded ..."},
    {"id": "b", "title": "Rome", "section": "", "text": "Rome é antiga. 日本"},
    {"id": 3, "title": "Oslo", "text": "Oslo"},
]


def test_round_trip_over_files(tmp_path):
    first = write_jsonl(tmp_path / "p1.jsonl", PASSAGES[:2])
    second = write_jsonl(tmp_path / "p2.jsonl", ["", json.dumps(PASSAGES[2])])  # blank lines are skipped
    store = PassageStore.build([first, second], str(tmp_path / "store"))
    assert len(store) == 3
    assert store.get(1) == PASSAGES[1]
    assert store.get_many([2, 0]) == [PASSAGES[2], PASSAGES[0]]
    reopened = PassageStore.open(str(tmp_path / "store"))
    assert [reopened.get(i) for i in range(3)] == PASSAGES
    assert pickle.loads(pickle.dumps(reopened)).get(0) == PASSAGES[0]  # reopens by path (e.g. DataLoader workers)
    with pytest.raises(IndexError):
        store.get(3)
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_max_passages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", PASSAGES)
    assert len(PassageStore.build([path], str(tmp_path / "s"), max_passages=2)) == 2


def test_title_with_section():
    assert passage_title(PASSAGES[0]) == "Paris: History"
    assert passage_title(PASSAGES[1]) == "Rome"
    assert passage_title(PASSAGES[2]) == "Oslo"
    assert passage_title({"text": "x"}) == ""


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [PASSAGES[0], '{"id": "x", "text": '])
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        PassageStore.build([path], str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s")
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]  # failed builds leave nothing


def test_missing_id_and_text(tmp_path):
    path = write_jsonl(tmp_path / "noid.jsonl", [PASSAGES[0], {"text": "no id"}])
    with pytest.raises(UserError, match=r'noid\.jsonl:2: passage has no "id"'):
        PassageStore.build([path], str(tmp_path / "s"))
    path = write_jsonl(tmp_path / "notext.jsonl", [{"id": "q", "title": "t"}])
    with pytest.raises(UserError, match=r'notext\.jsonl:1: passage has no "text"'):
        PassageStore.build([path], str(tmp_path / "s"))


def test_duplicate_id_names_both_places(tmp_path):
    first = write_jsonl(tmp_path / "one.jsonl", PASSAGES)
    second = write_jsonl(tmp_path / "two.jsonl", [{"id": "z", "text": "."}, {"id": "b", "text": "again"}])
    with pytest.raises(UserError, match=r"'b'.*one\.jsonl:2 and .*two\.jsonl:2"):
        PassageStore.build([first, second], str(tmp_path / "s"))


def test_missing_file_and_not_a_store(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl"):
        PassageStore.build([str(tmp_path / "nope.jsonl")], str(tmp_path / "s"))
    with pytest.raises(UserError, match="not a passage store"):
        PassageStore.open(str(tmp_path))


def test_truncated_store_is_refused(tmp_path):
    store = PassageStore.build([write_jsonl(tmp_path / "p.jsonl", PASSAGES)], str(tmp_path / "s"))
    data = store.files()[0]
    with open(data, "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(UserError, match="corrupted"):
        PassageStore.open(str(tmp_path / "s"))


def test_build_or_open_caches_by_file_state(tmp_path):
    world = World(0, 0, 1, torch.device("cpu"))
    path = write_jsonl(tmp_path / "p.jsonl", PASSAGES)
    first = PassageStore.build_or_open([path], str(tmp_path / "cache"), -1, world)
    again = PassageStore.build_or_open([path], str(tmp_path / "cache"), -1, world)
    assert first.directory == again.directory and len(again) == 3
    assert PassageStore.build_or_open([path], str(tmp_path / "cache"), 1, world).directory != first.directory
    write_jsonl(tmp_path / "p.jsonl", PASSAGES[:2])  # editing the file changes size/mtime: a new store
    changed = PassageStore.build_or_open([path], str(tmp_path / "cache"), -1, world)
    assert changed.directory != first.directory and len(changed) == 2


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PASSAGES[0]).encode() + b"\n")
    assert PassageStore.build([str(path)], str(tmp_path / "s")).get(0) == PASSAGES[0]
