"""The project around the code: docs run as written, the package imports and its ``__all__``, stubs, the style
checks, the GPU check script offline, and the benchmarks' own code on the double.

Every test here is marked ``project`` by tests/conftest.py: ``pytest -m project`` runs this layer."""
