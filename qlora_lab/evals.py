"""Evaluate a model on the lab's task and on general text: what labs 05 and 07 measure.

- `generation_eval`, the headline: greedy generation with the chat template the model was
  trained with, exact match of the generated line, a 95 % Wilson interval, the per-item
  results (for paired comparisons, `stats`) and the wrong fields read from the generated JSON;
- `evaluate`, the fast proxy, one forward pass per batch: the eval loss (mean cross-entropy over
  the answer tokens, the prompt masked) and teacher-forced exact match (at every answer position
  the model's most likely next token is the reference token, the end-of-turn token included).
  That is the condition under which greedy decoding writes the reference, so it agrees with
  generation except at near-ties (two tokens within bf16 rounding, which cached decoding may break
  the other way) and for another tokenisation of the same string; `margins` reports each
  example's smallest top-1/top-2 logit gap, and the labs count where the two disagree;
- `perplexity` of a plain text (forgetting: general text before and after fine-tuning);
- `answer_logits`, `compare_outputs` and `kl_divergence`: two models' outputs on the same inputs, compared.

Shortcuts: one device; perplexity over consecutive windows (each window's first tokens see no
earlier context, so it reads a little higher than a sliding window would).
"""

import json
import math
from collections import Counter

import torch
import torch.nn.functional as F

from qlora_lab import data, env, stats


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _forward_batches(model, tokenizer, rows, batch_size: int, progress: bool = False):
    """Teacher-forced forward passes over rows in eval mode (the model's mode restored at the end): yields
    (batch on the model's device, logits of shape (batch, seq, vocab))."""
    was_training = model.training
    model.eval()
    encoded = [data.encode(row, tokenizer) for row in rows]
    collate = data.Collator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    chunks = list(_batches(encoded, batch_size))
    for chunk in env.progress(chunks, desc="eval", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        yield batch, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)


@torch.no_grad()
def evaluate(model, tokenizer, rows, batch_size: int = 16, progress: bool = False) -> dict:
    """Eval loss and teacher-forced exact-match accuracy over rows (dicts with system/prompt/answer).

    Example: evaluate(model, tok, load_task()["eval"].select(range(32))) -> {"loss": 1.67, "accuracy": 0.0, ...}
    """
    loss_sum, n_tokens, correct, margins, only_end = 0.0, 0, [], [], []
    for batch, logits in _forward_batches(model, tokenizer, rows, batch_size, progress):
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
        last = mask & (mask.cumsum(1) == mask.sum(1, keepdim=True))  # (batch, seq-1): the end-of-turn position
        missed = ~hits  # (batch, seq-1): answer positions whose top token is not the reference
        only_end += (missed.any(1) & ~(missed & ~last).any(1)).tolist()  # wrong at the end-of-turn token alone
    return {"loss": loss_sum / n_tokens, "accuracy": sum(correct) / len(correct), "correct": correct,
            "margins": margins, "wrong_only_at_end": only_end, "examples": len(correct), "answer_tokens": n_tokens}


@torch.no_grad()
def generate_answers(model, tokenizer, rows, max_new_tokens: int = 48, batch_size: int = 16,
                     min_new_tokens: int | None = None, token_ids: list | None = None) -> list[str]:
    """Greedy answers for rows, batched with left padding (min_new_tokens: generate at least that many, for timing).

    token_ids: a list to append each answer's generated token ids to (special tokens and padding removed).
    Example: generate_answers(m, tok, rows[:2]) -> ['{"name": ...}', ...]
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    device = next(p for p in model.parameters()).device
    answers, special = [], set(tokenizer.all_special_ids)
    try:
        for chunk in _batches(list(rows), batch_size):
            prompts = [data.prompt_text(row, tokenizer) for row in chunk]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (batch, generated)
            answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            if token_ids is not None:
                token_ids += [[t for t in row if t not in special] for row in new_tokens.tolist()]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def wrong_fields(prediction: str, reference: str) -> list[str]:
    """The fields of a JSON answer that differ from the reference's; ["not JSON"] if it does not parse.

    A field missing from the prediction counts as wrong; extra fields are reported as "extra".
    Example: wrong_fields('{"name": "Loren", "qty": 4}', '{"name": "Lorenzo", "qty": 4}') -> ["name"]
    """
    try:
        got = json.loads(prediction)
    except json.JSONDecodeError:
        return ["not JSON"]
    want = json.loads(reference)
    if not isinstance(got, dict):
        return ["not JSON"]
    wrong = [key for key in want if got.get(key) != want[key]]
    return wrong + (["extra"] if set(got) - set(want) else [])


@torch.no_grad()
def answer_logits(model, tokenizer, rows, batch_size: int = 16) -> torch.Tensor:
    """Logits at every answer position of rows (teacher-forced), fp32, shape (answer tokens, vocab).

    For comparing two models' outputs on the same inputs: equal tensors mean identical outputs.
    Example: (answer_logits(a, tok, rows) - answer_logits(b, tok, rows)).abs().max() -> tensor(0.)
    """
    out = []
    for batch, logits in _forward_batches(model, tokenizer, rows, batch_size):
        mask = batch["labels"][:, 1:] != data.IGNORE_INDEX  # (batch, seq-1)
        out.append(logits[:, :-1][mask].float().cpu())  # (answer tokens in batch, vocab)
    return torch.cat(out)


def answer_targets(tokenizer, rows) -> torch.Tensor:
    """The reference token at every answer position, in answer_logits' order, shape (answer tokens,).

    Example: F.cross_entropy(answer_logits(m, tok, rows), answer_targets(tok, rows)).exp() -> answer perplexity
    """
    labels = [torch.as_tensor(data.encode(row, tokenizer)["labels"])[1:] for row in rows]  # position t predicts t+1
    return torch.cat([t[t != data.IGNORE_INDEX] for t in labels])


def compare_outputs(reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """How a model's answer logits differ from a reference model's on the same rows.

    kl: mean KL(reference || model) in nats; perplexity: exp(cross-entropy of the reference answers)
    under the model; same_top1: share of positions where both pick the same token.
    Example: compare_outputs(ref, merged, answer_targets(tok, rows)) -> {"kl": 0.004, "perplexity": 1.08, ...}
    """
    return {"kl": kl_divergence(reference, logits), "perplexity": math.exp(F.cross_entropy(logits, targets).item()),
            "same_top1": (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()}


def generation_eval(model, tokenizer, rows, max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """Generation-based exact match: greedy answers, per-item correctness, a 95 % Wilson interval, wrong fields.

    "fields" lists each item's wrong fields ([] when exact), "wrong_fields" counts them over all items.
    Example: generation_eval(model, tok, rows)["ci"] -> (0.744, 0.854)   # 161 of 200 exact
    """
    rows, ids = list(rows), []
    answers = generate_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, token_ids=ids)
    correct = [data.exact_match(a, row["answer"]) for a, row in zip(answers, rows)]
    retokenized = [ok and written_differently(tokenizer, i, row["answer"]) for ok, i, row in zip(correct, ids, rows)]
    fields = [[] if ok else wrong_fields(a, row["answer"]) for a, row, ok in zip(answers, rows, correct)]
    return {"accuracy": sum(correct) / len(rows), "ci": stats.wilson(sum(correct), len(rows)), "correct": correct,
            "answers": answers, "fields": fields, "wrong_fields": dict(Counter(f for fs in fields for f in fs)),
            "written_differently": retokenized, "examples": len(rows)}


def written_differently(tokenizer, generated_ids: list[int], reference: str) -> bool:
    """Did the model write the reference text with other tokens than the tokenizer's own split of it?

    Teacher forcing scores one tokenization (the tokenizer's); generation may reach the same text another way.
    Example: written_differently(tok, tok.convert_tokens_to_ids(["0", "8"]), "08") -> True (if "08" is one token)
    """
    return generated_ids != tokenizer(reference, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 256) -> dict:
    """Perplexity of a plain text: exp(mean next-token cross-entropy) over consecutive windows of `window` tokens.

    Example: perplexity(model, tok, data.general_text())["perplexity"] -> 25.1
    """
    was_training = model.training
    model.eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]  # (tokens,)
    device = next(model.parameters()).device
    token_nll = []
    for chunk in ids.split(window):  # the last window may be shorter
        chunk = chunk[None].to(device)  # (1, <= window)
        logits = model(input_ids=chunk).logits[0, :-1].float()  # (tokens-1, vocab): position t predicts t+1
        token_nll += F.cross_entropy(logits, chunk[0, 1:], reduction="none").tolist()
    model.train(was_training)
    nll = sum(token_nll) / len(token_nll)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": len(token_nll), "token_nll": token_nll}


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) in nats over positions, from two (positions, vocab) logit tensors.

    0 for identical outputs; what `other` loses of the reference's next-token distribution.
    Example: kl_divergence(answer_logits(adapter_model, ...), answer_logits(merged, ...)) -> 0.0021
    """
    ref = F.log_softmax(reference.float(), dim=-1)  # (positions, vocab)
    oth = F.log_softmax(other.float(), dim=-1)
    return F.kl_div(oth, ref, log_target=True, reduction="batchmean").item()
