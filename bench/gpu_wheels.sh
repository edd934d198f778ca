#!/usr/bin/env bash
# Builds .whl/ (git-ignored) on a machine with pip access: exactly what the GPU machine's image lacks for
# bench/gpu_check.sh. That image (CPython 3.12, torch, torchvision, timm, numpy, pandas, pyarrow, scikit-learn,
# matplotlib, safetensors, PyYAML, regex, pytest, pytest-xdist, psutil, ...) has no Ray, no pydantic and no
# open_clip; nothing can be downloaded there. So this fetches, as CPython 3.12 manylinux wheels:
#   - Ray 2.60 and what Ray Train / Tune / Data need beyond the image (jsonschema and its helpers, tensorboardX),
#   - pydantic and its helpers, with typing_extensions (the image has one, maybe older than the 4.16 that
#     pydantic 2.14 requires; a newer one serves torch as well), open_clip_torch and ftfy (+ wcwidth),
#   - this project itself as a wheel (its `ega-ray` command), built from the working tree.
# Versions are those of the .venv that `make` builds and the test suite runs (read from it), so the GPU runs
# what CI tested. The Ray wheel is repacked without its Java jars and source maps (unused here) so that the
# working tree that travels to the GPU machine stays under its 64 MiB; .whl/ must stay under 60 MiB.
#
#   bash bench/gpu_wheels.sh              # → .whl/ ; then, on the GPU machine: bash bench/gpu_check.sh
#   PY=/path/to/python bash bench/gpu_wheels.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
py=${PY:-.venv/bin/python}
[ -x "$py" ] || { echo "gpu_wheels: $py not found: run 'make test' (or set PY=) first" >&2; exit 2; }
limit_mib=60

# name as pip knows it; its version is read from the venv
names=(ray jsonschema jsonschema-specifications referencing rpds-py tensorboardX
       pydantic pydantic-core annotated-types typing-inspection typing_extensions
       open_clip_torch ftfy wcwidth)
pins=()
for n in "${names[@]}"; do
    v=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$n") \
        || { echo "gpu_wheels: $n is not installed in $py" >&2; exit 2; }
    pins+=("$n==$v")
done

mkdir -p "$out"
rm -f "$out"/*.whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$out" "${pins[@]}"

# Ray without its Java jars and source maps
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
whl=$(ls "$out"/ray-*.whl)
"$py" - "$whl" "$tmp/$(basename "$whl")" <<'PY'
import sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith("ray/jars/") or item.filename.endswith(".js.map"):
            continue
        zout.writestr(item, zin.read(item.filename))
PY
mv "$tmp/$(basename "$whl")" "$whl"

# the project, from the working tree (committed or not), built outside it so that no build/ folder is left here
mkdir -p "$tmp/src"
cp -r pyproject.toml README.md ega_ray "$tmp/src/"
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$tmp/src"

ls -1 "$out"
size_kib=$(du -sk "$out" | cut -f1)
echo "gpu_wheels: $out holds $(ls "$out"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB"
if [ "$size_kib" -ge $((limit_mib * 1024)) ]; then
    echo "gpu_wheels: $out is over ${limit_mib} MiB: the working tree that travels to the GPU machine is limited to 64 MiB" >&2
    exit 1
fi
