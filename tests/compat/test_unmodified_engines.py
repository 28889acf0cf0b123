"""Unmodified engines on gpusleep (Note [Unmodified engines] in gpusleep/compat/redirect.py): with
``python -m gpusleep.compat.launch`` (or ``GPUSLEEP_COMPAT`` and gpusleep's ``sitecustomize`` on
``PYTHONPATH``), ``import torch_memory_saver`` and ``vllm.device_allocator.cumem`` resolve to gpusleep's
compat layers in the launched process and in every Python process it starts.

What runs here, on a CPU machine:

* torch_memory_saver: its real wheel (``pip install torch_memory_saver``) is installed when present;
  the tests check that without the redirect the import gives the real package, and with it the engine's
  own calls (SGLang's adapter: ``torch_memory_saver.torch_memory_saver``, ``configure_subprocess()``,
  ``hook_mode``) reach gpusleep's singleton, in a child and a grandchild process.
* vLLM: its wheel installs with ``--no-deps`` but ``vllm`` cannot be imported without its dependencies
  (``regex`` and more) on this machine, so the redirect of ``vllm.device_allocator.cumem`` is checked
  under a stand-in ``vllm`` package tree made in a temporary directory (only the two parent packages,
  empty); the test against the real package runs where ``vllm.device_allocator`` imports.
* Neither engine can serve a model here; the GPU run (tests/compat/test_compat_gpu.py) covers the
  compat layers on a device, not a full engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from gpusleep.compat import launch, redirect


def run_python(code: str, env: dict, cwd=None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def real_torch_memory_saver_installed() -> bool:
    out = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('torch_memory_saver') is not None)"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != redirect.ENV_VAR},
    )
    return out.stdout.strip() == "True"


SGLANG_ADAPTER_CALLS = """
    import sys, subprocess
    import torch_memory_saver                     # SGLang's TorchMemorySaverAdapter
    with torch_memory_saver.configure_subprocess():
        pass
    saver = torch_memory_saver.torch_memory_saver
    saver.hook_mode = "preload"
    print(torch_memory_saver.__name__, type(saver).__module__, saver.enabled)
    # a process the scheduler starts: the redirect holds there too
    code = "import torch_memory_saver; print(torch_memory_saver.__name__)"
    print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
"""


def test_without_the_redirect_the_peer_is_itself():
    env = {k: v for k, v in os.environ.items() if k != redirect.ENV_VAR}
    code = "import sys, gpusleep.compat.redirect as r; print(r.installed_peers(), 'torch_memory_saver' in sys.modules)"
    assert run_python(code, env) == "[] False"


@pytest.mark.skipif(not real_torch_memory_saver_installed(), reason="torch_memory_saver's wheel is not installed")
def test_the_real_torch_memory_saver_without_the_redirect():
    env = {k: v for k, v in os.environ.items() if k != redirect.ENV_VAR}
    assert (
        run_python(
            "import torch_memory_saver; print(torch_memory_saver.__name__, "
            "type(torch_memory_saver.torch_memory_saver).__module__)",
            env,
        )
        == "torch_memory_saver torch_memory_saver.entrypoint"
    )


def test_the_launcher_redirects_torch_memory_saver_in_the_engine_and_its_children():
    """SGLang's calls, through ``python -m gpusleep.compat.launch -- python -c ...`` (whether or not the
    real wheel is installed: the redirect answers before it)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpusleep.compat.launch",
            "--peers",
            "torch_memory_saver",
            "--",
            sys.executable,
            "-c",
            textwrap.dedent(SGLANG_ADAPTER_CALLS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    first, child = out.stdout.strip().splitlines()
    assert first == "gpusleep.compat.torch_memory_saver gpusleep.compat.torch_memory_saver True"
    assert child == "gpusleep.compat.torch_memory_saver"


def test_the_environment_alone_redirects_a_spawned_process():
    """What the launcher sets is all it takes; a multiprocessing ``spawn`` child inherits it."""
    env = launch.environment(["torch_memory_saver"])
    code = """
        import multiprocessing as mp

        def child(queue):
            import torch_memory_saver
            queue.put(torch_memory_saver.__name__)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            p = ctx.Process(target=child, args=(queue,))
            p.start()
            print(queue.get(timeout=60))
            p.join(60)
    """
    script = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gpusleep_spawn_{os.getpid()}.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(code))
    try:
        out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpusleep.compat.torch_memory_saver"


def test_vllm_cumem_is_redirected_under_a_stand_in_vllm_package(tmp_path):
    """vLLM cannot be imported here (see the module docstring): two empty parent packages stand in."""
    (tmp_path / "vllm" / "device_allocator").mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (tmp_path / "vllm" / "device_allocator" / "__init__.py").write_text("")
    env = launch.environment(["vllm"])
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(tmp_path)])
    code = """
        from vllm.device_allocator.cumem import CuMemAllocator   # vLLM's worker
        import vllm.device_allocator.cumem as cumem
        import gpusleep.compat.vllm
        print(CuMemAllocator is gpusleep.compat.vllm.CuMemAllocator, cumem.cumem_available)
    """
    assert run_python(code, env) == "True True"


def test_vllm_cumem_is_redirected_in_the_real_package():
    probe = subprocess.run(
        [sys.executable, "-c", "import vllm.device_allocator"],
        capture_output=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != redirect.ENV_VAR},
    )
    if probe.returncode != 0:
        pytest.skip("vllm.device_allocator does not import on this machine (vLLM's dependencies are missing)")
    code = """
        from vllm.device_allocator.cumem import CuMemAllocator
        import gpusleep.compat.vllm
        print(CuMemAllocator is gpusleep.compat.vllm.CuMemAllocator)
    """
    assert run_python(code, launch.environment(["vllm"])) == "True"


def test_bad_peer_names_are_refused():
    with pytest.raises(ValueError, match="unknown peer"):
        redirect.install_from_env({redirect.ENV_VAR: "sglang"})
    out = subprocess.run(
        [sys.executable, "-m", "gpusleep.compat.launch", "--peers", "sglang", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "unknown peer" in out.stderr


def test_the_launcher_keeps_the_users_pythonpath_and_sitecustomize(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    env = launch.environment(["torch_memory_saver"], {**os.environ, "PYTHONPATH": str(tmp_path)})
    assert env["PYTHONPATH"].split(os.pathsep) == [launch.SITE_DIR, str(tmp_path)]
    code = "import os, torch_memory_saver; print(os.environ.get('USER_SITECUSTOMIZE_RAN'), torch_memory_saver.__name__)"
    assert run_python(code, env) == "1 gpusleep.compat.torch_memory_saver"
