"""The operator surface: the ``tipgraph`` command line and ``tipgraph status``.

The top of the house: it may import every layer (core ``tipgraph``, the serving shells in
``deployments``, the offline tools in ``tuning``, the assembly in ``graphs``) and nothing
imports it.  It is a package of its own, not ``tipgraph.ops``, because a layer inside the
core's package would count as core to the import contracts (``[tool.importlinter]``), and
the core must never import the layers above it.
"""

import os

from tipgraph.serve_config import SERVE_ENV

# Before anything here imports Ray Serve (the CLI imports the graph to serve it): Serve reads
# these switches when it is imported, in the driver as in the cluster it starts.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
for _name, _value in SERVE_ENV.items():  # measured in BENCHMARKS.md
    os.environ.setdefault(_name, _value)
