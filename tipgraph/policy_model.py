"""The MLflow pyfunc that every registered ``tip-policy`` version is.

It holds no learned state of its own: ``load_context`` rebuilds the policy from the version's
``policy_state`` artifact (``Policy.to_bytes``), so the registry stores data and the code stays
here, in the installed package.  New versions are logged "from code"
(:mod:`tipgraph.policy_model_code`, stored as source text); versions registered before that
hold a cloudpickled instance of this class, found by reference as ``tuning.registry.PolicyModel``
(still importable there). Importing this module imports MLflow: only MLflow's loader does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mlflow.pyfunc import PythonModel

from tipgraph.policies import Policy, policy_from_bytes
from tipgraph.registry import STATE_ARTIFACT_KEY


class PolicyModel(PythonModel):
    """``predict`` takes one event's candidate features, array of shape (K, d), and returns
    the policy's probability for every candidate, array of shape (K,)."""

    policy: Policy

    def load_context(self, context: Any) -> None:
        self.policy = policy_from_bytes(Path(context.artifacts[STATE_ARTIFACT_KEY]).read_bytes())

    # ``np.ndarray`` is a hint MLflow accepts without inferring a schema; ``Any`` made it warn
    # on import and at every log_model.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return self.policy.distribution(np.asarray(model_input, dtype=np.float64))
