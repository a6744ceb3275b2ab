"""The fever and kilt tasks: label maps, answers, formats, file passages, user mistakes, and runs end to end."""

import json
import random
from pathlib import Path

import pytest

from src.data import TrainingBatches, TrainingData, eval_batches, load_instances
from src.errors import UserError
from src.tasks import build_task
from tests.conftest import demo_args
from tests.conftest import run_script as run

BENCH_FEVER = Path(__file__).resolve().parents[2] / "shared/bench/fever.dev.jsonl"
PASSAGES = [
    {"id": "p1", "title": "Orchid", "text": "Orchids are flowers."},
    {"id": "p2", "title": "Rose", "text": "Red."},
]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def examples(path: str, task_name: str):
    task = build_task(task_name)
    return [ex for batch in eval_batches(load_instances([path], task), task, 100) for ex in batch]


def user_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


# fever


def test_fever_maps_labels_to_words_and_formats_query_and_target(tmp_path):
    rows = [
        {"id": 1, "claim": "Orchids are flowers.", "label": "SUPPORTS"},
        {"id": 2, "claim": "Roses are blue.", "label": "REFUTES"},
        {"id": 3, "claim": "Tilda Swinton is a vegan.", "label": "NOT ENOUGH INFO"},
    ]
    got = examples(write_jsonl(tmp_path / "dev.jsonl", rows), "fever")
    assert [(ex.query, ex.target, ex.answers) for ex in got] == [
        ("question: Orchids are flowers. answer: <extra_id_0>", "<extra_id_0> true", ["true"]),
        ("question: Roses are blue. answer: <extra_id_0>", "<extra_id_0> false", ["false"]),
        ("question: Tilda Swinton is a vegan. answer: <extra_id_0>", "<extra_id_0> maybe", ["maybe"]),
    ]
    assert [ex.metadata["id"] for ex in got] == [1, 2, 3] and got[0].metadata["label"] == "SUPPORTS"
    assert all(ex.passages is None for ex in got)  # nothing given: retrieved


def test_fever_accuracy_is_raw_exact_match_and_there_is_no_eval_loss():
    task = build_task("fever")
    assert task.metrics == ("accuracy",)
    assert task.evaluate("true", ["true"]) == {"accuracy": 1.0}
    assert task.evaluate(" maybe ", ["maybe"]) == {"accuracy": 1.0}
    assert task.evaluate("True", ["true"]) == {"accuracy": 0.0}  # raw: no normalisation
    assert task.evaluate("true.", ["true"]) == {"accuracy": 0.0}


def test_fever_keeps_file_passages(tmp_path):
    row = {"claim": "Orchids are flowers.", "label": "SUPPORTS", "passages": PASSAGES}
    (ex,) = examples(write_jsonl(tmp_path / "d.jsonl", [row]), "fever")
    assert [(p["id"], p["title"], p["text"]) for p in ex.passages] == [
        ("p1", "Orchid", "Orchids are flowers."),
        ("p2", "Rose", "Red."),
    ]
    assert "passages" not in ex.metadata


def test_fever_user_mistakes_name_file_line_and_field(tmp_path):
    good = {"claim": "c", "label": "SUPPORTS"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"claim": "c", "label": "SUPPORTED"}])
    message = user_error(lambda: load_instances([path], build_task("fever")))
    assert message.startswith(f"{path}:2: field 'label' of task 'fever' must be one of SUPPORTS, REFUTES")
    assert "'SUPPORTED'" in message
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, {"question": "c", "label": "REFUTES"}])
    assert user_error(lambda: TrainingData([path], build_task("fever"))) == (
        f"{path}:3: task 'fever' needs the field 'claim'"
    )
    path = write_jsonl(tmp_path / "d.jsonl", [{"claim": "c"}])
    assert user_error(lambda: load_instances([path], build_task("fever"))) == (
        f"{path}:1: task 'fever' needs the field 'label'"
    )


# kilt


def kilt_row(answers: list, **extra) -> dict:
    output = [{"answer": a} if a is not None else {"provenance": [{"wikipedia_id": "1"}]} for a in answers]
    return {"id": "k1", "input": "who wrote Hamlet", "output": output, **extra}


def test_kilt_answers_drop_empty_and_repeated_answers_in_order(tmp_path):
    rows = [
        kilt_row(["Shakespeare", "", "  ", None, "William Shakespeare", "Shakespeare", " Shakespeare "]),
        kilt_row(["Bard"], meta={"x": 1}),
    ]
    got = examples(write_jsonl(tmp_path / "nq-dev-kilt.jsonl", rows), "kilt")
    assert got[0].answers == ["Shakespeare", "William Shakespeare"]
    assert got[0].query == "question: who wrote Hamlet answer: <extra_id_0>"
    assert got[1].answers == ["Bard"] and got[1].target == "<extra_id_0> Bard"
    assert got[1].metadata["meta"] == {"x": 1} and got[1].metadata["id"] == "k1"


def test_kilt_target_is_a_random_answer_from_the_given_rng():
    task = build_task("kilt")
    raw = kilt_row(["Shakespeare", "William Shakespeare", "the Bard"])
    targets = [task.process(raw, "nq.jsonl:1", random.Random(seed)).target for seed in range(40)]
    assert set(targets) == {"<extra_id_0> Shakespeare", "<extra_id_0> William Shakespeare", "<extra_id_0> the Bard"}
    again = [task.process(raw, "nq.jsonl:1", random.Random(seed)).target for seed in range(40)]
    assert again == targets  # the same rng state draws the same answer (training resumes identically)


def test_kilt_fever_files_read_labels_as_true_or_false(tmp_path):
    rows = [kilt_row(["SUPPORTS"]), kilt_row(["REFUTES"]), kilt_row(["NOT ENOUGH INFO", "REFUTES"])]
    fever = examples(write_jsonl(tmp_path / "fever-dev-kilt.jsonl", rows), "kilt")
    assert [(ex.target, ex.answers) for ex in fever] == [
        ("<extra_id_0> true", ["true"]),
        ("<extra_id_0> false", ["false"]),
        ("<extra_id_0> false", ["false"]),
    ]
    (tmp_path / "FEVER").mkdir()  # any case; only the file's own name counts, not its directories
    assert examples(write_jsonl(tmp_path / "FEVER/FEVER-train.jsonl", rows[:1]), "kilt")[0].answers == ["true"]
    (tmp_path / "fever_runs").mkdir()
    other = examples(write_jsonl(tmp_path / "fever_runs/nq-dev-kilt.jsonl", rows), "kilt")
    assert [ex.answers for ex in other] == [["SUPPORTS"], ["REFUTES"], ["NOT ENOUGH INFO", "REFUTES"]]
    # the original's test: a `filename` field naming a fever file
    marked = examples(write_jsonl(tmp_path / "mixed.jsonl", [kilt_row(["SUPPORTS"], filename="fever-dev")]), "kilt")
    assert marked[0].answers == ["true"]


def test_kilt_metrics_raw_and_normalised():
    task = build_task("kilt")
    assert task.metrics == ("accuracy", "exact_match", "f1")
    assert task.evaluate("the Eiffel Tower!", ["Eiffel Tower"]) == {"accuracy": 0.0, "exact_match": 1.0, "f1": 1.0}
    assert task.evaluate("Eiffel Tower", ["Paris", "Eiffel Tower"]) == {"accuracy": 1.0, "exact_match": 1.0, "f1": 1.0}
    scores = task.evaluate("Eiffel", ["Eiffel Tower"])
    assert scores["accuracy"] == 0.0 and scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(2 / 3)  # precision 1, recall 1/2


def test_kilt_rows_without_answers_are_skipped(tmp_path, caplog):
    rows = [kilt_row(["", None]), kilt_row(["A"]), kilt_row([]), kilt_row(["B"])]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level("WARNING"):
        instances = load_instances([path], build_task("kilt"))
    assert [inst.where for inst in instances] == [f"{path}:2", f"{path}:4"]
    assert f"{path}:1: no non-empty answer" in caplog.text and caplog.text.count("no non-empty answer") == 1
    batches = TrainingBatches(TrainingData([path], build_task("kilt")), build_task("kilt"), 3, shuffle=True, seed=0)
    targets = [ex.target for _ in range(4) for ex in next(batches)]
    assert sorted(set(targets)) == ["<extra_id_0> A", "<extra_id_0> B"]
    empty = write_jsonl(tmp_path / "test-kilt.jsonl", [{"id": "t", "input": "q", "output": []}])
    assert "no usable instance for task 'kilt'" in user_error(lambda: load_instances([empty], build_task("kilt")))


def test_kilt_keeps_file_passages(tmp_path):
    (ex,) = examples(write_jsonl(tmp_path / "d.jsonl", [kilt_row(["A"], passages=PASSAGES)]), "kilt")
    assert [p["id"] for p in ex.passages] == ["p1", "p2"] and ex.passages[1]["text"] == "Red."


def test_kilt_user_mistakes_name_file_line_and_field(tmp_path):
    def error(rows: list) -> str:
        path = write_jsonl(tmp_path / "d.jsonl", rows)
        return user_error(lambda: load_instances([path], build_task("kilt"))).replace(path, "d.jsonl")

    good = kilt_row(["A"])
    assert error([good, {"id": "x", "output": [{"answer": "A"}]}]) == "d.jsonl:2: task 'kilt' needs the field 'input'"
    assert error([{"input": "q"}]) == "d.jsonl:1: task 'kilt' needs the field 'output'"
    assert error([{"input": "q", "output": "A"}]) == "d.jsonl:1: field 'output' of task 'kilt' must be a list"
    assert error([{"input": "q", "output": ["A"]}]).startswith(
        "d.jsonl:1: field 'output' of task 'kilt' must be a list of objects"
    )
    assert error([good, good, {"input": "q", "output": [{"answer": 3}]}]) == (
        "d.jsonl:3: field 'output[0].answer' of task 'kilt' must be a string"
    )


# end to end


def fast_flags(demo: Path, ckpt: Path, task: str) -> list[str]:
    return [
        *demo_args(demo, ckpt), "--task", task, "--target_maxlength", "8", "--generation_max_length", "4",
        "--n_context", "2", "--retriever_n_context", "2", "--per_gpu_batch_size", "2",
    ]  # fmt: skip


def demo_facts(demo: Path) -> list[tuple[str, str, str]]:
    """(person, birthplace, another person's birthplace) from the demo world's passages."""
    people = []
    for line in (demo / "data/passages.jsonl").read_text().splitlines():
        p = json.loads(line)
        first = p["text"].split(". ")[0]
        if " was born in " in first:
            person, town = first.rstrip(".").split(" was born in ")
            people.append((person, town))
    assert len(people) >= 9, "the demo world changed: too few 'X was born in Y' passages"
    return [(person, town, people[(i + 1) % len(people)][1]) for i, (person, town) in enumerate(people)]


def train_then_evaluate(demo: Path, ckpt: Path, task: str, train: str, dev: str, eval_flags: list[str]):
    """train.py for 2 steps (evaluating at step 2), then evaluate.py on its checkpoint; returns evaluate.py's run."""
    result = run(["train.py", *fast_flags(demo, ckpt, task), "--name", "t", "--train_data", train,
                  "--eval_data", dev, "--total_steps", "2", "--eval_freq", "2", "--warmup_steps", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metric = build_task(task).metrics[0]
    assert f"{dev} step 2 | {metric} " in (ckpt / "t/run.log").read_text()  # train.py evaluated at step 2
    result = run(["evaluate.py", *fast_flags(demo, ckpt, task), "--name", "e", "--eval_data", dev,
                  "--model_path", str(ckpt / "t/checkpoint/latest"), "--write_results", *eval_flags])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    return result


def test_fever_trains_and_evaluates_end_to_end(demo, tmp_path):
    labels = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"]
    rows = []
    for i, (person, town, other) in enumerate(demo_facts(demo)[:9]):
        claim = [f"{person} was born in {town}.", f"{person} was born in {other}.", f"{person} likes tea."][i % 3]
        rows.append({"id": i, "claim": claim, "label": labels[i % 3]})
    train = write_jsonl(tmp_path / "train.jsonl", rows[:6])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[6:])
    result = train_then_evaluate(demo, tmp_path, "fever", train, dev, [])
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("dev/"))
    assert set(printed) == {"dev/accuracy"}  # no eval_loss, as the original
    written = [json.loads(line) for line in (tmp_path / "e/dev-step-0.jsonl").read_text().splitlines()]
    assert [row["answers"] for row in written] == [["true"], ["false"], ["maybe"]]
    assert written[0]["query"] == f"question: {rows[6]['claim']} answer: <extra_id_0>"
    expected = 100 * sum(row["generation"] in row["answers"] for row in written) / 3
    assert float(printed["dev/accuracy"]) == pytest.approx(expected, abs=0.01)


def test_kilt_trains_and_evaluates_with_file_passages(demo, tmp_path):
    rows = []
    for i, (person, town, _) in enumerate(demo_facts(demo)[:6]):
        given = [{"id": f"f{i}", "title": person, "text": f"{person} was born in {town}."}]
        output = [{"answer": town}, {"answer": ""}, {"provenance": [{"wikipedia_id": "1"}]}]
        rows.append({"id": f"k{i}", "input": f"Where was {person} born?", "passages": given, "output": output})
    train = write_jsonl(tmp_path / "train.jsonl", rows[:4])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[4:])
    result = train_then_evaluate(demo, tmp_path, "kilt", train, dev, ["--use_file_passages"])
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("dev/"))
    assert set(printed) == {"dev/accuracy", "dev/exact_match", "dev/f1"}
    written = [json.loads(line) for line in (tmp_path / "e/dev-step-0.jsonl").read_text().splitlines()]
    assert [row["answers"] for row in written] == [[row["output"][0]["answer"]] for row in rows[4:]]
    assert [[p["id"] for p in row["passages"]] for row in written] == [["f4"], ["f5"]]  # the file's, not retrieved


@pytest.mark.skipif(not BENCH_FEVER.is_file(), reason="needs ../shared/bench (developer machines only)")
def test_fever_real_dev_rows_evaluate(demo, tmp_path):
    with open(BENCH_FEVER, encoding="utf-8") as f:
        head = [next(f) for _ in range(20)]
    dev = tmp_path / "fever.dev.head20.jsonl"
    dev.write_text("".join(head))
    result = run(["evaluate.py", *fast_flags(demo, tmp_path, "fever"), "--name", "bench", "--eval_data", str(dev),
                  "--write_results"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("fever.dev.head20/")]
    assert [line.split(": ")[0] for line in lines] == ["fever.dev.head20/accuracy"]
    assert 0.0 <= float(lines[0].split(": ")[1]) <= 100.0
    written = [json.loads(line) for line in (tmp_path / "bench/fever.dev.head20-step-0.jsonl").read_text().splitlines()]
    truth = {"SUPPORTS": "true", "REFUTES": "false", "NOT ENOUGH INFO": "maybe"}
    assert [row["answers"] for row in written] == [[truth[json.loads(line)["label"]]] for line in head]
    claims = [json.loads(line)["claim"] for line in head]
    assert [row["query"] for row in written] == [f"question: {claim} answer: <extra_id_0>" for claim in claims]
