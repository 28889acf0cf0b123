"""The driver double itself (csrc/simulated_gpu, built by tests/fakecuda/harness.py) and the simulated GPU
shipped in the package: each driver rule of docs/driver-rules.md has a strictness test here, so that the
core's tests can trust what the double accepts and refuses.

Every test here is marked ``simulated_gpu`` by tests/conftest.py: ``pytest -m simulated_gpu`` runs this layer."""
