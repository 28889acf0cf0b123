"""The model switch (gpusleep.switch): routing, budgets, backend kinds and launched processes, idle sleep,
hostile clients. Backends are stand-in processes in this folder sharing a memory ledger
(switch_ledger.py); ``switch_standin_*.py`` run as scripts.

Every test here is marked ``switch`` by tests/conftest.py: ``pytest -m switch`` runs this layer."""
