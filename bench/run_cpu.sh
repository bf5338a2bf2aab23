#!/usr/bin/env bash
# Every CPU table of the README's Performance section, one script after another (about 30 minutes on
# 2 cores): JSON per table and run.log (commands and printed tables) in $1 (default
# bench/results/<date>-cpu). Run nothing else on the machine meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/$(date +%F)-cpu}"
py="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
log="$out/run.log"
: > "$log"

# Our best PyTorch, onnxruntime and OpenVINO configurations (float and the QAT model's INT8 file) and the peers
# in theirs: frozen-compiled channels_last, and exported to the same engines.
ENGINE_MODELS=ours+nhwc+freeze,ours+onnxruntime,ours+openvino,ours+openvino+int8,ours+onnxruntime+int8
ENGINE_MODELS=$ENGINE_MODELS,timm+nhwc+freeze,torchvision+nhwc+freeze,timm+onnxruntime,timm+openvino

run() {  # run TITLE SCRIPT FLAGS...: one bench script, its command and output appended to run.log
    local title="$1"; shift
    echo "### $title" | tee -a "$log"
    echo "\$ $py $*" | tee -a "$log"
    # grep -v exits 1 when every line is filtered out, which pipefail would take for the bench failing.
    "$py" "$@" 2>&1 | { grep -v -e '^USDT:' -e 'gpuGetDeviceCount' -e 'No CUDA runtime is found' || [ $? -eq 1 ]; } \
        | tee -a "$log"
}

# Every model in every configuration its users can pick (layout, torch.compile): like-for-like ratios first.
run "train b0 fp32 224 bs32" bench/bench_train.py \
    --models ours,timm,torchvision,ours+nhwc,ours+nhwc+aten,timm+nhwc,torchvision+nhwc,ours+nhwc+compile,timm+nhwc+compile,torchvision+nhwc+compile \
    --batch-sizes 32 --repeats 6 --json "$out/train_b0_fp32.json"
run "train b0 fp32 224 bs32, glibc's default allocator" bench/bench_train.py \
    --models ours+nhwc,timm+nhwc,torchvision+nhwc --batch-sizes 32 --repeats 5 --cpu-allocator system \
    --json "$out/train_b0_fp32_system_allocator.json"
run "train b4 fp32 380 bs8" bench/bench_train.py --archs b4 \
    --models ours,timm,torchvision,ours+nhwc,timm+nhwc,torchvision+nhwc --batch-sizes 8 --repeats 5 \
    --json "$out/train_b4_fp32.json"
run "inference b0 fp32 224" bench/bench_inference.py --models ours,ours+nhwc,ours+nhwc+freeze,timm,torchvision \
    --batch-sizes 1,8,32 --repeats 10 --json "$out/inference_b0_fp32.json"
run "inference b0 224 engines, fp32 and int8, peak RSS" bench/bench_inference.py --batch-sizes 1,32 --repeats 10 \
    --peak-rss --models "$ENGINE_MODELS" --json "$out/inference_b0_engines.json"
run "e2e" bench/bench_e2e.py --iterations 15 --skip 3 --repeats 3 --json "$out/e2e_b0_fp32.json"
run "train b0 bf16 112 bs16" bench/bench_train.py --precision bf16 --image-size 112 \
    --models ours,timm,torchvision,ours+nhwc,timm+nhwc,torchvision+nhwc --batch-sizes 16 --repeats 5 \
    --json "$out/train_b0_bf16_112.json"
run "inference b0 bf16 224" bench/bench_inference.py --precision bf16 --models ours,ours+nhwc,timm,torchvision,timm+nhwc,torchvision+nhwc \
    --batch-sizes 8 --repeats 10 --json "$out/inference_b0_bf16.json"
if [ -d data/generated ]; then  # the main job's dataset (scripts/demo.sh makes it)
    run "data pipelines, 64 px" bench/bench_data.py --data data/generated --image-size 64 --batches 15 \
        --json "$out/data_generated_64.json"
fi
echo "### done" | tee -a "$log"
