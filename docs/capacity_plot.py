"""Draw the README's capacity plot: `sectors simulate` on docs/example-cluster.toml.

    python docs/capacity_plot.py                      # 30 days -> docs/capacity.png
    python docs/capacity_plot.py --days 2 --png /tmp/capacity.png --report /tmp/report

It runs the `sectors` command installed beside this interpreter (both assigners, the config's
seed), keeps the full report in --report DIR if asked, and saves the main plot (sectors
reaching Proving per day against the analytic bound) as a PNG.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sectorfsm.simulate.report import save_main_plot

DOCS = Path(__file__).resolve().parent
CONFIG = DOCS / "example-cluster.toml"


def main(argv: list[str] | None = None) -> int:
    """Run the simulation and write the PNG; the exit code of `sectors simulate` on failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=30.0, help="simulated days (default 30)")
    parser.add_argument("--png", type=Path, default=DOCS / "capacity.png", help="PNG to write")
    parser.add_argument("--report", type=Path, help="keep summary.json and report.html here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        out = args.report or Path(tmp)
        sectors = Path(sys.executable).with_name("sectors")
        flags = ["--config", str(CONFIG), "--days", f"{args.days:g}", "--out", str(out)]
        print("$ sectors simulate", " ".join(flags), flush=True)
        cmd = [str(sectors), "simulate", *flags]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode:
            return proc.returncode
        summary = json.loads((out / "summary.json").read_text())
        save_main_plot(summary, args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
