"""Tests for src/options.py: seed flags, defaults, aliases, --closed_book, validation, refresh schedule, round trip."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
from pathlib import Path

import pytest
import torch

from src import options
from src.config import AtlasConfig, EvalConfig, IndexConfig, ModelConfig, TrainConfig
from src.gold_scores import GOLD_SCORE_ALIASES, GOLD_SCORE_FNS, GOLD_SCORE_MODES
from src.index.refresh import parse_refresh_schedule, refresh_due
from src.options import (
    READER_MODEL_TYPES,
    build_parser,
    build_settings,
    options_from_dict,
    options_to_dict,
    parse_options,
    parse_settings,
)
from src.reader import ATTENTION as READER_ATTENTION
from src.tasks import ORIGINAL_TASKS, TASKS, UNIMPLEMENTED_TASKS, Task

SEED_README = Path(__file__).resolve().parents[1] / ".." / "shared" / "seed" / "atlas_README.md"

# Flag names of the original's usage line (seed README, "Full list of command line flags").
_SEED_FLAG_TEXT = """
name checkpoint_dir model_path per_gpu_batch_size per_gpu_embedder_batch_size local_rank main_port seed log_freq
eval_freq save_freq train_data eval_data write_results dont_write_passages load_index_path save_index_path
save_index_n_shards index_mode faiss_index_type faiss_code_size reader_model_type text_maxlength target_maxlength
n_context passages max_passages retriever_model_path retrieve_only train_retriever use_file_passages
retriever_n_context gold_score_mode closed_book temperature_score temperature_gold compute_crossattention_stats
filtering_overretrieve_ratio freeze_retriever_steps query_side_retriever_training retrieve_with_rerank
n_to_rerank_with_retrieve_with_rerank decoder_format decoder_prompt_format encoder_format retriever_format
generation_max_length generation_min_length generation_length_penalty generation_num_beams task mlm_noise_density
mlm_mean_noise_span_length min_words_per_lm_instance min_lm_context_ratio max_lm_context_ratio qa_prompt_format
multiple_choice_num_options multiple_choice_train_permutations multiple_choice_eval_permutations warmup_steps
total_steps scheduler_steps accumulation_steps dropout lr lr_retriever clip scheduler weight_decay save_optimizer
epsilon alpha beta2 refresh_index shuffle precision shard_optim shard_grads use_gradient_checkpoint_reader
use_gradient_checkpoint_retriever
"""
SEED_FLAGS = _SEED_FLAG_TEXT.split()
NEW_FLAGS = ["faiss_nprobe", "uncentered_layernorm", "kl_reduction", "emdr_mixture", "passage_store_dir",
             "reader_attention", "compile"]  # fmt: skip
DATA = ["--train_data", "t.jsonl", "--eval_data", "e.jsonl"]  # train.py and evaluate.py need data files
BASE = ["--reader_model_type", "t5-small", "--passages", "p.jsonl", *DATA]
MODES = ["train", "evaluate"]


def _sample_args(parser: argparse.ArgumentParser, flag: str) -> list[str]:
    """A valid command-line fragment for one flag."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    if action.nargs == 0:
        return [flag]
    if flag == "--reader_model_type":
        return [flag, "google/t5-base-lm-adapt"]
    if flag == "--refresh_index":
        return [flag, "0-100:10,100-1000000:500"]
    if action.choices:
        return [flag, str(list(action.choices)[-1])]
    if action.type is int:
        return [flag, "3"]
    if action.type is float:
        return [flag, "0.25"]
    if action.nargs == "+":
        return [flag, "a.jsonl", "b.jsonl"]
    return [flag, "some_value"]


def _error(capsys: pytest.CaptureFixture, argv: list[str], mode: str = "train") -> str:
    """Run parse_options expecting a usage error; return the error line."""
    with pytest.raises(SystemExit) as exc:
        parse_options(argv, mode)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    return err.strip().splitlines()[-1]


def test_seed_flag_list_size() -> None:
    assert len(SEED_FLAGS) == len(set(SEED_FLAGS)) == 81


@pytest.mark.parametrize("mode", MODES)
def test_every_flag_parses_and_is_in_help(mode: str) -> None:
    parser = build_parser(mode)
    assert parser.prog == f"{mode}.py"
    help_text = parser.format_help()
    for name in SEED_FLAGS + NEW_FLAGS:
        flag = "--" + name
        assert re.search(re.escape(flag) + r"\b", help_text), flag
        argv = _sample_args(parser, flag)
        opt = parser.parse_args(argv)
        assert hasattr(opt, name)


@pytest.mark.skipif(not SEED_README.exists(), reason="seed README not available")
def test_seed_readme_usage_flags_all_defined() -> None:
    text = SEED_README.read_text()
    section = text[text.index("## Full list of command line flags") :]
    usage = section[section.index("usage:") : section.index("optional arguments")]
    flags = set(re.findall(r"(?<![\w-])--(\w+)", usage))
    assert flags == set(SEED_FLAGS)
    parser = build_parser("train")
    defined = {s for a in parser._actions for s in a.option_strings}
    assert {"--" + f for f in flags} <= defined


@pytest.mark.parametrize(
    "name,value",
    [
        ("lr", 1e-4),
        ("lr_retriever", 1e-5),
        ("warmup_steps", 1000),
        ("total_steps", 1000),
        ("text_maxlength", 200),
        ("n_context", 1),
        ("retriever_n_context", 5),
        ("temperature_score", 0.01),
        ("temperature_gold", 0.01),
        ("filtering_overretrieve_ratio", 2),
        ("n_to_rerank_with_retrieve_with_rerank", 128),
        ("save_index_n_shards", 128),
        ("per_gpu_embedder_batch_size", 512),
        ("scheduler", "cosine"),
        ("weight_decay", 0.1),
        ("epsilon", 1e-6),
        ("beta2", 0.999),
        ("qa_prompt_format", "question: {question} answer: <extra_id_0>"),
        ("refresh_index", "-1"),
        ("gold_score_mode", "ppmean"),
        ("encoder_format", "{query} title: {title} context: {text}"),
        ("retriever_format", "{title} {text}"),
        ("retriever_model_path", "facebook/contriever"),
        ("model_path", "none"),
        ("index_mode", "flat"),
        ("faiss_index_type", "flat"),
        ("precision", "fp32"),
        ("target_maxlength", None),
        ("kl_reduction", "mean"),
        ("emdr_mixture", "token"),
        ("faiss_nprobe", None),
        ("passage_store_dir", None),
        ("uncentered_layernorm", "auto"),
    ],
)
def test_defaults_match_seed(name: str, value: object) -> None:
    opt = parse_options(BASE, "train")
    assert getattr(opt, name) == value


@pytest.mark.parametrize("argv,value", [([], "auto"), (["--uncentered_layernorm"], "on"),
                                        (["--uncentered_layernorm", "off"], "off")])  # fmt: skip
def test_uncentered_layernorm_flag(argv: list[str], value: str) -> None:
    """The bare flag (the only spelling before auto existed) still means on."""
    assert parse_options(BASE + argv, "train").uncentered_layernorm == value


@pytest.mark.parametrize("alias,canonical", [("pdist", "ppmean"), ("adist", "evalnormsum")])
def test_gold_score_aliases(alias: str, canonical: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="src.options"):
        opt = parse_options(BASE + ["--gold_score_mode", alias], "train")
    assert opt.gold_score_mode == canonical
    assert alias in caplog.text and canonical in caplog.text


@pytest.mark.parametrize("mode", ["ppmean", "evalnormsum", "loop", "emdr"])
def test_gold_score_modes_unchanged(mode: str) -> None:
    assert parse_options(BASE + ["--gold_score_mode", mode], "train").gold_score_mode == mode


def test_closed_book(caplog: pytest.LogCaptureFixture) -> None:
    argv = ["--reader_model_type", "t5-small", "--closed_book", "--n_context", "10", "--retriever_n_context", "20"]
    argv += DATA
    with caplog.at_level(logging.INFO, logger="src.options"):
        opt = parse_options(argv, "train")
    assert (opt.n_context, opt.retriever_n_context, opt.encoder_format) == (1, 1, "{query}")
    assert opt.use_file_passages is True
    assert "--closed_book" in caplog.text


@pytest.mark.parametrize("mode,flag", [("train", "--train_data"), ("evaluate", "--eval_data")])
def test_data_files_are_required(capsys: pytest.CaptureFixture, mode: str, flag: str) -> None:
    argv = [a for a in BASE if a not in ("--train_data", "t.jsonl", "--eval_data", "e.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv, mode)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_use_file_passages_disables_retriever_training() -> None:
    argv = ["--reader_model_type", "t5-small", "--use_file_passages", "--train_retriever", *DATA]
    opt = parse_options(argv + ["--query_side_retriever_training"], "train")
    assert not opt.train_retriever and not opt.query_side_retriever_training


def test_reader_model_type_local_dir(tmp_path: Path) -> None:
    opt = parse_options(["--reader_model_type", str(tmp_path), "--passages", "p.jsonl", *DATA], "evaluate")
    assert opt.reader_model_type == str(tmp_path)


def test_reader_model_type_bad_value(capsys: pytest.CaptureFixture) -> None:
    line = _error(capsys, ["--reader_model_type", "t5-nonexistent", "--passages", "p.jsonl"])
    assert "--reader_model_type" in line
    assert all(name in line for name in READER_MODEL_TYPES)


def test_n_context_raises_retriever_n_context() -> None:
    opt = parse_options(BASE + ["--n_context", "8"], "train")
    assert (opt.n_context, opt.retriever_n_context) == (8, 8)
    opt = parse_options(BASE + ["--n_context", "3", "--retriever_n_context", "20", "--train_retriever"], "train")
    assert (opt.n_context, opt.retriever_n_context) == (3, 20)


def test_target_maxlength_minus_one_is_none() -> None:
    assert parse_options(BASE + ["--target_maxlength", "-1"], "train").target_maxlength is None
    assert parse_options(BASE + ["--target_maxlength", "16"], "train").target_maxlength == 16


def test_index_and_passages_both_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="src.options"):
        opt = parse_options(BASE + ["--load_index_path", "idx"], "evaluate")
    assert opt.load_index_path == "idx"
    assert "--passages" in caplog.text


def test_retrieve_only_evaluate_needs_no_reader() -> None:
    opt = parse_options(["--retrieve_only", "--load_index_path", "idx", *DATA], "evaluate")
    assert opt.retrieve_only and opt.reader_model_type is None


def test_faiss_pq_with_code_size_ok() -> None:
    argv = BASE + ["--index_mode", "faiss", "--faiss_index_type", "ivfpq", "--faiss_code_size", "16"]
    assert parse_options(argv, "evaluate").faiss_code_size == 16


T5 = ["--reader_model_type", "t5-small"]


@pytest.mark.parametrize(
    "mode,argv,flag",
    [
        ("evaluate", ["--passages", "p.jsonl"], "--reader_model_type"),
        ("train", ["--passages", "p.jsonl"], "--reader_model_type"),
        ("train", BASE + ["--retrieve_only"], "--retrieve_only"),
        ("evaluate", BASE + ["--retrieve_only", "--closed_book"], "--retrieve_only"),
        ("train", BASE + ["--shard_grads"], "--shard_optim"),
        ("train", BASE + ["--compile", "--shard_optim", "--shard_grads"], "--compile"),
        ("train", BASE + ["--reader_attention", "flash"], "--reader_attention"),
        ("train", T5, "--passages"),
        ("evaluate", T5, "--load_index_path"),
        ("train", BASE + ["--query_side_retriever_training"], "--train_retriever"),
        ("train", BASE + ["--train_retriever", "--n_context", "10"], "--retriever_n_context"),
        ("train", BASE + ["--retrieve_with_rerank", "--n_to_rerank_with_retrieve_with_rerank", "3"], "--n_to_rerank"),
        ("train", BASE + ["--retrieve_with_rerank", "--n_context", "200"], "--retriever_n_context"),
        ("evaluate", BASE + ["--index_mode", "faiss", "--faiss_index_type", "pq"], "--faiss_code_size"),
        ("evaluate", BASE + ["--index_mode", "faiss", "--faiss_index_type", "ivfpq"], "--faiss_code_size"),
        ("train", BASE + ["--per_gpu_batch_size", "0"], "--per_gpu_batch_size"),
        ("train", BASE + ["--total_steps", "0"], "--total_steps"),
        ("train", BASE + ["--text_maxlength", "0"], "--text_maxlength"),
        ("train", BASE + ["--n_context", "0"], "--n_context"),
        ("train", BASE + ["--accumulation_steps", "0"], "--accumulation_steps"),
        ("train", BASE + ["--temperature_score", "0"], "--temperature_score"),
        ("train", BASE + ["--temperature_gold", "-1"], "--temperature_gold"),
        ("train", BASE + ["--target_maxlength", "0"], "--target_maxlength"),
        ("train", BASE + ["--faiss_nprobe", "0"], "--faiss_nprobe"),
        ("train", BASE + ["--refresh_index", "abc"], "--refresh_index"),
        ("train", BASE + ["--refresh_index", "100-10:5"], "--refresh_index"),
        ("train", BASE + ["--refresh_index", "0-100:0"], "--refresh_index"),
        ("train", BASE + ["--refresh_index", "0"], "--refresh_index"),
        ("train", BASE + ["--gold_score_mode", "std"], "--gold_score_mode"),
        ("train", BASE + ["--kl_reduction", "sum"], "--kl_reduction"),
        ("train", BASE + ["--emdr_mixture", "passage"], "--emdr_mixture"),
        ("train", BASE + ["--faiss_index_type", "hnsw"], "--faiss_index_type"),
    ],
)
def test_validation_errors(capsys: pytest.CaptureFixture, mode: str, argv: list[str], flag: str) -> None:
    assert flag in _error(capsys, argv, mode)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("-1", []),
        ("100", [(0, 2**32, 100)]),
        ("0-1000:500,1000-10000:1000", [(0, 1000, 500), (1000, 10000, 1000)]),
        ("0-100:10,100-1000000:500", [(0, 100, 10), (100, 1000000, 500)]),
        ("0-1000000:1000000", [(0, 1000000, 1000000)]),
    ],
)
def test_parse_refresh_schedule(text: str, expected: list[tuple[int, int, int]]) -> None:
    assert parse_refresh_schedule(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1.5", "-2", "0-100", "0-100:", "100-0:10", "0-100:0", "0-10:5,x"])
def test_parse_refresh_schedule_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_refresh_schedule(text)


def test_refresh_due() -> None:
    sched = parse_refresh_schedule("0-100:10,100-1000000:500")
    due = [s for s in range(1501) if refresh_due(sched, s)]
    assert due[:11] == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert due[11:] == [600, 1100]
    assert not refresh_due(sched, 1000000)
    assert not any(refresh_due([], s) for s in range(100))
    every = parse_refresh_schedule("100")
    assert [s for s in range(350) if refresh_due(every, s)] == [0, 100, 200, 300]


def test_options_dict_round_trip(tmp_path: Path) -> None:
    opt = parse_options(BASE + ["--train_data", "a.jsonl", "b.jsonl", "--gold_score_mode", "pdist"], "train")
    d = options_to_dict(opt)
    path = tmp_path / "opt.pt"
    torch.save({"opt": d}, path)
    loaded = torch.load(path, weights_only=True)["opt"]
    assert loaded == d
    back = options_from_dict(loaded, "train")
    assert vars(back) == vars(opt)


def test_options_from_dict_fills_defaults_and_aliases() -> None:
    opt = options_from_dict({"lr": 4e-5, "gold_score_mode": "adist", "target_maxlength": -1, "extra": 1}, "evaluate")
    assert opt.lr == 4e-5 and opt.gold_score_mode == "evalnormsum" and opt.target_maxlength is None
    assert opt.text_maxlength == 200 and opt.extra == 1


def test_options_to_dict_rejects_objects() -> None:
    opt = parse_options(BASE, "train")
    opt.bad = object()
    with pytest.raises(TypeError, match="bad"):
        options_to_dict(opt)


def test_build_parser_bad_mode() -> None:
    with pytest.raises(ValueError):
        build_parser("serve")


def test_original_task_without_its_file_is_named_as_not_implemented(capsys, monkeypatch) -> None:
    """A task of the original whose file is missing (all exist today: pretend one does not)."""
    assert set(TASKS) | set(UNIMPLEMENTED_TASKS) == set(ORIGINAL_TASKS)
    implemented = tuple(t for t in TASKS if t != "mlm")
    monkeypatch.setattr(options, "TASKS", implemented)
    monkeypatch.setattr(options, "UNIMPLEMENTED_TASKS", ("mlm",))
    line = _error(capsys, BASE + ["--task", "mlm"])
    assert "'mlm'" in line and "not implemented yet" in line and ", ".join(implemented) in line


def test_choice_lists_come_from_their_registries() -> None:
    actions = {a.dest: a for a in build_parser("train")._actions}
    assert list(actions["task"].choices) == list(TASKS)
    for name in TASKS:  # every accepted name is a task of that name
        cls = importlib.import_module(f"src.tasks.{name}").Task
        assert issubclass(cls, Task) and cls.name == name
    assert list(actions["gold_score_mode"].choices) == [*GOLD_SCORE_MODES, *GOLD_SCORE_ALIASES]
    assert list(actions["reader_attention"].choices) == list(READER_ATTENTION)
    assert set(GOLD_SCORE_MODES) == {*GOLD_SCORE_FNS, "emdr"}


@pytest.mark.parametrize("mode", MODES)
def test_settings_carry_every_flag_they_name(mode: str) -> None:
    argv = BASE + ["--lr", "0.5", "--n_context", "3", "--index_mode", "faiss", "--faiss_nprobe", "7"]
    argv += ["--refresh_index", "0-10:2", "--name", "exp", "--checkpoint_dir", "ck"]
    argv += ["--per_gpu_embedder_batch_size", "9"]
    opt = parse_options(argv, mode)
    settings = build_settings(opt, mode)
    parts = (settings.model, settings.atlas, settings.index, settings.train, settings.eval)
    for part, cls in zip(parts, (ModelConfig, AtlasConfig, IndexConfig, TrainConfig, EvalConfig)):
        assert isinstance(part, cls)
        for name in cls.__dataclass_fields__:
            if name in vars(opt) and name not in ("model_path", "passages", "eval_data", "passage_store_dir"):
                assert getattr(part, name) == getattr(opt, name), (cls.__name__, name)
    assert settings.run_dir == settings.train.run_dir == settings.eval.run_dir == Path("ck/exp")
    assert settings.index.refresh_schedule == ((0, 10, 2),) and settings.index.embedder_batch_size == 9
    assert settings.index.passage_store_dir == str(Path("ck/passage_store")) and settings.model.model_path is None
    assert settings.options == options_to_dict(opt)


def test_settings_follow_closed_book_and_retrieve_only() -> None:
    closed = parse_settings(BASE + ["--closed_book"], "train")
    assert not closed.index.enabled and not closed.model.with_retriever and closed.model.with_reader
    only = parse_settings(BASE + ["--retrieve_only"], "evaluate")
    assert only.index.enabled and only.model.with_retriever and not only.model.with_reader
    eager = parse_settings(BASE + ["--train_retriever", "--gold_score_mode", "adist"], "train")
    assert eager.model.eager_attention
    assert not parse_settings(BASE + ["--train_retriever"], "train").model.eager_attention
