"""The README's path for a user with a mirror of the (closed) Atlas bucket: download a released model and index from
a file:// mirror, convert the index, evaluate, finetune 2 steps, export to Hugging Face, load the export in plain
transformers and back here. The "release" is synthetic: a tiny checkpoint in the original's format and an index in the
original's layout whose embeddings were computed with the original's encoder formula."""

import json
import pickle

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, T5ForConditionalGeneration

from tests.conftest import run_script
from tests.test_released_checkpoint import original_contriever, write_released_checkpoint

N_SHARDS = 128  # the release's shard count (download_index.py fetches exactly these files)
TEXT_MAXLENGTH = 64


def write_release(demo, mirror) -> dict:
    """models/atlas/base/model.pth.tar and indices/atlas/wiki/base/{passages,embeddings}.{i}.pt under `mirror`."""
    model_dir = mirror / "models/atlas/base"
    model_dir.mkdir(parents=True)
    state = write_released_checkpoint(demo, model_dir / "model.pth.tar")
    passages = [json.loads(line) for line in (demo / "data/passages.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(demo / "models/retriever")
    config = AutoModel.from_pretrained(demo / "models/retriever").config
    # the original titled passages "{title}: {section}" in place before embedding them, and saved them so
    for p in passages:
        if p.get("section"):
            p["title"] = f"{p['title']}: {p['section']}"
    batch = tokenizer([f"{p['title']} {p['text']}" for p in passages], padding=True, truncation=True,
                      max_length=TEXT_MAXLENGTH, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        embeddings = original_contriever(state, config, batch["input_ids"], batch["attention_mask"]).half()  # (N, d)
    index_dir = mirror / "indices/atlas/wiki/base"
    index_dir.mkdir(parents=True)
    for shard, rows in enumerate(np.array_split(np.arange(len(passages)), N_SHARDS)):
        (index_dir / f"passages.{shard}.pt").write_bytes(pickle.dumps([passages[i] for i in rows]))
        torch.save(embeddings[torch.as_tensor(rows, dtype=torch.long)].T.clone(), index_dir / f"embeddings.{shard}.pt")
    return {"state": state, "embeddings": embeddings.float(), "ids": [p["id"] for p in passages], "config": config}


def evaluate(demo, tmp_path, name, *model_flags):
    index = tmp_path / "data/indices/atlas/wiki/base-converted"
    result = run_script([
        "evaluate.py", "--task", "qa", *model_flags, "--load_index_path", str(index),
        "--eval_data", str(demo / "data/dev.jsonl"), "--n_context", "2", "--text_maxlength", str(TEXT_MAXLENGTH),
        "--generation_max_length", "6", "--checkpoint_dir", str(tmp_path / "runs"), "--name", name, "--write_results",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "dev-step-0.jsonl").read_text().splitlines()]
    metrics = [line for line in result.stdout.splitlines() if line.startswith("dev/")]
    return result, rows, metrics


def test_readme_path_from_a_mirror_to_an_exported_model(demo, tmp_path):
    release = write_release(demo, tmp_path / "mirror")
    base = (tmp_path / "mirror").as_uri()
    data = tmp_path / "data"
    got = run_script(["preprocessing/download_model.py", "--model", "models/atlas/base", "--output_directory",
                      str(data), "--base_url", base])  # fmt: skip
    assert got.returncode == 0, got.stderr
    got = run_script(["preprocessing/download_index.py", "--index", "indices/atlas/wiki/base", "--output_directory",
                      str(data), "--base_url", base, "--convert"])  # fmt: skip
    assert got.returncode == 0, got.stderr
    converted = json.loads((data / "indices/atlas/wiki/base-converted/index.json").read_text())
    assert converted["retriever_layernorm"] == "uncentered" and converted["n_passages"] == len(release["ids"])

    # evaluate the released model: the retriever is the original's (auto -> uncentered), so it finds what the
    # original's query embeddings find in the original's index
    released = ["--model_path", str(data / "models/atlas/base"), "--reader_model_type", str(demo / "models/reader"),
                "--retriever_model_path", str(demo / "models/retriever")]  # fmt: skip
    result, rows, metrics = evaluate(demo, tmp_path, "released", *released)
    assert "retriever LayerNorm: uncentered (a released Atlas checkpoint" in result.stderr
    assert any(m.startswith("dev/exact_match:") for m in metrics)
    tokenizer = AutoTokenizer.from_pretrained(demo / "models/retriever")
    questions = [json.loads(line)["question"] for line in (demo / "data/dev.jsonl").read_text().splitlines()]
    queries = [f"question: {q} answer: <extra_id_0>" for q in questions]  # the original's QA query, rows in order
    batch = tokenizer(queries, padding=True, truncation=True, max_length=TEXT_MAXLENGTH, return_tensors="pt")
    with torch.no_grad():
        scores = original_contriever(release["state"], release["config"], batch["input_ids"], batch["attention_mask"])
    scores = scores @ release["embeddings"].T  # (n_questions, N)
    row_of = {pid: i for i, pid in enumerate(release["ids"])}
    ours = scores[torch.arange(len(rows)), torch.tensor([row_of[row["passages"][0]["id"]] for row in rows])]
    # our top-1 is the brute-force best passage (up to a near-tie in float rounding)
    torch.testing.assert_close(ours, scores.max(dim=1).values, atol=1e-3, rtol=1e-4)
    # the standard LayerNorm would not match the index: refused in one line
    index = data / "indices/atlas/wiki/base-converted"
    wrong = run_script(["evaluate.py", "--task", "qa", *released, "--uncentered_layernorm", "off", "--load_index_path",
                        str(index), "--eval_data", str(demo / "data/dev.jsonl"),
                        "--checkpoint_dir", str(tmp_path / "runs"), "--name", "wrong"])  # fmt: skip
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1].startswith("error: --load_index_path")

    # finetune it 2 steps (query-side: the released index stays valid); our checkpoint records the LayerNorm used
    got = run_script(["train.py", "--task", "qa", *released, "--load_index_path", str(index),
                      "--train_data", str(demo / "data/train.jsonl"), "--n_context", "2", "--text_maxlength",
                      str(TEXT_MAXLENGTH), "--per_gpu_batch_size", "2", "--total_steps", "2", "--train_retriever",
                      "--query_side_retriever_training", "--checkpoint_dir", str(tmp_path / "runs"),
                      "--name", "finetuned"])  # fmt: skip
    assert got.returncode == 0, got.stderr
    trained = tmp_path / "runs/finetuned/checkpoint/latest"
    state = torch.load(trained / "model.pth.tar", weights_only=True)
    assert state["opt"]["uncentered_layernorm"] == "on"

    # export, then plain transformers: the same weights in standard classes
    hf = data / "hf"
    got = run_script(["preprocessing/export_hf.py", "--model_path", str(trained), "--output_directory", str(hf)])
    assert got.returncode == 0, got.stderr
    card = (hf / "README.md").read_text()
    assert "uncentered" in card and "Measured on 16 sample texts" in card
    assert json.loads((hf / "retriever/config.json").read_text())["atlas_uncentered_layernorm"] is True
    difference = json.loads((hf / "atlas_export.json").read_text())["layernorm_difference"]
    assert 0 < difference["min_cosine"] <= difference["mean_cosine"] < 1
    model = state["model"]
    reference = T5ForConditionalGeneration.from_pretrained(demo / "models/reader").eval()
    reference.load_state_dict({k.removeprefix("reader."): v for k, v in model.items() if k.startswith("reader.")})
    exported = T5ForConditionalGeneration.from_pretrained(hf / "reader").eval()
    reader_tokenizer = AutoTokenizer.from_pretrained(hf / "reader")
    inputs = reader_tokenizer([f"{queries[0]} title: x context: y"], return_tensors="pt")
    labels = reader_tokenizer(["<extra_id_0> z"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs, labels=labels).logits, reference(**inputs, labels=labels).logits)
    for part, prefix in (("retriever", "query_contriever"), ("passage_retriever", "passage_contriever")):
        plain = AutoModel.from_pretrained(hf / part, add_pooling_layer=False)
        for key, value in plain.state_dict().items():
            assert torch.equal(value, model[f"retriever.{prefix}.{key}"]), (part, key)

    # and back here: the export evaluates as the finetuned checkpoint does
    _, trained_rows, trained_metrics = evaluate(
        demo, tmp_path, "finetuned_eval", "--model_path", str(trained), *released[2:]
    )
    _, export_rows, export_metrics = evaluate(demo, tmp_path, "export", "--model_path", str(hf))
    assert export_metrics == trained_metrics
    assert [r["passages"] for r in export_rows] == [r["passages"] for r in trained_rows]
