#!/usr/bin/env bash
# Issue 27's GPU figures in one call of the device tool (about 9 minutes on an H100; rerunnable): SD2-base
# at 512 px at batch_size=auto's batch (eager, channels_last, compile), SDXL, SD3-medium and FLUX at
# batch 16 with their largest fitting batch, and the device memory of the 1,000 x 80 conditioning
# table on the shipped SD3-format model, resident and streamed. Each step has its own time limit and
# writes its output under $OUT as it goes, so a step cut short leaves the others'.
#
# The device tool sends the tracked tree, which is 123 MB (demo/ holds 121 MB of shipped weights and
# data), against its limit of 64 MiB; and the device's image lacks diffusers, clip_benchmark,
# open_clip and webdataset. So, here:
#
#   scripts/gpu_figures.sh prepare    # .gpu/: their wheels and the shipped flow model; demo/ out of the index
#   (device tool) run: command "bash scripts/gpu_figures.sh run", carry [".gpu"], timeout_s 600
#   scripts/gpu_figures.sh restore    # demo/ back in the index: do this before any commit
#
# "prepare" only changes the index and .git/info/exclude (nothing is committed); "restore" undoes both.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="diffusers==0.42.1 clip-benchmark==1.6.2 open_clip_torch==3.3.0 webdataset==1.0.2 ftfy==6.3.1
        wcwidth==0.9.4 braceexpand==0.1.7"
FLOW_MODEL=demo/clip_benchmark_diffusion_demo/models/diffusion_tiny_flow

prepare() {
    mkdir -p .git/info .gpu/whl
    for line in /.gpu/ /demo/; do
        grep -qxF "$line" .git/info/exclude 2>/dev/null || echo "$line" >> .git/info/exclude
    done
    # The device's Python is 3.12 on x86-64; its image has torch, transformers, accelerate and the rest.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl $WHEELS || exit 1
    rm -rf .gpu/diffusion_tiny_flow && cp -r "$FLOW_MODEL" .gpu/diffusion_tiny_flow
    git rm -r -q --cached demo
    echo "demo/ is out of the index until 'scripts/gpu_figures.sh restore': do not commit before it" >&2
    du -sh .gpu
}

restore() {
    git reset -q -- demo
    [ -f .git/info/exclude ] && sed -i '\#^/demo/$#d' .git/info/exclude
    git status --short demo | head -3
}

run() {
    local out=${OUT:-runs/gpu_figures}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/device.csv" 2>&1
    python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
        >> "$out/device.csv" 2>&1
    step sd2_auto 180 python3 scripts/benchmark_families_gpu.py --models sd2 --batch auto --probe-cap 1024 \
        --variants eager,channels_last,compile --warmup 2 --repeats 5
    step families 240 python3 scripts/benchmark_families_gpu.py --models sdxl,sd3,flux --batch 16 --probe-batch \
        --probe-cap 64 --variants eager,channels_last --warmup 2 --repeats 5
    local memory=(python3 scripts/measure_conditioning_memory.py --device cuda --model diffusion_sd3
                  --pretrained .gpu/diffusion_tiny_flow --max-sequence-length 1)
    step memory_resident 60 "${memory[@]}"
    step memory_streamed 60 "${memory[@]}" --stream
}

step() {   # step NAME SECONDS COMMAND...: its output in $out/NAME.txt, its tail here
    local name=$1 limit=$2 out=${OUT:-runs/gpu_figures}
    shift 2
    echo "== $name ($limit s at most)"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit status $?" >> "$out/$name.txt"
    grep -v -i -E "warn|^\s*$" "$out/$name.txt" | tail -n 14
}

case "${1:-}" in
    prepare) prepare ;;
    restore) restore ;;
    run) run ;;
    *) echo "usage: scripts/gpu_figures.sh prepare|run|restore (see its header)" >&2; exit 2 ;;
esac
