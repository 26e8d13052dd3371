# Sourced by the gpu_*.sh device scripts: editable install, versions, the device slug and
# `step NAME LIMIT_S CMD...` (one time-limited step, its log in $OUT/NAME.log, the tail
# printed), so a time limit in one step still returns what the others wrote.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
slug=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - t0))s"; tail -n ${TAILN:-14} "$OUT/$name.log"
}
