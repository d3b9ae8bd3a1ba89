"""Prints the versions in use and, when they differ from the tested set (constraints.txt), which ones.

A difference is reported, not refused: the lent GPU machine has its own torch/triton and no network.
Usage: python scripts/check_versions.py [constraints.txt | none]
"""
import importlib.metadata
import sys

import torch


def pinned(path):
    """{name: version} of the `name==version` lines of a constraints file."""
    pins = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(path):
    import triton  # noqa: F401  (import check)
    print(f"torch {torch.__version__} | triton {installed('triton')} | transformers {installed('transformers')} "
          f"| cuda {torch.cuda.is_available()}")
    if path == "none":
        return
    off = [(name, want, installed(name)) for name, want in pinned(path).items()
           if (installed(name) or "").split("+")[0] != want]
    if off:
        print("not the tested set (constraints.txt): " +
              ", ".join(f"{name} {have or 'missing'} (tested {want})" for name, want, have in off))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
