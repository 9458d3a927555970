"""qlora_lab.checks: the only-LoRA-trains checker passes a correct QLoRA setup and names the offender in broken ones.

All tests use the tiny random shape in 4-bit (2 layers, hidden 64): the checker only looks at
names, gradients and bytes, so a small model exercises every path in well under a second.
"""

import warnings

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model

from qlora_lab import checks, data, lora, models

R = 8


def tiny_batch(tok, n=2):
    rows = data.load_task()["train"].select(range(n))
    return data.Collator(tok.pad_token_id)([data.encode(row, tok) for row in rows])


@pytest.fixture
def base(tiny_shape):
    """(4-bit tiny base model, tokenizer, one batch)."""
    torch.manual_seed(0)
    model, tok = models.load_model(f"random:{tiny_shape}", quant="nf4")
    return model, tok, tiny_batch(tok)


def correct_setup(model, weight_decay=0.0, **lora_kwargs):
    torch.manual_seed(0)
    peft_model = lora.add_lora(model, r=R, alpha=2 * R, **lora_kwargs)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(peft_model), lr=1e-3, weight_decay=weight_decay)
    return peft_model, optimizer


def run(model, optimizer, batch, **kwargs):
    return checks.check_only_lora_trains(model, optimizer, lambda: checks.training_step(model, optimizer, batch), **kwargs)


def failed(report):
    return {c.name for c in report.checks if not c.passed}


# --------------------------------------------------------------------------- counting


def test_trainable_ratio_matches_a_hand_count(base):
    model, _, batch = base
    # tiny: hidden 64, intermediate 128, 2 layers, 4 heads / 2 kv heads of 16 -> k/v project 64 -> 32
    linears = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128),
               "down": (128, 64)}
    base_total = 4096 * 64 + 2 * (sum(i * o for i, o in linears.values()) + 2 * 64) + 64  # embed (tied), layers, final norm
    lora_total = 2 * sum(R * (i + o) for i, o in linears.values())
    quantized = 2 * sum(i * o for i, o in linears.values())
    peft_model, optimizer = correct_setup(model)
    report = run(peft_model, optimizer, batch)
    assert report.counts["total"] == base_total + lora_total == 352_576
    assert report.counts["trainable"] == report.counts["lora"] == lora_total == 16_384
    assert report.counts["quantized"] == quantized
    assert report.counts["naive_total"] == report.counts["total"] - quantized // 2  # numel() sees two values per byte
    assert report.trainable_ratio == pytest.approx(lora_total / (base_total + lora_total))
    assert peft_model.get_nb_trainable_parameters() == (lora_total, base_total + lora_total)  # peft agrees


# --------------------------------------------------------------------------- a correct setup, and step 1


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_correct_setup_passes_and_step_one_is_explained(base, weight_decay):
    model, _, batch = base
    peft_model, optimizer = correct_setup(model, weight_decay)
    a_names = [n for n, p in peft_model.named_parameters() if "lora_A" in n]
    a_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}
    first = {}  # A right after step 1, captured inside the step
    params = dict(peft_model.named_parameters())

    def step():
        loss = checks.training_step(peft_model, optimizer, batch)
        if not first:
            first.update({n: params[n].detach().clone() for n in a_names})
        return loss

    report = checks.check_only_lora_trains(peft_model, optimizer, step)
    assert report.ok, report.failures
    report.raise_if_failed()
    assert report.steps == 2 and len(report.losses) == 2 and all(isinstance(x, float) for x in report.losses)
    stats = report.lora_stats
    assert stats["A"] == stats["B"] == len(a_names) == 14
    assert stats["A zero grad at step 1"] == 14 and stats["B moved at step 1"] == 14 and stats["A moved at step 2"] == 14
    for n in a_names:  # what the report says about A at step 1, checked independently
        if weight_decay == 0:
            assert torch.equal(first[n], a_before[n])
        else:
            assert torch.allclose(first[n], a_before[n] * (1 - 1e-3 * weight_decay), rtol=0, atol=1e-9)
    assert stats["A moved at step 1"] == stats["A moved by weight decay only"] == (14 if weight_decay else 0)
    assert "zero gradient" in " ".join(report.notes)
    assert "All checks pass" in report._repr_html_() and "FAIL" not in str(report)


def test_modules_to_save_is_allowed_on_purpose(base):
    model, _, batch = base
    peft_model, optimizer = correct_setup(model, modules_to_save=["norm"])
    report = run(peft_model, optimizer, batch)
    assert report.ok, report.failures
    assert report.counts["trainable"] > report.counts["lora"]


def test_without_a_second_step_a_is_not_verified_but_not_failed(base):
    model, _, batch = base
    peft_model, optimizer = correct_setup(model)
    report = run(peft_model, optimizer, batch, second_step=False)
    assert report.ok and report.steps == 1 and report.lora_stats["A moved at step 2"] == 0
    assert "No second step" in " ".join(report.notes)
    moved = next(c for c in report.checks if c.name == "LoRA moved").detail
    assert "A at step 2: not run" in moved  # not "0", which would read as "did not move"


# --------------------------------------------------------------------------- broken setups


def test_nothing_trainable_is_caught(base):
    model, _, batch = base
    with pytest.raises(ValueError, match="not found in the base model"):  # peft's own guard
        lora.add_lora(model, r=R, targets=["query_key_value", "dense"])
    model.requires_grad_(False)  # as if the LoRA step were skipped
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    report = run(model, optimizer, batch)
    assert not report.ok and {"trainable = LoRA", "LoRA moved"} <= failed(report)
    text = "\n".join(report.failures)
    assert "nothing is trainable" in text and "nothing can learn" in text  # the step itself runs: silent
    with pytest.raises(checks.OnlyLoraError, match="nothing is trainable"):
        report.raise_if_failed()


@pytest.mark.parametrize("layer", ["lm_head", "norm"])
def test_base_layer_left_trainable_is_named(base, layer):
    model, _, batch = base
    peft_model = lora.add_lora(model, r=R)
    module = {"lm_head": peft_model.base_model.model.lm_head, "norm": peft_model.base_model.model.model.norm}[layer]
    module.weight.requires_grad_(True)  # "let's also tune the head" / a norm left trainable
    optimizer = torch.optim.AdamW(lora.trainable_parameters(peft_model), lr=1e-3)
    report = run(peft_model, optimizer, batch)
    assert failed(report) == {"trainable = LoRA", "base unchanged", "no gradient on frozen"}
    # the tiny shape ties lm_head to the input embeddings: one tensor, reported under both names
    offender = {"lm_head": "model.embed_tokens.weight", "norm": "model.norm.weight"}[layer]
    assert all(offender in problem for check in report.checks for problem in check.problems)
    if layer == "lm_head":
        assert "shared with base_model.model.lm_head.weight" in report.failures[0]
    assert report.trainable_ratio > report.counts["lora"] / report.counts["total"]


def test_optimizer_over_all_parameters_is_named(base):
    model, _, batch = base
    peft_model = lora.add_lora(model, r=R)
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-3)
    report = run(peft_model, optimizer, batch)
    assert failed(report) == {"optimizer = trainable"}
    assert "holds 20 frozen tensor(s)" in report.failures[0] and "requires_grad" in report.failures[0]


def test_optimizer_built_before_lora_trains_nothing(base):
    model, _, batch = base
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    peft_model = lora.add_lora(model, r=R)
    report = run(peft_model, optimizer, batch)
    assert failed(report) == {"optimizer = trainable", "LoRA moved"}
    text = "\n".join(report.failures)
    assert "28 trainable tensor(s) are not in the optimizer" in text and "before get_peft_model" in text
    assert "28 trainable tensor(s) did not move: not in the optimizer" in text
    assert report.steps == 1  # B never moved, so a second step could not teach A anything


def test_reentrant_checkpointing_without_input_grads_is_explained(base):
    model, _, batch = base
    peft_model = get_peft_model(model, lora.lora_config(r=R))  # no prepare_model_for_kbit_training
    peft_model.gradient_checkpointing_enable({"use_reentrant": True})
    if hasattr(peft_model.get_base_model(), "_require_grads_hook"):  # newer transformers add input grads
        peft_model.get_base_model().disable_input_require_grads()  # what transformers < 4.35 left you with
    optimizer = torch.optim.AdamW(lora.trainable_parameters(peft_model), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
        report = run(peft_model, optimizer, batch)
    assert not report.ok and "use_reentrant=True" in " ".join(report.failures)
    assert report.error.startswith("RuntimeError") and "does not require grad" in report.error
    assert checks.describe_setup(peft_model)["input embeddings output requires grad"] is False


def test_forgetting_prepare_changes_dtypes_but_still_trains_only_lora(base):
    model, _, batch = base
    peft_model = get_peft_model(model, lora.lora_config(r=R))
    before = checks.describe_setup(peft_model)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(peft_model), lr=1e-3)
    assert run(peft_model, optimizer, batch).ok
    assert before["norms"] == "bfloat16" and before["gradient checkpointing"] is False
    prepared = checks.describe_setup(lora.add_lora(models.load_model("random:tiny")[0], r=R))
    assert prepared["norms"] == prepared["embeddings / lm_head"] == "float32" and prepared["gradient checkpointing"]


@pytest.mark.parametrize("part", ["packed bytes", "absmax", "nested absmax", "norm values"])
def test_a_changed_base_tensor_is_caught_by_its_fingerprint(base, part):
    model, _, batch = base
    peft_model, optimizer = correct_setup(model)
    layer = peft_model.base_model.model.model.layers[1]
    weight = layer.mlp.down_proj.base_layer.weight
    target = {"packed bytes": lambda: weight.data, "absmax": lambda: weight.quant_state.absmax,
              "nested absmax": lambda: weight.quant_state.state2.absmax,
              "norm values": lambda: layer.input_layernorm.weight.data}[part]

    edits = []

    def step_that_also_edits_the_base():
        loss = checks.training_step(peft_model, optimizer, batch)
        if not edits:  # once: the checker runs a second step (two XORs would undo each other)
            with torch.no_grad():
                t = target().view(-1)
                t[0] = t[0] ^ 0xFF if t.dtype == torch.uint8 else t[0] + 1
            edits.append(part)
        return loss

    report = checks.check_only_lora_trains(peft_model, optimizer, step_that_also_edits_the_base)
    assert failed(report) == {"base unchanged"}
    problem = report.failures[0]
    assert ("down_proj" in problem or "input_layernorm" in problem) and "1 base tensor(s) changed" in problem
    assert (part if part != "norm values" else "values") in problem


def test_a_failing_step_is_reported_not_raised(base):
    model, _, batch = base
    peft_model, optimizer = correct_setup(model)

    def broken_step():
        raise RuntimeError("out of memory")

    report = checks.check_only_lora_trains(peft_model, optimizer, broken_step)
    assert not report.ok and "out of memory" in " ".join(report.failures)
    assert [c.passed for c in report.checks] == [True, True, False, False, False, False]


# --------------------------------------------------------------------------- bitsandbytes' CPU repack


needs_avx512bf16 = pytest.mark.skipif(not bnb.functional.has_avx512bf16(),
                                      reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")


@needs_avx512bf16
def test_cpu_repack_keeps_values_and_the_canonical_fingerprint(base):
    model, _, _ = base
    layer = model.model.layers[0].mlp.up_proj.to("cpu")
    before = checks.fingerprint(layer.weight, canonical=True)
    layer.support_avx512bf16_for_cpu = True
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 64, dtype=torch.bfloat16))  # repacks in place
    after = checks.fingerprint(layer.weight, canonical=True)
    assert checks.is_cpu_repacked(layer.weight) and after["layout"] == "cpu-inference"
    assert before["packed bytes"] != after["packed bytes"] and before["canonical"] == after["canonical"]
    assert checks.same_values(before, after)
    layer.weight.data.view(-1)[0] ^= 0x0F  # now a real change
    assert not checks.same_values(before, checks.fingerprint(layer.weight, canonical=True))


@needs_avx512bf16
def test_eval_pass_with_the_cpu_repack_on_is_caught(base):
    model, tok, batch = base
    model = model.to("cpu")
    peft_model, optimizer = correct_setup(model)
    for module in peft_model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: gemv_4bit has no autograd kernel

        def eval_then_train():
            peft_model.eval()
            checks.batch_loss(peft_model, batch)  # no grad in eval mode: bitsandbytes repacks here
            return checks.training_step(peft_model, optimizer, batch)

        report = checks.check_only_lora_trains(peft_model, optimizer, eval_then_train)
    assert "base unchanged" not in failed(report)  # a layout change is not training
    assert {"4-bit gradient path", "LoRA moved"} <= failed(report)
    text = "\n".join(report.failures)
    assert "14 4-bit layer(s) are repacked" in text and "got no gradient" in text
    assert "14 4-bit weight(s) changed layout during the step" in " ".join(report.notes)


# --------------------------------------------------------------------------- names


def test_lora_names():
    assert checks.is_lora_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert not checks.is_lora_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    assert checks.lora_partner("x.q_proj.lora_A.default.weight") == "x.q_proj.lora_B.default.weight"
    assert checks.lora_partner("x.embed.lora_embedding_A.default") == "x.embed.lora_embedding_B.default"
    assert checks.lora_partner("x.q_proj.lora_B.default.weight") is None
