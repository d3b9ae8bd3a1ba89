"""Reconstruction and gradient drift against depth, per scheme.

    python benchmarks/drift.py [--preset cpu|gpu] [--out DIR]

Thin entry point to `python -m revkernels.bench drift --out plots --tag-device`: writes
DIR/drift-<device>.csv, .png and .md (DIR defaults to the checkout's plots/).
See revkernels/bench/__main__.py.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # runs from a checkout without installing

from revkernels.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["drift", "--out", str(ROOT / "plots"), "--tag-device", *sys.argv[1:]]))
