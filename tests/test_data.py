"""qlora_lab.data: the shipped files, split sizes, determinism, prompt masking, batching."""

import json

import pytest
import torch

from qlora_lab import bpe, data, paths


def test_committed_files_are_what_the_generator_writes(tmp_path):
    fresh = data.write_task_files(tmp_path)
    for split, path in fresh.items():
        assert (paths.DATA_DIR / f"{split}.jsonl").read_text() == path.read_text(), split


def test_generation_is_deterministic_and_sized():
    assert data.make_split("eval") == data.make_split("eval")
    assert len(data.make_split("train")) == 2000 and len(data.make_split("eval")) == 200
    ids = [r["id"] for r in data.make_split("train")]
    assert len(set(ids)) == len(ids)


def test_answers_follow_the_rules():
    for row in data.make_split("eval"):
        answer = json.loads(row["answer"])
        assert list(answer) == ["name", "item", "qty", "city", "date"]
        assert answer["name"] in row["sentence"] and answer["city"] in row["sentence"]
        month, day = map(int, answer["date"].split("-"))
        assert data.MONTHS[month - 1] in row["sentence"] and str(day) in row["sentence"]
        qty_words = {data.NUMBER_WORDS[answer["qty"]], str(answer["qty"])}
        assert any(f" {q} " in f" {row['sentence']} " for q in qty_words)


def test_eval_names_and_cities_never_occur_in_training():
    train = data.make_split("train")
    train_names = {json.loads(r["answer"])["name"] for r in train}
    train_cities = {json.loads(r["answer"])["city"] for r in train}
    for row in data.make_split("eval"):
        answer = json.loads(row["answer"])
        assert answer["name"] not in train_names and answer["city"] not in train_cities


def test_load_task_with_datasets():
    ds = data.load_task()
    assert {k: len(v) for k, v in ds.items()} == {"train": 2000, "eval": 200}
    assert set(ds["train"].column_names) == {"id", "system", "prompt", "answer"}
    assert ds["eval"][0]["system"] == data.TASK_INSTRUCTION


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="train"):
        data.task_file("test")


@pytest.fixture(scope="module")
def tokenizer():
    return bpe.small_bpe_tokenizer(4096)


def test_prompt_is_masked_and_answer_ends_with_end_of_turn(tokenizer):
    row = data.load_task()["eval"][3]
    enc = data.encode(row, tokenizer)
    labels, ids = enc["labels"], enc["input_ids"]
    n_prompt = len(tokenizer(data.prompt_text(row, tokenizer), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == row["answer"]
    assert tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")


def test_collator_pads_right_and_masks_padding(tokenizer):
    rows = data.load_task()["eval"].select(range(4))
    encoded = [data.encode(r, tokenizer) for r in rows]
    batch = data.Collator(tokenizer.pad_token_id)(encoded)
    lengths = [len(e["input_ids"]) for e in encoded]
    assert batch["input_ids"].shape == (4, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i, n:] == data.IGNORE_INDEX).all()
        assert torch.equal(batch["input_ids"][i, :n], torch.tensor(encoded[i]["input_ids"]))


def test_tokenize_split(tokenizer):
    tok = data.tokenize(data.load_task()["eval"], tokenizer, limit=5)
    assert len(tok) == 5 and set(tok.column_names) == {"input_ids", "attention_mask", "labels"}


def test_exact_match():
    assert data.exact_match(' {"a": 1}\n', '{"a": 1}')
    assert not data.exact_match('{"a": 1, }', '{"a": 1}')
