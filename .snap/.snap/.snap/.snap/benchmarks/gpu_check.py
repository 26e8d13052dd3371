"""GPU correctness check only (every scheme, the fast GPU kernels vs the reference; the
prequant / in-loop QDQ and dequantized-workspace paths too), split over worker processes.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [OUT_JSON]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_moe_kernels import gpu_check_parallel  # noqa: E402

if __name__ == "__main__":
    rows = gpu_check_parallel(8)
    res = {"all_ok": all(r.get("ok") for r in rows), "rows": rows}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1)[-3000:])
    print("gpu_check all_ok:", res["all_ok"])
