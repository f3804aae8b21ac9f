#!/usr/bin/env bash
# bench/embed.py's GPU figures, as run on a lent GPU machine that has python3 with torch but
# none of this project's other dependencies: the chips come from a carried lake partition
# (no Dagster, rasterio or STAC needed there) and the worker's three extra imports (netCDF4,
# cftime, shapely) from carried wheels. Prepare here:
#   mkdir -p .devcarry/whl && pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 -d .devcarry/whl netCDF4==1.7.5.1.post1 cftime==1.6.6.1 shapely==2.2.0
#   copy one chips partition of the bench sample (its chips.parquet and datacubes/) into
#   .devcarry/lake/chips/region=jamari/date=2021-07-31/
# then run this there with .devcarry carried. Results: JSON files in $OUT (or bench/out).
set -uo pipefail
CARRY=${CARRY:-.devcarry}
RESULTS=${OUT:-bench/out}
mkdir -p "$RESULTS"
if ls "$CARRY"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
nproc
common=(--lake "$CARRY/lake" --partition "2021-07-31|jamari" --replicate "${CHIPS:-4096}")
timeout 240 python3 bench/embed.py --encoders clay-v1.5,clay-v1 "${common[@]}" --json "$RESULTS/embed_eager_b32.json"
timeout 240 python3 bench/embed.py --encoders clay-v1.5 --compile "${common[@]}" --json "$RESULTS/embed_compiled_b32.json"
