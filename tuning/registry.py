"""Where the registry client lived before it moved to the core (:mod:`tipgraph.registry`).

Versions registered before models-from-code hold a cloudpickled ``PolicyModel`` that names
this module as its home: it stays importable here, so MLflow can still load them.
"""

from tipgraph.policy_model import PolicyModel

__all__ = ["PolicyModel"]
