"""The lab's task data: generate it, load it with `datasets`, and turn it into training tensors.

The task: turn a sentence about an order into one line of JSON, for example

    "Omar ordered seven lamps for delivery to Oslo on 14 March."
    -> {"name": "Omar", "item": "lamp", "qty": 7, "city": "Oslo", "date": "03-14"}

An exact answer needs several small skills at once: copy the name and city, singularise
the item ("shelves" -> "shelf"), read a quantity in words or digits, and write the date as
zero-padded "MM-DD". The base SmolLM2-135M-Instruct scores about 0 % exact match (it does not
know the output format); a few minutes of QLoRA on a CPU take it above 70 %. The eval split
uses names and cities that never occur in training, so a high score means the rules were
learned, not the examples.

`data/make_dataset.py` writes data/train.jsonl and data/eval.jsonl with `write_task_files`;
the files are committed and a test checks they are exactly what the seeded generator makes.
When the package is installed without the repository (Colab), `task_file` regenerates them
into the cache. `load_task` also takes an Alpaca-style hub data set name when online.
`general_text` and `GENERAL_QUESTION` are the forgetting check: general text and a general
question, measured before and after fine-tuning (the text ships inside the package).

Shortcuts: prompts are masked from the loss with -100 labels; examples are right-padded;
no packing of several examples into one sequence.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset

from qlora_lab import paths

TASK_INSTRUCTION = "Extract the order as JSON."  # the system message of every example
IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)

# Many training names and cities, each seen only a few times: the model must learn to copy
# a word from the sentence, not recall one of a short list (with 60 names it "corrected"
# unseen eval names to training ones: Lorenzo -> Loren, Malmo -> Mala).
NAMES_TRAIN = """Aiko Amara Anders Ava Bea Bruno Carmen Chen Dara Diego Elif Emil Farah Felix
Greta Hana Hugo Ines Ivan Jonas Kai Kemal Lara Leo Lina Luca Maja Marco Mina Nadia Nils Noor
Omar Oskar Pablo Paula Quinn Rafael Rosa Sami Sara Selin Tariq Teo Uma Vera Wanda Yara Yusuf
Zara Zoe Arjun Bianca Cyrus Daria Ezra Freya Gideon Abel Adele Agnes Ahmed Aida Alba Aleksi
Amir Anika Anton Ari Astrid Aurora Axel Baran Beatriz Benno Birgit Bjorn Bogdan Bruna Caio
Camila Cecil Chiara Clara Cosmin Dalia Damian Dario Dilan Dorota Edda Edgar Elena Elias Emre
Enzo Erik Esther Eva Fatima Fenna Filip Flora Goran Hamid Hedda Helga Hiro Ida Igor Imani
Irene Isak Jakob Jana Janek Joao Joel Julia Juno Kaito Karim Karla Katya Keiko Klaus Lale
Lars Leila Lena Linus Liv Lotte Lucia Magnus Malik Marta Mateo Mats Mei Milan Miro Nell
Naoki Nora Odile Ola Oren Otto Petra Pia Priya Ravi Reza Rina Rolf Runa Saga Samir Sanne
Selma Silas Sven Tamar Tanja Theo Timo Tomas Ugo Una Valter Vidar Wilma Xenia Yann Yoko Yuki
Zeno Zofia Zuri""".split()
NAMES_EVAL = """Alma Boris Celia Dmitri Esme Fabio Gaia Henrik Ilse Jorge Kira Lorenzo Mirela
Nikos Olga Pieter Rhea Stefan Tove Viktor""".split()
CITIES_TRAIN = """Oslo Lisbon Nairobi Lima Hanoi Dublin Austin Porto Quito Riga Tunis Zagreb
Bergen Cairo Dakar Denver Geneva Havana Jakarta Kyoto Lagos Madrid Manila Milan Munich Osaka
Paris Perth Prague Seoul Sofia Tallinn Tokyo Turin Vienna Warsaw Zurich Boston Chicago Sydney
Aarhus Adelaide Ankara Antwerp Athens Atlanta Baku Bangkok Basel Belfast Bilbao Bologna Bonn
Bremen Brno Bruges Busan Calgary Cardiff Cologne Cordoba Dallas Delft Dresden Durban Galway
Genoa Ghent Gdansk Glasgow Gothenburg Haifa Helsinki Houston Kiev Kobe Lahore Leipzig Lille
Linz Lyon Marseille Medina Memphis Minsk Mumbai Nagoya Naples Nice Odessa Orlando Ottawa
Oxford Palermo Pisa Poznan Reno Rome Rotterdam Salzburg Santiago Sapporo Seville Shanghai
Siena Stockholm Tampa Tartu Toledo Toronto Trieste Tulsa Turku Uppsala Venice Verona Vilnius
Wroclaw York""".split()
CITIES_EVAL = """Accra Bogota Cusco Delhi Essen Fukuoka Graz Hamburg Izmir Krakow Leeds Malmo
Nantes Oaxaca Pune Rabat Split Tbilisi Utrecht Valencia""".split()
# (singular, plural); irregular plurals on purpose
ITEMS = [("lamp", "lamps"), ("chair", "chairs"), ("desk", "desks"), ("mug", "mugs"),
         ("kettle", "kettles"), ("candle", "candles"), ("blanket", "blankets"),
         ("shelf", "shelves"), ("knife", "knives"), ("box", "boxes"), ("brush", "brushes"),
         ("glass", "glasses"), ("battery", "batteries"), ("clock", "clocks"),
         ("pillow", "pillows"), ("plate", "plates"), ("towel", "towels"),
         ("notebook", "notebooks"), ("bottle", "bottles"), ("basket", "baskets"),
         ("mirror", "mirrors"), ("jacket", "jackets"), ("scarf", "scarves"),
         ("bench", "benches"), ("tray", "trays"), ("spoon", "spoons"), ("rug", "rugs"),
         ("vase", "vases"), ("helmet", "helmets"), ("puzzle", "puzzles")]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
TEMPLATES = [  # dates appear as "14 March" or "March 14"
    "{name} ordered {qty} {items} for delivery to {city} on {date}.",
    "Please ship {qty} {items} to {name} in {city} by {date}.",
    "On {date}, {name} from {city} bought {qty} {items}.",
    "{name} needs {qty} {items} delivered in {city} on {date}.",
    "Send {name} {qty} {items} at the {city} store, arriving {date}.",
    "Order for {name}: {qty} {items}, deliver to {city} on {date}.",
    "{name} in {city} asked for {qty} {items} on {date}.",
    "By {date}, {city} should receive {qty} {items} for {name}.",
]
SPLITS = {  # split -> (number of examples, seed, names, cities)
    "train": (2000, 0, NAMES_TRAIN, CITIES_TRAIN),
    "eval": (200, 1, NAMES_EVAL, CITIES_EVAL),
}


# --------------------------------------------------------------------------- generation


def make_example(rng: random.Random, names: list[str], cities: list[str]) -> dict:
    """One example drawn from rng.

    Example: make_example(random.Random(0), ["Omar"], ["Oslo"])
    -> {"sentence": "Send Omar ten jackets at the Oslo store, ...", "answer": '{"name": "Omar", ...}'}
    """
    name, city = rng.choice(names), rng.choice(cities)
    singular, plural = rng.choice(ITEMS)
    qty = rng.randint(2, 12)  # 2 or more, so the sentence always has the plural
    qty_text = NUMBER_WORDS[qty] if rng.random() < 0.6 else str(qty)
    month = rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    date_text = f"{day} {MONTHS[month - 1]}" if rng.random() < 0.5 else f"{MONTHS[month - 1]} {day}"
    sentence = rng.choice(TEMPLATES).format(name=name, qty=qty_text, items=plural, city=city, date=date_text)
    answer = json.dumps({"name": name, "item": singular, "qty": qty, "city": city, "date": f"{month:02d}-{day:02d}"})
    return {"sentence": sentence[0].upper() + sentence[1:], "answer": answer}


def make_split(split: str) -> list[dict]:
    """All rows of a split, deterministic. Example: len(make_split("eval")) -> 200"""
    n, seed, names, cities = SPLITS[split]
    rng = random.Random(seed)
    return [{"id": f"{split}-{i:05d}", **make_example(rng, names, cities)} for i in range(n)]


def write_task_files(out_dir: Path) -> dict[str, Path]:
    """Write <split>.jsonl for every split into out_dir; returns the paths."""
    out_dir = Path(out_dir)
    return {split: paths.atomic_write_text(out_dir / f"{split}.jsonl",
                                           "".join(json.dumps(row) + "\n" for row in make_split(split)))
            for split in SPLITS}


def task_file(split: str) -> Path:
    """The JSONL file of a split: the repository's data/, or a copy generated into the cache."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the lab's task has {list(SPLITS)}")
    path = paths.DATA_DIR / f"{split}.jsonl"
    if path.exists():
        return path
    cached = paths.cache_dir() / "data" / f"{split}.jsonl"
    if not cached.exists():
        write_task_files(cached.parent)
    return cached


GENERAL_QUESTION = "What is the capital of France? Answer in one sentence."  # lab 00 asks it; labs 05, 07 ask it again
GENERAL_TEXT = Path(__file__).with_name("general.txt")  # ~1,000 tokens of plain English on nine everyday topics


def general_text() -> str:
    """Held-out general text, written for this lab (not in the task data): perplexity on it measures forgetting.

    Example: len(general_text().split()) -> 823
    """
    return GENERAL_TEXT.read_text()


class DataError(ValueError):
    """A data file the lab cannot read; the message names the file, the line and what is wrong."""


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file: one JSON object per line (blank lines skipped); DataError names file and line.

    Example: read_jsonl(task_file("eval"))[0]["sentence"] -> "Send Kira ..."
    """
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}, column {err.colno}: not valid JSON ({err.msg}): "
                            f"{line[:80]!r}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows; regenerate the task files with: python data/make_dataset.py")
    return rows


# --------------------------------------------------------------------------- loading


def load_task(name: str = "orders", eval_size: int = 200, seed: int = 0):
    """A DatasetDict with "train" and "eval" splits and columns system / prompt / answer.

    name "orders" is the lab's shipped task. Any other name is read as an Alpaca-style hub
    data set (columns instruction, input, output), which needs network; its last eval_size
    rows after a seeded shuffle become the eval split.
    Example: load_task()["eval"][0]["prompt"] -> "Send Kira ..."
    """
    if name == "orders":  # read (and checked line by line) here, then handed to datasets
        ds = DatasetDict({s: Dataset.from_list(read_jsonl(task_file(s))) for s in SPLITS})
        return ds.map(lambda row: {"system": TASK_INSTRUCTION, "prompt": row["sentence"]},
                      remove_columns=["sentence"])
    try:
        raw = load_dataset(name, split="train")
    except Exception as err:  # offline, or not a data set
        raise ValueError(f"could not load hub data set {name!r} ({type(err).__name__}: {err}). "
                         f"Offline, use the lab's own task: load_task('orders').") from err
    missing = {"instruction", "output"} - set(raw.column_names)
    if missing:
        raise ValueError(f"{name!r} is not Alpaca-style: it lacks the columns {sorted(missing)}")

    def to_row(row):
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"system": "You are a helpful assistant.", "prompt": prompt, "answer": row["output"]}

    raw = raw.map(to_row, remove_columns=raw.column_names).shuffle(seed=seed)
    n = len(raw)
    return DatasetDict(train=raw.select(range(n - eval_size)), eval=raw.select(range(n - eval_size, n)))


# --------------------------------------------------------------------------- formatting


def messages(example: dict, with_answer: bool = False) -> list[dict]:
    """Chat messages for one example. Example: messages(row)[0] -> {"role": "system", ...}"""
    msgs = [{"role": "system", "content": example["system"]}, {"role": "user", "content": example["prompt"]}]
    if with_answer:
        msgs.append({"role": "assistant", "content": example["answer"]})
    return msgs


def prompt_text(example: dict, tokenizer) -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(messages(example), add_generation_prompt=True, tokenize=False)


def encode(example: dict, tokenizer, max_length: int | None = None) -> dict:
    """Token ids and labels for one example, the prompt masked out of the loss.

    labels equal input_ids on the answer and its end-of-turn token, IGNORE_INDEX elsewhere,
    so the loss (and the gradient) only comes from what the model should write.
    Example: encode(row, tok)["labels"][:3] -> [-100, -100, -100]
    """
    prompt = prompt_text(example, tokenizer)
    full = tokenizer.apply_chat_template(messages(example, with_answer=True), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with an answer; cannot mask it")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("prompt tokens are not a prefix of prompt+answer tokens; cannot mask the prompt")
    answer_ids = full_ids[len(prompt_ids):]
    eos = tokenizer.eos_token_id
    if eos in answer_ids:  # keep the end-of-turn token (the model must learn to stop), drop what follows
        answer_ids = answer_ids[: answer_ids.index(eos) + 1]
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize(split, tokenizer, max_length: int | None = None, limit: int | None = None):
    """encode() over a datasets split (first `limit` rows), keeping only the tensor columns."""
    if limit is not None:
        split = split.select(range(min(limit, len(split))))
    return split.map(lambda row: encode(row, tokenizer, max_length), remove_columns=split.column_names)


@dataclass
class Collator:
    """Right-pads a list of encoded examples into a batch of tensors.

    Example: Collator(pad_token_id=2)([encode(a, tok), encode(b, tok)])["input_ids"].shape -> (2, L)
    """

    pad_token_id: int  # id written into padded input positions (masked by attention and labels)

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)

        def pad(key, value):
            return torch.tensor([list(f[key]) + [value] * (length - len(f[key])) for f in features])

        return {"input_ids": pad("input_ids", self.pad_token_id),  # (batch, seq)
                "attention_mask": pad("attention_mask", 0),  # (batch, seq)
                "labels": pad("labels", IGNORE_INDEX)}  # (batch, seq)


def exact_match(prediction: str, answer: str) -> bool:
    """The task metric: the generated answer equals the reference after trimming whitespace."""
    return prediction.strip() == answer.strip()
