"""`sectors simulate`: capacity planning on the real engine, scheduler and chain, on virtual time.

`config.py` reads the `[simulate]` section and the what-ifs, `bound.py` computes the analytic
bound and names the bottleneck, `run.py` runs one variant under one assigner (`collect.py`
records it, `faults.py` breaks it), and `summary.py` writes the JSON. This layer sits above
`sealing/` and `sched/` and below `cli/`.
"""

from .config import SimulateConfig, SimulateConfigError, load_simulate_config, parse_what_if
from .run import run_all
from .summary import summary

__all__ = [
    "SimulateConfig",
    "SimulateConfigError",
    "load_simulate_config",
    "parse_what_if",
    "run_all",
    "summary",
]
