"""The multiple_choice task (MMLU): prompts, truncation, answer-order permutations, de-biasing, the MMLU scorer, and a
run of train.py and evaluate.py on real MMLU rows."""

import itertools
import json
import math
import random

import pytest
from transformers import AutoTokenizer

from src.errors import UserError
from src.tasks import build_task
from tests.conftest import ROOT, demo_args
from tests.conftest import run_script as run

BENCH_MMLU = ROOT.parent / "shared/bench/mmlu"
SCORER = "example_scripts/mmlu/evaluate_mmlu_predictions.py"
ROW = {
    "question": "What is 2+2?",
    "options": {"A": "3", "B": "4", "C": "5", "D": "22"},
    "answer": "B",
    "dataset": "elementary_mathematics",
}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:  # not str.splitlines(): two MMLU test questions hold U+0085
        return [json.loads(line) for line in f]


def task(tokenizer=None, **flags):
    return build_task("multiple_choice", flags, tokenizer)


def process(t, raw, where="f.jsonl:1"):
    return t.process(raw, where, random.Random(0))


def test_prompt_target_and_choices():
    ex = process(task(), ROW)
    assert ex.query == "question: What is 2+2? options: (A) 3 (B) 4 (C) 5 (D) 22 answer: <extra_id_0>"
    assert ex.target == "<extra_id_0> B" and ex.answers == ["B"]
    assert ex.choices == ("<extra_id_0> A", "<extra_id_0> B", "<extra_id_0> C", "<extra_id_0> D")
    assert ex.metadata["dataset"] == "elementary_mathematics"
    three = process(task(multiple_choice_num_options=3), {**ROW, "options": {"C": "z", "A": "x", "B": "y"}})
    assert three.query == "question: What is 2+2? options: (A) x (B) y (C) z answer: <extra_id_0>"
    assert three.choices == ("<extra_id_0> A", "<extra_id_0> B", "<extra_id_0> C")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"options": {"A": "3", "B": "4", "C": "5"}}, "'options'"),  # 3 options where --multiple_choice_num_options 4
        ({"options": {"A": "3", "B": "4", "C": "5", "E": "6"}}, "'options'"),
        ({"options": {"A": "3", "B": 4, "C": "5", "D": "6"}}, "'options'"),
        ({"options": ["3", "4", "5", "22"]}, "'options'"),
        ({"answer": "E"}, "'answer'"),
        ({"question": None}, "'question'"),
    ],
)
def test_malformed_rows_name_the_line_and_field(change, field):
    with pytest.raises(UserError) as err:
        process(task(), {**ROW, **change}, "mmlu.jsonl:7")
    assert str(err.value).startswith("mmlu.jsonl:7: ") and field in str(err.value)


def test_long_question_keeps_its_tail_within_356_tokens(demo):
    tok = AutoTokenizer.from_pretrained(demo / "models/reader")
    t = task(tok)
    question = " ".join(f"the person number {i} was born in the city" for i in range(120))  # ~2,000 tokens
    ex = process(t, {**ROW, "question": question})
    head, rest = ex.query.split(" options: ")
    assert head.startswith("question: ") and rest == "(A) 3 (B) 4 (C) 5 (D) 22 answer: <extra_id_0>"
    kept = head.removeprefix("question: ")
    assert question.endswith(kept) and len(kept) < len(question) / 3
    n_tokens = len(tok(ex.query).input_ids)
    assert 346 <= n_tokens <= 356  # the question is cut just enough
    short = process(t, {**ROW, "question": "the person number 1 was born in the city"})
    assert "options: (A) 3" in short.query and short.query.startswith("question: the person number 1 was born")
    # Without a reader tokenizer (retrieve-only runs) nothing is cut.
    assert process(task(), {**ROW, "question": question}).query.startswith(f"question: {question} options:")


@pytest.mark.parametrize("kind, count", [("single", 1), ("cyclic", 4), ("all", 24)])
def test_permutations(kind, count):
    t = task(multiple_choice_train_permutations=kind, multiple_choice_eval_permutations="single")
    ex = process(t, ROW)
    perms = t.expand(ex, True, random.Random(0))
    assert len(perms) == count and len(t.expand(ex, False, random.Random(0))) == 1
    orders = [tuple(p.metadata["options"][letter] for letter in "ABCD") for p in perms]
    assert len(set(orders)) == count
    if kind == "cyclic":  # rotations of the original order
        assert set(orders) == {("3", "4", "5", "22")[i:] + ("3", "4", "5", "22")[:i] for i in range(4)}
    if kind == "all":
        assert set(orders) == set(itertools.permutations(("3", "4", "5", "22")))
    assert [p.metadata["is_original"] for p in perms].count(True) == 1 and perms[0].metadata["is_original"]
    assert perms[0].query == ex.query and orders[0] == ("3", "4", "5", "22")
    for p in perms:
        letter = p.answers[0]
        assert p.metadata["options"][letter] == "4"  # the answer letter points at the right text
        assert p.target == f"<extra_id_0> {letter}" and p.metadata["answer"] == letter
        assert p.metadata["uid"] == "What is 2+2?3 4 5 22"
        shown = " ".join(f"({c}) {p.metadata['options'][c]}" for c in "ABCD")
        assert p.query == f"question: What is 2+2? options: {shown} answer: <extra_id_0>"
        # permutation[i] = the original letter of the option shown at letter i
        assert all(p.metadata["options"][c] == ROW["options"][o] for c, o in zip("ABCD", p.metadata["permutation"]))


def test_debiasing_by_hand():
    """Two 3-option questions, cyclic orders; the probabilities are given (logits = their logs). Question 1's model
    prefers letter A whatever it shows: plain argmax A (wrong), de-biased B (right). Question 2: plain C (right),
    de-biased A (wrong)."""
    t = task(multiple_choice_num_options=3, multiple_choice_eval_permutations="cyclic")
    q1 = {"question": "q1", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "B"}
    q2 = {"question": "q2", "options": {"A": "p", "B": "q", "C": "r"}, "answer": "C"}
    probs_by_shown_order = {  # the options shown at A, B, C -> the model's probabilities of the letters A, B, C
        ("x", "y", "z"): [0.5, 0.3, 0.2],
        ("z", "x", "y"): [0.5, 0.2, 0.3],
        ("y", "z", "x"): [0.6, 0.1, 0.3],
        ("p", "q", "r"): [0.2, 0.2, 0.6],
        ("r", "p", "q"): [0.1, 0.8, 0.1],
        ("q", "r", "p"): [0.3, 0.2, 0.5],
    }
    rows = []
    for raw in (q1, q2):
        for ex in t.expand(process(t, raw), False, random.Random(0)):
            shown = tuple(ex.metadata["options"][c] for c in "ABC")
            logits = [math.log(p) + 7.0 for p in probs_by_shown_order[shown]]
            plain = "ABC"[max(range(3), key=logits.__getitem__)]
            rows.append({"query": ex.query, "answers": ex.answers, "generation": plain, "passages": [{"id": "0"}],
                         "metadata": ex.metadata, "choice_logits": logits})  # fmt: skip
    written, extra = t.postprocess(rows)
    assert extra == {"debiased_accuracy": [1.0, 0.0]}
    assert [r["generation"] for r in written] == ["B", "A"]
    # x: (.5 + .2 + .3)/3, y: (.3 + .3 + .6)/3, z: (.2 + .5 + .1)/3, listed by the original letter
    assert written[0]["choice_probs"] == pytest.approx({"A": 1.0 / 3, "B": 0.4, "C": 0.8 / 3})
    all_probs = {"A": [0.5, 0.2, 0.3], "B": [0.3, 0.3, 0.6], "C": [0.2, 0.5, 0.1]}  # in the order of `permutations`
    assert written[0]["all_probs"].keys() == all_probs.keys()
    assert all(written[0]["all_probs"][k] == pytest.approx(v) for k, v in all_probs.items())
    # p: (.2 + .8 + .5)/3, q: (.2 + .1 + .3)/3, r: (.6 + .1 + .2)/3
    assert written[1]["choice_probs"] == pytest.approx({"A": 0.5, "B": 0.2, "C": 0.3})
    for row, question in zip(written, ("q1", "q2")):
        assert row["metadata"]["is_original"] and row["metadata"]["question"] == question
        assert row["metadata"]["options"] == (q1 if question == "q1" else q2)["options"]
        assert row["passages"] == [{"id": "0"}] and "choice_logits" not in row
        assert len(row["permutations"]) == 3 and all("passages" not in p for p in row["permutations"])
        assert [p["metadata"]["is_original"] for p in row["permutations"]] == [True, False, False]
    assert written[1]["permutations"][0]["generation"] == "C"  # the plain prediction stays in its permutation row


def test_identical_option_texts_stay_apart():
    """Two options read "none": the answer is the second one (C), told apart by position, not text."""
    t = task(multiple_choice_eval_permutations="cyclic")
    raw = {**ROW, "options": {"A": "none", "B": "4", "C": "none", "D": "5"}, "answer": "C"}
    perms = t.expand(process(t, raw), False, random.Random(0))
    assert [p.metadata["is_original"] for p in perms] == [True, False, False, False]
    assert [p.metadata["permutation"]["ABCD".index(p.answers[0])] for p in perms] == ["C"] * 4
    logits = [[5.0 if o == "C" else 0.0 for o in p.metadata["permutation"]] for p in perms]  # the model finds C
    rows = [{"query": p.query, "answers": p.answers, "generation": "A", "metadata": p.metadata, "choice_logits": x}
            for p, x in zip(perms, logits)]  # fmt: skip
    written, extra = t.postprocess(rows)
    assert extra == {"debiased_accuracy": [1.0]} and written[0]["generation"] == "C"
    low = 1 / (math.exp(5) + 3)  # softmax of (5, 0, 0, 0) in every order
    assert written[0]["choice_probs"] == pytest.approx({"A": low, "B": low, "C": 1 - 3 * low, "D": low})


def results_row(dataset, question, answer, plain, debiased, dict_logits=False):
    """A results row as the task writes it: plain = argmax of the original order's logits."""
    options = {c: f"{question} option {c}" for c in "ABCD"}
    logits = [3.0 if c == plain else 0.0 for c in "ABCD"]
    meta = {"question": question, "options": options, "answer": answer, "dataset": dataset, "is_original": True,
            "uid": question, "permutation": list("ABCD")}  # fmt: skip
    # A rotated order listed first whose top logit is on the gold letter: the scorer must not read it.
    decoy = {"generation": answer, "choice_logits": [3.0 if c == answer else 0.0 for c in "ABCD"],
             "metadata": {**meta, "is_original": False, "permutation": list("DABC")}}  # fmt: skip
    original = {"generation": plain, "choice_logits": dict(zip("ABCD", logits)) if dict_logits else logits,
                "metadata": meta}  # fmt: skip
    return {"query": question, "answers": [answer], "generation": debiased, "metadata": meta,
            "choice_probs": {}, "all_probs": {}, "permutations": [decoy, original]}  # fmt: skip


HAND_ROWS = [  # subject, question, gold, plain, de-biased
    ("abstract_algebra", "q1\x85(a NEL, which str.splitlines splits at)", "A", "A", "A"),
    ("abstract_algebra_test", "q2", "B", "C", "B"),  # prepare_mmlu.py's dataset names carry the split
    ("college_physics", "q3", "D", "D", "D"),
    ("philosophy", "q4", "A", "B", "A"),
    ("philosophy", "q5", "C", "B", "B"),
]


def table(stdout: str) -> dict[str, list[str]]:
    """The scorer's tables: subject -> [category, n, Acc, Debias Acc] and category -> [n, Acc, Debias Acc]."""
    out, in_categories = {}, False
    for line in stdout.splitlines()[2:]:  # after "predictions: ..." and the header
        if line.startswith("-"):
            in_categories = True
        elif not line.startswith("category"):
            name, *numbers = line.rsplit(maxsplit=3)
            subject, _, category = name.partition(" ")
            out.update({name.strip(): numbers} if in_categories else {subject: [category.strip(), *numbers]})
    return out


def test_scorer_on_hand_written_results(tmp_path):
    rows = [results_row(*r, dict_logits=r[1] == "q4") for r in HAND_ROWS]
    path = tmp_path / "combined_test-step-8.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = run([SCORER, "--predictions_path", str(path)])
    assert result.returncode == 0, result.stderr
    got = table(result.stdout)
    assert got["abstract_algebra"] == ["STEM", "2", "50.00", "100.00"]
    assert got["college_physics"] == ["STEM", "1", "100.00", "100.00"]
    assert got["philosophy"] == ["humanities", "2", "0.00", "50.00"]
    assert got["STEM"] == ["3", "66.67", "100.00"]
    assert got["humanities"] == ["2", "0.00", "50.00"]
    assert got["all"] == ["5", "40.00", "80.00"]
    assert "social sciences" not in got  # no question of it

    # --gold_path: gold letters from the data file (q5's changed to B), and every question must be predicted.
    gold = [{"question": q, "options": {c: f"{q} option {c}" for c in "ABCD"}, "answer": "B" if q == "q5" else a,
             "dataset": s} for s, q, a, _, _ in HAND_ROWS]  # fmt: skip
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    result = run([SCORER, "--predictions_path", str(path), "--gold_path", str(tmp_path / "gold.jsonl")])
    assert table(result.stdout)["philosophy"] == ["humanities", "2", "50.00", "100.00"]
    extra = {**gold[0], "question": "q6"}
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in [*gold, extra]))
    result = run([SCORER, "--predictions_path", str(path), "--gold_path", str(tmp_path / "gold.jsonl")])
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: 1 questions of {tmp_path}/gold.jsonl have no prediction (the first at " \
                                    f"{tmp_path}/gold.jsonl:6)"  # fmt: skip

    # 5-shot layout: one experiment directory per subject; other directories (the passage store) are ignored.
    save_dir = tmp_path / "five-shot"
    for subject in ("abstract_algebra", "philosophy"):
        (save_dir / subject).mkdir(parents=True)
        mine = [r for r in rows if r["metadata"]["dataset"].startswith(subject)]
        (save_dir / subject / f"{subject}.test-step-16.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    (save_dir / "passage_store").mkdir()
    result = run([SCORER, "--predictions_path", str(save_dir), "--step", "16", "--split", "test"])
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["all"] == ["4", "25.00", "75.00"]


def test_scorer_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = run([SCORER, "--predictions_path", str(missing)])
    assert result.returncode == 2 and result.stderr.strip() == f"error: {missing}: no such file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(results_row(*HAND_ROWS[0])) + "\n{oops\n")
    result = run([SCORER, "--predictions_path", str(bad)])
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:2: not valid JSON (Expecting property name enclosed in double " \
                                    "quotes at character 2)"  # fmt: skip
    bad.write_text(json.dumps({"query": "q", "generation": "A"}) + "\n")
    result = run([SCORER, "--predictions_path", str(bad)])
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {bad}:1: no 'permutations'")


@pytest.mark.skipif(not BENCH_MMLU.is_dir(), reason="needs the shared bench data (../shared/bench/mmlu)")
def test_train_and_evaluate_on_mmlu(demo, tmp_path):
    subjects = ("abstract_algebra", "philosophy", "sociology", "marketing")  # one per category
    rows = read_jsonl(BENCH_MMLU / "test.jsonl")
    sample = [r for s in subjects for r in [r for r in rows if r["dataset"] == s][:2]]
    eval_file = tmp_path / "mmlu_test.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in sample))
    common = [*demo_args(demo, tmp_path), "--task", "multiple_choice", "--n_context", "2", "--retriever_n_context",
              "2", "--target_maxlength", "8", "--generation_max_length", "4"]  # fmt: skip
    result = run(["train.py", *common, "--name", "mmlu", "--train_data", str(BENCH_MMLU / "dev.jsonl"),
                  "--multiple_choice_train_permutations", "all", "--total_steps", "2", "--per_gpu_batch_size", "2",
                  "--warmup_steps", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "mmlu/checkpoint/latest"
    result = run(["evaluate.py", *common, "--name", "mmlu-eval", "--model_path", str(checkpoint),
                  "--eval_data", str(eval_file), "--multiple_choice_eval_permutations", "cyclic", "--write_results",
                  "--per_gpu_batch_size", "4"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("mmlu_test/"))
    assert set(printed) == {"mmlu_test/accuracy", "mmlu_test/debiased_accuracy", "mmlu_test/eval_loss"}
    (out,) = (tmp_path / "mmlu-eval").glob("mmlu_test-step-*.jsonl")
    written = read_jsonl(out)
    assert [(r["metadata"]["question"], r["metadata"]["dataset"]) for r in written] == [
        (r["question"], r["dataset"]) for r in sample
    ]  # one row per question, in order
    for row in written:
        assert row["metadata"]["is_original"] and row["generation"] in "ABCD"
        assert set(row["choice_probs"]) == set("ABCD") and sum(row["choice_probs"].values()) == pytest.approx(1.0)
        assert all(len(ps) == 4 for ps in row["all_probs"].values())
        assert len(row["permutations"]) == 4 and sum(p["metadata"]["is_original"] for p in row["permutations"]) == 1
    # The printed metrics, recomputed from the written rows: every permutation's generation, each question's letter.
    perms = [p for r in written for p in r["permutations"]]
    accuracy = 100 * sum(p["generation"] == p["metadata"]["answer"] for p in perms) / len(perms)
    debiased = 100 * sum(r["generation"] == r["metadata"]["answer"] for r in written) / len(written)
    assert float(printed["mmlu_test/accuracy"]) == pytest.approx(accuracy, abs=0.01)
    assert float(printed["mmlu_test/debiased_accuracy"]) == pytest.approx(debiased, abs=0.01)
    result = run([SCORER, "--predictions_path", str(out), "--gold_path", str(eval_file)])
    assert result.returncode == 0, result.stderr
    got = table(result.stdout)
    assert got["all"][0] == "8" and float(got["all"][2]) == pytest.approx(debiased, abs=0.01)
    assert [got[s][:2] for s in subjects] == [["STEM", "2"], ["humanities", "2"], ["social sciences", "2"],
                                              ["other", "2"]]  # fmt: skip
