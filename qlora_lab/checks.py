"""Prove that only LoRA trains: run one real training step and check what changed.

A QLoRA setup can look right and still train the wrong thing (a base layer left
trainable) or nothing at all (an optimizer that never saw the adapters). The loss curve
rarely tells you which. `check_only_lora_trains(model, optimizer, step_fn)` runs one real
step (`step_fn()` does forward, backward and `optimizer.step()`) and checks:

1. trainable = LoRA: the trainable parameters are LoRA adapters (or declared on purpose,
   like peft's `modules_to_save`), with the trainable ratio counted at logical size (a
   4-bit weight stores two values per byte, so its `numel()` is half its real size);
2. optimizer = trainable: the optimizer holds exactly the trainable parameters;
3. base unchanged: every frozen tensor is bit-identical after the step. A 4-bit weight is
   fingerprinted by its packed bytes and its whole quantization state (absmax, and with
   double quantization the nested absmax, code and offset); other tensors by their bytes;
4. LoRA moved: every trainable adapter changed. At step 1 LoRA's B is zero, so A's
   gradient is exactly zero; A then moves only through AdamW's decoupled weight decay
   (A <- A * (1 - lr * wd)) or not at all. The checker measures this, and when A had no
   gradient because B was zero it runs a second step to see A really learn;
5. no gradient on frozen: no base parameter received a gradient during the step;
6. 4-bit layers keep their gradient path: on CPUs with AVX512-BF16, bitsandbytes repacks a
   Linear4bit for inference after an eval pass, and the repacked layer passes no gradient
   to its input (see `models.keep_cpu_4bit_trainable`). A repack during the step is a
   layout change, not training: check 3 compares such layers in a canonical layout
   (4-bit codes in row-major order + absmax rounded to bf16, which is what the repack keeps).

The report (`OnlyLoraReport`) has `.ok`, `.failures` (readable sentences naming the
offenders), renders as a table in a notebook or as text, and `.raise_if_failed()` raises.
`training_step`, `batch_loss` and `describe_setup` are small helpers lab 04 uses to show
each mistake's symptom.

Shortcuts: fingerprints are blake2b hashes of the raw bytes, copied to the CPU (fine for the
lab's models; for a 70B model this reads every weight once per snapshot). LoRA tensors are
recognised by peft's names (a path element starting with "lora_"). Only AdamW-style
decoupled weight decay is explained in the step-1 notes; other optimizers are checked but
not explained.
"""

import copy
import hashlib
from dataclasses import dataclass, field
from html import escape

import torch

ALLOWED_BY_DEFAULT = ("modules_to_save", "trainable_tokens_")  # peft's names for parts trained on purpose
SHOW_NAMES = 3  # offenders named in one failure sentence before "and N more"


class OnlyLoraError(AssertionError):
    """Raised by OnlyLoraReport.raise_if_failed: the setup trains something other than LoRA."""


# --------------------------------------------------------------------------- naming


def is_lora_name(name: str) -> bool:
    """True for peft LoRA tensors. Example: is_lora_name("...q_proj.lora_A.default.weight") -> True"""
    return any(part.startswith("lora_") for part in name.split("."))


def lora_partner(name: str) -> str | None:
    """The B tensor paired with a LoRA A tensor, else None.

    Example: lora_partner("m.q_proj.lora_A.default.weight") -> "m.q_proj.lora_B.default.weight"
    """
    for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        if f".{a}." in f".{name}.":
            return ".".join(b if part == a else part for part in name.split("."))
    return None


def _short(names: list[str]) -> str:
    """'a, b, c and 4 more'"""
    names = [n.removeprefix("base_model.model.") for n in names]
    head = ", ".join(names[:SHOW_NAMES])
    return head + (f" and {len(names) - SHOW_NAMES} more" if len(names) > SHOW_NAMES else "")


def named_unique_parameters(model) -> dict[str, tuple[torch.nn.Parameter, list[str]]]:
    """{first name: (parameter, other names of the same tensor)}; tied weights appear once.

    Example: named_unique_parameters(smollm2)["model.embed_tokens.weight"][1] -> ["lm_head.weight"]
    """
    out, first = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[first[id(p)]][1].append(name)
        else:
            first[id(p)] = name
            out[name] = (p, [])
    return out


def logical_numel(p: torch.Tensor) -> int:
    """Values a parameter represents: a packed 4-bit weight counts its unpacked shape.

    Example: logical_numel(q_proj.weight)  # Params4bit (165888, 1) uint8 -> 331776 (= 576 * 576)
    """
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


# --------------------------------------------------------------------------- fingerprints


def digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's raw bytes (dtype and values; shape only through the size)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)  # (bytes,)
    return hashlib.blake2b(raw.cpu().numpy(), digest_size=12).hexdigest()


def is_cpu_repacked(p: torch.Tensor) -> bool:
    """True when bitsandbytes has repacked this 4-bit weight into its CPU inference layout."""
    return bool(getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False))


def fingerprint(p: torch.Tensor, canonical: bool = False) -> dict:
    """Hashes of everything that defines a frozen tensor's values.

    4-bit: the packed bytes and each part of the quant state; with canonical=True also a
    `canonical` hash that is the same before and after bitsandbytes' CPU inference repack.
    Others: the bytes.
    Example: fingerprint(q_proj.weight) -> {"layout": "standard", "packed bytes": "9c1e...", "absmax": ..., ...}
    """
    state = getattr(p, "quant_state", None)
    if state is None:
        return {"layout": "plain", "values": digest(p)}
    parts = {"layout": "cpu-inference" if is_cpu_repacked(p) else "standard",
             "packed bytes": digest(p), "absmax": digest(state.absmax), "code": digest(state.code)}
    if state.nested:
        parts.update({"nested absmax": digest(state.state2.absmax), "nested code": digest(state.state2.code),
                      "offset": digest(state.offset)})
    if canonical:
        parts["canonical"] = canonical_digest(p.data, state)
    return parts


def canonical_digest(packed: torch.Tensor, state) -> str:
    """Hash of (4-bit codes in the standard packed order, per-block absmax rounded to bf16).

    bitsandbytes' CPU repack reorders the codes (losslessly) and replaces the (nested)
    absmax by its dequantized value in bf16, so both layouts map to the same pair. In the
    standard layout the codes are the packed bytes themselves.
    """
    from bitsandbytes import functional as bnbf

    if getattr(state, "packing_format_for_cpu", False):
        codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(packed.clone(), copy.deepcopy(state))
        return digest(codes) + digest(state.absmax.T.reshape(-1))  # absmax stored (blocks per row, rows) in bf16
    return digest(packed) + _absmax_digest(state)


def _absmax_digest(state) -> str:
    """The per-block scales of a standard-layout quant state, dequantized and rounded to bf16, hashed."""
    from bitsandbytes import functional as bnbf

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return digest(absmax.float().to(torch.bfloat16))


def same_values(before: dict, after: dict) -> bool:
    """Two fingerprints describe the same values (comparing canonically across a CPU repack)."""
    if before["layout"] != after["layout"] and "canonical" in before and "canonical" in after:
        return before["canonical"] == after["canonical"]
    return before == after


def changed_parts(before: dict, after: dict) -> list[str]:
    """Which parts of a fingerprint differ. Example: -> ["packed bytes", "absmax"]"""
    return [k for k in before if k not in ("layout", "canonical") and before.get(k) != after.get(k)]


# --------------------------------------------------------------------------- the report


@dataclass
class Check:
    """One row of the report."""

    name: str  # what is checked, e.g. "optimizer = trainable"
    passed: bool  # the verdict
    detail: str  # what was measured, one line
    problems: list[str] = field(default_factory=list)  # readable sentences naming offenders (empty if passed)


@dataclass
class OnlyLoraReport:
    """What check_only_lora_trains measured; `.ok`, `.failures`, `.raise_if_failed()`."""

    checks: list[Check]  # the six checks in order
    counts: dict  # logical parameter counts: total, trainable, lora, quantized, naive_total
    trainable_ratio: float  # trainable / total, logical counts
    losses: list  # what step_fn returned at each step it ran (usually the loss)
    steps: int  # training steps run (1, or 2 when A needed a second step to show it learns)
    lora_stats: dict  # step-1 story: counts of LoRA A/B tensors by what happened to them
    notes: list[str]  # explanations that are not failures (e.g. A at step 1)
    error: str | None = None  # the exception the step raised ("RuntimeError: ..."), if it raised

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f"[{c.name}] {p}" for c in self.checks for p in c.problems]

    @property
    def passed(self) -> dict[str, bool]:
        """{check name: passed}, for record()."""
        return {c.name: c.passed for c in self.checks}

    def raise_if_failed(self):
        """Raise OnlyLoraError listing every failure; return self when all checks pass."""
        if not self.ok:
            raise OnlyLoraError("only-LoRA-trains check failed:\n- " + "\n- ".join(self.failures))
        return self

    def __str__(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"{'check'.ljust(width)}  result  measured"]
        for c in self.checks:
            lines.append(f"{c.name.ljust(width)}  {'pass' if c.passed else 'FAIL'}    {c.detail}")
        lines += ["", "failures:" if self.failures else "all checks pass"] + [f"- {f}" for f in self.failures]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{escape(c.name)}</td><td style='color:{'green' if c.passed else 'red'};font-weight:bold'>"
            f"{'✓ pass' if c.passed else '✗ FAIL'}</td><td style='text-align:left'>{escape(c.detail)}</td></tr>"
            for c in self.checks)
        items = "".join(f"<li>{escape(f)}</li>" for f in self.failures)
        notes = "".join(f"<li>{escape(n)}</li>" for n in self.notes)
        return (f"<table><tr><th>check</th><th>result</th><th style='text-align:left'>measured</th></tr>{rows}</table>"
                + (f"<p><b>Failures</b></p><ul>{items}</ul>" if items else "<p><b>All checks pass.</b></p>")
                + (f"<p>Notes</p><ul>{notes}</ul>" if notes else ""))


# --------------------------------------------------------------------------- the checker


def _explain_step_error(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    if "does not require grad" in text:
        return (f"the training step failed ({text}). The loss has no path back to any trainable parameter: "
                f"nothing trainable takes part in the forward pass (no LoRA adapters, frozen adapters), or "
                f"gradient checkpointing with use_reentrant=True cut the path because the layer inputs do not "
                f"require grad (prepare_model_for_kbit_training / model.enable_input_require_grads() fix that).")
    return f"the training step failed ({text})."


def _as_number(value):
    """A step's return value as a float when it is a number or a one-element tensor."""
    return float(value) if isinstance(value, (int, float)) or getattr(value, "numel", lambda: 0)() == 1 else value


def _optimizer_groups(optimizer) -> dict[int, dict]:
    """{id(tensor): its param group} over every tensor the optimizer holds."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def check_only_lora_trains(model, optimizer, step_fn, allow: tuple[str, ...] = ALLOWED_BY_DEFAULT,
                           second_step: bool = True) -> OnlyLoraReport:
    """Run step_fn() (one real training step) and check that it trained exactly the LoRA adapters.

    allow: name fragments of parameters trained on purpose besides LoRA (default: peft's
    modules_to_save and trainable tokens). second_step: when some LoRA A had no gradient at
    step 1 only because its B was still zero, run step_fn() once more to see A learn.
    Example:
        step = lambda: training_step(model, optimizer, batch)
        check_only_lora_trains(model, optimizer, step).raise_if_failed()
    """
    params = named_unique_parameters(model)
    is_adapter = {n: is_lora_name(n) for n in params}
    is_allowed = {n: not is_adapter[n] and any(a in n for a in allow) for n in params}
    expected_trainable = {n for n in params if is_adapter[n] or is_allowed[n]}
    trainable = {n for n, (p, _) in params.items() if p.requires_grad}
    base = [n for n in params if n not in expected_trainable]  # must stay frozen and unchanged
    checks, notes = [], []

    # 1. trainable = LoRA (static)
    counts = {"total": sum(logical_numel(p) for p, _ in params.values()),
              "trainable": sum(logical_numel(params[n][0]) for n in trainable),
              "lora": sum(params[n][0].numel() for n in params if is_adapter[n]),
              "quantized": sum(logical_numel(p) for p, _ in params.values() if getattr(p, "quant_state", None) is not None),
              "naive_total": sum(p.numel() for p, _ in params.values())}
    ratio = counts["trainable"] / max(counts["total"], 1)
    wrong = sorted(trainable - expected_trainable)
    adapters = [n for n in params if is_adapter[n]]
    problems = []
    if not trainable:
        problems.append("nothing is trainable: every parameter has requires_grad=False. Did get_peft_model run, "
                        "did target_modules match any layer, is the LoraConfig in inference_mode?")
    elif not adapters:
        problems.append("the model has no LoRA adapters (get_peft_model was not called, or target_modules matched nothing).")
    if wrong:
        size = sum(logical_numel(params[n][0]) for n in wrong)
        aliases = [f"{n} (shared with {', '.join(params[n][1])})" if params[n][1] else n for n in wrong]
        problems.append(f"{len(wrong)} base tensor(s) are trainable but are not LoRA adapters ({size:,} parameters): "
                        f"{_short(aliases)}. Freeze them (requires_grad_(False)), or declare them on purpose "
                        f"with modules_to_save.")
    frozen_adapters = [n for n in adapters if n not in trainable]
    if frozen_adapters and trainable:
        notes.append(f"{len(frozen_adapters)} LoRA tensor(s) are frozen, e.g. {_short(frozen_adapters)}.")
    checks.append(Check("trainable = LoRA", not problems,
                        f"{counts['trainable']:,} of {counts['total']:,} parameters trainable ({ratio:.3%}); "
                        f"{len(trainable)} tensors, {len(wrong)} not LoRA", problems))

    # 2. optimizer = trainable (static)
    groups = _optimizer_groups(optimizer)
    name_of = {id(p): n for n, (p, _) in params.items()}
    in_opt = {name_of[i] for i in groups if i in name_of}
    stale = [i for i in groups if i not in name_of]
    frozen_in_opt, missing = sorted(in_opt - trainable), sorted(trainable - in_opt)
    problems = []
    if frozen_in_opt:
        problems.append(f"the optimizer holds {len(frozen_in_opt)} frozen tensor(s), e.g. {_short(frozen_in_opt)}: it was "
                        f"built over model.parameters(). Build it over the trainable ones only: "
                        f"[p for p in model.parameters() if p.requires_grad].")
    if missing:
        problems.append(f"{len(missing)} trainable tensor(s) are not in the optimizer and will never be updated, "
                        f"e.g. {_short(missing)}. Was the optimizer built before get_peft_model added the adapters?")
    if stale:
        problems.append(f"the optimizer holds {len(stale)} tensor(s) that are not parameters of this model "
                        f"(an optimizer built for another model object?).")
    checks.append(Check("optimizer = trainable", not problems,
                        f"optimizer holds {len(groups)} tensors: {len(in_opt & trainable)} trainable, "
                        f"{len(frozen_in_opt)} frozen, {len(stale)} foreign; {len(missing)} trainable missing", problems))

    # run the step, watching gradients as they are accumulated
    grads: dict[str, float] = {}  # name -> norm of the gradient accumulated at the last step run

    def watch(name):
        def hook(p):
            grads[name] = float(p.grad.detach().float().norm())
        return hook

    hooks = [p.register_post_accumulate_grad_hook(watch(n)) for n, (p, _) in params.items() if p.requires_grad]
    before_base = {n: fingerprint(params[n][0]) for n in base}
    saved = {n: (params[n][0].data.clone() if is_cpu_repacked(params[n][0]) else None,  # to compare canonically
                 copy.deepcopy(params[n][0].quant_state))  # if the step changes a layer's layout (CPU repack)
             for n in base if before_base[n]["layout"] != "plain"}
    watched = sorted(trainable & expected_trainable)  # adapters (and declared parts) that should move
    before = {n: params[n][0].detach().clone() for n in watched}
    losses, error = [], None
    try:
        losses.append(_as_number(step_fn()))
    except Exception as err:  # reported as a failure, with the likely cause
        error = err
    grads1, grads = dict(grads), {}
    after1 = {n: params[n][0].detach().clone() for n in watched}
    steps = 1

    # A whose gradient was zero at step 1 because B was still zero: give it a second step
    def b_was_zero(a):
        b = lora_partner(a)
        return b is not None and b in before and not before[b].any()

    deferred = [n for n in watched if is_adapter[n] and grads1.get(n, 0.0) == 0.0 and b_was_zero(n)]
    b_moved = {lora_partner(a) for a in deferred if not torch.equal(before[lora_partner(a)], after1[lora_partner(a)])}
    retry = [a for a in deferred if lora_partner(a) in b_moved]
    grads2, after2 = {}, {}
    if error is None and second_step and retry:
        try:
            losses.append(_as_number(step_fn()))
        except Exception as err:
            error = err
        grads2 = dict(grads)
        after2 = {n: params[n][0].detach().clone() for n in retry}
        steps = 2
    for h in hooks:
        h.remove()
    after_base = {n: fingerprint(params[n][0]) for n in base}
    for n in base:  # a layout change (CPU repack) during the step: compare in the canonical layout
        if before_base[n]["layout"] != after_base[n]["layout"]:
            data, state = saved[n]
            before_base[n]["canonical"] = (before_base[n]["packed bytes"] + _absmax_digest(state) if data is None
                                           else canonical_digest(data, state))
            after_base[n]["canonical"] = canonical_digest(params[n][0].data, params[n][0].quant_state)

    if error is not None:
        message = _explain_step_error(error)
        for name in ("base unchanged", "LoRA moved", "no gradient on frozen", "4-bit gradient path"):
            checks.append(Check(name, False, "not measured: the step failed", [message] if name == "LoRA moved" else []))
        return OnlyLoraReport(checks, counts, ratio, losses, steps, {}, notes,
                              error=f"{type(error).__name__}: {error}".splitlines()[0])

    # 3. base unchanged
    changed = [n for n in base if not same_values(before_base[n], after_base[n])]
    repacked = [n for n in base if before_base[n]["layout"] != after_base[n]["layout"]]
    problems = []
    if changed:
        parts = sorted({p for n in changed for p in changed_parts(before_base[n], after_base[n])})
        problems.append(f"{len(changed)} base tensor(s) changed during the step ({', '.join(parts)}): {_short(changed)}. "
                        f"Something besides LoRA is being trained.")
    same = [n for n in repacked if n not in changed]
    if same:
        notes.append(f"{len(same)} 4-bit weight(s) changed layout during the step (bitsandbytes' CPU inference "
                     f"repack) with unchanged values (compared in a canonical layout): not training.")
    n4 = sum(before_base[n]["layout"] != "plain" for n in base)
    checks.append(Check("base unchanged", not changed,
                        f"{len(base) - len(changed)} of {len(base)} base tensors bit-identical "
                        f"({n4} 4-bit: packed bytes + quant state hashed)", problems))

    # 4. LoRA moved (with the step-1 story for A)
    stuck, stats = [], {"A": 0, "B": 0, "A zero grad at step 1": len(deferred), "A moved at step 1": 0,
                        "A moved by weight decay only": 0, "A moved at step 2": 0, "B moved at step 1": 0}
    for n in watched:
        moved1 = not torch.equal(before[n], after1[n])
        kind = "A" if lora_partner(n) else ("B" if is_adapter[n] and ("lora_B" in n or "lora_embedding_B" in n) else None)
        if kind:
            stats[kind] += 1
        if kind == "B" and moved1:
            stats["B moved at step 1"] += 1
        if kind == "A" and moved1:
            stats["A moved at step 1"] += 1
        if n not in in_opt:
            stuck.append((n, "not in the optimizer"))
            continue
        if n in deferred:
            group = groups.get(id(params[n][0]), {})
            lr, wd = group.get("lr", 0.0), group.get("weight_decay", 0.0)
            change = float((after1[n] - before[n]).float().norm() / before[n].float().norm().clamp_min(1e-30))
            if moved1 and lr * wd > 0 and abs(change / (lr * wd) - 1) < 1e-2:
                stats["A moved by weight decay only"] += 1
            if n in after2 and grads2.get(n, 0.0) > 0 and not torch.equal(after1[n], after2[n]):
                stats["A moved at step 2"] += 1
                continue
            if n in retry and not second_step:
                continue  # cannot learn at step 1 by construction; not verified
            reason = ("its B did not move at step 1, so A had no gradient to learn from" if n not in retry
                      else "it still had no gradient at step 2")
            stuck.append((n, reason))
            continue
        if not moved1:
            reason = "got no gradient" if grads1.get(n, 0.0) == 0.0 else "got a gradient but did not change (lr 0?)"
            stuck.append((n, reason))
    problems = [] if watched else ["no trainable LoRA adapter exists, so nothing can learn: the step ran "
                                       "and changed nothing."]
    for reason in sorted({r for _, r in stuck}):
        names = [n for n, r in stuck if r == reason]
        problems.append(f"{len(names)} trainable tensor(s) did not move: {reason}: {_short(names)}.")
    if deferred:
        lr_wd = [(g.get("lr", 0.0), g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
        how = (f"{stats['A moved by weight decay only']} of them moved only by AdamW's decoupled weight decay "
               f"(A <- A * (1 - lr * wd), lr, wd = {lr_wd[0]})" if stats["A moved by weight decay only"]
               else f"none moved (with zero gradient and no weight decay Adam's update is 0; lr, wd = {lr_wd[0]})")
        notes.append(f"step 1: {len(deferred)} LoRA A tensor(s) had exactly zero gradient because their B starts at "
                     f"zero; {how}. " + (f"At step 2, {stats['A moved at step 2']} of them got a gradient and moved."
                                         if steps == 2 else "No second step was run to see them learn."))
    checks.append(Check("LoRA moved", not problems,
                        f"{len(watched) - len(stuck)} of {len(watched)} trainable tensors moved "
                        f"(B at step 1: {stats['B moved at step 1']}/{stats['B']}; A at step 1: {stats['A moved at step 1']}/"
                        f"{stats['A']}, {stats['A moved by weight decay only']} by weight decay only; A at step 2: "
                        f"{stats['A moved at step 2']})", problems))

    # 5. no gradient on frozen (base) parameters
    graded = sorted(n for n in base if grads1.get(n, 0.0) > 0 or grads2.get(n, 0.0) > 0
                    or (params[n][0].grad is not None and bool(params[n][0].grad.any())))
    problems = [f"{len(graded)} base tensor(s) received a gradient: {_short(graded)}. They require grad; "
                f"freeze them or they cost memory and may be trained."] if graded else []
    checks.append(Check("no gradient on frozen", not graded,
                        f"{len(graded)} of {len(base)} base tensors received a gradient", problems))

    # 6. 4-bit layers keep their gradient path (bitsandbytes CPU inference repack)
    repacked_now = [n for n in base if "cpu-inference" in (before_base[n]["layout"], after_base[n]["layout"])]
    problems = [f"{len(repacked_now)} 4-bit layer(s) are repacked for CPU inference ({_short(repacked_now)}): "
                f"their matmul passes no gradient to its input, so every layer below gets wrong gradients. "
                f"An eval pass with bitsandbytes' AVX512-BF16 path on did this; call "
                f"models.keep_cpu_4bit_trainable(model) right after loading (load_model does) and reload."
                ] if repacked_now else []
    checks.append(Check("4-bit gradient path", not repacked_now,
                        f"{len(repacked_now)} of {n4} 4-bit layers in bitsandbytes' CPU inference layout", problems))
    return OnlyLoraReport(checks, counts, ratio, losses, steps, stats, notes)


# --------------------------------------------------------------------------- helpers for lab 04


def training_step(model, optimizer, batch: dict) -> float:
    """One step on one batch: forward, backward, optimizer.step(), zero_grad; returns the loss.

    Example: check_only_lora_trains(model, opt, lambda: training_step(model, opt, batch))
    """
    device = next(model.parameters()).device
    model.train()
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def loss_curve(model, optimizer, batch: dict, steps: int, losses=()) -> list[float]:
    """The loss on one batch after 0, 1, ..., `steps` updates, continuing the `losses` of steps already run.

    `losses[i]` is the loss before update i+1 (what training_step returns); missing updates
    are trained, and the loss after the last one is a forward pass without training.
    Overfitting one batch is the quickest symptom meter: a healthy setup drives it down.
    Example: loss_curve(model, opt, batch, 3, report.losses) -> [1.81, 1.06, 0.64, 0.30]
    """
    losses = list(losses)[: steps + 1]
    while len(losses) < steps:
        losses.append(training_step(model, optimizer, batch))
    if len(losses) == steps:
        losses.append(batch_loss(model, batch))
    return losses


@torch.no_grad()
def batch_loss(model, batch: dict) -> float:
    """The loss on one batch without training (train mode kept: no CPU inference repack)."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss.item()


def describe_setup(model) -> dict:
    """What prepare_model_for_kbit_training changes, measured on a model.

    dtypes of each kind of parameter, whether the input embeddings' output requires grad
    (needed by reentrant gradient checkpointing), and whether gradient checkpointing is on.
    Example: describe_setup(model) -> {"4-bit weights": "uint8", "norms": "bfloat16", ...}
    """
    kinds: dict[str, set] = {}
    for name, (p, _) in named_unique_parameters(model).items():
        kind = ("LoRA adapters" if is_lora_name(name) else "4-bit weights" if getattr(p, "quant_state", None) is not None
                else "norms" if "norm" in name else "embeddings / lm_head" if ("embed" in name or "lm_head" in name)
                else "other")
        kinds.setdefault(kind, set()).add(str(p.dtype).removeprefix("torch."))
    embeddings = model.get_input_embeddings()
    probe = torch.zeros(1, 1, dtype=torch.long, device=embeddings.weight.device)  # (batch, seq): one token
    with torch.enable_grad():
        input_grads = bool(embeddings(probe).requires_grad)  # hooks from enable_input_require_grads run here
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    return {**{k: "/".join(sorted(v)) for k, v in sorted(kinds.items())},
            "input embeddings output requires grad": input_grads, "gradient checkpointing": checkpointing,
            "trainable tensors": sum(p.requires_grad for p, _ in named_unique_parameters(model).values())}
