#!/usr/bin/env bash
# One check of fedsim on a GPU box with no package registry: install the carried wheels,
# run tests/gpu, then a throughput table (sequential in-process, vectorized in-process, the
# bare PyTorch loop, and the Ray cohort engine where Ray is installed) for quickstart,
# thousand_clients (1,000 clients) and cifar_like.
#
#   bash benchmarks/gpu_check.sh [WHEEL_DIR] [--cpu]      # WHEEL_DIR default: .whl/gpu
#
# WHEEL_DIR comes from benchmarks/gpu_wheels.sh (flwr and its small dependencies, tomli-w,
# dp-accounting, pytest, ...). Only the wheels of distributions the box does not have are
# installed, into a private folder (pip --target: the box's own environment is untouched),
# with no registry (PIP_NO_INDEX=1); fedsim itself is used from this checkout (PYTHONPATH).
# Ray is not among the wheels (too large): where the box has no Ray of its own, the Ray
# cohort engine is left out and the script says so ("Ray: not installed here, skipped").
#
# --cpu (or GPU_CHECK_CPU=1): a dry run on a machine without a GPU: engine.device=cpu,
# tiny federations, and tests/gpu run on the CPU (FEDSIM_GPU_TESTS_ON_CPU=1).
#
# Everything printed also goes to $OUT/gpu_check.txt when $OUT is set. Every part runs
# under its own `timeout` and a failing part does not stop the others; the exit status is
# non-zero when any part failed. Sized to finish in about 3 minutes on one H200 (short
# runs, rounds 2..N measured: the tables are for ratios within one run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS=".whl/gpu"
CPU="${GPU_CHECK_CPU:-0}"
for arg in "$@"; do
    case "$arg" in
        --cpu) CPU=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $arg; use [WHEEL_DIR] [--cpu]" >&2; exit 2 ;;
        *) WHEELS="$arg" ;;
    esac
done
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "error: no wheels in '$WHEELS'; make them with bash benchmarks/gpu_wheels.sh" \
         "and carry the folder" >&2
    exit 2
fi
WHEELS="$(cd "$WHEELS" && pwd)"
for candidate in "${PYTHON:-}" python3 python; do  # the first Python that has torch
    if [[ -n "$candidate" ]] && "$candidate" -c "import torch" 2>/dev/null; then
        PYTHON="$candidate"
        break
    fi
done
if [[ -z "${PYTHON:-}" ]] || ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "error: no Python with torch on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.txt") 2>&1
    TEE_PID=$!
fi

export PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
export FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1
FAILED=()
START=$SECONDS

step() {  # step NAME SECONDS CMD...: run CMD under a timeout, record a failure, go on
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
    local t0=$SECONDS
    # (in a child bash, so that CMD may be one of the exported functions below)
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@"
    local rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "--- $name: TIMED OUT after ${limit}s"
        FAILED+=("$name (timed out)")
    elif ((rc != 0)); then
        echo "--- $name: FAILED (exit $rc, $((SECONDS - t0))s)"
        FAILED+=("$name (exit $rc)")
    else
        echo "--- $name: ok ($((SECONDS - t0))s)"
    fi
}

# --------------------------------------------------------------------------- install
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/fedsim-gpu-site}"

install_wheels() {
    rm -rf "$SITE" && mkdir -p "$SITE"
    # the distributions of the carried wheels that this Python does not have yet
    local missing
    missing=$("$PYTHON" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
names = sorted({re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
                for w in pathlib.Path(sys.argv[1]).glob("*.whl")})
have, need = [], []
for n in names:
    try:
        have.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        need.append(n)
print("already here (kept): " + (", ".join(have) or "none"), file=sys.stderr)
print(" ".join(need))
EOF
    ) || return 1
    [[ -z "$missing" ]] && { echo "nothing to install"; return 0; }
    echo "installing into $SITE: $missing"
    # shellcheck disable=SC2086
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" \
            --find-links "$WHEELS" $missing
    else  # no pip: a wheel is a zip laid out for sys.path; pick this interpreter's wheels
        echo "(no pip here: unpacking the wheels)"
        "$PYTHON" - "$WHEELS" "$SITE" $missing <<'EOF'
import pathlib, re, sys, zipfile
wheels, site, names = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
def fits(w):
    _, _, pyt, abi, plat = w.stem.rsplit("-", 4)
    if plat != "any" and "x86_64" not in plat:
        return False
    if abi == "abi3":
        return any(int(t[3:]) <= sys.version_info.minor for t in pyt.split(".") if t[:3] == "cp3")
    return abi == "none" or py in abi.split(".")
for n in names:
    cands = [w for w in wheels.glob("*.whl")
             if re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() == n and fits(w)]
    if not cands:
        sys.exit(f"error: no wheel of {n} for {py} in {wheels}; add it with gpu_wheels.sh")
    zipfile.ZipFile(cands[0]).extractall(site)
EOF
    fi
}

export PYTHON WHEELS SITE
export -f install_wheels

echo "fedsim GPU check: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -n), commit" \
     "$(git rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ $CPU == 1 ]] && echo ', DRY RUN ON CPU')"
echo "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1)); wheels: $WHEELS" \
     "($(du -sh "$WHEELS" | cut -f1))"
step "install wheels" 60 install_wheels
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# --------------------------------------------------------------------------- environment
step "environment" 45 "$PYTHON" - <<'EOF'
import platform, subprocess, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA (torch built for) {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
              f"compute capability {p.major}.{p.minor}")
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"(nvidia-smi: {exc})")
else:
    print("CUDA is not available here")
import flwr, dp_accounting, tomli_w  # noqa: E401,F401  what the wheels had to bring
import fedsim, fedsim.runner  # noqa: E401,F401  fedsim with every registry, Flower included
print(f"flwr {flwr.__version__}, fedsim {fedsim.__version__} from {fedsim.__file__}")
EOF

# --------------------------------------------------------------------------- tests
if [[ $CPU == 1 ]]; then
    step "tests/gpu skip without CUDA" 60 "$PYTHON" -m pytest tests/gpu -q -rs \
        -p no:cacheprovider
    step "tests/gpu (dry run on the CPU)" 240 env FEDSIM_GPU_TESTS_ON_CPU=1 \
        "$PYTHON" -m pytest tests/gpu -q -rs -p no:cacheprovider --durations=5
else
    step "tests/gpu" 150 "$PYTHON" -m pytest tests/gpu -q -rs -p no:cacheprovider \
        --durations=5
fi

# --------------------------------------------------------------------------- throughput
if [[ $CPU == 1 ]]; then
    DEVICE=cpu
    QUICK=(--rounds 3)
    THOUSAND=(--rounds 3 --set partition.num_clients=200 --set server.clients_per_round=20)
    CIFAR=(--rounds 3 --set partition.num_clients=100 --set server.clients_per_round=10)
    LIMITS=(100 100 150)
else  # rounds 2..N measured: 5, 3 and 3 (the 219 s run of 2026-12-04 measured 9, 5 and 5)
    DEVICE=cuda
    QUICK=(--rounds 6)
    THOUSAND=(--rounds 4 --set partition.num_clients=1000)
    CIFAR=(--rounds 4)
    LIMITS=(60 80 80)
fi
ENGINES=inprocess,vectorized,bare
RAY_ENGINE=""  # the Ray cohort engine's name in engine_throughput.py, where it can run
RAY_SET=()
echo
if ! "$PYTHON" -c "import ray" 2>/dev/null; then
    echo "Ray: not installed here, skipped (no Ray cohort engine in the tables)"
else
    RAY_ENGINE=$("$PYTHON" - <<'EOF'
import runpy
engines = runpy.run_path("benchmarks/engine_throughput.py", run_name="engines")["ENGINES"]
print(next((e for e in engines if e.startswith("ray_")), ""))
EOF
    )
    if [[ -z "$RAY_ENGINE" ]]; then
        echo "Ray: installed, but benchmarks/engine_throughput.py has no Ray cohort engine" \
             "(an engine named ray_...); skipped"
    else
        echo "Ray $("$PYTHON" -c 'import ray; print(ray.__version__)'): the Ray cohort" \
             "engine runs as '$RAY_ENGINE'"
        ENGINES="$ENGINES,$RAY_ENGINE"
        LIMITS=($((LIMITS[0] + 60)) $((LIMITS[1] + 60)) $((LIMITS[2] + 60)))  # Ray's start-up
        # its actors share the one GPU: half each (engine.ray_workers defaults to 2)
        [[ $DEVICE == cuda ]] && RAY_SET=(--set engine.client_gpus=0.5)
    fi
fi
if ! grep -q "resolve_device" benchmarks/engine_throughput.py; then
    echo
    echo "note: the 'bare' rows run on the CPU: benchmarks/engine_throughput.py's bare loop" \
         "does not read engine.device"
fi

TABLES="$(mktemp -d)"
export TABLES DEVICE ENGINES
throughput() {  # throughput NAME SCENARIO ARGS...: one engine_throughput table
    local name="$1" scenario="$2"
    shift 2
    "$PYTHON" benchmarks/engine_throughput.py --scenario "$scenario" \
        --engines "$ENGINES" --set "engine.device=$DEVICE" "$@" \
        | tee "$TABLES/$name.txt"
}
export -f throughput
step "throughput quickstart" "${LIMITS[0]}" throughput quickstart \
    scenarios/quickstart.toml "${QUICK[@]}" "${RAY_SET[@]}"
step "throughput thousand_clients" "${LIMITS[1]}" throughput thousand_clients \
    scenarios/thousand_clients.toml "${THOUSAND[@]}" "${RAY_SET[@]}"
step "throughput cifar_like" "${LIMITS[2]}" throughput cifar_like \
    scenarios/cifar_like.toml "${CIFAR[@]}" "${RAY_SET[@]}"

# --------------------------------------------------------------------------- summary
echo
echo "=== summary: client updates/s on $DEVICE (rounds 2..N)"
"$PYTHON" - "$TABLES" "$RAY_ENGINE" <<'EOF'
import pathlib, sys
tables, ray = pathlib.Path(sys.argv[1]), sys.argv[2]
engines = ("inprocess", "vectorized", "bare") + ((ray,) if ray else ())
print(f"{'scenario':<18} {'inprocess':>10} {'vectorized':>11} {'bare':>8} "
      + (f"{ray:>15} " if ray else "")
      + f"{'vectorized/inprocess':>21} {'bare/inprocess':>15}"
      + (f" {ray + '/vectorized':>24}" if ray else ""))
for name in ("quickstart", "thousand_clients", "cifar_like"):
    rates = {}
    path = tables / f"{name}.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) >= 3 and parts[0] in engines:
            # "engine threads updates/s ..." (a threads column) or "engine updates/s ..."
            value = parts[2] if parts[1].isdigit() and "." in parts[2] else parts[1]
            try:
                rates.setdefault(parts[0], float(value))
            except ValueError:
                pass
    def cell(e):
        return f"{rates[e]:.1f}" if e in rates else "–"
    def ratio(a, b):
        return f"{rates[a] / rates[b]:.2f}" if a in rates and rates.get(b) else "–"
    print(f"{name:<18} {cell('inprocess'):>10} {cell('vectorized'):>11} {cell('bare'):>8} "
          + (f"{cell(ray):>15} " if ray else "")
          + f"{ratio('vectorized', 'inprocess'):>21} {ratio('bare', 'inprocess'):>15}"
          + (f" {ratio(ray, 'vectorized'):>24}" if ray else ""))
    if name == "thousand_clients" and "vectorized" in rates and rates.get("inprocess"):
        r = rates["vectorized"] / rates["inprocess"]
        print(f"  target (issue 18): vectorized >= 20x sequential in-process on "
              f"thousand_clients: {r:.1f}x, {'met' if r >= 20 else 'NOT met'}")
EOF
rm -rf "$TABLES"

echo
echo "total $((SECONDS - START))s"
status=0
if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}"
    status=1
else
    echo "all parts passed"
fi
if [[ -n "${TEE_PID:-}" ]]; then
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
fi
exit $status
