"""The HTTP control plane (gpusleep.server): routes, the gate and its drain, error answers, the SGLang dialect,
concurrency, hostile traffic. Servers run in-process on free loopback ports (tests/_server_testkit.py).

Every test here is marked ``server`` by tests/conftest.py: ``pytest -m server`` runs this layer."""
