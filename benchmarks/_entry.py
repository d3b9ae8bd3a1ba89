"""Shared body of the scripts in benchmarks/: run one benchmark of `python -m revkernels.bench`
from a checkout (installed or not), writing device-named files to the checkout's plots/ unless
--out is given. See revkernels/bench/__main__.py."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name):
    sys.path.insert(0, str(ROOT))   # runs from a checkout without installing
    from revkernels.bench.__main__ import main
    sys.exit(main([name, "--out", str(ROOT / "plots"), "--tag-device", *sys.argv[1:]]))
