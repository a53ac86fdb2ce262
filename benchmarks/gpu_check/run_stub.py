"""Run a script or ``-m module`` with ``quietstar`` importable even when transformers is too old.

With ``QS_STUB=1`` the ``quietstar`` package is registered without executing its ``__init__`` (which
imports transformers), so the kernel stages (``quietstar.layout``, ``quietstar.ops``, ``triton_kernels``)
still run on a machine whose transformers the project does not support.
"""

import os
import runpy
import sys
import types

if os.environ.get("QS_STUB") == "1":
    stub = types.ModuleType("quietstar")
    stub.__path__ = [os.path.join(os.getcwd(), "quietstar")]
    sys.modules["quietstar"] = stub
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
