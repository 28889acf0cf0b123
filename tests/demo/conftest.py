"""The demo model and its OpenAI-compatible server, on the simulated GPU, with the openai SDK as the client.

Every test here is marked ``demo`` by tests/conftest.py: ``pytest -m demo`` runs this layer."""
