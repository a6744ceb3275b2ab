"""Tasks, metrics and jsonl reading: what users see when their files are right and when they are not."""

import json
import random
import re

import pytest

from src.data import DataPosition, TrainingBatches, TrainingData, eval_batches, load_instances, read_jsonl
from src.errors import UserError
from src.metrics import answer_in_text, exact_match, f1, normalize_answer
from src.tasks import TASKS, build_task


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Eiffel Tower", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Tower", ["Eiffel Tower"]) == 0.0
    assert f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert f1("nothing", ["Eiffel Tower"]) == 0.0
    assert answer_in_text(["Eiffel Tower"], "Paris has the Eiffel tower, built 1889.")
    assert not answer_in_text(["Eiffel"], "Eiffelberg is a town")


def test_qa_task_formats_query_and_target():
    task = build_task("qa")
    ex = task.process({"question": "who?", "answers": ["Ann", "Bo"], "id": 3}, "f:1", random.Random(0))
    assert ex.query == "question: who? answer: <extra_id_0>"
    assert ex.target in ("<extra_id_0> Ann", "<extra_id_0> Bo")
    assert ex.answers == ["Ann", "Bo"] and ex.metadata["id"] == 3
    ex = task.process({"question": "who?", "answers": ["Ann"], "target": "Annie"}, "f:1", random.Random(0))
    assert ex.target == "<extra_id_0> Annie"
    assert task.evaluate("ann", ["Ann"]) == {"exact_match": 1.0, "f1": 1.0}


def test_qa_prompt_format_flag():
    task = build_task("qa", {"qa_prompt_format": "{question}", "lr": 1.0})
    assert task.process({"question": "Q _X_", "answers": ["a"]}, "f:1", random.Random(0)).query == "Q _X_"


def test_base_task():
    task = build_task("base")
    ex = task.process({"query": "in", "target": "out"}, "f:1", random.Random(0))
    assert (ex.query, ex.target, ex.answers) == ("in", "out", ["out"])
    assert task.evaluate("out", ex.answers) == {"accuracy": 1.0}


def test_unknown_task_lists_the_tasks():
    with pytest.raises(UserError, match=re.escape(", ".join(TASKS))):
        build_task("nope")


def test_missing_field_names_task_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answers": ["a"]}, {"answers": ["a"]}])
    with pytest.raises(UserError, match=r"d\.jsonl:2: task 'qa' needs the field 'question'"):
        load_instances([path], build_task("qa"))


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answers": ["a"]}, "", '{"question": "q",'])
    with pytest.raises(UserError, match=r"d\.jsonl:3: not valid JSON"):
        list(read_jsonl(path))
    with pytest.raises(UserError, match="no such file"):
        list(read_jsonl(str(tmp_path / "missing.jsonl")))


def test_instances_are_sharded_round_robin_and_batched(tmp_path):
    rows = [{"question": f"q{i}", "answers": [f"a{i}"]} for i in range(7)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    task = build_task("qa")
    shards = [load_instances([path], task, rank, 3) for rank in range(3)]
    assert sorted(inst.obj["question"] for shard in shards for inst in shard) == sorted(r["question"] for r in rows)
    assert [len(s) for s in shards] == [3, 2, 2]
    assert [len(b) for b in eval_batches(shards[0], task, 2)] == [2, 1]
    batches = TrainingBatches(shards[1], task, 3, shuffle=True, seed=0)
    assert all(len(next(batches)) == 3 for _ in range(4))  # a shard smaller than the batch still yields batches
    streamed = [TrainingData([path], task, rank, 3) for rank in range(3)]  # what train.py reads: lines by offset
    assert [[i.obj for i in s] for s in streamed] == [[i.obj for i in s] for s in shards]
    assert streamed[2][1].where == f"{path}:6"


def test_training_batches_resume_from_a_saved_position(tmp_path):
    rows = [{"question": f"q{i}", "answers": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(5)]
    data = TrainingData([write_jsonl(tmp_path / "d.jsonl", rows)], build_task("qa"))

    def texts(batches, n):
        return [[(ex.query, ex.target) for ex in next(batches)] for _ in range(n)]

    full = texts(TrainingBatches(data, build_task("qa"), 2, shuffle=True, seed=3), 9)  # 18 examples: 3.6 epochs
    first = TrainingBatches(data, build_task("qa"), 2, shuffle=True, seed=3)
    head = texts(first, 4)
    saved = DataPosition(**vars(first.position))
    assert (saved.epoch, saved.index) == (1, 3)
    resumed = TrainingBatches(data, build_task("qa"), 2, shuffle=True, seed=3, position=saved)
    assert head + texts(resumed, 5) == full
    queries = [q for batch in full for q, _ in batch]
    for epoch in range(3):  # each epoch reads every instance once, in its own order
        assert sorted(queries[5 * epoch : 5 * epoch + 5]) == sorted(
            f"question: q{i} answer: <extra_id_0>" for i in range(5)
        )
    assert queries[:5] != queries[5:10]


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "q", "answers": ["a"]}\n{"question": "caf\xe9", "answers": ["a"]}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_instances([str(path)], build_task("qa"))
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid UTF-8"):
        TrainingData([str(path)], build_task("qa"))


def test_empty_file_gold_ids_string_and_empty_answers_are_named(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match=r"empty\.jsonl: no usable instance"):
        load_instances([empty], build_task("qa"))
    with pytest.raises(UserError, match=r"empty\.jsonl: no usable instance"):
        TrainingData([empty], build_task("qa"))
    bad = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answers": ["a"], "gold_ids": "123"}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: field 'gold_ids' must be a list"):
        load_instances([bad], build_task("qa"))
    none = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answers": []}])
    with pytest.raises(UserError, match=r"n\.jsonl:1: field 'answers' of task 'qa' is empty"):
        load_instances([none], build_task("qa"))


def test_few_shot_file_is_repeated_so_every_rank_trains(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answers": ["a"]}])
    three = write_jsonl(tmp_path / "three.jsonl", [{"question": f"q{i}", "answers": ["a"]} for i in range(3)])
    task = build_task("qa")
    shards = [TrainingData([one], task, rank, 2, repeat_below=4) for rank in range(2)]  # 2 ranks x batch 2
    assert [[i.where for i in s] for s in shards] == [[f"{one}:1"] * 2] * 2
    shards = [TrainingData([three], task, rank, 2, repeat_below=4) for rank in range(2)]
    questions = sorted(i.obj["question"] for s in shards for i in s)
    assert questions == ["q0", "q0", "q1", "q1", "q2", "q2"]  # every line twice over the two ranks
    assert [len(TrainingData([three], task, rank, 2, repeat_below=3)) for rank in range(2)] == [2, 1]  # not repeated
