"""The corpus tasks mlm, lm and section (rows are passages of the retrieval corpus) and ROUGE.

Expected values are computed independently: span statistics against the exact distribution of a uniform random
composition, split points against the original's bounds, ROUGE by hand; end to end, the rows written by train.py and
evaluate.py never contain their own passage, which an unfiltered search would have found.
"""

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from src.batching import Tokenizers, decode, target_tokens
from src.errors import UserError
from src.metrics import rouge
from src.tasks import build_task
from tests.conftest import demo_args
from tests.conftest import run_script as run

SENTINEL = re.compile(r"<extra_id_(\d+)>")


class WordTokenizer:
    """A word-level stand-in for a T5 tokenizer (one token per word, sentinels <extra_id_i>), so that span lengths
    in tokens can be read off the decoded strings. It has what the mlm task calls: __call__, decode,
    convert_tokens_to_ids and unk_token_id."""

    unk_token_id = 0

    def __init__(self, n_sentinels: int = 100) -> None:
        self.words = ["<unk>"] + [f"<extra_id_{i}>" for i in range(n_sentinels)]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def _id(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words)
            self.words.append(word)
        return self.ids[word]

    def __call__(self, text, add_special_tokens=True, max_length=None, truncation=False):
        ids = [self._id(w) for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.ids.get(token, self.unk_token_id)

    def decode(self, ids, skip_special_tokens=False) -> str:
        return " ".join(self.words[i] for i in ids if not (skip_special_tokens and SENTINEL.fullmatch(self.words[i])))


def corrupt(task, words: list[str], seed: int) -> tuple[list[list[str]], list[list[str]], list[int], list[int]]:
    """Process a passage of `words`; return the kept and noise spans (as words) and the sentinel numbers read in the
    query and in the target."""
    ex = task.process({"id": "p", "text": " ".join(words)}, "t.jsonl:1", random.Random(seed))
    query_sentinels = [int(m) for m in SENTINEL.findall(ex.query)]
    target_sentinels = [int(m) for m in SENTINEL.findall(ex.target)]
    assert ex.query.split()[-1].startswith("<extra_id_") and ex.target.split()[0] == "<extra_id_0>"
    kept = [part.split() for part in SENTINEL.split(ex.query)[0::2][:-1]]
    noise = [part.split() for part in SENTINEL.split(ex.target)[2::2]]
    return kept, noise, query_sentinels, target_sentinels


@pytest.mark.parametrize("density,mean", [(0.15, 3), (0.5, 2), (0.9, 1), (0.05, 10), (0.3, 0.5)])
def test_span_corruption_counts_order_and_reconstruction(density, mean):
    task = build_task("mlm", {"mlm_noise_density": density, "mlm_mean_noise_span_length": mean}, WordTokenizer())
    rng = random.Random(1)
    for draw in range(300):
        n = rng.randint(2, 120)
        words = [f"w{i}" for i in range(n)]
        kept, noise, q_sentinels, t_sentinels = corrupt(task, words, draw)
        # The documented counts: T5's bounds, and spans that are non-empty and separated.
        n_noise = min(max(round(n * density), 1), n - 1)
        n_spans = min(max(round(n_noise / mean), 1), n_noise, n - n_noise)
        assert q_sentinels == t_sentinels == list(range(n_spans))
        assert sum(map(len, noise)) == n_noise and all(kept) and all(noise)
        # Non-noise first, noise last; putting the spans back gives the text.
        assert [w for k, s in zip(kept, noise) for w in k + s] == words


def test_span_lengths_follow_a_uniform_random_composition():
    """Over many draws, noise fraction and mean span length match the flags, and each span's length has the law of
    a part of a uniformly random composition: P(first part = k) = C(N-k-1, S-2) / C(N-1, S-1)."""
    task = build_task("mlm", {}, WordTokenizer())
    n_draws, n = 3000, 60  # 9 noise tokens in 3 spans, 51 kept tokens in 3 spans
    first_noise, last_noise, first_kept = Counter(), Counter(), []
    noise_tokens = spans = 0
    for draw in range(n_draws):
        kept, noise, _, _ = corrupt(task, [f"w{i}" for i in range(n)], draw)
        first_noise[len(noise[0])] += 1
        last_noise[len(noise[-1])] += 1
        first_kept.append(len(kept[0]))
        noise_tokens += sum(map(len, noise))
        spans += len(noise)
    assert noise_tokens / (n * n_draws) == pytest.approx(0.15, abs=0.5 / n)  # rounding of n * density only
    assert noise_tokens / spans == pytest.approx(3, abs=0.5)

    def law(total, parts):
        return {k: math.comb(total - k - 1, parts - 2) / math.comb(total - 1, parts - 1) for k in range(1, total)}

    for counts in (first_noise, last_noise):
        for k, p in law(9, 3).items():
            assert abs(counts[k] / n_draws - p) <= 5 * math.sqrt(p * (1 - p) / n_draws), (k, counts[k], p)
    kept_law = law(51, 3)
    mean = sum(k * p for k, p in kept_law.items())
    sd = math.sqrt(sum(k * k * p for k, p in kept_law.items()) - mean**2)
    assert abs(sum(first_kept) / n_draws - mean) < 5 * sd / math.sqrt(n_draws)


def test_span_corruption_is_reproducible_per_rng_and_handles_tiny_texts():
    task = build_task("mlm", {}, WordTokenizer())
    row = {"id": 3, "text": " ".join(f"w{i}" for i in range(40))}
    assert task.process(row, "t:1", random.Random("0-1-2")) == task.process(row, "t:1", random.Random("0-1-2"))
    assert len({task.process(row, "t:1", random.Random(s)).query for s in range(20)}) > 10
    two = task.process({"id": "p", "text": "a b"}, "t:1", random.Random(0))
    assert (two.query, two.target, two.answers) == ("a <extra_id_0>", "<extra_id_0> b", ["b"])
    assert task.process({"id": "p", "text": "a"}, "t:1", random.Random(0)) is None  # nothing left to keep
    few = build_task("mlm", {"text_maxlength": 10}, WordTokenizer(n_sentinels=2))
    kept, noise, sentinels, _ = corrupt(few, [f"w{i}" for i in range(50)], 0)  # truncated to 10, at most 2 spans
    assert [w for k, s in zip(kept, noise) for w in k + s] == [f"w{i}" for i in range(10)] and sentinels == [0]


def test_mlm_on_the_t5_tokenizer(demo):
    """With the demo's sentencepiece T5 tokenizer: sentinels in order, the query with the spans put back is the
    (truncated) text, and a generation of exactly the target, as the evaluation loop decodes it, scores 100."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "models/reader")
    task = build_task("mlm", {"text_maxlength": 24, "mlm_noise_density": 0.3}, tokenizer)
    rows = [json.loads(line) for line in (demo / "data/passages.jsonl").read_text().splitlines()]
    for seed, row in enumerate(rows):
        ex = task.process(row, "passages.jsonl:1", random.Random(seed))
        q_parts, t_parts = SENTINEL.split(ex.query), SENTINEL.split(ex.target)
        n_spans = len(q_parts) // 2
        assert q_parts[1::2] == t_parts[1::2] == [str(i) for i in range(n_spans)] and q_parts[-1] == t_parts[0] == ""
        ids = tokenizer(row["text"], add_special_tokens=False).input_ids[:24]
        assert "".join(k + s for k, s in zip(q_parts[0::2], t_parts[2::2])) == tokenizer.decode(ids)
        labels = target_tokens(Tokenizers(tokenizer, None), [ex.target], None)
        generation = decode(Tokenizers(tokenizer, None), labels)[0]
        assert task.evaluate(generation, ex.answers) == {k: 1.0 for k in task.metrics if k != "eval_loss"}
        assert "<extra_id" not in ex.answers[0]
        assert ex.metadata["id"] == row["id"] and ex.metadata["target"] == ex.target
        assert ex.metadata["clean_target"] == row["text"]


def test_mlm_needs_the_reader_tokenizer_and_sane_flags():
    with pytest.raises(UserError, match=r"task 'mlm' needs the reader's tokenizer: pass --reader_model_type"):
        build_task("mlm", {}, None)
    with pytest.raises(UserError, match="--mlm_noise_density"):
        build_task("mlm", {"mlm_noise_density": 1.5}, WordTokenizer())
    with pytest.raises(UserError, match="--mlm_mean_noise_span_length"):
        build_task("mlm", {"mlm_mean_noise_span_length": 0}, WordTokenizer())


def piece_bounds(text: str, min_ratio: float, max_ratio: float) -> tuple[list[str], int, int]:
    """The original lm.split: pieces of re.split(r"(\\S+)"), split point in [low, high] (ATLAS_REFERENCE §7)."""
    pieces = re.split(r"(\S+)", text)
    low = int(max(2, len(pieces) * min_ratio))
    return pieces, low, int(max(min(len(pieces) - 2, len(pieces) * max_ratio), low + 1))


@pytest.mark.parametrize("ratios", [(0.5, 0.5), (0.2, 0.8), (0.1, 0.3), (0.9, 0.9)])
def test_lm_split_points_cover_the_original_bounds(ratios):
    task = build_task("lm", {"min_lm_context_ratio": ratios[0], "max_lm_context_ratio": ratios[1]})
    for n_words in (1, 2, 3, 5, 12, 40):
        text = " ".join(f"w{i}" for i in range(n_words)) + ".\n"
        pieces, low, high = piece_bounds(text, *ratios)
        examples = [task.process({"id": "p", "text": text}, "t:1", random.Random(s)) for s in range(600)]
        if high > len(pieces) - 2:  # the target could be left without a word
            assert all(ex is None for ex in examples)
            continue
        seen = set()
        for ex in examples:
            splits = [k for k in range(len(pieces) + 1) if "".join(pieces[:k]) == ex.query]
            assert ex.query + ex.target == text and ex.target.split() and ex.query.split()
            assert ex.answers == [" ".join(ex.target.split())] and ex.metadata == {"id": "p"}
            seen.add(max(splits))
        assert min(seen) == low and max(seen) == high and seen <= set(range(low, high + 1))
    two_words = build_task("lm", {}).process({"id": "p", "text": "one two"}, "t:1", random.Random(0))
    assert (two_words.query.strip(), two_words.answers) == ("one", ["two"])


def test_section_query_target_and_rows_without_section():
    task = build_task("section", {})
    row = {"id": 7, "title": "Orchid", "section": "Description", "text": "Orchids  are\nplants.", "url": "x"}
    ex = task.process(row, "t:1", random.Random(0))
    assert (ex.query, ex.target, ex.answers, ex.metadata) == (
        "Orchid, Description", "Orchids  are\nplants.", ["Orchids are plants."], {"id": "7"}
    )  # fmt: skip
    for section in ("", "  ", None):
        assert task.process({**row, "section": section}, "t:1", random.Random(0)) is None
    del row["section"]
    assert task.process(row, "t:1", random.Random(0)) is None
    with pytest.raises(UserError, match="t:1: field 'section' of task 'section' must be a string"):
        task.process({**row, "section": 3}, "t:1", random.Random(0))


@pytest.mark.parametrize("name", ["mlm", "lm", "section"])
def test_min_words_empty_text_and_missing_fields(name):
    row = {"id": "p", "title": "T", "section": "S", "text": "one two three four five"}
    options = {"min_words_per_lm_instance": 6}
    tokenizer = WordTokenizer()
    assert build_task(name, options, tokenizer).process(row, "t:1", random.Random(0)) is None
    task = build_task(name, {"min_words_per_lm_instance": 5}, tokenizer)
    assert task.filter_by_id and task.process(row, "t:1", random.Random(0)).metadata["id"] == "p"
    for text in ("", " \n "):
        assert task.process({**row, "text": text}, "t:1", random.Random(0)) is None
    for field in ("id", "text"):
        with pytest.raises(UserError, match=f"t.jsonl:4: task '{name}' needs the field '{field}'"):
            task.process({k: v for k, v in row.items() if k != field}, "t.jsonl:4", random.Random(0))


def test_rouge_by_hand():
    # unigrams: 5 of 6 shared; bigrams: "the cat", "on the", "the mat" of 5; LCS "the cat on the mat" = 5 of 6.
    assert rouge("The cat sat on the mat.", ["the cat is on the mat"]) == pytest.approx(
        {"rouge_1": 5 / 6, "rouge_2": 3 / 5, "rouge_L": 5 / 6}
    )
    # Best over answers, per metric: "d c b a" has every word (rouge_1 1, rouge_2 0, LCS 1 of 4);
    # "a b x y" shares "a b" (rouge_1 1/2, rouge_2 1/3, LCS 2 of 4).
    assert rouge("a b c d", ["d c b a", "a b x y", ""]) == pytest.approx(
        {"rouge_1": 1.0, "rouge_2": 1 / 3, "rouge_L": 1 / 2}
    )
    assert rouge("", ["a"]) == rouge("a", [""]) == {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_L": 0.0}


def test_corpus_task_scores():
    task = build_task("section", {})
    assert task.metrics == ("eval_loss", "accuracy", "f1", "rouge_1", "rouge_2", "rouge_L")
    scores = task.evaluate("The cat, on the mat", ["the cat on the mat"])
    assert scores["accuracy"] == 0.0 and scores["f1"] == 1.0  # accuracy is a raw string match; F1 normalises
    assert scores["rouge_1"] == scores["rouge_L"] == 1.0


# End to end: train.py (2 steps, evaluation at step 2) for each task, evaluate.py, and unfiltered retrieval.

FLAGS = [
    *("--total_steps", "2", "--eval_freq", "2", "--per_gpu_batch_size", "2", "--generation_max_length", "8"),
    *("--target_maxlength", "16", "--n_context", "2", "--retriever_n_context", "2", "--write_results"),
    *("--min_words_per_lm_instance", "5", "--mlm_noise_density", "0.3"),
]


@pytest.fixture(scope="module")
def corpus(demo, tmp_path_factory) -> dict:
    """A few demo passages to evaluate on (some without a section) plus one too short for --min_words 5."""
    root = tmp_path_factory.mktemp("corpus")
    rows = [json.loads(line) for line in (demo / "data/passages.jsonl").read_text().splitlines()]
    few = rows[:6] + [{"id": "short", "title": "Short", "section": "Stub", "text": "Only four words here."}]
    (root / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in few))
    return {"root": root, "rows": rows, "few": few, "passages": demo / "data/passages.jsonl"}


@pytest.fixture(scope="module", params=["mlm", "lm", "section"])
def trained(request, demo, corpus) -> tuple[str, Path]:
    task, root = request.param, corpus["root"]
    args = demo_args(demo, root) + FLAGS + ["--task", task, "--name", task, "--eval_data", str(root / "few.jsonl")]
    args += ["--train_data", str(corpus["passages"])]
    result = run(["train.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return task, root / task


def check_rows(task: str, rows: list[dict], few: list[dict], demo: Path) -> None:
    """One row per usable passage, its own passage never among the retrieved ones, query and answer as the task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "models/reader")
    usable = [r for r in few if r["id"] != "short" and (task != "section" or r["section"])]
    assert [row["id"] for row in rows] == [r["id"] for r in usable]
    for row, raw in zip(rows, usable):
        assert len(row["passages"]) == 2 and row["id"] not in [p["id"] for p in row["passages"]]
        if task == "section":
            assert row["query"] == f"{raw['title']}, {raw['section']}"
        elif task == "lm":
            assert raw["text"].startswith(row["query"]) and row["answers"] == [raw["text"][len(row["query"]) :].strip()]
        else:  # --mlm_noise_density 0.3 and --text_maxlength 64 reach the task: the number of spans says so
            n = min(len(tokenizer(raw["text"], add_special_tokens=False).input_ids), 64)
            n_noise = round(n * 0.3)
            assert len(SENTINEL.findall(row["query"])) == min(round(n_noise / 3), n - n_noise)
            assert "<extra_id" not in row["answers"][0] and row["metadata"]["target"].startswith("<extra_id_0>")


def test_each_task_trains_and_evaluates_without_its_own_passage(demo, trained, corpus):
    task, run_dir = trained
    log = (run_dir / "run.log").read_text()
    step2 = [line for line in log.splitlines() if "few.jsonl step 2 |" in line]
    assert step2 and all(f"{m} " in step2[0] for m in ("accuracy", "eval_loss", "f1", "rouge_1", "rouge_2", "rouge_L"))
    assert (run_dir / "checkpoint/latest/model.pth.tar").is_file()
    rows = [json.loads(line) for line in (run_dir / "few-step-2.jsonl").read_text().splitlines()]
    check_rows(task, rows, corpus["few"], demo)


@pytest.mark.parametrize("trained", ["mlm"], indirect=True)  # once, with the task that needs the reader's tokenizer
def test_evaluate_prints_corpus_metrics(demo, corpus, trained):
    task, run_dir = trained
    root = corpus["root"]
    args = (
        demo_args(demo, root) + FLAGS + ["--task", task, "--name", "mlm-eval", "--eval_data", str(root / "few.jsonl")]
    )
    result = run(["evaluate.py", *args, "--model_path", str(run_dir / "checkpoint/latest")])
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("few/"))
    assert set(printed) == {f"few/{m}" for m in ("accuracy", "eval_loss", "f1", "rouge_1", "rouge_2", "rouge_L")}
    rows = [json.loads(line) for line in (root / "mlm-eval/few-step-0.jsonl").read_text().splitlines()]
    check_rows(task, rows, corpus["few"], demo)


def test_unfiltered_retrieval_would_find_the_own_passage(demo, corpus):
    """The same passages under other ids are not filtered: the search finds their own text (recall by answer
    string, and the id) for most of them, while with their real ids it never returns it."""
    root = corpus["root"]
    renamed = root / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({**r, "id": f"copy-{r['id']}"}) + "\n" for r in corpus["rows"]))
    args = demo_args(demo, root) + ["--task", "lm", "--name", "retrieve", "--retrieve_only", "--write_results"]
    args += ["--n_context", "5", "--eval_data", str(corpus["passages"]), str(renamed)]
    result = run(["evaluate.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split(": ") for line in result.stdout.splitlines())
    assert float(printed["passages/recall@5"]) == 0.0 and float(printed["renamed/recall@5"]) >= 50.0
    for name, prefix in (("passages", ""), ("renamed", "copy-")):
        rows = [json.loads(line) for line in (root / f"retrieve/{name}-step-0.jsonl").read_text().splitlines()]
        found = [row["id"].removeprefix(prefix) in [p["id"] for p in row["passages"]] for row in rows]
        assert len(rows) == len(corpus["rows"]) and all(len(row["passages"]) == 5 for row in rows)
        assert sum(found) == 0 if name == "passages" else sum(found) >= len(rows) / 2
