"""Command line: `python -m qlora_lab run ...` (the papermill runner) and friends.

    python -m qlora_lab run [NOTEBOOK ...] --profile smoke|cpu|gpu --out runs/
    python -m qlora_lab vram --model llama-2-7b --method qlora --batch 4 --seq 512 [--json]
    python -m qlora_lab env [--check [--core]]  # versions and device; --check: exit 1 if a requirement is missing
    python -m qlora_lab model [SPEC]            # resolve (and for the default, convert) a model
    python -m qlora_lab strip NOTEBOOK ...      # remove outputs and execution counts
    python -m qlora_lab colab                   # write the Colab install cell (URL and version: pyproject.toml)
"""

import sys

# Each command imports its module when it runs: `env --check` must work before torch is installed
# (make install asks it what is missing), and `--help` should not wait for torch.

def main(argv: list[str] | None = None) -> int:
    """Dispatch `python -m qlora_lab COMMAND ...` to its module; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": "run lab notebooks with papermill", "vram": "predict the memory of a training step",
                "env": "print versions and device",
                "model": "resolve a model spec and print where it lives",
                "strip": "remove outputs from notebooks",
                "colab": "write the Colab install cell (from pyproject.toml) into every lab"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        print("commands: " + ", ".join(f"{k} ({v})" for k, v in commands.items()))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "vram":
        from qlora_lab import budget

        return budget.main(rest)
    if command == "run":
        from qlora_lab import runner

        return runner.main(rest)
    if command == "env":
        from qlora_lab import env

        if "--check" in rest:  # exit 1 when a requirement is missing (make install uses this)
            missing = env.missing_requirements(extras=() if "--core" in rest else ("dev",))
            print("missing: " + ", ".join(missing) if missing else "all requirements installed")
            return 1 if missing else 0
        env.report()
        return 0
    if command == "colab":
        from qlora_lab.runner import write_colab_cells

        for path in write_colab_cells():
            print(f"updated  {path}")
        return 0
    if command == "strip":
        from qlora_lab.runner import strip_notebook

        for path in rest:
            print(("stripped " if strip_notebook(path) else "clean    ") + path)
        return 0
    from qlora_lab import models

    spec = rest[0] if rest else models.DEFAULT_MODEL
    try:
        source = models.resolve(spec)
        print(source.description)
        if source.kind != "random":
            print(models.checkpoint_for(spec))
    except models.ModelSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
