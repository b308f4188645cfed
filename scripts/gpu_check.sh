#!/usr/bin/env bash
# The GPU check of issue 12, as ONE command for a session that has a GPU (about 8 minutes on one
# H100; every step has its own timeout so one hang cannot eat the session):
#   1. the test suite's CUDA tests (pytest -k cuda)
#   2. a tiny pipeline under torchrun --nproc_per_node=1 on CUDA (NCCL process group)
#   3. bf16 autocast + channels_last on CUDA through ptd's Runtime and fit
#   4. torch.compile of the CIFAR VGG19 training step on CUDA: compile time and step time vs eager
#   5. benchmarks/pipeline_speed.py on CUDA: per-epoch times of the CIFAR-100 VGG19 recipe, ptd vs
#      the re-creation of the published code's way (fabricated CIFAR-100 at full size, 50k/10k)
#   6. benchmarks/student_speed.py on CUDA (issue 7's table: students vs teachers, fp32 and bf16)
# Everything lands in benchmarks/results/gpu/ (and in $OUT too when the device runner sets it),
# each file naming the GPU. The step's exit codes are collected in summary.txt; the script exits
# non-zero when any step failed.
#
#   scripts/gpu_check.sh              # on the GPU machine, from the repository root
#   scripts/gpu_check.sh --dry-run    # on a CPU: same steps, tiny sizes, gloo, no GPU needed
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH=${PYTHONPATH:-$PWD}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RES=${GPU_CHECK_DIR:-benchmarks/results/gpu}
[ $DRY = 1 ] && RES=${GPU_CHECK_DIR:-/tmp/ptd_gpu_check_dry}
mkdir -p "$RES"
WORK=$(mktemp -d)
SUMMARY="$RES/summary.txt"
: > "$SUMMARY"
if [ $DRY = 1 ]; then DEV=cpu; else DEV=cuda; fi
export PTD_GPU_CHECK_DEV=$DEV PTD_GPU_CHECK_DRY=$DRY PTD_GPU_CHECK_WORK=$WORK PTD_GPU_CHECK_RES=$RES

step() {  # step NAME TIMEOUT_S CMD...: run, log to $RES/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall_s=$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
}

$PY - > "$RES/device.txt" 2>&1 <<'EOF'
import platform, torch
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run on CPU)")
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "python:", platform.python_version())
EOF
cat "$RES/device.txt" | tee -a "$SUMMARY"

# 1. CUDA tests of the suite (they skip themselves without CUDA, so the dry run reports skips).
step cuda_tests 120 $PY -m pytest tests -q -x -p no:cacheprovider -k cuda -rs

# 2. A tiny pipeline under torchrun, one process: NCCL on CUDA (gloo in the dry run).
$PY - <<'EOF'
import os, sys, yaml
sys.path.insert(0, "benchmarks")
from pathlib import Path
import pipeline_speed as ps
w = Path(os.environ["PTD_GPU_CHECK_WORK"])
ps.write_cifar100(w / "tiny", 640, 128)
cfg = {"name": "gpu_tiny", "device": os.environ["PTD_GPU_CHECK_DEV"], "quiet": True,
       "data": {"name": "cifar100", "root": str(w / "tiny"), "val_fraction": 0.1},
       "teacher": {"model": {"arch": "vgg", "kwargs": {"plan": [16, "M", 32, "M", 32]}}, "optim": {"epochs": 1, "batch_size": 64}},
       "prune": {"target_sparsity": 0.2, "retrain": {"epochs": 1, "batch_size": 64}},
       "distill": {"seeds": [0], "arms": ["scratch", "pruned_teacher"], "optim": {"epochs": 1, "batch_size": 64}}}
(w / "tiny.yaml").write_text(yaml.safe_dump(cfg))
EOF
step torchrun_nccl 180 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m ptd run "$WORK/tiny.yaml" --out "$WORK/tiny_run" --quiet
$PY -c "import json,sys; e=json.load(open('$WORK/tiny_run/env.json')); r=json.load(open('$WORK/tiny_run/results.json')) if __import__('os').path.exists('$WORK/tiny_run/results.json') else {}; print(json.dumps({'device': e.get('device'), 'world_size': e.get('world_size'), 'gpus': e.get('gpus'), 'results_keys': sorted(r)}))" > "$RES/torchrun_nccl.json" 2>&1

# 3 + 4. bf16 autocast + channels_last through ptd's Runtime/fit; torch.compile vs eager step time.
step amp_compile 240 $PY - <<'EOF'
import json, os, time, torch, torch.nn.functional as F
from ptd.config import OptimConfig
from ptd.data import make_loader
from ptd.data.base import Split
from ptd.models import build_model
from ptd.train.loop import Runtime, fit
dev, dry, res = os.environ["PTD_GPU_CHECK_DEV"], os.environ["PTD_GPU_CHECK_DRY"] == "1", os.environ["PTD_GPU_CHECK_RES"]
rt = Runtime(device=torch.device(dev), amp=True, channels_last=True, quiet=True)
n, bs = (256, 64) if dry else (4096, 128)
sp = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 100, (n,)))
ld = make_loader(sp, batch_size=bs, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, device=rt.device, channels_last=True)
x, _ = next(iter(ld))
arch = dict(arch="vgg", plan=[16, "M", 32]) if dry else dict(arch="vgg19")
m = rt.prepare(build_model(arch.pop("arch"), num_classes=100, **arch))
with rt.autocast():
    logits = m(x)
out = {"uses_amp": rt.uses_amp, "logits_dtype": str(logits.dtype), "input_channels_last": x.is_contiguous(memory_format=torch.channels_last),
       "weight_channels_last": next(p for p in m.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)}
r = fit(m, ld, None, OptimConfig(epochs=1, batch_size=bs, lr=0.01), rt)
out["fit_images_per_s_amp_cl"] = (len(ld) * bs) / r["wall_s"]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

def timed(net, opt, steps):
    sync(); t = time.perf_counter()
    for _ in range(steps):
        with rt.autocast():
            loss = F.cross_entropy(net(x), torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    sync(); return time.perf_counter() - t

steps = 3 if dry else 30
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
timed(m, opt, 2)
eager = timed(m, opt, steps)
cm = torch.compile(m)
t0 = time.perf_counter(); timed(cm, opt, 1); compile_s = time.perf_counter() - t0
comp = timed(cm, opt, steps)
out.update({"compile_s": compile_s, "eager_step_ms": 1000 * eager / steps, "compiled_step_ms": 1000 * comp / steps,
            "compile_speedup": eager / comp, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (dry run)"})
assert out["weight_channels_last"] and out["input_channels_last"]
assert dry or (out["uses_amp"] and out["logits_dtype"] == "torch.bfloat16")
print(json.dumps(out, indent=1))
open(os.path.join(res, "amp_compile.json"), "w").write(json.dumps(out, indent=1))
EOF

# 5. Per-epoch times of the CIFAR-100 VGG19 recipe, ptd vs the published way (one pair, one seed).
if [ $DRY = 1 ]; then
  step pipeline_speed 240 $PY benchmarks/pipeline_speed.py --quick --device cpu --out "$RES" --tag pipeline_speed_gpu
else
  step pipeline_speed 330 $PY benchmarks/pipeline_speed.py --device cuda --n-train 50000 --n-test 10000 --seeds 0 \
    --batch-size 128 --flops-batches 50 --peak-n 8192 --out "$RES" --tag pipeline_speed_gpu
fi

# 6. Issue 7's student speed table on CUDA: demo and ResNet-18 students, fp32 and bf16, per rounding.
if [ $DRY = 1 ]; then
  step student_speed 120 $PY benchmarks/student_speed.py --cases demo --round-to 1 8n --precisions fp32 --repeats 1 --device cpu --out "$RES/student_speed_cuda"
else
  step student_speed 150 $PY benchmarks/student_speed.py --repeats 5 --warmup 3 --train-batch 128 --device cuda --out "$RES/student_speed_cuda"
fi

rm -rf "$WORK"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp -r "$RES" "$OUT/"; fi
cat "$SUMMARY"
! grep -q "rc=[1-9]" "$SUMMARY"
