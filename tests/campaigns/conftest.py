"""Property-based and fault-sweep campaigns over the core (tests/campaign_model.py is their model and that of
tests/campaigns/soak.py, the long run outside CI). ``GPUSLEEP_CAMPAIGN_SCALE`` scales them.

Every test here is marked ``campaigns`` by tests/conftest.py: ``pytest -m campaigns`` runs this layer."""
