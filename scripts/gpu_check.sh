#!/usr/bin/env bash
# The GPU check of issues 7 and 12, as ONE command for a session that has a GPU (about 8 minutes
# on one H100). Every step has its own timeout, and GPU_CHECK_BUDGET_S (seconds, optional) caps
# the whole script: each step gets at most what is left of it, so one slow step cannot eat the
# device time of the rest. Steps, most important first:
#   1. the test suite's CUDA tests (pytest -k cuda: tests/test_devices.py, the loss formulas, ...)
#   2. a tiny pipeline under torchrun --nproc_per_node=1 on CUDA (NCCL process group)
#   3. bf16 autocast + channels_last on CUDA through ptd's Runtime and fit, and
#   4. torch.compile of the CIFAR VGG19 training step on CUDA: compile time and step time vs eager,
#      and ptd's `compile` key through fit (per-epoch wall, eager vs CUDA graphs)
#   5. benchmarks/pipeline_speed.py on CUDA: per-epoch times of the CIFAR-100 VGG19 recipe, ptd vs
#      the re-creation of the published code's way (fabricated CIFAR-100 at full size, 50k/10k)
#   6. benchmarks/student_speed.py on CUDA (issue 7's table: students vs teachers, fp32 and bf16; inference
#      eager and replayed from CUDA graphs)
#   (7. pipeline_compile, only when GPU_CHECK_STEPS names it: step 5 with compile: reduce-overhead,
#    against ptd eager in the same pairs)
#   (8. round_accuracy and 9. demo_run, likewise only when named: ResNet-18 students at 8n and 32n
#    from one pruned teacher over 5 seeds; the demo on CUDA and student_speed.py --run on it)
# Everything lands in benchmarks/results/gpu/, each file naming the GPU. The steps' exit codes are
# collected in summary.txt; the script exits non-zero when any step failed. Where the device runner
# sets $OUT, the results are packed there as gpu_check.tgz after EVERY step, so a run cut off at its
# limit still brings back what it finished.
#
#   scripts/gpu_check.sh              # on the GPU machine, from the repository root
#   GPU_CHECK_BUDGET_S=560 PYTHON=python3 scripts/gpu_check.sh   # inside a 10-minute lease call
#   scripts/gpu_check.sh --dry-run    # on a CPU: same steps, tiny sizes, gloo, no GPU needed
#   GPU_CHECK_STEPS='cuda_tests amp_compile' scripts/gpu_check.sh   # only the steps named
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # ptd from this checkout, ahead of anything installed
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
T_START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-0}  # 0: no overall cap

pack() {  # results so far -> $OUT/gpu_check.tgz (one file: the runner brings back few files)
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    tar czf "$OUT/gpu_check.tgz" -C "$(dirname "$RES")" "$(basename "$RES")" && cp "$SUMMARY" "$OUT/summary.txt"
  fi
}

step() {  # step NAME TIMEOUT_S CMD...: run, log to $RES/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    echo "$name rc=skipped (not in GPU_CHECK_STEPS)" | tee -a "$SUMMARY"; return
  fi
  if [ "$BUDGET" -gt 0 ]; then
    local left=$(( BUDGET - ($(date +%s) - T_START) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
      echo "$name rc=skipped (GPU_CHECK_BUDGET_S=$BUDGET spent)" | tee -a "$SUMMARY"; pack; return
    fi
  fi
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall_s=$(( $(date +%s) - t0 )) limit_s=$limit" | tee -a "$SUMMARY"
  pack
}

$PY - > "$RES/device.txt" 2>&1 <<'EOF'
import platform, torch
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (dry run on CPU)")
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "python:", platform.python_version())
import torch_pruning, onnxruntime
print("torch_pruning:", torch_pruning.__version__, "onnxruntime:", onnxruntime.__version__)
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$RES/device.txt" 2>&1
cat "$RES/device.txt" | tee -a "$SUMMARY"
pack

# 1. CUDA tests of the suite (they skip themselves without CUDA, so the dry run reports skips).
step cuda_tests 240 $PY -m pytest tests -q -p no:cacheprovider -k cuda -rs --durations=10

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
step torchrun_nccl 120 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m ptd run "$WORK/tiny.yaml" --out "$WORK/tiny_run" --quiet
[ -f "$WORK/tiny_run/env.json" ] && $PY -c "import json,sys; e=json.load(open('$WORK/tiny_run/env.json')); r=json.load(open('$WORK/tiny_run/results.json')) if __import__('os').path.exists('$WORK/tiny_run/results.json') else {}; print(json.dumps({'device': e.get('device'), 'world_size': e.get('world_size'), 'gpus': e.get('gpus'), 'results_keys': sorted(r)}))" > "$RES/torchrun_nccl.json" 2>&1

# 3 + 4. bf16 autocast + channels_last through ptd's Runtime/fit; torch.compile vs eager step time.
step amp_compile 150 $PY - <<'EOF'
import json, os, time, torch, torch._dynamo, torch.nn.functional as F
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
out.update({"eager_step_ms": 1000 * eager / steps, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (dry run)"})
# Default inductor, then "reduce-overhead" (CUDA graphs: one launch for the whole forward and
# backward; VGG19 on 32x32 at batch 128 is launch-bound on a big GPU). Each on a fresh model.
for mode in ("default", "reduce-overhead"):
    try:
        torch._dynamo.reset()
        mm = rt.prepare(build_model("vgg19", num_classes=100) if not dry else build_model("vgg", num_classes=100, plan=[16, "M", 32]))
        o2 = torch.optim.SGD(mm.parameters(), lr=0.01, momentum=0.9)
        cm = torch.compile(mm, mode=mode)
        t0 = time.perf_counter(); timed(cm, o2, 3); compile_s = time.perf_counter() - t0
        comp = timed(cm, o2, steps)
        out[mode] = {"compile_s": compile_s, "step_ms": 1000 * comp / steps, "speedup_over_eager": eager / comp}
    except Exception as e:  # a mode that fails is a finding, not the end of the check
        out[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
assert out["weight_channels_last"] and out["input_channels_last"]
assert dry or (out["uses_amp"] and out["logits_dtype"] == "torch.bfloat16")
print(json.dumps(out, indent=1))
open(os.path.join(res, "amp_compile.json"), "w").write(json.dumps(out, indent=1))
EOF

# 3c. ptd's `compile` key through fit: per-epoch wall of the CIFAR VGG19 teacher (bf16, channels_last,
#     batch 128), eager against compile (reduce-overhead on CUDA: CUDA graphs), 2 epochs each; the
#     first compiled epoch carries the compile time.
step compile_fit 150 $PY - <<'EOF'
import json, os, torch
from dataclasses import replace
from ptd.config import OptimConfig
from ptd.data import make_loader
from ptd.data.base import Split
from ptd.models import build_model
from ptd.train.loop import Runtime, fit
dev, dry, res, work = (os.environ[k] for k in ("PTD_GPU_CHECK_DEV", "PTD_GPU_CHECK_DRY", "PTD_GPU_CHECK_RES", "PTD_GPU_CHECK_WORK"))
dry = dry == "1"
n, bs, epochs = (512, 64, 2) if dry else (25600, 128, 2)
g = torch.Generator().manual_seed(0)
tr = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 100, (n,), generator=g))
va = Split(tr.x[:2048], tr.y[:2048])
out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu (dry run)", "images_per_epoch": n, "batch_size": bs}
for mode in ("off", "reduce-overhead" if dev == "cuda" else "default"):
    rt = Runtime(device=torch.device(dev), amp=True, channels_last=True, quiet=True, compile=mode)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device=rt.device, channels_last=True)
    torch.manual_seed(0)
    m = rt.prepare(build_model("vgg", 100, 3, plan=[16, "M", 32]) if dry else build_model("vgg19", num_classes=100))
    d = os.path.join(work, f"fit_{mode}")
    r = fit(m, make_loader(tr, batch_size=bs, train=True, **kw), make_loader(va, batch_size=512, train=False, **kw),
            OptimConfig(epochs=epochs, batch_size=bs, lr=0.05), rt, out_dir=d)
    walls = [json.loads(l)["wall_s"] for l in open(os.path.join(d, "metrics.jsonl"))]
    out[mode] = {"epoch_s": [walls[0]] + [b - a for a, b in zip(walls, walls[1:])], "best_val_acc": r["best_val_acc"]}
k = [m for m in out if m not in ("device", "images_per_epoch", "batch_size", "off")][0]
out["steady_epoch_speedup"] = out["off"]["epoch_s"][-1] / out[k]["epoch_s"][-1]
print(json.dumps(out, indent=1))
open(os.path.join(res, "compile_fit.json"), "w").write(json.dumps(out, indent=1))
EOF

# 5. Per-epoch times of the CIFAR-100 VGG19 recipe, ptd vs the published way (one pair, one seed).
if [ $DRY = 1 ]; then
  step pipeline_speed 240 $PY benchmarks/pipeline_speed.py --quick --device cpu --out "$RES" --tag pipeline_speed_gpu
else
  step pipeline_speed 270 $PY benchmarks/pipeline_speed.py --device cuda --n-train 50000 --n-test 10000 --seeds 0 \
    --batch-size 128 --flops-batches 50 --peak-n 8192 --out "$RES" --tag pipeline_speed_gpu
fi

# 6. Issue 7's student speed table on CUDA: demo and ResNet-18 students, fp32 and bf16, per rounding.
if [ $DRY = 1 ]; then
  step student_speed 120 $PY benchmarks/student_speed.py --cases demo --round-to 1 8n auto --precisions fp32 --repeats 1 --large-batch 32 --device cpu --out "$RES/student_speed_cuda"
else
  step student_speed 150 $PY benchmarks/student_speed.py --round-to 1 8n 16n 32n auto --repeats 5 --warmup 3 --train-batch 128 --large-batch 1024 --device cuda --cuda-graphs --out "$RES/student_speed_cuda"
fi

# 7. Last, and only when GPU_CHECK_STEPS names it (~5 min on an H100, beyond one lease call with the
#     rest): the same pipeline with ptd's `compile: reduce-overhead`, over enough epochs that each
#     stage's epochs after its first (compiling) one show the CUDA-graph gain; ptd also runs eager in
#     the same pair, so the gain end to end and per steady epoch is measured on the same GPU.
if [[ " ${GPU_CHECK_STEPS:-} " == *" pipeline_compile "* ]]; then
  if [ $DRY = 1 ]; then
    step pipeline_compile 240 $PY benchmarks/pipeline_speed.py --quick --teacher-epochs 2 --device cpu --compile default --out "$RES" --tag pipeline_compile_gpu
  else
    step pipeline_compile 420 $PY benchmarks/pipeline_speed.py --device cuda --n-train 25000 --n-test 5000 --seeds 0 \
      --teacher-epochs 3 --retrain-epochs 2 --distill-epochs 3 --compile reduce-overhead --flops-batches 20 --peak-n 8192 \
      --out "$RES" --tag pipeline_compile_gpu
  fi
fi

# 8, 9. Only when GPU_CHECK_STEPS names them. Fashion-MNIST from GPU_CHECK_FMNIST (default: Debian's
#     folder, else .fmnist/ in the checkout, which a device call can carry); the dry run fabricates it.
FM=${GPU_CHECK_FMNIST:-/usr/share/datasets/fashion-mnist}
[ -d "$FM" ] || FM=$PWD/.fmnist
TINY=()
if [ $DRY = 1 ]; then
  FM=$WORK/fmnist
  $PY -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import write_fashion_like; write_fashion_like(Path('$FM'))"
  TINY=(--set device=cpu --set threads=1 --set data.train_subset=null --set data.val_fraction=0.2 --set teacher.optim.epochs=1
        --set teacher.optim.milestones=[] --set prune.target_sparsity=0.36 --set prune.retrain.epochs=1 --set prune.retrain.milestones=[]
        --set distill.optim.epochs=1 --set distill.optim.milestones=[])
fi
# 8. What the CUDA default rounding (auto: 32n for ResNet-18 students) costs in accuracy against 8n:
#    ResNet-18 on Fashion-MNIST pruned to 0.79 once, then 8n and 32n students from it over 5 seeds,
#    the two candidates side by side (benchmarks/round_accuracy.py; about 4 minutes on an H200).
if [ $DRY = 1 ]; then
  step round_accuracy 240 $PY benchmarks/round_accuracy.py configs/fashion_mnist_resnet18.yaml --round-to 8 32 --seeds 0 1 --parallel \
    --set data.root="$FM" "${TINY[@]}" --set teacher.model.width=0.25 --out "$RES/round_accuracy_r18" --work "$WORK/round_accuracy"
else
  step round_accuracy 360 $PY benchmarks/round_accuracy.py configs/fashion_mnist_resnet18.yaml --round-to 8 32 --seeds 0 1 2 3 4 --parallel \
    --set data.root="$FM" --set device=cuda --out "$RES/round_accuracy_r18" --work "$WORK/round_accuracy"
fi
# 9. The demo on CUDA (README's first command), then benchmarks/student_speed.py --run on its own
#    trained, IMP-pruned teacher: the demo's real students per rounding, not the fresh-init stand-in.
if [ $DRY = 1 ]; then
  step demo_run 240 bash -c "$PY -m ptd run configs/fashion_mnist_demo.yaml --out $WORK/demo --quiet --set data.root=$FM ${TINY[*]} --set distill.seeds=[0] \
    && $PY benchmarks/student_speed.py --cases --run $WORK/demo --input 1 28 28 --round-to 1 8n auto --precisions fp32 --repeats 1 \
       --large-batch 32 --device cpu --out $RES/student_speed_demo_run"
else
  step demo_run 300 bash -c "$PY -m ptd run configs/fashion_mnist_demo.yaml --out $WORK/demo --quiet --set data.root=$FM \
    && $PY benchmarks/student_speed.py --cases --run $WORK/demo --input 1 28 28 --round-to 1 8n 16n 32n auto --repeats 5 --warmup 3 \
       --train-batch 128 --large-batch 1024 --device cuda --cuda-graphs --out $RES/student_speed_demo_run_cuda"
fi
if [ -f "$WORK/demo/$([ $DRY = 1 ] && echo results.json || echo report.md)" ]; then
  mkdir -p "$RES/fashion_mnist_demo_run"
  for f in config.yaml env.json results.json report.md report.html run.log; do cp "$WORK/demo/$f" "$RES/fashion_mnist_demo_run/" 2>/dev/null; done
  pack
fi

rm -rf "$WORK"
pack
cat "$SUMMARY"
! grep -q "rc=[1-9]" "$SUMMARY"
