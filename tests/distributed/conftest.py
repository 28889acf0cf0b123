"""Multi-rank sleep (gpusleep.distributed): each scenario runs one process per rank on the driver double with
the NCCL double (tests/nccl_double.py), faults on one rank included.

Every test here is marked ``distributed`` by tests/conftest.py: ``pytest -m distributed`` runs this layer."""
