"""The command line (gpusleep serve/status/sleep/wake/doctor), the Python client and ``gpusleep doctor``.

Every test here is marked ``cli`` by tests/conftest.py: ``pytest -m cli`` runs this layer."""
