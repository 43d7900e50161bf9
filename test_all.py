"""Shape and equivalence checks for every piece of the project.

    python test_all.py            # run everything, print "N passed, M failed"
    python test_all.py rope       # run only the tests whose name contains "rope"
    python -m pytest test_all.py  # also works, if pytest happens to be installed

Each test compares against an independent formulation (a closed form, a second implementation written
differently, or a known value), with fixed seeds and tolerances that mean something.
"""
import sys
import time
import traceback

import numpy as np
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# ----------------------------------------------------------------------------------------------------
# harness

def main(argv):
    pattern = argv[1] if len(argv) > 1 else ""
    tests = [(name, fn) for name, fn in globals().items()
             if name.startswith("test_") and callable(fn) and pattern in name]
    passed = failed = 0
    t_start = time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"ok   {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # a failing test must not stop the others
            failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"FAIL {name}: {type(e).__name__}: {e} (line {where.lineno})", flush=True)
    print(f"total {time.time() - t_start:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
