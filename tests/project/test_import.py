"""The package imports and explains itself on a machine with no GPU and no driver."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_import_needs_no_gpu_and_no_torch():
    result = run_python(
        "import sys, gpusleep; print('torch' in sys.modules); a = gpusleep.Allocator(); print(a.is_sleeping)",
        GPUSLEEP_CUDA_DRIVER="/nonexistent/libcuda.so.1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_first_driver_call_without_a_driver_raises_a_clear_error():
    result = run_python(
        "import gpusleep\n"
        "try:\n"
        "    gpusleep.Allocator().allocate(1)\n"
        "except gpusleep.DriverUnavailableError as e:\n"
        "    print('OK', e)\n",
        GPUSLEEP_CUDA_DRIVER="/nonexistent/libcuda.so.1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK")
    assert "/nonexistent/libcuda.so.1" in result.stdout and "GPUSLEEP_CUDA_DRIVER" in result.stdout


def test_public_names():
    import gpusleep

    for name in [
        "Allocator",
        "CudaError",
        "OutOfMemoryError",
        "SleepStateError",
        "SleepReport",
        "WakeReport",
        "TagStats",
        "AllocatorStats",
    ]:
        assert hasattr(gpusleep, name), name
    assert issubclass(gpusleep.OutOfMemoryError, MemoryError)


def test_the_version_has_one_source_pyproject(monkeypatch, tmp_path):
    import pathlib
    import re
    from importlib import metadata

    import gpusleep

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    assert gpusleep.__version__ == tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    init = (root / "python" / "gpusleep" / "__init__.py").read_text()
    assert not re.search(r"""__version__\s*=\s*["']""", init), "the version is written in pyproject.toml only"
    # Installed (no pyproject.toml above the package), or beside another project's: the distribution's metadata.
    monkeypatch.setattr(metadata, "version", lambda name: {"gpusleep": "9.8.7"}[name])
    monkeypatch.setattr(gpusleep, "__file__", str(tmp_path / "lib" / "site-packages" / "gpusleep" / "__init__.py"))
    assert gpusleep._version() == "9.8.7"
    (tmp_path / "lib").mkdir(exist_ok=True)
    (tmp_path / "lib" / "pyproject.toml").write_text('[project]\nname = "other"\nversion = "1.2.3"\n')
    assert gpusleep._version() == "9.8.7"


def test_every_module_exports_only_names_it_has():
    """`from module import *` raised for gpusleep.remote, whose __all__ named functions it did not have."""
    import importlib
    import pkgutil

    import gpusleep

    for info in pkgutil.walk_packages(gpusleep.__path__, "gpusleep."):
        if info.name.startswith(("gpusleep.compat._site", "gpusleep.demo", "gpusleep.torch_glue")):
            continue  # import-time effects (a sitecustomize) or optional dependencies
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue  # an optional dependency missing here
        submodules = {m.name for m in pkgutil.iter_modules(getattr(module, "__path__", []))}  # `import *` loads them
        exported = getattr(module, "__all__", [])
        missing = [name for name in exported if not hasattr(module, name) and name not in submodules]
        assert not missing, f"{info.name}.__all__ names what it does not have: {missing}"


def test_every_exception_gpusleep_defines_has_the_one_root():
    import importlib
    import inspect
    import pkgutil

    import gpusleep
    from gpusleep.errors import GpusleepError

    rootless = []
    for info in pkgutil.walk_packages(gpusleep.__path__, "gpusleep."):
        if info.name.startswith("gpusleep.compat._site"):
            continue  # a sitecustomize: importing it has effects
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue  # an optional dependency missing here
        for name, cls in inspect.getmembers(module, inspect.isclass):
            raised = issubclass(cls, BaseException) and not issubclass(cls, Warning)  # warnings are not errors
            if cls.__module__ == info.name and raised and not issubclass(cls, GpusleepError):
                rootless.append(f"{info.name}.{name}")
    assert not rootless, f"exceptions without gpusleep.GpusleepError among their bases: {rootless}"
