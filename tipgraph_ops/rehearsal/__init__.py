"""The multi-node rehearsal (``tipgraph rehearse``, ``make rehearsal``): a Ray cluster of
three nodes on this machine, Postgres, the Ollama stub; the app deployed as KubeRay deploys
it; scenarios that scale, update, lose a node and restart the database under load."""
