"""Target formats (--decoder_format, --decoder_prompt_format) and the one-line errors for format strings."""

import pytest
import torch

from src.batching import collate, decode, decoder_text
from src.model_factory import build_model
from src.options import parse_settings
from src.tasks import Example
from tests.conftest import demo_args
from tests.conftest import run_script as run

EXAMPLES = [
    Example("question: who is Ab? answer: <extra_id_0>", "<extra_id_0> Cd", ["Cd"]),
    Example("question: where is Ef? answer: <extra_id_0>", "<extra_id_0> Gh Ij", ["Gh Ij"]),
]
PASSAGES = [[{"id": "1", "title": "Ab", "text": "Ab lives in Cd."}]] * 2


def built(demo, tmp_path, *flags):
    settings = parse_settings([*demo_args(demo, tmp_path), "--closed_book", "--generation_max_length", "48", *flags],
                              "train")  # fmt: skip
    return build_model(settings.model, settings.atlas, torch.device("cpu"))


def test_decoder_format_shapes_the_target(demo, tmp_path):
    model, tokenizers = built(demo, tmp_path, "--decoder_format", "answer: {target}")
    labels = collate(EXAMPLES, PASSAGES, tokenizers, model.config).labels
    expected = tokenizers.reader(["answer: <extra_id_0> Cd", "answer: <extra_id_0> Gh Ij"], padding="longest").input_ids
    assert labels.masked_fill(labels == -100, tokenizers.reader.pad_token_id).tolist() == expected


def test_decoder_prompt_is_masked_in_labels_forced_in_generation_and_stripped(demo, tmp_path):
    model, tokenizers = built(demo, tmp_path, "--decoder_prompt_format", "to {query} the answer is")
    batch = collate(EXAMPLES, PASSAGES, tokenizers, model.config)
    for b, ex in enumerate(EXAMPLES):
        prompt = f"to {ex.query} the answer is"
        assert decoder_text(ex.target, ex.query, model.config) == (prompt, ex.target)
        prompt_ids = tokenizers.reader(prompt, add_special_tokens=False).input_ids
        full_ids = tokenizers.reader(prompt + ex.target).input_ids
        row = batch.labels[b].tolist()
        assert row[: len(prompt_ids)] == [-100] * len(prompt_ids)  # the model does not learn to write the prompt
        assert row[len(prompt_ids) : len(full_ids)] == full_ids[len(prompt_ids) :]
        assert batch.decoder_prompts[b] == prompt_ids
    tokens = model.generate(batch)
    for b, prompt_ids in enumerate(batch.decoder_prompts):
        assert tokens[b, 1 : 1 + len(prompt_ids)].tolist() == prompt_ids  # forced after the start token
    stripped = decode(tokenizers, tokens, batch.decoder_prompts)
    whole = decode(tokenizers, tokens)
    for b in range(len(EXAMPLES)):
        prompt_text = tokenizers.reader.decode(batch.decoder_prompts[b], skip_special_tokens=True)
        assert whole[b].startswith(prompt_text.strip()) and not stripped[b].startswith(prompt_text.strip())


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--encoder_format", "{question} {text}", "--encoder_format '{question} {text}' names the field {question}"),
        ("--retriever_format", "{title} {body}", "names the field {body}, which is not one of {title}, {text}"),
        ("--qa_prompt_format", "{question", "--qa_prompt_format '{question' is not a valid format string"),
        ("--decoder_format", "{answer}", "--decoder_format '{answer}' names the field {answer}"),
        ("--decoder_prompt_format", "{0}", "--decoder_prompt_format '{0}' names the field {0}"),
    ],
)
def test_bad_format_string_is_one_line_before_anything_loads(tmp_path, flag, value, message):
    result = run(["train.py", "--task", "qa", "--reader_model_type", "t5-small", "--passages", "p.jsonl",
                  "--train_data", "t.jsonl", "--checkpoint_dir", str(tmp_path), flag, value])  # fmt: skip
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())  # nothing written


def test_options_are_scored_at_their_token_or_by_their_whole_target(demo, tmp_path):
    from src import reader as fid

    model, tokenizers = built(demo, tmp_path)
    model.eval()
    # The demo tokenizer reads "Ab" / "Cd" as distinct first tokens, but "B" and "C" both as "▁" + letter.
    for choices, by_token in ((("<extra_id_0> Ab", "<extra_id_0> Cd"), True),
                              (("<extra_id_0> A", "<extra_id_0> B", "<extra_id_0> C"), False)):  # fmt: skip
        example = Example("question: who? answer: <extra_id_0>", choices[1], [choices[1]], choices=choices)
        batch = collate([example], PASSAGES[:1], tokenizers, model.config)
        _, scores = model.eval_outputs(batch)
        options = [tokenizers.reader(c).input_ids for c in choices]
        if by_token:  # the original: each option's token logit where the options first differ
            assert batch.choice_labels is None
            at = next(t for t in range(min(map(len, options))) if len({o[t] for o in options}) > 1)
            logits = fid.forward(model.reader, batch.reader_ids, batch.reader_mask, batch.labels).logits[0, at]
            expected = torch.stack([logits[o[at]] for o in options])
        else:  # no position tells all three apart: whole-target log-likelihoods
            assert batch.choice_ids is None and batch.choice_labels is not None
            expected = torch.stack(
                [
                    -fid.forward(model.reader, batch.reader_ids, batch.reader_mask, torch.tensor([o])).loss * len(o)
                    for o in options
                ]  # fmt: skip
            )
        torch.testing.assert_close(scores[0], expected.detach(), rtol=1e-4, atol=1e-4)
