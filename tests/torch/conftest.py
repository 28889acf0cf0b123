"""gpusleep.torch_glue on the CPU: PyTorch's CUDA objects are recorders (tests/torch_cuda_double.py) and the
core runs on the driver double, so pool and global mode can be switched on without a GPU.

Every test here is marked ``torch`` by tests/conftest.py: ``pytest -m torch`` runs this layer."""
