"""User errors and faults (issue: nothing hangs, nothing is trusted that should not be, one line that names the fix):
bad data files, command-line mistakes, runners sharing an output folder, overrides of list settings."""

import json
import subprocess
import sys
import threading

import pytest

from qlora_lab import data, runner


def test_a_malformed_line_names_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "a", "answer": "b"}\n\n{"sentence": "c", "answer": }\n')
    with pytest.raises(data.DataError, match=r"train.jsonl, line 3, column 29: not valid JSON"):
        data.read_jsonl(path)
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(data.DataError, match="line 1: expected a JSON object, got list"):
        data.read_jsonl(path)


def test_an_empty_file_says_how_to_regenerate(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n")
    with pytest.raises(data.DataError, match="holds no rows; regenerate the task files with: python data/make_dataset.py"):
        data.read_jsonl(path)


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", "qlora_lab", *args], capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    return done.returncode, errors, done.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "labs/99_missing.ipynb"], "no notebook at labs/99_missing.ipynb"),
    (["run", "labs/00_environment.ipynb", "--profile", "bogus"], "unknown profile 'bogus'"),
    (["run", "data"], "no lab notebooks (NN_topic.ipynb) in data"),
    (["run", "labs/00_environment.ipynb", "--set", "steps"], "--set takes key=value"),
    (["model", "bogus"], "unknown model 'bogus'"),
    (["vram", "--gpu", "RTX 9090"], "unknown GPU 'RTX 9090'"),
    (["vram", "--optimizer", "adam9"], "unknown optimizer 'adam9'"),
    (["vram", "--method", "prefix"], "invalid choice: 'prefix'"),  # argparse's own errors: one line, not the usage
    (["run", "--jobs", "x"], "invalid int value: 'x'"),
])
def test_command_line_user_errors_are_one_line_exit_2(args, message):
    code, errors, stderr = _cli(*args)
    assert code == 2 and "Traceback" not in stderr and "usage:" not in stderr, stderr
    assert len(errors) == 1 and message in errors[0], stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) <= 2, stderr  # bitsandbytes may add one


def test_runners_sharing_an_output_folder_keep_each_others_entries(tmp_path):
    """Two writers at once: each adds its entry under the lock, re-reading summary.json first."""
    def write(stem):
        runner.record_entry(tmp_path, "smoke", stem, {"status": "ok", "seconds": 1.0, "results": {}, "error": None})

    threads = [threading.Thread(target=write, args=(f"{i:02d}_lab",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads((tmp_path / "summary.json").read_text())["notebooks"]) == [f"{i:02d}_lab" for i in range(8)]


def test_a_string_override_of_a_list_setting_is_a_list():
    profiles = {"smoke": {"shapes": ["llama-65b", "llama-33b"], "seq": 512}}
    settings = runner.profile_settings(profiles, "smoke", {"shapes": "llama-65b", "seq": 1024})
    assert settings.shapes == ["llama-65b"] and settings.seq == 1024
    assert runner.profile_settings(profiles, "smoke", {"shapes": "llama-65b,llama-33b"}).shapes == ["llama-65b", "llama-33b"]


def test_sequences_past_the_context_are_warned_and_not_answered():
    from qlora_lab import budget, vram

    assert budget.max_seq("H200 141GB", model="smollm2-135m", method="qlora", batch=1) == 8192  # before: 195,883
    warnings = vram.estimate("smollm2-135m", seq=10000).warnings
    assert any("longer than smollm2-135m's context (8192 positions)" in w for w in warnings)
    assert not any("context" in w for w in vram.estimate("smollm2-135m", seq=8192).warnings)


def test_stale_partial_directories_are_cleaned(tmp_path):
    import os
    import time

    from qlora_lab import paths

    old, fresh = tmp_path / ".model-abc.x1.partial", tmp_path / ".model-abc.x2.partial"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert paths.remove_stale_partials(tmp_path) == [old]
    assert not old.exists() and fresh.exists()  # a writer still at work keeps its directory


@pytest.mark.parametrize("module", ["budget", "vram"])
def test_docstring_examples_are_doctests_that_run(module):
    """Examples with >>> are run, so they cannot go stale (max_batch said 12 while it returned 17)."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"qlora_lab.{module}"))
    assert result.attempted >= 1 and result.failed == 0


def test_a_damaged_converted_model_is_found_by_its_record(tmp_path):
    """Before: a truncated cache file failed every load with a raw SafetensorError naming no path; 8 MB zeroed
    loaded silently and answered nonsense. The conversion now records sizes and checksums; a load checks them."""
    import os
    import time

    from qlora_lab import models

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(1 << 20))
    (tmp_path / "config.json").write_text("{}")
    assert models.converted_problem(tmp_path) is None  # no record yet (an older conversion): recorded now, trusted
    assert "files" in json.loads((tmp_path / "qlora_lab_source.json").read_text())
    assert models.converted_problem(tmp_path) is None
    data_ = bytearray(weights.read_bytes())
    data_[1000:9000] = bytes(8000)  # zeroed in place: same size
    time.sleep(0.01)
    weights.write_bytes(bytes(data_))
    assert models.converted_problem(tmp_path) == "model.safetensors changed since it was written (its checksum differs)"
    weights.write_bytes(bytes(data_[: len(data_) // 2]))  # truncated
    assert "model.safetensors has 524,288 bytes, 1,048,576 were written" == models.converted_problem(tmp_path)


def test_an_adapter_on_a_different_base_warns(tmp_path):
    from types import SimpleNamespace

    from qlora_lab import ship

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    with pytest.warns(UserWarning, match="trained on 'HuggingFaceTB/SmolLM2-135M', but the base loaded is 'other/model'"):
        assert ship.check_adapter_base(tmp_path, SimpleNamespace(name_or_path="other/model"))
    assert ship.check_adapter_base(tmp_path, SimpleNamespace(name_or_path="/cache/SmolLM2-135M")) is None  # same model
    assert ship.check_adapter_base(tmp_path, SimpleNamespace(name_or_path="")) is None  # a random shape: unknown
