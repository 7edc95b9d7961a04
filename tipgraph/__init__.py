"""tipgraph: one helpful tip per request, chosen by a contextual bandit that learns online.

The plain-Python core (contracts, features, candidates, policies, store, simulator) lives
here and runs without Ray; ``deployments/`` and ``graphs/`` wrap it in Ray Serve.
"""

__version__ = "0.1.0"
