#!/usr/bin/env bash
# Stage-2 GPU checks and figures, run on a lent GPU machine that has torch but neither Ray nor
# open_clip: the wheels in .whl/ (open_clip_torch, ftfy, wcwidth) are installed to /tmp/site.
# Writes JSON figures under ${OUT:-/tmp/out}.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/method tests/test_gpu.py -k "not local_run" > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
B="python3 benchmarks/stage2.py --device cuda --model ViT-B-32 --images 2048 --steps 40 --warmup 5"
$B --batch 256 --baseline-fraction 4 --phases --json "$OUT/b256_lora.json"
$B --batch 256 --source pinned --no-baseline --json "$OUT/b256_pinned.json"
$B --batch 512 --no-baseline --json "$OUT/b512_lora.json"
$B --batch 256 --adapter full --no-baseline --json "$OUT/b256_full.json"
$B --batch 256 --adapter last_blocks --no-baseline --json "$OUT/b256_last_blocks.json"
$B --batch 256 --compile --phases --no-baseline --json "$OUT/b256_lora_compiled.json"
$B --batch 512 --compile --no-baseline --json "$OUT/b512_lora_compiled.json"
