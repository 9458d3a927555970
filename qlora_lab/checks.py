"""Prove that only LoRA trains: run one real training step and check what changed.

A QLoRA setup can look right and still train the wrong thing (a base layer left trainable) or nothing at all
(an optimizer that never saw the adapters); the loss curve rarely tells you which. `check_only_lora_trains(model,
optimizer, step_fn)` runs one real step (`step_fn()`: forward, backward, `optimizer.step()`) and checks:

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

The report (`OnlyLoraReport`) has `.ok`, `.failures` (sentences naming the offenders), renders
as a table, and `.raise_if_failed()` raises. `training_step`, `batch_loss` and `describe_setup`
help lab 04 show each mistake's symptom.

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
from bitsandbytes import functional as bnbf

from qlora_lab.shapes import logical_numel

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
    if getattr(state, "packing_format_for_cpu", False):
        codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(packed.clone(), copy.deepcopy(state))
        return digest(codes) + digest(state.absmax.T.reshape(-1))  # absmax stored (blocks per row, rows) in bf16
    return digest(packed) + _absmax_digest(state)


def _absmax_digest(state) -> str:
    """The per-block scales of a standard-layout quant state, dequantized and rounded to bf16, hashed."""
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
    notes: list[str] = field(default_factory=list)  # explanations that are not failures


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

    __repr__ = __str__  # the readable table, also in papermill's text/plain output

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
    roles = Roles.of(model, allow)
    checks = [check_trainable_is_lora(roles), check_optimizer_holds_trainable(roles, optimizer)]  # 1, 2: static
    run = run_watched(roles, step_fn, second_step)
    if run.error is not None:
        unmeasured = ("base unchanged", "LoRA moved", "no gradient on frozen", "4-bit gradient path")
        checks += [Check(name, False, "not measured: the step failed", [_explain_step_error(run.error)] * (i == 1))
                   for i, name in enumerate(unmeasured)]
    else:
        checks += [check_base_unchanged(roles, run), check_lora_moved(roles, optimizer, run, second_step),
                   check_no_gradient_on_frozen(roles, run), check_4bit_gradient_path(roles, run)]
    return OnlyLoraReport(checks, roles.counts, roles.ratio, run.losses, run.steps,
                          run.lora_stats if run.error is None else {}, [note for c in checks for note in c.notes],
                          error=None if run.error is None else f"{type(run.error).__name__}: {run.error}".splitlines()[0])


@dataclass
class Roles:
    """Who is who among a model's parameters, by the first name of each tensor (tied weights once)."""

    params: dict  # name -> (parameter, other names of the same tensor)
    adapters: list  # LoRA tensors
    expected: set  # tensors that may train: adapters and the parts `allow` names
    trainable: set  # tensors with requires_grad now
    base: list  # everything else: must stay frozen and unchanged
    counts: dict  # logical parameter counts: total, trainable, lora, quantized, naive_total

    @classmethod
    def of(cls, model, allow: tuple[str, ...]) -> "Roles":
        params = named_unique_parameters(model)
        adapters = [n for n in params if is_lora_name(n)]
        expected = set(adapters) | {n for n in params if n not in adapters and any(a in n for a in allow)}
        trainable = {n for n, (p, _) in params.items() if p.requires_grad}
        tensors = [p for p, _ in params.values()]
        counts = {"total": sum(map(logical_numel, tensors)),
                  "trainable": sum(logical_numel(params[n][0]) for n in trainable),
                  "lora": sum(params[n][0].numel() for n in adapters),
                  "quantized": sum(logical_numel(p) for p in tensors if getattr(p, "quant_state", None) is not None),
                  "naive_total": sum(p.numel() for p in tensors)}
        return cls(params, adapters, expected, trainable, [n for n in params if n not in expected], counts)

    @property
    def ratio(self) -> float:
        return self.counts["trainable"] / max(self.counts["total"], 1)

    def watched(self) -> list[str]:
        """Adapters (and declared parts) that are trainable and so should move."""
        return sorted(self.trainable & self.expected)


@dataclass
class WatchedRun:
    """What happened during the checked step(s): losses, gradients, values before and after."""

    losses: list = field(default_factory=list)  # what step_fn returned at each step
    steps: int = 0  # steps run
    error: Exception | None = None  # what the step raised, if it raised
    grads: list = field(default_factory=list)  # per step: {name: gradient norm accumulated}
    before: dict = field(default_factory=dict)  # watched tensors before step 1
    after: list = field(default_factory=list)  # per step: {name: tensor after it}
    base_before: dict = field(default_factory=dict)  # fingerprints of frozen tensors before
    base_after: dict = field(default_factory=dict)  # ... and after
    deferred: list = field(default_factory=list)  # A tensors with zero gradient at step 1 because B was zero
    lora_stats: dict = field(default_factory=dict)  # step-1 story of A and B, filled by check_lora_moved


def run_watched(roles: Roles, step_fn, second_step: bool) -> WatchedRun:
    """Run step_fn() with gradient hooks and snapshots; a second step for A tensors that could not learn at step 1."""
    run, grads = WatchedRun(), {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, float(p.grad.detach().float().norm())))
             for n, (p, _) in roles.params.items() if p.requires_grad]
    run.base_before, saved = _fingerprint_base(roles)
    watched = roles.watched()
    run.before = {n: roles.params[n][0].detach().clone() for n in watched}
    _step(roles, run, step_fn, grads, watched)
    b_was_zero = {n for n in watched if lora_partner(n) in run.before and not run.before[lora_partner(n)].any()}
    run.deferred = [n for n in watched if is_lora_name(n) and run.grads[0].get(n, 0.0) == 0.0 and n in b_was_zero]
    retry = [a for a in run.deferred if not torch.equal(run.before[lora_partner(a)], run.after[0][lora_partner(a)])]
    if run.error is None and second_step and retry:
        _step(roles, run, step_fn, grads, retry)
    for h in hooks:
        h.remove()
    run.base_after = {n: fingerprint(roles.params[n][0]) for n in roles.base}
    for n in roles.base:  # a layout change (CPU repack) during the step: compare in the canonical layout
        if run.base_before[n]["layout"] != run.base_after[n]["layout"]:
            data, state = saved[n]
            run.base_before[n]["canonical"] = (run.base_before[n]["packed bytes"] + _absmax_digest(state) if data is None
                                               else canonical_digest(data, state))
            run.base_after[n]["canonical"] = canonical_digest(roles.params[n][0].data, roles.params[n][0].quant_state)
    return run


def _fingerprint_base(roles: Roles) -> tuple[dict, dict]:
    """Fingerprints of every frozen tensor, plus copies of the 4-bit ones' data and quant state, to compare
    canonically if the step changes a layer's layout (the CPU repack)."""
    before = {n: fingerprint(roles.params[n][0]) for n in roles.base}
    saved = {n: (roles.params[n][0].data.clone() if is_cpu_repacked(roles.params[n][0]) else None,
                 copy.deepcopy(roles.params[n][0].quant_state)) for n in roles.base if before[n]["layout"] != "plain"}
    return before, saved


def _step(roles: Roles, run: WatchedRun, step_fn, grads: dict, keep: list[str]) -> None:
    """One step_fn() call: its loss (or error), the gradients it accumulated, the kept tensors after it."""
    grads.clear()
    try:
        run.losses.append(_as_number(step_fn()))
    except Exception as err:  # reported as a failure, with the likely cause
        run.error = err
    run.steps += 1
    run.grads.append(dict(grads))
    run.after.append({n: roles.params[n][0].detach().clone() for n in keep})


def check_trainable_is_lora(roles: Roles) -> Check:
    """1. The trainable parameters are LoRA adapters (or declared on purpose), counted at logical size."""
    wrong, problems, notes = sorted(roles.trainable - roles.expected), [], []
    if not roles.trainable:
        problems.append("nothing is trainable: every parameter has requires_grad=False. Did get_peft_model run, "
                        "did target_modules match any layer, is the LoraConfig in inference_mode?")
    elif not roles.adapters:
        problems.append("the model has no LoRA adapters (get_peft_model was not called, or target_modules matched nothing).")
    if wrong:
        size = sum(logical_numel(roles.params[n][0]) for n in wrong)
        aliases = [f"{n} (shared with {', '.join(roles.params[n][1])})" if roles.params[n][1] else n for n in wrong]
        problems.append(f"{len(wrong)} base tensor(s) are trainable but are not LoRA adapters ({size:,} parameters): "
                        f"{_short(aliases)}. Freeze them (requires_grad_(False)), or declare them on purpose "
                        f"with modules_to_save.")
    frozen_adapters = [n for n in roles.adapters if n not in roles.trainable]
    if frozen_adapters and roles.trainable:
        notes.append(f"{len(frozen_adapters)} LoRA tensor(s) are frozen, e.g. {_short(frozen_adapters)}.")
    c = roles.counts
    return Check("trainable = LoRA", not problems, f"{c['trainable']:,} of {c['total']:,} parameters trainable "
                 f"({roles.ratio:.3%}); {len(roles.trainable)} tensors, {len(wrong)} not LoRA", problems, notes)


def check_optimizer_holds_trainable(roles: Roles, optimizer) -> Check:
    """2. The optimizer holds exactly the trainable parameters."""
    groups = _optimizer_groups(optimizer)
    name_of = {id(p): n for n, (p, _) in roles.params.items()}
    in_opt = {name_of[i] for i in groups if i in name_of}
    stale = [i for i in groups if i not in name_of]
    frozen_in_opt, missing = sorted(in_opt - roles.trainable), sorted(roles.trainable - in_opt)
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
    return Check("optimizer = trainable", not problems,
                 f"optimizer holds {len(groups)} tensors: {len(in_opt & roles.trainable)} trainable, "
                 f"{len(frozen_in_opt)} frozen, {len(stale)} foreign; {len(missing)} trainable missing", problems)


def check_base_unchanged(roles: Roles, run: WatchedRun) -> Check:
    """3. Every frozen tensor is bit-identical after the step (4-bit: packed bytes and quant state)."""
    before, after = run.base_before, run.base_after
    changed = [n for n in roles.base if not same_values(before[n], after[n])]
    repacked_same = [n for n in roles.base if before[n]["layout"] != after[n]["layout"] and n not in changed]
    problems = []
    if changed:
        parts = sorted({p for n in changed for p in changed_parts(before[n], after[n])})
        problems.append(f"{len(changed)} base tensor(s) changed during the step ({', '.join(parts)}): {_short(changed)}. "
                        f"Something besides LoRA is being trained.")
    notes = [f"{len(repacked_same)} 4-bit weight(s) changed layout during the step (bitsandbytes' CPU inference "
             f"repack) with unchanged values (compared in a canonical layout): not training."] if repacked_same else []
    n4 = sum(before[n]["layout"] != "plain" for n in roles.base)
    return Check("base unchanged", not changed, f"{len(roles.base) - len(changed)} of {len(roles.base)} base tensors "
                 f"bit-identical ({n4} 4-bit: packed bytes + quant state hashed)", problems, notes)


def check_lora_moved(roles: Roles, optimizer, run: WatchedRun, second_step: bool) -> Check:
    """4. Every trainable adapter changed, with the step-1 story of A (zero gradient while B is zero)."""
    watched, groups = roles.watched(), _optimizer_groups(optimizer)
    in_opt = {n for n in watched if id(roles.params[n][0]) in groups}
    stats = run.lora_stats = _step1_stats(roles, groups, in_opt, run)
    stuck = [(n, reason) for n in watched if (reason := _why_stuck(n, in_opt, run, second_step))]
    problems = [] if watched else ["no trainable LoRA adapter exists, so nothing can learn: "
                                   "the step ran and changed nothing."]
    for reason in sorted({r for _, r in stuck}):
        names = [n for n, r in stuck if r == reason]
        problems.append(f"{len(names)} trainable tensor(s) did not move: {reason}: {_short(names)}.")
    return Check("LoRA moved", not problems,
                 f"{len(watched) - len(stuck)} of {len(watched)} trainable tensors moved "
                 f"(B at step 1: {stats['B moved at step 1']}/{stats['B']}; A at step 1: {stats['A moved at step 1']}/"
                 f"{stats['A']}, {stats['A moved by weight decay only']} by weight decay only; A at step 2: "
                 f"{stats['A moved at step 2'] if run.steps == 2 else 'not run'})", problems,
                 [_step1_note(optimizer, run)] if run.deferred else [])


def _moved(run: WatchedRun, name: str) -> bool:
    """Whether a watched tensor changed at step 1."""
    return not torch.equal(run.before[name], run.after[0][name])


def _learned_at_step2(run: WatchedRun, name: str) -> bool:
    """A second step ran, gave this tensor a gradient, and moved it."""
    return (run.steps == 2 and name in run.after[1] and run.grads[1].get(name, 0.0) > 0
            and not torch.equal(run.after[0][name], run.after[1][name]))


def _step1_stats(roles: Roles, groups: dict, in_opt: set, run: WatchedRun) -> dict:
    """Counts of LoRA A and B tensors by what happened to them at steps 1 and 2."""
    stats = {"A": 0, "B": 0, "A zero grad at step 1": len(run.deferred), "A moved at step 1": 0,
             "A moved by weight decay only": 0, "A moved at step 2": 0, "B moved at step 1": 0}
    for n in roles.watched():
        kind = "A" if lora_partner(n) else ("B" if is_lora_name(n) and ("lora_B" in n or "lora_embedding_B" in n) else None)
        if kind:
            stats[kind] += 1
            stats[f"{kind} moved at step 1"] += _moved(run, n)
        if n in run.deferred and n in in_opt:
            group = groups[id(roles.params[n][0])]
            decay = group.get("lr", 0.0) * group.get("weight_decay", 0.0)
            change = float((run.after[0][n] - run.before[n]).float().norm() / run.before[n].float().norm().clamp_min(1e-30))
            stats["A moved by weight decay only"] += _moved(run, n) and decay > 0 and abs(change / decay - 1) < 1e-2
            stats["A moved at step 2"] += _learned_at_step2(run, n)
    return stats


def _why_stuck(name: str, in_opt: set, run: WatchedRun, second_step: bool) -> str | None:
    """Why a watched tensor did not move, or None when it did (or cannot yet, by construction)."""
    if name not in in_opt:
        return "not in the optimizer"
    if name in run.deferred:
        if _learned_at_step2(run, name):
            return None
        b_moved = _moved(run, lora_partner(name))  # then A could learn at step 2
        if b_moved and not second_step:
            return None  # cannot learn at step 1 by construction; not verified
        return "it still had no gradient at step 2" if b_moved else \
            "its B did not move at step 1, so A had no gradient to learn from"
    if not _moved(run, name):
        return "got no gradient" if run.grads[0].get(name, 0.0) == 0.0 else "got a gradient but did not change (lr 0?)"
    return None


def _step1_note(optimizer, run: WatchedRun) -> str:
    """The step-1 story of A in words: zero gradient, moved by weight decay only (or not at all), learned at step 2."""
    stats = run.lora_stats
    lr_wd = [(g.get("lr", 0.0), g.get("weight_decay", 0.0)) for g in optimizer.param_groups][0]
    how = (f"{stats['A moved by weight decay only']} of them moved only by AdamW's decoupled weight decay "
           f"(A <- A * (1 - lr * wd), lr, wd = {lr_wd})" if stats["A moved by weight decay only"]
           else f"none moved, although weight decay is on (lr, wd = {lr_wd}): they are not in the optimizer"
           if lr_wd[1] > 0 else f"none moved (with zero gradient and no weight decay Adam's update is 0; lr, wd = {lr_wd})")
    return (f"step 1: {len(run.deferred)} LoRA A tensor(s) had exactly zero gradient because their B starts at zero; "
            f"{how}. " + (f"At step 2, {stats['A moved at step 2']} of them got a gradient and moved."
                          if run.steps == 2 else "No second step was run to see them learn."))


def check_no_gradient_on_frozen(roles: Roles, run: WatchedRun) -> Check:
    """5. No frozen (base) parameter received a gradient during the step(s)."""
    graded = sorted(n for n in roles.base if any(g.get(n, 0.0) > 0 for g in run.grads)
                    or (roles.params[n][0].grad is not None and bool(roles.params[n][0].grad.any())))
    problems = [f"{len(graded)} base tensor(s) received a gradient: {_short(graded)}. They require grad; "
                f"freeze them or they cost memory and may be trained."] if graded else []
    return Check("no gradient on frozen", not graded, f"{len(graded)} of {len(roles.base)} base tensors received a gradient",
                 problems)


def check_4bit_gradient_path(roles: Roles, run: WatchedRun) -> Check:
    """6. No 4-bit layer is in bitsandbytes' CPU inference layout, whose matmul passes no gradient to its input."""
    repacked = [n for n in roles.base if "cpu-inference" in (run.base_before[n]["layout"], run.base_after[n]["layout"])]
    n4 = sum(run.base_before[n]["layout"] != "plain" for n in roles.base)
    problems = [f"{len(repacked)} 4-bit layer(s) are repacked for CPU inference ({_short(repacked)}): "
                f"their matmul passes no gradient to its input, so every layer below gets wrong gradients. "
                f"An eval pass with bitsandbytes' AVX512-BF16 path on did this; call "
                f"models.keep_cpu_4bit_trainable(model) right after loading (load_model does) and reload."
                ] if repacked else []
    return Check("4-bit gradient path", not repacked, f"{len(repacked)} of {n4} 4-bit layers in bitsandbytes' CPU "
                 f"inference layout", problems)


def _explain_step_error(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    if "does not require grad" in text:
        return (f"the training step failed ({text}). The loss has no path back to any trainable parameter: "
                f"nothing trainable takes part in the forward pass (no LoRA adapters, frozen adapters), or "
                f"gradient checkpointing with use_reentrant=True cut the path because the layer inputs do not "
                f"require grad (prepare_model_for_kbit_training / model.enable_input_require_grads() fix that).")
    return f"the training step failed ({text})."


def _as_number(value):  # a step's return value as a float when it is a number or a one-element tensor
    return float(value) if isinstance(value, (int, float)) or getattr(value, "numel", lambda: 0)() == 1 else value


def _optimizer_groups(optimizer) -> dict[int, dict]:
    """{id(tensor): its param group} over every tensor the optimizer holds."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


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
