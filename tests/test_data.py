"""Tokenizers and data: a SentencePiece model trained here and Hugging Face tokenizer directories
with a hand-written vocabulary behind one interface, prompt ids under chat and plain templates
against hand-built ids, every malformed line's exact `path:line:` error, SFT loss masks, and the
prompt sampler's order against torch's permutations, across epochs, DP sizes and resumes."""

import dataclasses
import json
import sys

import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from megatron_tropd.data import (Columns, DataError, PromptSampler, load_prompts, load_sft,
                                 load_teacher_responses)
from megatron_tropd.errors import UserError
from megatron_tropd.records import read_rows
from megatron_tropd.tokenizer import TokenizerError, load_tokenizer, prompt_ids

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
         "User", "Assistant", "System", ":", "what", "is", "two", "plus", "three", "?", "five",
         "hello", "world", "Be", "brief", "."]
ID = {w: i for i, w in enumerate(WORDS)}
PAD, BOS, EOS, USER, ASSISTANT, SYSTEM, END = 0, 1, 2, 4, 5, 6, 7
QUESTION = "what is two plus three ?"
QUESTION_IDS = [ID[w] for w in QUESTION.split()]
CHAT = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}" \
       "{% if add_generation_prompt %}<|assistant|>{% endif %}"
# Starts with bos itself and rejects system turns, like some real templates.
CHAT_WITH_BOS = "{% if messages[0].role == 'system' %}{{ raise_exception('no system turns') }}" \
                "{% endif %}{{ bos_token }}" + CHAT
SYSTEM_AND_USER = [{"role": "system", "content": "Be brief ."},
                   {"role": "user", "content": QUESTION}]
SP_VOCAB = 80


def words(text):
    """Ids of `text` tokenized by hand over WORDS: words between spaces, ':' split off."""
    return [ID[w] for w in text.replace(":", " :").split()]


def save_hf(directory, chat_template=None, adds_bos=True, pad=True):
    """A word-level tokenizer over WORDS; `adds_bos=False` is GPT-2's way: a bos token that the
    tokenizer's own encoding never puts first."""
    raw = RawTokenizer(models.WordLevel(ID, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", BOS)])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="<pad>" if pad else None,
                                 additional_special_tokens=WORDS[4:8])
    hf.chat_template = chat_template
    hf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return load_tokenizer(save_hf(tmp_path_factory.mktemp("hf"), CHAT))


def train_sp(corpus, prefix, **options):
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=SP_VOCAB, model_type="bpe",
        character_coverage=1.0, minloglevel=2, **options)
    return prefix.parent / f"{prefix.name}.model"


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    corpus = directory / "corpus.txt"
    vocab = "User Assistant System : what is two plus three ? five hello world Be brief .".split()
    corpus.write_text("\n".join(" ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(9))
                                for i in range(300)))
    return train_sp(corpus, directory / "tokenizer")


@pytest.fixture(scope="module")
def sp(sp_file):
    return load_tokenizer(sp_file)


@pytest.fixture(scope="module")
def sp_ref(sp_file):
    return sentencepiece.SentencePieceProcessor(model_file=str(sp_file))


def data_error(load, *args, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        load(*args, **kwargs)
    return str(error.value)


def write_lines(path, *lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode()
                                for line in lines))
    return path


# --- tokenizers ---------------------------------------------------------------------------------

def test_sentencepiece_behind_the_interface(sp, sp_file, sp_ref, tmp_path):
    text = "hello world what is two plus three?"
    assert (sp.vocab_size, sp.bos_id, sp.eos_id) == (SP_VOCAB, 1, 2)
    assert sp.pad_id == sp.eos_id  # SentencePiece's trainer makes no pad piece by default
    assert not sp.has_chat_template
    assert sp.encode(text) == sp_ref.encode(text)
    assert sp.decode(sp.encode(text)) == text
    assert sp.decode([sp.bos_id] + sp.encode(text) + [sp.eos_id]) == text
    only_model = tmp_path / "only_model"
    only_model.mkdir()
    (only_model / "tokenizer.model").write_bytes(sp_file.read_bytes())
    assert load_tokenizer(only_model).encode(text) == sp.encode(text)


def test_hf_behind_the_interface(hf, tmp_path):
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (len(WORDS), BOS, EOS, PAD)
    assert hf.has_chat_template
    assert hf.encode("hello world") == [ID["hello"], ID["world"]]
    assert hf.decode([BOS, USER, ID["hello"], ID["world"], END, EOS]) == "hello world"

    gpt2_like = load_tokenizer(save_hf(tmp_path, adds_bos=False, pad=False))
    assert gpt2_like.bos_id is None and gpt2_like.pad_id == gpt2_like.eos_id == EOS
    assert not gpt2_like.has_chat_template


def test_hf_templates(hf):
    chat_ids = [BOS, USER] + QUESTION_IDS + [END, ASSISTANT]
    assert prompt_ids(hf, prompt=QUESTION) == chat_ids
    assert prompt_ids(hf, prompt=QUESTION, template="chat") == chat_ids
    assert prompt_ids(hf, messages=SYSTEM_AND_USER, template="auto") == (
        [BOS, SYSTEM, ID["Be"], ID["brief"], ID["."], END, USER] + QUESTION_IDS + [END, ASSISTANT])
    assert prompt_ids(hf, prompt=QUESTION, template="plain") == [BOS] + QUESTION_IDS
    assert prompt_ids(hf, messages=SYSTEM_AND_USER, template="plain") == (
        [BOS] + words(f"System: Be brief . User: {QUESTION} Assistant:"))


def test_hf_template_with_bos_and_without_template(tmp_path):
    with_bos = load_tokenizer(save_hf(tmp_path / "bos", CHAT_WITH_BOS))
    assert prompt_ids(with_bos, prompt=QUESTION) == [BOS, USER] + QUESTION_IDS + [END, ASSISTANT]
    with pytest.raises(TokenizerError, match="no system turns"):
        prompt_ids(with_bos, messages=SYSTEM_AND_USER)

    # Neither a template nor a bos that the tokenizer uses: the plain template, nothing prepended.
    gpt2_like = load_tokenizer(save_hf(tmp_path / "plain", adds_bos=False))
    assert prompt_ids(gpt2_like, messages=SYSTEM_AND_USER) == (
        words(f"System: Be brief . User: {QUESTION} Assistant:"))
    with pytest.raises(TokenizerError, match="^--prompt-template chat: the tokenizer .* has no "
                       "chat template"):
        prompt_ids(gpt2_like, prompt=QUESTION, template="chat")


def test_sentencepiece_templates(sp, sp_ref):
    question = "what is two plus three?"
    system_and_user = [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": question}]
    assert prompt_ids(sp, prompt=question) == [1] + sp_ref.encode(question)
    with pytest.raises(TokenizerError, match="has no chat template"):
        prompt_ids(sp, prompt=question, template="chat")
    for template in ("auto", "plain"):
        assert prompt_ids(sp, messages=system_and_user, template=template) == (
            [1] + sp_ref.encode(f"System: Be brief.\nUser: {question}\nAssistant: "))


def test_prompt_ids_arguments(sp):
    with pytest.raises(ValueError, match="template must be one of auto, chat, plain, got 'x'"):
        prompt_ids(sp, prompt="hi", template="x")
    with pytest.raises(ValueError, match="exactly one of prompt and messages"):
        prompt_ids(sp, prompt="hi", messages=[{"role": "user", "content": "hi"}])


def test_load_tokenizer_errors(tmp_path, sp_file):
    def message(path):
        with pytest.raises(TokenizerError) as error:
            load_tokenizer(path)
        assert isinstance(error.value, UserError) and "\n" not in str(error.value)
        return str(error.value)

    assert message(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such tokenizer file or directory"
    assert message(tmp_path) == (f"{tmp_path}: holds no tokenizer.json, tokenizer_config.json or "
                                 f"tokenizer.model")
    garbage = write_lines(tmp_path / "tokenizer.model", "not a model")
    assert message(garbage).startswith(f"{garbage}: not a SentencePiece model (")
    broken = tmp_path / "broken"
    broken.mkdir()
    write_lines(broken / "tokenizer.json", "{")
    assert message(broken).startswith(f"{broken}: cannot load the Hugging Face tokenizer (")
    no_eos = train_sp(sp_file.parent / "corpus.txt", tmp_path / "no_eos", eos_id=-1)
    assert message(no_eos) == (
        f"{tmp_path / 'no_eos.model'}: the tokenizer defines no end-of-sequence token")


# --- JSONL files --------------------------------------------------------------------------------

def test_load_prompts(hf, tmp_path):
    first_line = {"prompt": QUESTION, "answer": "5", "id": "extra keys ignored"}
    path = write_lines(tmp_path / "p.jsonl", json.dumps(first_line), "",
                       json.dumps({"messages": SYSTEM_AND_USER}))
    first, second = load_prompts(path, hf)
    assert (first.index, first.prompt_ids, first.answer, first.prompt_text) == (
        0, [BOS, USER] + QUESTION_IDS + [END, ASSISTANT], "5", QUESTION)
    assert (second.index, second.answer) == (1, None)
    assert second.prompt_text == f"System: Be brief .\nUser: {QUESTION}\nAssistant: "
    assert [e.prompt_ids for e in load_prompts(path, hf, template="plain")] == [
        [BOS] + QUESTION_IDS, [BOS] + words(f"System: Be brief . User: {QUESTION} Assistant:")]
    assert list(read_rows(path)) == [(f"{path}:1", first_line),
                                     (f"{path}:3", {"messages": SYSTEM_AND_USER})]


def test_prompt_length_limit(hf, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", json.dumps({"prompt": "hello"}),
                       json.dumps({"prompt": QUESTION}))
    length = len([BOS, USER] + QUESTION_IDS + [END, ASSISTANT])
    assert len(load_prompts(path, hf, max_prompt_length=length)) == 2
    assert data_error(load_prompts, path, hf, max_prompt_length=length - 1) == (
        f"{path}:2: prompt is {length} tokens, longer than the maximum prompt length {length - 1}")


def test_sft_examples_and_prompt_lengths(hf, sp, sp_ref, tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", json.dumps({"prompt": QUESTION, "response": "five"}),
                       json.dumps({"messages": SYSTEM_AND_USER, "response": "hello world"}))
    first, second = load_sft(path, hf)
    assert first.input_ids == [BOS, USER] + QUESTION_IDS + [END, ASSISTANT, ID["five"], EOS]
    assert first.prompt_length == 10
    assert second.input_ids[-3:] == [ID["hello"], ID["world"], EOS]
    assert second.prompt_length == len(second.input_ids) - 3

    first_sp = load_sft(path, sp)[0]
    prompt = [1] + sp_ref.encode(QUESTION)
    assert first_sp.input_ids == prompt + sp_ref.encode("five") + [2]
    assert first_sp.prompt_length == len(prompt)

    assert data_error(load_sft, path, hf, max_length=11) == (
        f"{path}:1: prompt, response and EOS are 12 tokens, longer than the maximum length 11")


def test_teacher_responses(tmp_path):
    path = write_lines(tmp_path / "t.jsonl",
                       json.dumps({"prompt_ids": [1, 4], "response_ids": [5, 6, 2],
                                   "prompt": "ab", "response": "cde"}),
                       json.dumps({"prompt_ids": [3], "response_ids": []}))
    assert load_teacher_responses(path) == {(1, 4): [5, 6, 2], (3,): []}


MALFORMED = [
    ("prompts", '{"prompt": "hi"', "malformed JSON (Expecting ',' delimiter at column 16)"),
    ("prompts", '{"prompt": "hi"} x', "malformed JSON (Extra data at column 18)"),
    ("prompts", b'{"prompt": "\xff"}', "not UTF-8 text"),
    ("prompts", "[1, 2]", "expected a JSON object, got an array"),
    ("prompts", '"what is two plus three"', "expected a JSON object, got a string"),
    ("prompts", '{"answer": "5"}', "needs exactly one of 'prompt' and 'messages', has neither"),
    ("prompts", '{"prompt": "hi", "messages": []}',
     "needs exactly one of 'prompt' and 'messages', has both"),
    ("prompts", '{"prompt": 5}', "'prompt' must be a string, got a number"),
    ("prompts", '{"prompt": null}', "needs exactly one of 'prompt' and 'messages', has neither"),
    ("prompts", '{"prompt": " \\n "}', "'prompt' is empty"),
    ("prompts", '{"prompt": "hi", "answer": ["5"]}',
     "'answer' must be a string or a number, got an array"),
    ("prompts", '{"messages": "hi"}', "'messages' must be an array, got a string"),
    ("prompts", '{"messages": []}', "'messages' is empty"),
    ("prompts", '{"messages": ["hi"]}', "messages[0] must be an object, got a string"),
    ("prompts", '{"messages": [{"role": "user", "content": "a"}, {"content": "hi"}]}',
     "messages[1]: missing 'role'"),
    ("prompts", '{"messages": [{"role": "user"}]}', "messages[0]: missing 'content'"),
    ("prompts", '{"messages": [{"role": "user", "content": 3}]}',
     "messages[0]: 'content' must be a string, got a number"),
    ("prompts", '{"messages": [{"role": true, "content": "hi"}]}',
     "messages[0]: 'role' must be a string, got a boolean"),
    ("sft", '{"prompt": "hi"}', "missing 'response'"),
    ("sft", '{"prompt": "hi", "response": {"text": "a"}}',
     "'response' must be a string, got an object"),
    ("sft", '{"prompt": "hi", "response": ""}', "'response' is empty"),
    ("sft", '{"response": "hi"}', "needs exactly one of 'prompt' and 'messages', has neither"),
    ("teacher", '{"response_ids": [1]}', "missing 'prompt_ids'"),
    ("teacher", '{"prompt_ids": [1]}', "missing 'response_ids'"),
    ("teacher", '{"prompt_ids": [7], "response_ids": [1]}',
     "the same prompt_ids are already given at {path}:1"),
    ("teacher", '{"prompt_ids": [2], "response_ids": "1 2"}',
     "'response_ids' must be an array of non-negative integers"),
    ("teacher", '{"prompt_ids": [2], "response_ids": [1, 2.0]}',
     "'response_ids' must be an array of non-negative integers"),
    ("teacher", '{"prompt_ids": [-2], "response_ids": [1]}',
     "'prompt_ids' must be an array of non-negative integers"),
    ("teacher", '{"prompt_ids": [2], "response_ids": [1, 24]}',
     "'response_ids' holds 24, outside the vocabulary of 24 ids"),
]


@pytest.mark.parametrize("loader,line,what", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_line(hf, tmp_path, loader, line, what):
    load, good = {
        "prompts": (lambda path: load_prompts(path, hf), '{"prompt": "hi"}'),
        "sft": (lambda path: load_sft(path, hf), '{"prompt": "hi", "response": "a"}'),
        "teacher": (lambda path: load_teacher_responses(path, vocab_size=24),
                    '{"prompt_ids": [7], "response_ids": [1]}'),
    }[loader]
    path = write_lines(tmp_path / "data.jsonl", good, "", line, good.replace("7", "8"))
    assert data_error(load, path) == f"{path}:3: {what.format(path=path)}"


def test_chat_template_error_names_the_line(tmp_path):
    tokenizer = load_tokenizer(save_hf(tmp_path / "bos", CHAT_WITH_BOS))
    path = write_lines(tmp_path / "p.jsonl", json.dumps({"prompt": "hi"}),
                       json.dumps({"messages": SYSTEM_AND_USER}))
    assert data_error(load_prompts, path, tokenizer) == (
        f"{path}:2: chat template of {tmp_path / 'bos'} failed: no system turns")


@pytest.mark.parametrize("loader", [lambda path: list(read_rows(path)), load_teacher_responses])
def test_empty_missing_and_unreadable_files(tmp_path, loader):
    for content in ("", "\n  \n\n"):
        path = write_lines(tmp_path / "empty.jsonl", content)
        assert data_error(loader, path) == f"{path}: empty file, no rows"
    assert data_error(loader, tmp_path / "no.jsonl") == f"{tmp_path / 'no.jsonl'}: no such file"
    assert data_error(loader, tmp_path) == (
        f"{tmp_path}: a directory, but not one written by datasets' save_to_disk")


# --- sampler ------------------------------------------------------------------------------------

def reference_order(num_examples, seed, epochs):
    """The global order: epoch after epoch, each torch's permutation under seed + epoch."""
    return [i for epoch in range(epochs) for i in torch.randperm(
        num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()]


def global_batches(num_examples, global_batch_size, dp_size, seed, iterations, state=None):
    """Each iteration's global batch, the DP ranks' slices joined in rank order."""
    samplers = [PromptSampler(num_examples, global_batch_size, rank, dp_size, seed)
                for rank in range(dp_size)]
    for sampler in samplers:
        if state is not None:
            sampler.load_state_dict(state)
    batches = [sum((s.next_indices() for s in samplers), []) for _ in range(iterations)]
    assert all(s.state_dict() == samplers[0].state_dict() for s in samplers)
    return batches, samplers[0].state_dict()


@pytest.mark.parametrize("num_examples,global_batch_size", [(10, 4), (3, 8)])
def test_sampler_order_crosses_epochs(num_examples, global_batch_size):
    iterations = 7
    batches, state = global_batches(num_examples, global_batch_size, 1, seed=5,
                                    iterations=iterations)
    order = reference_order(num_examples, 5, epochs=20)
    assert batches == [order[i * global_batch_size:(i + 1) * global_batch_size]
                       for i in range(iterations)]
    consumed = iterations * global_batch_size
    assert state == {"epoch": consumed // num_examples, "position": consumed % num_examples,
                     "consumed_samples": consumed, "seed": 5}
    assert batches != global_batches(num_examples, global_batch_size, 1, 6, iterations)[0]


def test_sampler_same_global_batches_at_any_dp_size():
    one, _ = global_batches(12, 8, 1, seed=0, iterations=5)
    assert global_batches(12, 8, 2, seed=0, iterations=5)[0] == one
    assert global_batches(12, 8, 4, seed=0, iterations=5)[0] == one
    rank1 = PromptSampler(12, 8, dp_rank=1, dp_size=2, seed=0)
    assert [rank1.next_indices() for _ in range(5)] == [batch[4:] for batch in one]


@pytest.mark.parametrize("resume_dp_size", [1, 2, 4])
def test_sampler_resume(resume_dp_size):
    uninterrupted, _ = global_batches(10, 4, 2, seed=3, iterations=8)
    first, state = global_batches(10, 4, 2, seed=3, iterations=3)
    rest, _ = global_batches(10, 4, resume_dp_size, seed=3, iterations=5, state=state)
    assert first + rest == uninterrupted


def test_sampler_errors():
    with pytest.raises(ValueError, match="global batch size 6 must be a positive multiple of the "
                                         "data-parallel size 4"):
        PromptSampler(10, 6, 0, 4, 0)
    with pytest.raises(ValueError, match="data-parallel rank 2 outside 0..1"):
        PromptSampler(10, 4, 2, 2, 0)
    with pytest.raises(ValueError, match="no prompts"):
        PromptSampler(0, 4, 0, 1, 0)
    state = {"epoch": 1, "position": 2, "consumed_samples": 12, "seed": 0}
    with pytest.raises(DataError, match="saved with seed 0, this run has seed 1"):
        PromptSampler(10, 4, 0, 1, 1).load_state_dict(state)
    with pytest.raises(DataError, match=r"\(epoch 1, position 2, 12 consumed samples\) does not "
                                        r"fit 11 prompts"):
        PromptSampler(11, 4, 0, 1, 0).load_state_dict(state)


# --- file formats and column mapping --------------------------------------------------------------

# verl-style rows: the prompt a list of chat messages, the answer nested, a source column
ROWS = [{"prompt": [{"role": "user", "content": QUESTION}],
         "reward_model": {"ground_truth": "5"}, "data_source": "gsm8k"},
        {"prompt": [{"role": "system", "content": "Be brief ."},
                    {"role": "user", "content": "what is two plus two ?"}],
         "reward_model": {"ground_truth": "4"}, "data_source": "math"}]
VERL = Columns(answer="reward_model.ground_truth")


def write_formats(directory, rows):
    """The same rows as JSON Lines, a JSON array, JSON Lines named .json, Parquet (pyarrow) and a
    datasets save_to_disk directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": directory / "rows.jsonl", "json": directory / "rows.json",
             "json_lines": directory / "lines.json", "parquet": directory / "rows.parquet",
             "saved": directory / "saved"}
    lines = "\n".join(json.dumps(row) for row in rows) + "\n"
    paths["jsonl"].write_text(lines)
    paths["json_lines"].write_text(lines)
    paths["json"].write_text(json.dumps(rows, indent=1))
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    return paths


def test_every_format_reads_the_same_prompts(hf, tmp_path):
    paths = write_formats(tmp_path, ROWS)
    expected = [
        ([BOS, USER] + QUESTION_IDS + [END, ASSISTANT], "5", "gsm8k"),
        ([BOS, SYSTEM] + words("Be brief .") + [END, USER] + words("what is two plus two ?")
         + [END, ASSISTANT], "4", "math")]
    for name, path in paths.items():
        examples = load_prompts(path, hf, columns=VERL)
        assert [(e.prompt_ids, e.answer, e.source) for e in examples] == expected, name
        assert [e.index for e in examples] == [0, 1], name


def test_column_mapping_and_system_prompt(hf, sp, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": QUESTION, "label": 5, "split": "test"}]),
                   path)
    columns = Columns(prompt="question", answer="label", source="split")
    [example] = load_prompts(path, hf, columns=columns)
    assert (example.prompt_ids, example.answer, example.source) == (
        [BOS, USER] + QUESTION_IDS + [END, ASSISTANT], "5", "test")
    # a system turn for prompts without one; one that has its own keeps it
    system = dataclasses.replace(columns, system_prompt="Be brief .")
    [example] = load_prompts(path, hf, columns=system)
    assert example.prompt_ids == ([BOS, SYSTEM] + words("Be brief .") + [END, USER]
                                  + QUESTION_IDS + [END, ASSISTANT])
    [_, own] = load_prompts(write_formats(tmp_path, ROWS)["parquet"], hf,
                            columns=dataclasses.replace(VERL, system_prompt="Other ."))
    assert own.prompt_ids[:3] == [BOS, SYSTEM, ID["Be"]]
    # the plain template renders the system turn as a line
    [plain] = load_prompts(path, sp, "plain", columns=system)
    assert plain.prompt_text == f"System: Be brief .\nUser: {QUESTION}\nAssistant: "
    # SFT rows through a response column of another name
    sft = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "hello", "solution": "world"}]), sft)
    [pair] = load_sft(sft, hf, "plain", columns=Columns(prompt="question", response="solution"))
    assert pair.input_ids == [BOS, ID["hello"], ID["world"], EOS] and pair.prompt_length == 2


def test_chat_template_file(tmp_path):
    from megatron_tropd.tokenizer import load_chat_template

    tokenizer = load_tokenizer(save_hf(tmp_path / "plain", chat_template=None))
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT)
    load_chat_template(tokenizer, str(template))
    assert prompt_ids(tokenizer, prompt=QUESTION, template="chat") == (
        [BOS, USER] + QUESTION_IDS + [END, ASSISTANT])


def test_chat_template_file_errors(sp, tmp_path):
    from megatron_tropd.tokenizer import load_chat_template

    with pytest.raises(TokenizerError) as error:
        load_chat_template(sp, str(tmp_path / "chat.jinja"))
    assert str(error.value) == (f"--chat-template-file needs a Hugging Face tokenizer directory; "
                                f"{sp.path} is a SentencePiece model")


def test_bad_table_files(hf, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(name, rows):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path

    missing = parquet("missing", [{"question": "hi"}])
    assert data_error(load_prompts, missing, hf) == (
        f"{missing}:row 0: needs exactly one of 'prompt' and 'messages', has neither")
    wrong_type = parquet("type", [{"prompt": "hi", "answer": None},
                                  {"prompt": "ho", "answer": [1.5]}])
    assert data_error(load_prompts, wrong_type, hf) == (
        f"{wrong_type}:row 1: 'answer' must be a string or a number, got an array")
    empty = parquet("empty", [{"prompt": "hi"}, {"prompt": "hi"}, {"prompt": "  "}])
    assert data_error(load_prompts, empty, hf) == f"{empty}:row 2: 'prompt' is empty"
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    assert data_error(load_prompts, corrupt, hf).startswith(
        f"{corrupt}: not a readable Parquet file (")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "hi"}]),
                          "test": datasets.Dataset.from_list([{"prompt": "ho"}])}
                         ).save_to_disk(str(splits))
    assert data_error(load_prompts, splits, hf) == (
        f"{splits} holds the splits train, test: give one split's directory, e.g. "
        f"{splits / 'train'}")
    array = tmp_path / "array.json"
    array.write_text('[{"prompt": "hi"}, 3]')
    assert data_error(load_prompts, array, hf) == (
        f"{array}:row 1: expected a JSON object, got a number")


def test_large_files_stream(tmp_path):
    """100k rows of ~1 KB: reading them row by row holds a batch at a time, not the file (peak
    Python allocations while iterating, tracemalloc, far below the rows' own size)."""
    import tracemalloc

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, text = 100_000, "x" * 1000
    table = pa.table({"prompt": pa.array([text] * n), "answer": pa.array(range(n))})
    parquet = tmp_path / "big.parquet"
    pq.write_table(table, parquet, row_group_size=8192)
    saved = tmp_path / "big"
    datasets.Dataset(table).save_to_disk(str(saved))
    jsonl = tmp_path / "big.jsonl"
    with open(jsonl, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": text, "answer": i}) + "\n")
    rows_size = n * (sys.getsizeof(text) + 200)  # the rows as Python objects, at the least
    for path in (parquet, saved, jsonl):
        tracemalloc.start()
        count = sum(1 for _ in read_rows(path))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n, path
        assert peak < rows_size / 20, (path, peak, rows_size)


def test_ids_beyond_the_tokenizer_decode_to_nothing(hf, sp):
    """A student's vocabulary can be larger than its tokenizer's (padded): ids it samples there
    decode to nothing instead of failing the rollout's pass rate or an evaluation."""
    for tokenizer in (hf, sp):
        ids = tokenizer.encode("hello world")
        assert tokenizer.decode(ids + [tokenizer.vocab_size + 3]) == tokenizer.decode(ids)
