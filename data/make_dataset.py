"""Write the lab's task data, data/train.jsonl and data/eval.jsonl.

    python data/make_dataset.py [--out DIR]

The generator itself (seeded, with the task's rules) is `qlora_lab.data`; see its docstring
for what the task is and why it was chosen. tests/test_data.py checks that the committed
files are exactly what this script writes.
"""

import argparse
from pathlib import Path

from qlora_lab.data import SPLITS, write_task_files

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    args = parser.parse_args()
    for split, path in write_task_files(args.out).items():
        print(f"{split}: {SPLITS[split][0]} examples -> {path}")
