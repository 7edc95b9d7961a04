"""The operator surface: the ``tipgraph`` command line and ``tipgraph status``.

The top of the house: it may import every layer (core ``tipgraph``, the serving shells in
``deployments``, the offline tools in ``tuning``, the assembly in ``graphs``) and nothing
imports it.  It is a package of its own, not ``tipgraph.ops``, because a layer inside the
core's package would count as core to the import contracts (``[tool.importlinter]``), and
the core must never import the layers above it.
"""
