"""qlora_lab.findings: every conclusion flips its words when the numbers flip, and ties are called ties."""

import math
from types import SimpleNamespace

import pytest

from qlora_lab import budget, findings


def test_mse_ranking_names_the_measured_winner():
    nf4 = findings.mse_ranking({"nf4": 1.0, "fp4": 2.0, "int4": 1.5}, 100)
    fp4 = findings.mse_ranking({"nf4": 2.0, "fp4": 1.0, "int4": 1.5}, 100)
    assert nf4.facts["ranking"] == ["nf4", "int4", "fp4"]
    assert "NF4 has the lowest error, 2.00x lower than FP4" in nf4.sentence
    assert fp4.facts["ranking"][0] == "fp4" and "FP4 has the lowest error" in fp4.sentence
    assert nf4.needs_trained_weights


def test_wins_by_layer_counts():
    f = findings.wins_by_layer({"nf4": {"q": 1, "k": 3}, "fp4": {"q": 2, "k": 2}, "int4": {"q": 0.5, "k": 4}})
    assert f.facts["wins"] == {"fp4": 1, "int4": 1}
    assert f.sentence == "NF4 beats FP4 in 1 of 2 and INT4 in 1 of 2 layer types."


def test_best_by_blocksize_says_every_or_lists():
    every = findings.best_by_blocksize({"nf4": {64: 1, 256: 1}, "fp4": {64: 2, 256: 2}})
    mixed = findings.best_by_blocksize({"nf4": {64: 1, 256: 3}, "fp4": {64: 2, 256: 2}})
    assert every.sentence.startswith("NF4 has the lowest MSE at every blocksize")
    assert mixed.sentence == "Lowest MSE by blocksize: 64: NF4, 256: FP4." and mixed.facts["best"] == {64: "nf4", 256: "fp4"}


def test_eval_loss_ranking_agrees_or_not():
    agree = findings.eval_loss_ranking({"bf16": 1.5, "nf4": 1.6, "fp4": 1.8}, ["nf4", "fp4"])
    disagree = findings.eval_loss_ranking({"bf16": 1.5, "nf4": 1.9, "fp4": 1.8}, ["nf4", "fp4"])
    assert agree.facts["agrees_with_mse"] and "as the weight MSE did" in agree.sentence
    assert disagree.facts["closest"] == "fp4" and not disagree.facts["agrees_with_mse"]
    assert "the two rankings differ" in disagree.sentence and "not a proof" in disagree.sentence


def test_fixed_alpha_rank_flips_and_ties():
    slow = findings.fixed_alpha_rank({1: 0.07, 4: 0.075, 64: 0.09}, 16)
    not_slow = findings.fixed_alpha_rank({1: 0.09, 4: 0.05, 64: 0.07}, 16)
    tie = findings.fixed_alpha_rank({1: 0.0700, 64: 0.0705}, 16)
    assert slow.facts["largest_rank_slowest"] and "learned slowest" in slow.sentence
    assert not not_slow.facts["largest_rank_slowest"] and "was not the slowest" in not_slow.sentence
    assert "tie" in tie.sentence


def test_scale_stability_flips():
    f = findings.scale_stability({"rs": 1.3, "fixed": 5.7}, "rs", "fixed", [16, 64])
    assert "more stable" in f.sentence and "r = 16, 64" in f.sentence
    assert "did NOT" in findings.scale_stability({"rs": 6.0, "fixed": 5.7}, "rs", "fixed", [16, 64]).sentence


def test_update_directions_words_fit_the_count():
    """A smoke run printed 'uses few directions' with 6 of 8: the words now follow the share."""
    assert "most of its directions" in findings.update_directions(6, 8).sentence
    assert "few of its directions" in findings.update_directions(15, 64).sentence
    assert "about half" in findings.update_directions(4, 8).sentence


def test_targets_at_equal_budget_three_ways():
    better = findings.targets_at_equal_budget((4, 100, 0.146), (21, 100, 0.158))
    worse = findings.targets_at_equal_budget((4, 100, 0.170), (21, 100, 0.158))
    tie = findings.targets_at_equal_budget((4, 100, 8.314), (21, 100, 8.358))  # 0.5 %: the GPU run's "finding"
    # the cpu run: loss favours all-linear (0.146 vs 0.158), exact match q,v (16.7 % vs 20.8 %): no verdict
    mixed = findings.targets_at_equal_budget((4, 100, 0.146), (21, 100, 0.158), accuracy=(0.167, 0.208))
    assert mixed.facts["verdict"] == "mixed" and "16.7% vs 20.8%" in mixed.sentence
    agree = findings.targets_at_equal_budget((4, 100, 0.146), (21, 100, 0.158), accuracy=(0.25, 0.208))
    assert agree.facts["verdict"] == "better"
    assert (better.facts["verdict"], worse.facts["verdict"], tie.facts["verdict"]) == ("better", "worse", "tie")
    assert "as the QLoRA paper found" in better.sentence and "does not separate them" in tie.sentence


def test_qlora_vs_lora_speed_and_accuracy():
    assert "tie" in findings.qlora_vs_lora_speed(3.40, 3.36, "CPU", False).sentence  # 1 %
    slower = findings.qlora_vs_lora_speed(0.91, 0.62, "H100", True)
    assert "47% slower" in slower.sentence and "does not test that claim" in slower.sentence
    assert "does not test" not in findings.qlora_vs_lora_speed(0.91, 0.62, "H100", False).sentence
    assert "faster" in findings.qlora_vs_lora_speed(1.0, 1.5, "GPU", False).sentence
    assert "less" in findings.qlora_vs_lora_memory(1.0e9, 2.0e9, "x").sentence


def _paired(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_qlora_vs_lora_accuracy_is_paired():
    lab = findings.qlora_vs_lora_accuracy(*_paired(150, 11, 21, 18))  # 80.5 % vs 85.5 %: the lab's old 5-point "finding"
    assert lab.facts["verdict"] == "tie" and "a tie" in lab.sentence and lab.facts["ci"][0] < 0 < lab.facts["ci"][1]
    worse = findings.qlora_vs_lora_accuracy(*_paired(150, 2, 28, 20))  # 76 % vs 89 %, the split all one way
    assert worse.facts["verdict"] == "worse" and worse.facts["mcnemar_p"] < 0.001 and "excludes 0" in worse.sentence
    # the same 5-point gap is a finding when the models disagree on few items (pairing removes the shared noise)
    consistent = findings.qlora_vs_lora_accuracy(*_paired(161, 0, 10, 29))
    assert consistent.facts["verdict"] == "worse"
    assert findings.qlora_vs_lora_accuracy(*_paired(150, 31, 1, 18)).facts["verdict"] == "better"


def test_forgetting_flips_with_the_change():
    import random

    rng = random.Random(0)
    before = [rng.uniform(1, 5) for _ in range(960)]
    same = findings.forgetting(before, [x + rng.gauss(0, 0.3) for x in before])
    worse = findings.forgetting(before, [x + 0.3 + rng.gauss(0, 0.3) for x in before])
    better = findings.forgetting(before, [x - 0.3 + rng.gauss(0, 0.3) for x in before])
    assert (same.facts["verdict"], worse.facts["verdict"], better.facts["verdict"]) == ("tie", "higher", "lower")
    assert "forgetting" in worse.sentence and worse.facts["ratio"] == pytest.approx(math.exp(0.3), rel=0.05)


def test_show_withholds_weight_dependent_findings_on_random_weights(capsys):
    items = [findings.Finding("memory fact"), findings.Finding("NF4 wins", needs_trained_weights=True)]
    assert findings.show(items, trained_weights=False) == items[:1]
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "NF4 wins" not in out and "memory fact" in out
    assert findings.show(items, trained_weights=True) == items


def test_paper_verdict_uses_the_three_tiers():
    gib = 2**30
    est = SimpleNamespace(peak_allocated_bytes=43 * gib, paged_bytes=6.4 * gib, device_bytes=58 * gib)
    predicted = findings.paper_verdict("llama-65b", 48, est)
    assert predicted.facts == {"call": "does not fit", "fits": False, "decided_by": "+ paged state", "measured": False,
                               "margin_gib": 0.5}  # 49.4 GiB
    fits = SimpleNamespace(peak_allocated_bytes=40 * gib, paged_bytes=6 * gib, device_used_bytes=47 * gib)
    assert findings.paper_verdict("llama-65b", 48, est, fits).facts == {
        "call": "fits", "fits": True, "decided_by": "device total", "measured": True, "margin_gib": 0.5}
    device_over = SimpleNamespace(peak_allocated_bytes=40 * gib, paged_bytes=6 * gib, device_used_bytes=49 * gib)
    verdict = findings.paper_verdict("llama-65b", 48, est, device_over)
    assert verdict.facts["decided_by"] == "device total" and not verdict.facts["fits"]
    assert "does not fit 48.0 GiB" in verdict.sentence and "device total 49.0 GiB OVER" in verdict.sentence


def test_paper_verdict_is_at_the_limit_within_the_margin():
    """Lab 06's H200 run read 48.01 GiB against 48 GiB: 10 MiB over is at the limit, not 'does not fit'."""
    gib = 2**30
    est = SimpleNamespace(peak_allocated_bytes=39.5 * gib, paged_bytes=6 * gib, device_bytes=52 * gib)

    def call(device_gib, margin_gib=0.5):
        run = SimpleNamespace(peak_allocated_bytes=40 * gib, paged_bytes=6 * gib, device_used_bytes=device_gib * gib)
        return findings.paper_verdict("llama-65b", 48, est, run, margin_gib, card=", the paper's '48 GB' as 48 GiB")

    assert [call(g).facts["call"] for g in (47.4, 47.6, 48.01, 48.4, 48.6)] == [
        "fits", "at the limit", "at the limit", "at the limit", "does not fit"]
    at = call(48.01)
    assert not at.facts["fits"]  # strictly over, yet inside the margin
    assert "AT THE LIMIT of 48.0 GiB, the paper's '48 GB' as 48 GiB" in at.sentence and "device total 48.01" in at.sentence
    assert "OVER" not in at.sentence and "within 0.50 GiB" in at.sentence
    assert call(48.01, margin_gib=0).facts["call"] == "does not fit" and call(47.6, margin_gib=0).facts["call"] == "fits"
    assert call(48.4, margin_gib=1).facts["call"] == "at the limit" and call(46.9, margin_gib=1).facts["call"] == "fits"
    assert "fits 48.0 GiB, the paper's '48 GB' as 48 GiB, by more than 0.50 GiB" in call(47.4).sentence


def test_merge_keeps_accuracy_flips_with_the_paired_interval():
    kept = findings.merge_keeps_accuracy("merged into 16-bit", *_paired(158, 3, 4, 35), kl=0.003)
    lost = findings.merge_keeps_accuracy("merged into NF4", *_paired(120, 2, 41, 37), kl=0.2)
    assert kept.facts["verdict"] == "tie" and "keeps what was learned" in kept.sentence
    assert lost.facts["verdict"] == "worse" and "loses accuracy" in lost.sentence and lost.facts["ci"][1] < 0


def test_update_survival_and_inference_speed_flip():
    assert findings.update_survival(0.04, 3.1).facts["survives"] is False
    assert findings.update_survival(2.0, 0.2).facts["survives"] is True
    tie = findings.inference_speed({"4-bit": (60, 55, 66), "16-bit": (63, 58, 70)}, "CPU")
    apart = findings.inference_speed({"4-bit": (60, 58, 61), "16-bit": (90, 88, 93)}, "CPU")
    assert tie.facts["tie"] and "not separable" in tie.sentence
    assert not apart.facts["tie"] and apart.facts["fastest"] == "16-bit" and "1.5x" in apart.sentence
    assert "'16-bit' is fastest" in apart.sentence
    top_tie = findings.inference_speed({"4-bit": (69, 68, 70), "merged": (131, 131, 132), "bf16": (130, 128, 132)}, "CPU")
    assert "'merged', 'bf16' overlap the fastest's range" in top_tie.sentence and not top_tie.facts["tie"]
    commas = findings.inference_speed({"merged, re-quantized": (60, 58, 61), "bf16": (90, 88, 93)}, "CPU")
    assert "'merged, re-quantized' 60 (58-61)" in commas.sentence  # names with commas stay whole


def test_sharded_job_flips_on_bytes_loss_and_learning():
    good = [{"local_param_bytes": 100 * 2**20, "losses": [5.0, 4.8], "unsharded_loss": 5.0}] * 2
    f = findings.sharded_job(good, 101 * 2**20)
    assert f.facts == {"worst_error": pytest.approx(1 / 101), "same_loss": True, "loss_falls": True}
    assert "100.00 MiB" in f.sentence and "-0.99%" in f.sentence
    assert "within 5%" in f.sentence and "gave" in f.sentence and "fell" in f.sentence
    bad = [{"local_param_bytes": 200 * 2**20, "losses": [7.0, 7.5], "unsharded_loss": 5.0}]
    f = findings.sharded_job(bad, 101 * 2**20)
    assert "NOT within" in f.sentence and "did NOT give" in f.sentence and "did NOT fall" in f.sentence


def test_offload_verdicts_names_what_fits():
    fits, over = budget.verdict(10 * 2**30, 0, 12 * 2**30, 24 * 2**30), budget.verdict(28 * 2**30, 0, 32 * 2**30, 24 * 2**30)
    f = findings.offload_verdicts({"2 GPUs": over, "2 GPUs + offload": fits})
    assert f.facts["fit"] == ["2 GPUs + offload"] and "Only 2 GPUs + offload fits" in f.sentence
    assert findings.offload_verdicts({"2 GPUs": over}).facts["fit"] == []
    tight = budget.verdict(20 * 2**30, 0, 22.6 * 2**30, 24 * 2**30)
    assert "borderline" in findings.offload_verdicts({"4 GPUs": tight}).sentence
    assert "borderline" not in findings.offload_verdicts({"2 GPUs + offload": fits}).sentence


def test_big_fsdp_flips_on_outcome_and_error():
    offload = {"outcome": "trained", "held_gib": 24, "peak_gib": 14.0, "predicted_gib": 13.7, "predicted_device_gib": 16.0,
               "error": -0.02, "gpus": 2}
    oom = {"outcome": "out of memory: CUDA out of memory", "held_gib": 24, "predicted_gib": 27.5,
           "predicted_device_gib": 32.4, "gpus": 2}
    f = findings.big_fsdp({"offload, held": offload, "no offload, held": oom})
    assert f.facts == {"trained_held": ["offload, held"], "worst_error": -0.02, "called": True}
    assert "within 10%" in f.sentence and "2 of 2 held jobs" in f.sentence and "would not fit 24 GiB" in f.sentence
    surprise = {**oom, "predicted_device_gib": 20.0}  # predicted to fit, ran out of memory: the calculator was wrong
    f = findings.big_fsdp({"offload, held": {**offload, "error": 0.25}, "no offload, held": surprise})
    assert f.facts["called"] is False and "1 of 2 held jobs" in f.sentence and "NOT within 10%" in f.sentence
    f = findings.big_fsdp({"no offload, held": oom})
    assert f.facts["worst_error"] is None and "No job trained" in f.sentence


def test_untrained_caption_speaks_only_on_random_weights(capsys):
    findings.untrained_caption(False, "the eval losses", "which format fits best")
    said = capsys.readouterr().out
    assert said.startswith("RANDOM WEIGHTS: the eval losses below") and "not which format fits best" in said
    findings.untrained_caption(True, "the eval losses", "which format fits best")
    assert capsys.readouterr().out == ""
