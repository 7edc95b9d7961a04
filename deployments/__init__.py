"""Ray Serve deployments: thin shells around the plain-Python core in :mod:`tipgraph`."""
