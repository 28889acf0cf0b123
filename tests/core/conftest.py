"""The C++ core (gpusleep._C and gpusleep.Allocator) against the driver double: sleep and wake transactions,
state, failures of every driver call, threads, captures, peer devices, host tiers, verified wakes. Fixtures
``fake``, ``alloc``, ``unverified_alloc`` and ``global_mode`` come from tests/conftest.py.

Every test here is marked ``core`` by tests/conftest.py: ``pytest -m core`` runs this layer."""
