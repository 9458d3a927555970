"""The labs' conclusions, built from a run's numbers: each function returns the facts and a sentence.

A conclusion typed into a notebook can contradict the numbers above it. Here every sentence
is chosen by the numbers it states, and `tests/test_findings.py` feeds each function inputs
on both sides of its finding, so the words flip when the measurement does. Differences
smaller than `TIE` (relative, one seed, short runs) are called a tie, not a win.

Some findings hold only for trained weights (which format fits real weights best, which rank
or target set learns better, accuracy): they carry `needs_trained_weights=True`, and
`show` prints them only for a real model; on random weights it prints what the run can and
cannot show instead.

Shortcut: the tie threshold is a fixed rule of thumb, not an interval from repeated runs.
"""

import math
from dataclasses import dataclass, field

from qlora_lab import budget, stats
from qlora_lab.results import record

TIE = 0.02  # relative difference below which two single-seed results are called a tie
VERDICT = {"tie": "tie", "higher": "better", "lower": "worse"}  # stats.call of a difference -> the comparison's word


@dataclass(frozen=True)
class Finding:
    """One conclusion of a lab run."""

    sentence: str  # the conclusion in words, chosen by the facts
    facts: dict = field(default_factory=dict)  # the numbers it rests on
    needs_trained_weights: bool = False  # true only of a pretrained or fine-tuned model, not of random weights

    def __str__(self) -> str:
        return self.sentence


RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS: this run measures memory, speed, mechanics and bit-exactness. It cannot show "
    "how well a format fits trained weights, quality or accuracy, or which rank or target set learns "
    "better; {n} such finding(s) are withheld. Run with the real model (the cpu profile, or online) to see them.")


RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: the weights below are Gaussian noise, not a trained model. The figures show "
                       "the mechanics (blocks, levels, code use); how trained weights look and fit a format cannot be "
                       "seen here.")


def show(findings: list[Finding], trained_weights: bool) -> list[Finding]:
    """Print each finding as a bullet; withhold the weight-dependent ones on random weights (with a banner).

    Returns the findings that were printed. Example: show([Finding("NF4 wins", needs_trained_weights=True)], False) -> []
    """
    shown = [f for f in findings if trained_weights or not f.needs_trained_weights]
    if len(shown) < len(findings):
        print(RANDOM_WEIGHTS_BANNER.format(n=len(findings) - len(shown)))
    for f in shown:
        print("-", f.sentence)
    return shown


def untrained_caption(trained_weights: bool, what: str, cannot: str) -> None:
    """On random weights, print above a table or figure that its weight-dependent part is not a result.

    Example: untrained_caption(False, "the eval losses", "which format costs a trained model least")
    """
    if not trained_weights:
        print(f"RANDOM WEIGHTS: {what} below come from an untrained model; they show the run worked, not {cannot}.")


def record_finding(name: str, value, trained_weights: bool) -> None:
    """record() a weight-dependent result only for trained weights; on random weights nothing is recorded.

    Example: record_finding("best_r", 64, trained_weights=False)  # records nothing
    """
    if trained_weights:
        record(name, value)


def _rel(a: float, b: float) -> float:
    """Relative difference of a against b."""
    return a / b - 1 if b else float("inf")


def _compare(a: float, b: float, lower_is_better: bool = True) -> str:
    """"better", "worse" or "tie" for a against b."""
    if abs(_rel(a, b)) < TIE:
        return "tie"
    return "better" if (a < b) == lower_is_better else "worse"


# --------------------------------------------------------------------------- lab 02: formats


def mse_ranking(mse: dict[str, float], n_weights: int) -> Finding:
    """Which 4-bit format has the lowest error on the studied weights.

    Example: mse_ranking({"nf4": 3.4e-4, "fp4": 6.1e-4, "int4": 5.0e-4}, 10**6).sentence
             -> "Over 1,000,000 weights the MSE ranks NF4 < INT4 < FP4: NF4 has the lowest error, 1.81x lower than FP4."
    """
    order = sorted(mse, key=mse.get)
    best, worst = order[0], order[-1]
    return Finding(f"Over {n_weights:,} weights the MSE ranks {' < '.join(f.upper() for f in order)}: {best.upper()} has "
                   f"the lowest error, {mse[worst] / mse[best]:.2f}x lower than {worst.upper()}.",
                   {"ranking": order, "mse": dict(mse)}, needs_trained_weights=True)


def wins_by_layer(mse_by_type: dict[str, dict[str, float]], fmt: str = "nf4") -> Finding:
    """In how many layer types one format beats each other format.

    mse_by_type: {format: {layer type: MSE}}.
    Example: wins_by_layer({"nf4": {"q": 1, "k": 3}, "fp4": {"q": 2, "k": 2}}).sentence
             -> "NF4 beats FP4 in 1 of 2 layer types."
    """
    types = list(mse_by_type[fmt])
    wins = {other: sum(mse_by_type[fmt][t] < mse_by_type[other][t] for t in types) for other in mse_by_type if other != fmt}
    return Finding(f"{fmt.upper()} beats " + " and ".join(f"{o.upper()} in {w} of {len(types)}" for o, w in wins.items())
                   + " layer types.", {"wins": wins, "layer_types": len(types)}, needs_trained_weights=True)


def best_by_blocksize(mse_by_blocksize: dict[str, dict[int, float]]) -> Finding:
    """Which format has the lowest error at each blocksize.

    Example: best_by_blocksize({"nf4": {64: 1, 256: 3}, "fp4": {64: 2, 256: 2}}).sentence
             -> "Lowest MSE by blocksize: 64: NF4, 256: FP4."
    """
    blocksizes = sorted(next(iter(mse_by_blocksize.values())))
    best = {b: min(mse_by_blocksize, key=lambda f: mse_by_blocksize[f][b]) for b in blocksizes}
    winners = set(best.values())
    head = (f"{next(iter(winners)).upper()} has the lowest MSE at every blocksize ({', '.join(map(str, blocksizes))})"
            if len(winners) == 1 else "Lowest MSE by blocksize: " + ", ".join(f"{b}: {f.upper()}" for b, f in best.items()))
    return Finding(head + ".", {"best": best}, needs_trained_weights=True)


def eval_loss_ranking(losses: dict[str, float], mse_order: list[str], baseline: str = "bf16") -> Finding:
    """Which format costs the model least eval loss, and whether that agrees with the weight MSE ranking.

    Example: eval_loss_ranking({"bf16": 1.54, "nf4": 1.74, "fp4": 1.88}, ["nf4", "fp4"]).sentence
             -> "Closest to bf16: NF4 (+0.2000 nats); ..."
    """
    formats = sorted((k for k in losses if k != baseline), key=losses.get)
    closest = min(formats, key=lambda k: abs(losses[k] - losses[baseline]))
    agree = formats == [f for f in mse_order if f in formats]
    order = " < ".join(f.upper() for f in formats)
    tail = (f"the eval loss ranks the formats as the weight MSE did ({order})." if agree else
            f"the eval loss ranks {order}, the weight MSE "
            f"{' < '.join(f.upper() for f in mse_order if f in formats)}: on this small eval (one run, no interval) "
            f"the two rankings differ, a hint that the average weight error is not all the model loses, not a proof.")
    return Finding(f"Closest to {baseline}: {closest.upper()} ({losses[closest] - losses[baseline]:+.4f} nats); " + tail,
                   {"closest": closest, "ranking": formats, "agrees_with_mse": agree}, needs_trained_weights=True)


# --------------------------------------------------------------------------- lab 03: r and alpha


def fixed_alpha_rank(eval_loss: dict[int, float], alpha: float) -> Finding:
    """With alpha fixed, raising r shrinks the scale alpha/r: did the largest rank learn slowest?

    Example: fixed_alpha_rank({1: 0.07, 64: 0.08}, 16).facts["largest_rank_slowest"] -> True
    """
    lo, hi = min(eval_loss), max(eval_loss)
    best = min(eval_loss, key=eval_loss.get)
    slowest = max(eval_loss.values())
    verdict = ("a tie within the noise of one short run" if _compare(eval_loss[hi], eval_loss[lo]) == "tie" else
               "and the largest rank learned slowest" if eval_loss[hi] == slowest else
               "yet the largest rank was not the slowest here")
    return Finding(f"With alpha fixed at {alpha:g}, the best rank was r={best} (eval loss {eval_loss[best]:.3f}); r={hi} "
                   f"ended at {eval_loss[hi]:.3f} vs r={lo} at {eval_loss[lo]:.3f}: raising r with alpha fixed shrinks the "
                   f"update scale alpha/r ({alpha / lo:.3g} -> {alpha / hi:.3g}), {verdict}.",
                   {"best_r": best, "largest_rank_slowest": eval_loss[hi] == slowest}, needs_trained_weights=True)


def scale_stability(spread: dict[str, float], rslora: str, fixed: str, ranks: list[int]) -> Finding:
    """Does rsLoRA's alpha/sqrt(r) keep the update size more stable across r than a fixed alpha?

    spread: {rule label: largest / smallest final ||delta W|| over the same ranks under both rules}.
    Example: scale_stability({"rs": 1.3, "fixed": 5.7}, "rs", "fixed", [4, 16, 64]).facts["rslora_more_stable"] -> True
    """
    stable = spread[rslora] < spread[fixed]
    return Finding(f"Final ||delta W|| varied {spread[rslora]:.1f}x across r = {', '.join(map(str, ranks))} with rsLoRA vs "
                   f"{spread[fixed]:.1f}x with fixed "
                   f"alpha: " + ("rsLoRA keeps the update size more stable as r changes." if stable
                                 else "in this run rsLoRA did NOT stabilise it more."),
                   {"rslora_more_stable": stable, "spread": dict(spread)})


def update_directions(effective_rank: int, r: int) -> Finding:
    """How many of its r directions a learned update uses (90 % of ||delta W||^2), in words that fit the count.

    Example: update_directions(6, 8).sentence -> "... uses most of its directions: at r=8 the median layer needs 6 ..."
    """
    share = effective_rank / r
    words = "few of its directions" if share <= 0.25 else "about half of its directions" if share <= 0.6 else \
        "most of its directions"
    return Finding(f"The learned update uses {words}: at r={r} the median layer needs {effective_rank} singular values "
                   f"for 90 % of its ||delta W||^2.", {"effective_rank": effective_rank, "r": r, "share": share},
                   needs_trained_weights=True)


def targets_at_equal_budget(all_linear: tuple[int, int, float], qv: tuple[int, int, float],
                            accuracy: tuple[float, float] | None = None) -> Finding:
    """All linear layers at a small rank against q,v at a larger one, same parameter budget: (r, params, eval loss) each;
    accuracy: their exact match, which must not point the other way for a verdict.

    Example: targets_at_equal_budget((4, 1221120, 0.146), (21, 1209600, 0.158)).facts["verdict"] -> "better"
    """
    verdict = _compare(all_linear[2], qv[2])
    if accuracy and verdict != "tie" and (accuracy[0] - accuracy[1]) * (1 if verdict == "better" else -1) < 0:
        verdict = "mixed"
    words = {"better": "adapting all linear layers was better, as the QLoRA paper found.",
             "worse": "q,v only was better in this short run, unlike the QLoRA paper's finding.",
             "tie": f"a tie (within {TIE:.0%}, one seed): this run does not separate them.",
             "mixed": "mixed: the eval loss and the exact match ({:.1%} vs {:.1%}) point opposite ways; one seed: this "
                      "run does not separate them.".format(*(accuracy or (0, 0)))}[verdict]
    return Finding(f"At the same budget ({all_linear[1]:,} vs {qv[1]:,} parameters), all-linear r={all_linear[0]} reached "
                   f"eval loss {all_linear[2]:.3f} and q,v r={qv[0]} {qv[2]:.3f}: {words}",
                   {"verdict": verdict}, needs_trained_weights=True)


# --------------------------------------------------------------------------- lab 05: QLoRA vs LoRA


def qlora_vs_lora_speed(qlora_s: float, lora_s: float, device: str, launch_bound: bool) -> Finding:
    """Step time of QLoRA against 16-bit LoRA, with the usual claim beside it.

    Example: qlora_vs_lora_speed(3.40, 3.36, "CPU", False).sentence -> "... QLoRA is 1 % slower ... a tie ..."
    """
    change = _rel(qlora_s, lora_s)
    verdict = _compare(qlora_s, lora_s)
    words = "a tie" if verdict == "tie" else f"{abs(change):.0%} {'slower' if change > 0 else 'faster'}"
    note = (" This model is small (under 1B parameters) and the published gap is for 7B-8B, so this timing does not "
            "test that claim.") if launch_bound else ""
    return Finding(f"Step time on {device}: QLoRA {qlora_s:.2f} s vs LoRA {lora_s:.2f} s -> QLoRA is {words} "
                   f"(published at 7B-8B on GPUs: +24 % to +56 %, README).{note}", {"relative": change, "verdict": verdict})


def qlora_vs_lora_memory(qlora_bytes: float, lora_bytes: float, memory_kind: str) -> Finding:
    """Peak memory of QLoRA against 16-bit LoRA.

    Example: qlora_vs_lora_memory(2.45e9, 3.99e9, "RSS").facts["saved"] -> 0.386
    """
    saved = 1 - qlora_bytes / lora_bytes
    whole = "RSS" in memory_kind  # a process total (Python, libraries, data): only the difference is the models'
    return Finding(f"Peak memory ({memory_kind}): QLoRA {qlora_bytes / 2**20:,.0f} MiB vs LoRA "
                   f"{lora_bytes / 2**20:,.0f} MiB -> {abs(lora_bytes - qlora_bytes) / 2**20:,.0f} MiB "
                   f"{'less' if saved > 0 else 'more'}"
                   + (" (a whole-process reading: the difference is what the setups differ by; a percentage of it "
                      "would understate it)." if whole else f", {abs(saved):.0%}."), {"saved": saved})


def qlora_vs_lora_accuracy(qlora_correct: list[bool], lora_correct: list[bool]) -> Finding:
    """Generated exact match of QLoRA against LoRA on the same items: paired bootstrap interval and exact McNemar test.

    A difference whose 95 % interval holds 0 is a tie. Example: qlora_vs_lora_accuracy(q, l).facts["verdict"] -> "tie"
    """
    n = len(qlora_correct)
    diff, low, high = stats.paired_difference_ci(qlora_correct, lora_correct)
    test = stats.mcnemar(qlora_correct, lora_correct)
    verdict = VERDICT[stats.call(low, high)]
    words = ("a tie: the interval holds 0" if verdict == "tie" else f"QLoRA {verdict}: the interval excludes 0")
    return Finding(f"Generated exact match on the same {n} items: QLoRA {100 * sum(qlora_correct) / n:.1f} % vs LoRA "
                   f"{100 * sum(lora_correct) / n:.1f} %, difference {100 * diff:+.1f} points (95 % paired interval "
                   f"{100 * low:+.1f} to {100 * high:+.1f}; {test['only_a']} items only QLoRA got right, {test['only_b']} "
                   f"only LoRA, McNemar p = {test['p']:.2f}) -> {words}. One training seed each: seed-to-seed "
                   f"variation is not in this interval (the QLoRA paper: NF4 QLoRA matches 16-bit LoRA on its benchmarks).",
                   {"difference": diff, "ci": [low, high], "mcnemar_p": test["p"], "verdict": verdict},
                   needs_trained_weights=True)


def forgetting(nll_before: list[float], nll_after: list[float], block: int = 32) -> Finding:
    """Perplexity of held-out general text before and after fine-tuning, with a 95 % interval on the change.

    nll_*: per-token losses of the same text (evals.perplexity's "token_nll"); the interval is a paired
    bootstrap over blocks of `block` tokens (neighbouring tokens are not independent).
    Example: forgetting(before["token_nll"], after["token_nll"]).facts["verdict"] -> "higher"
    """
    blocks = range(0, len(nll_before) - block + 1, block)
    mean = lambda xs, i: sum(xs[i:i + block]) / block
    diff, low, high = stats.paired_difference_ci([mean(nll_after, i) for i in blocks], [mean(nll_before, i) for i in blocks])
    ppl = [math.exp(sum(x) / len(x)) for x in (nll_before, nll_after)]
    verdict = stats.call(low, high)
    words = {"tie": "no change beyond the noise of this text", "higher": "the model got worse at general text (forgetting)",
             "lower": "the model got better at general text"}[verdict]
    return Finding(f"General text ({len(nll_before)} tokens, never trained on): perplexity {ppl[0]:.1f} before, "
                   f"{ppl[1]:.1f} after, x{math.exp(diff):.2f} (95 % interval x{math.exp(low):.2f} to "
                   f"x{math.exp(high):.2f}) -> {words}.", {"ratio": math.exp(diff), "ci": [math.exp(low), math.exp(high)],
                                                           "verdict": verdict}, needs_trained_weights=True)


# --------------------------------------------------------------------------- lab 07: ways to ship


def merge_keeps_accuracy(name: str, correct: list[bool], reference_correct: list[bool], kl: float) -> Finding:
    """A shipped variant against the unmerged adapter, on the same items: paired interval of the difference.

    Example: merge_keeps_accuracy("merged into 16-bit", merged, adapter, 0.004).facts["verdict"] -> "tie"
    """
    diff, low, high = stats.paired_difference_ci(correct, reference_correct)
    verdict = VERDICT[stats.call(low, high)]
    words = {"tie": "keeps what was learned (the difference's interval holds 0)",
             "worse": "loses accuracy (the interval is below 0)", "better": "scores higher (the interval is above 0)"}
    n = len(correct)
    return Finding(f"{name}: {100 * sum(correct) / n:.1f} % vs the adapter's {100 * sum(reference_correct) / n:.1f} % "
                   f"exact match ({100 * diff:+.1f} points, 95 % paired interval {100 * low:+.1f} to {100 * high:+.1f}), "
                   f"KL {kl:.4f} nats from its outputs -> {words[verdict]}.",
                   {"difference": diff, "ci": [low, high], "verdict": verdict}, needs_trained_weights=True)


def update_survival(ratio_median: float, error_median: float) -> Finding:
    """What merging into a 4-bit model does to the update: its size in NF4 steps, and the error of what is stored.

    Example: update_survival(0.05, 3.2).facts["survives"] -> False
    """
    survives = error_median < 0.5
    words = ("most of the update survives the re-quantization" if survives else
             "re-quantizing stores rounding, not the update: merging into 4-bit cannot keep it")
    return Finding(f"The median LoRA update is {ratio_median:.3f} of the local NF4 step; merging into the 4-bit model "
                   f"stores it with a median error of {error_median:.2f}x its own size -> {words}.",
                   {"survives": survives}, needs_trained_weights=True)


def inference_speed(rates: dict[str, tuple[float, float, float]], device: str) -> Finding:
    """Generated tokens/s of the 4-bit and 16-bit variants: is 4-bit faster here? Overlapping ranges are a tie.

    rates: name -> (median, low, high). Example: inference_speed({"a": (60, 58, 61), "b": (90, 88, 93)}, "CPU")
    """
    order = sorted(rates, key=lambda n: -rates[n][0])
    fastest, slowest = order[0], order[-1]
    tie = rates[fastest][1] <= rates[slowest][2]
    top = [f"'{n}'" for n in order if rates[n][2] >= rates[fastest][1]]  # every variant whose range reaches the fastest's
    listing = "; ".join(f"'{n}' {m:.0f} ({lo:.0f}-{hi:.0f})" for n, (m, lo, hi) in rates.items())
    words = ("every range overlaps the others: not separable in this run" if tie else
             (f"{', '.join(top)} overlap the fastest's range (not separable from it)" if len(top) > 1 else
              f"{top[0]} is fastest") + f"; '{fastest}' is {rates[fastest][0] / rates[slowest][0]:.1f}x '{slowest}'")
    return Finding(f"Generation on {device} (tokens/s, median and range): {listing} -> {words}. 4-bit saves memory; "
                   f"whether it is faster depends on the kernel and the device, and this is the answer for this one.",
                   {"fastest": fastest, "tie": tie})


# --------------------------------------------------------------------------- lab 06: paper scale


def paper_verdict(name: str, target_gib: float, predicted, measured=None, margin_gib: float = 0.5,
                  card: str = "") -> Finding:
    """Does a shape fine-tune in the paper's memory? The three-tier verdict (budget.verdict: allocated, plus the paged
    optimizer state, device total), measured when a run exists, else predicted; a highest tier within margin_gib of
    the limit, on either side, is "at the limit", not fits / does not fit (the caller states why that margin).

    predicted: a vram.Estimate; measured: a measure.Measurement or None; card: what target_gib stands for, said in the
    sentence after the limit (e.g. ', the paper's "48 GB" read as 48 GiB').
    Example: paper_verdict("llama-65b", 48, est).facts["call"] -> "does not fit"
    """
    limit, margin = target_gib * 2**30, margin_gib * 2**30
    if measured is None:
        v, how = budget.predicted_verdict(predicted, limit), "predicted (not measured here)"
    else:
        v = budget.verdict(measured.peak_allocated_bytes, measured.paged_bytes, measured.device_used_bytes, limit)
        how = "measured at batch 1"
    tier, top = max(v.tiers.items(), key=lambda item: item[1])
    call = "fits" if top <= limit - margin else "does not fit" if top > limit + margin else "at the limit"
    if call == "at the limit":
        listing = ", ".join(f"{t} {b / 2**30:.2f} GiB" for t, b in v.tiers.items())
        said = (f"AT THE LIMIT of {target_gib:.1f} GiB{card}: its {tier}, {top / 2**30:.2f} GiB, is within "
                f"{margin_gib:.2f} GiB of it, closer than one reading settles ({listing})")
    else:
        said = f"{call} {target_gib:.1f} GiB{card}, by more than {margin_gib:.2f} GiB ({str(v).split(' (', 1)[1]}"
    tail = "" if measured is None else f"; the calculator said {predicted.peak_allocated_bytes / 2**30:.1f} GiB allocated"
    return Finding(f"{name}, {how}: {said}{tail}", {"call": call, "fits": v.fits, "decided_by": v.decided_by,
                                                    "measured": measured is not None, "margin_gib": margin_gib})


# --------------------------------------------------------------------------- lab 08: FSDP across GPUs


def sharded_job(ranks: list[dict], predicted_local_bytes: float, tolerance: float = 0.05) -> Finding:
    """Did the FSDP job shard as predicted and compute what one process computes? From launch()'s rank results.

    Example: sharded_job([{"local_param_bytes": 100, "losses": [5.0, 4.9], "unsharded_loss": 5.0}], 98).sentence
    """
    local = [r["local_param_bytes"] for r in ranks]
    signed = max((b / predicted_local_bytes - 1 for b in local), key=abs)
    error = abs(signed)
    held = (f"{local[0] / 2**20:.2f} MiB" if len(set(local)) == 1
            else f"{min(local) / 2**20:.2f}-{max(local) / 2**20:.2f} MiB")
    same = all(abs(r["losses"][0] - r["unsharded_loss"]) <= 1e-3 * abs(r["unsharded_loss"]) for r in ranks)
    falls = all(r["losses"][-1] < r["losses"][0] for r in ranks)
    return Finding(
        f"Each of the {len(ranks)} ranks held {held} of parameters against {predicted_local_bytes / 2**20:.2f} MiB "
        f"predicted (the calculator's weights + adapters over {len(ranks)}; worst {signed:+.2%}: "
        f"{'within' if error <= tolerance else 'NOT within'} {tolerance:.0%}); the first sharded forward "
        f"{'gave' if same else 'did NOT give'} the unsharded model's loss, and the loss "
        f"{'fell' if falls else 'did NOT fall'} over {len(ranks[0]['losses'])} steps on every rank.",
        {"worst_error": error, "same_loss": same, "loss_falls": falls})


def offload_verdicts(verdicts: dict[str, budget.Verdict]) -> Finding:
    """Which FSDP setups fit each GPU, predicted (labelled so): name -> budget.Verdict of one GPU.

    Example: offload_verdicts({"2 GPUs": v1, "2 GPUs + CPU offload": v2}).facts["fit"] -> ["2 GPUs + CPU offload"]
    """
    fit = [name for name, v in verdicts.items() if v.fits]

    def said(v):  # within 10 % of the card is inside the calculator's error: borderline, not a promise
        room = 1 - v.tiers["device total"] / v.limit_bytes
        return "does not fit" if not v.fits else f"fits, but only {room:.0%} to spare: borderline" if room < 0.1 else "fits"
    listing = "; ".join(f"{name}: {said(v)} (device total {v.tiers['device total'] / 2**30:.1f} GiB)"
                        for name, v in verdicts.items())
    limit = next(iter(verdicts.values())).limit_bytes / 2**30
    return Finding(f"Predicted per GPU against {limit:.0f} GiB: {listing}. "
                   + (f"Only {', '.join(fit)} fit{'s' if len(fit) == 1 else ''}." if fit else "None fits."),
                   {"fit": fit})


def big_fsdp(rows: dict[str, dict], tolerance: float = 0.10) -> Finding:
    """What lab 08's 70B jobs showed: which trained within their hold per GPU (each row's held_gib), whether the
    calculator called each one, and its worst error. rows: name -> fsdp.measure_case's row.

    Example: big_fsdp({"offload, held": {"outcome": "trained", "held_gib": 24, "peak_gib": 14.0, "predicted_gib": 13.7,
    "predicted_device_gib": 16.0, "error": -0.02, "gpus": 2}}).facts["trained_held"] -> ["offload, held"]
    """
    parts, called = [], []
    for name, r in rows.items():
        said = (f"{r['peak_gib']:.1f} GiB per GPU at the peak, predicted {r['predicted_gib']:.1f} ({r['error']:+.1%})"
                if r["outcome"] == "trained" else f"out of memory, {r['predicted_gib']:.1f} GiB per GPU predicted")
        if r.get("held_gib"):
            predicted_fit = r["predicted_device_gib"] <= r["held_gib"]
            called.append(predicted_fit == (r["outcome"] == "trained"))
            said += f"; the calculator said it would {'fit' if predicted_fit else 'not fit'} {r['held_gib']:g} GiB"
        parts.append(f"{name}: {'trained' if r['outcome'] == 'trained' else 'did not train'} ({said})")
    errors = [r["error"] for r in rows.values() if r["outcome"] == "trained"]
    worst = max(errors, key=abs) if errors else None
    closing = ("No job trained, so no prediction was checked" if worst is None else
               f"The calculator's worst error on the jobs that trained: {worst:+.1%} "
               f"({'within' if abs(worst) <= tolerance else 'NOT within'} {tolerance:.0%})")
    return Finding(
        f"Llama-2-70B on {next(iter(rows.values()))['gpus']} GPUs, measured: " + "; ".join(parts) + f". {closing}; "
        f"{sum(called)} of {len(called)} held jobs went the way the calculator said.",
        {"trained_held": [n for n, r in rows.items() if r.get("held_gib") and r["outcome"] == "trained"],
         "worst_error": worst, "called": all(called)})
