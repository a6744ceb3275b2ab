"""preprocessing/prepare_demo.py: the offline demo's data, reader and retriever (small world, scratch retriever)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "preprocessing") not in sys.path:
    sys.path.insert(0, str(ROOT / "preprocessing"))  # the scripts import their neighbours by bare name

import demo_world  # noqa: E402
import prepare_demo  # noqa: E402


def rebuild(demo: Path, out: Path) -> subprocess.CompletedProcess:
    """Build `out` with the options that built conftest's `demo` (small world, scratch retriever)."""
    manifest = json.loads((demo / prepare_demo.MANIFEST).read_text())
    options = ["--n_entities", str(manifest["n_entities"]), "--seed", str(manifest["seed"])]
    command = [sys.executable, "preprocessing/prepare_demo.py", "--output_directory", str(out), *options]
    return subprocess.run([*command, "--retriever", manifest["retriever"]], cwd=ROOT, capture_output=True, text=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(demo: Path) -> dict[str, list[dict]]:
    return {name: read_jsonl(demo / "data" / f"{name}.jsonl") for name in ("passages", "train", "dev")}


def test_files_have_the_task_fields(demo: Path, world: dict[str, list[dict]]) -> None:
    assert all(set(p) == {"id", "title", "section", "text"} for p in world["passages"])
    ids = [p["id"] for p in world["passages"]]
    assert len(set(ids)) == len(ids) and all(i.startswith("demo-") for i in ids)
    for split in ("train", "dev"):
        for example in world[split]:
            assert set(example) == {"question", "answers", "id", "gold_ids"}
            assert example["answers"] and set(example["gold_ids"]) <= set(ids)
    manifest = json.loads((demo / prepare_demo.MANIFEST).read_text())
    n_dev_people = round(manifest["n_entities"] / 10)
    assert len(world["dev"]) == 5 * n_dev_people  # one question per fact
    assert len(world["train"]) >= 5 * (manifest["n_entities"] - n_dev_people)
    assert manifest["counts"] == {name: len(rows) for name, rows in world.items()}


def test_dev_people_never_appear_in_train_questions(world: dict[str, list[dict]]) -> None:
    titles = {p["id"]: p["title"] for p in world["passages"]}
    dev_people = {titles[g] for e in world["dev"] for g in e["gold_ids"]}
    train_gold = {g for e in world["train"] for g in e["gold_ids"]}
    assert not train_gold & {g for e in world["dev"] for g in e["gold_ids"]}
    assert not any(name in e["question"] for e in world["train"] for name in dev_people)


def test_pretraining_text_is_about_train_people_only(demo: Path, world: dict[str, list[dict]]) -> None:
    """data/pretrain.jsonl: every fact of every train person, one a row; no dev person's name or dev-only fact value
    (else MLM pretraining could teach the reader dev answers), and ids no passage has (so retrieval never filters
    out the passage a masked fact can be copied from)."""
    rows = read_jsonl(demo / "data" / "pretrain.jsonl")
    assert all(set(row) == {"id", "title", "section", "text"} for row in rows)
    assert not {row["id"] for row in rows} & {p["id"] for p in world["passages"]}
    titles = {p["id"]: p["title"] for p in world["passages"]}
    dev_people = {titles[g] for e in world["dev"] for g in e["gold_ids"]}
    train_people = {titles[g] for e in world["train"] for g in e["gold_ids"]}
    assert {row["title"] for row in rows} == train_people and len(rows) == 5 * len(train_people)
    train_values = {a for e in world["train"] for a in e["answers"]}
    dev_only_values = {a for e in world["dev"] for a in e["answers"]} - train_values
    assert dev_people and dev_only_values
    text = (demo / "data" / "pretrain.jsonl").read_text()
    leaked = [w for w in dev_people | dev_only_values if re.search(rf"\b{re.escape(w)}\b", text)]
    assert leaked == []
    facts = {(row["title"], row["section"]): row["text"] for row in rows}
    assert len(facts) == len(rows)  # each fact once
    for e in world["train"]:  # every train answer is there to be masked
        assert any(e["answers"][0] in facts[titles[e["gold_ids"][0]], s] for s in demo_world.SECTIONS.values()), e


def test_every_answer_is_in_its_gold_passage(world: dict[str, list[dict]]) -> None:
    texts = {p["id"]: p["text"] for p in world["passages"]}
    for example in world["train"] + world["dev"]:
        assert all(example["answers"][0] in texts[g] for g in example["gold_ids"]), example


def test_same_seed_gives_identical_files(demo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    result = rebuild(demo, again)
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert [f for f in files if (demo / f).read_bytes() != (again / f).read_bytes()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary directory left behind


def test_facts_layout_gives_one_passage_per_fact() -> None:
    facts = demo_world.build_world(0, 40, layout="facts")
    by_id = {p["id"]: p for p in facts.passages}
    gold = [by_id[g] for q in facts.train + facts.dev for g in q["gold_ids"]]
    for question, passage in zip(facts.train + facts.dev, gold):
        assert question["answers"][0] in passage["text"] and passage["text"].count(".") == 1, passage
        assert passage["title"] in question["question"] and passage["section"] in demo_world.SECTIONS.values()
    people = {p["title"] for p in gold}
    assert len(people) == 40 and len({p["id"] for p in gold}) == 40 * len(demo_world.RELATIONS)
    assert [p["id"] for p in facts.passages] == [f"demo-{i}" for i in range(len(facts.passages))]


def test_other_seed_gives_another_world() -> None:
    first, second = demo_world.build_world(0, 40), demo_world.build_world(1, 40)
    assert first.passages != second.passages and first.dev != second.dev


def test_reader_tokenizer_has_t5_ids_and_sentinels(demo: Path, world: dict[str, list[dict]]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo / "models" / "reader")
    config = T5ForConditionalGeneration.config_class.from_pretrained(demo / "models" / "reader")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert len(set(sentinels)) == 100 and 2 not in sentinels and max(sentinels) < config.vocab_size
    assert len(tokenizer) <= config.vocab_size
    text = world["passages"][0]["text"]
    ids = tokenizer(f"{text} <extra_id_0>").input_ids
    assert ids[-2:] == [sentinels[0], tokenizer.eos_token_id] and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_reader_runs_a_fid_forward_pass(demo: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo / "models" / "reader")
    model = T5ForConditionalGeneration.from_pretrained(demo / "models" / "reader")
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # untied, as T5 v1.1
    B, N, L = 2, 3, 16
    inputs = tokenizer(["question: Where? answer: <extra_id_0> context: x"] * (B * N), padding="max_length",
                       max_length=L, truncation=True, return_tensors="pt")  # fmt: skip
    hidden = model.encoder(**inputs).last_hidden_state.view(B, N * L, -1)  # (B, N*L, D)
    labels = tokenizer(["<extra_id_0> a", "<extra_id_0> bc"], padding=True, return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    mask = inputs["attention_mask"].view(B, N * L)
    loss = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_scratch_retriever_embeds(demo: Path) -> None:
    directory = demo / "models" / "retriever"
    model, tokenizer = AutoModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert tokenizer("Where was X born?").input_ids[0] == tokenizer.cls_token_id
    vectors = prepare_demo.embed(model, tokenizer, ["a short one", "question: who? answer: <extra_id_0>"])
    assert vectors.shape == (2, model.config.hidden_size) and torch.isfinite(vectors).all()


def test_refuses_a_foreign_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_demo.main(["--output_directory", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "non-empty" in error
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_failed_build_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args, root: Path) -> dict:
        (root / "data").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_demo, "build_demo", fail)
    for name in ("set_verbosity_error", "disable_progress_bar"):  # keep transformers' logging as other tests expect
        monkeypatch.setattr(prepare_demo.hf_logging, name, lambda: None)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo.main(["--output_directory", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_publish_replaces_an_old_demo(tmp_path: Path) -> None:
    out, new = tmp_path / "out", tmp_path / "out.tmp-1"
    for directory, name in ((out, "old.txt"), (new, "new.txt")):
        directory.mkdir()
        (directory / prepare_demo.MANIFEST).write_text("{}")
        (directory / name).write_text(name)
    prepare_demo.check_output_directory(out)  # a demo may be overwritten
    prepare_demo.publish(new, out)
    assert sorted(p.name for p in out.iterdir()) == [prepare_demo.MANIFEST, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
