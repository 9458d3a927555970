"""Evaluate (and, in lab 05, train) a model on the lab's task.

`evaluate` measures two things in one forward pass per batch:

- eval loss: mean cross-entropy over the answer tokens (prompt tokens are masked), and
- exact-match accuracy by teacher forcing: an example counts as correct when, at every
  answer position, the model's most likely next token is the reference token (the
  end-of-turn token included). That is exactly the condition under which greedy decoding
  reproduces the reference token for token, so it equals greedy-generation exact match
  without generating, and is many times faster. Two gaps, both small: a different
  tokenisation of the same string counts as wrong here, and at a near-tie (two tokens
  within bf16 rounding of each other) cached decoding may break the tie the other way.
  `margins` reports each example's smallest top-1/top-2 logit gap over its answer;
  tests/test_train.py checks that examples with a clear margin agree with generation.

`generate_answers` does real greedy generation, for showing samples.
"""

import torch
import torch.nn.functional as F

from qlora_lab import data


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def evaluate(model, tokenizer, rows, batch_size: int = 16, progress: bool = False) -> dict:
    """Eval loss and teacher-forced exact-match accuracy over rows (dicts with system/prompt/answer).

    Example: evaluate(model, tok, load_task()["eval"].select(range(32))) -> {"loss": 1.67, "accuracy": 0.0, ...}
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    encoded = [data.encode(row, tokenizer) for row in rows]
    collate = data.Collator(tokenizer.pad_token_id)
    loss_sum, n_tokens, correct, margins = 0.0, 0, [], []
    device = next(p for p in model.parameters()).device
    for chunk in tqdm(list(_batches(encoded, batch_size)), desc="eval", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # (batch, seq-1, vocab): position t predicts token t+1
        targets = batch["labels"][:, 1:]  # (batch, seq-1)
        mask = targets != data.IGNORE_INDEX
        loss_sum += F.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
        n_tokens += int(mask.sum())
        hits = (logits.argmax(-1) == targets) | ~mask
        correct += hits.all(dim=1).tolist()
        top2 = logits.topk(2, dim=-1).values  # (batch, seq-1, 2)
        gap = (top2[..., 0] - top2[..., 1]).masked_fill(~mask, float("inf"))
        margins += gap.min(dim=1).values.tolist()
    model.train(was_training)
    return {"loss": loss_sum / n_tokens, "accuracy": sum(correct) / len(correct), "correct": correct,
            "margins": margins, "examples": len(correct), "answer_tokens": n_tokens}


@torch.no_grad()
def generate_answers(model, tokenizer, rows, max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy answers for rows, batched with left padding. Example: generate_answers(m, tok, rows[:2]) -> ['{"name": ...}', ...]"""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    device = next(p for p in model.parameters()).device
    answers = []
    try:
        for chunk in _batches(list(rows), batch_size):
            prompts = [data.prompt_text(row, tokenizer) for row in chunk]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (batch, generated)
            answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
