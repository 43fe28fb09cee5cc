"""`python -m loadtest.fleet ...`: the fleet workload alone (see throughput.py)."""

from __future__ import annotations

import sys

from ..charts import write_fleet_chaos_chart
from ..core.context import main_alone
from .throughput import NAME, add_options, run

sys.exit(main_alone(NAME, run, add_options, write_fleet_chaos_chart))
