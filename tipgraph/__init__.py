"""tipgraph: one helpful tip per request, chosen by a contextual bandit that learns online.

The core: settings, contracts, privacy, store, features, candidates, policies, generation,
the model registry client and the tip loop. It runs and is tested without Ray and imports
no other layer: ``deployments`` (serving shells) and ``tuning`` (offline tools) build on it,
``graphs`` assembles the Serve app, ``tipgraph_ops`` is the command line on top (README,
"Where things live"; enforced by ``lint-imports``).
"""

__version__ = "0.1.0"
