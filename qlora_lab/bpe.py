"""A small byte-level BPE tokenizer, trained on the lab's task data, for random-weight models.

A `random:<shape>` model has no tokenizer of its own. Where SmolLM2's cannot serve
(`models.random_tokenizer` decides), `small_bpe_tokenizer(vocab_size)` trains a byte-level
BPE on the task data with the `tokenizers` library (seconds, cached on disk), with SmolLM2's
ChatML chat template, so the data pipeline works unchanged.

Shortcut: the small BPE knows only the task's words well; it is for mechanics, not quality.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qlora_lab import data, paths

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad/unk, bos, eos (ChatML)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def small_bpe_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE with ChatML special tokens trained on data/*.jsonl, cached on disk.

    Example: small_bpe_tokenizer(4096)("Omar ordered seven lamps")["input_ids"][:3] -> [...]
    """
    out = paths.cache_dir() / f"bpe-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        texts = []
        for split in data.SPLITS:
            for row in data.read_jsonl(data.task_file(split)):
                texts += [row["sentence"], row["answer"], data.TASK_INSTRUCTION]
        texts.append("system user assistant")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", unk_token="<|endoftext|>")
        fast.chat_template = CHATML_TEMPLATE
        with paths.atomic_dir(out) as tmp:
            fast.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(out)
