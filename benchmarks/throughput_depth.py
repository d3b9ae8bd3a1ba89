"""Training throughput against depth at max and common batch (paper Table 4).

    python benchmarks/throughput_depth.py [--preset cpu|gpu] [--out DIR]

Thin entry point to `python -m revkernels.bench throughput-depth --out plots --tag-device`: writes
DIR/throughput-depth-<device>.csv, .png and .md (DIR defaults to the checkout's plots/).
See revkernels/bench/__main__.py.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # runs from a checkout without installing

from revkernels.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["throughput-depth", "--out", str(ROOT / "plots"), "--tag-device", *sys.argv[1:]]))
