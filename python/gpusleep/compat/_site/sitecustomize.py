"""gpusleep's ``sitecustomize``, first on ``PYTHONPATH`` when :mod:`gpusleep.compat.launch` started the
process: installs the peer redirect named by ``GPUSLEEP_COMPAT`` (Note [Unmodified engines] in
``gpusleep/compat/redirect.py``), then runs the next ``sitecustomize`` on the path, if any."""

import importlib.util
import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        candidate = os.path.join(entry or os.curdir, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_gpusleep_chained_sitecustomize", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


if os.environ.get("GPUSLEEP_COMPAT"):
    from gpusleep.compat.redirect import install_from_env

    install_from_env()
_chain()
