#!/bin/bash
# test.sh - THE test command: dependencies, format, lints, all tests (unit + real-initiator
# integration tests), a bounded fuzz run, then the Linux-initiator VM test. Runs every step even after a failure, prints a
# summary and exits non-zero if anything failed. The last line is "N passed, N failed", counting
# each nextest test plus each other step (fmt, clippy, one per fuzz target).
#
# Fuzzing runs on the stable toolchain: cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address), which RUSTC_BOOTSTRAP=1 unlocks on stable; stable ships the ASan
# runtime. The exact invocation per target is:
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> corpus/<target> seeds/<target> -- \
#       -max_total_time=45 -rss_limit_mb=2048 -timeout=10
# If the sanitizer build fails, the step retries with `cargo fuzz run -s none`.
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<EOF
Usage: $PROG [--no-deps] [--no-fuzz] [--no-vm] [--fuzz-time SEC] [--fuzz-targets LIST] [-h]
  --no-deps          do not run scripts/install-test-deps.sh
  --no-fuzz          skip the fuzz step
  --no-vm            skip the Linux-initiator VM test (tests/vm/test.sh)
  --fuzz-time SEC    seconds per fuzz target (default \$FUZZ_TIME or 45)
  --fuzz-targets L   comma-separated fuzz targets (default: pdu,cdb,size,frame,manager_apply)
Environment: CARGO_TARGET_DIR is honoured (fuzz builds go to \$CARGO_TARGET_DIR/fuzz).
EOF
}

DEPS=1 FUZZ=1 VM=1 FUZZ_TIME=${FUZZ_TIME:-45} FUZZ_TARGETS=pdu,cdb,size,frame,manager_apply
while [ $# -gt 0 ]; do
    case "$1" in
        --no-deps) DEPS=0; shift;;
        --no-fuzz) FUZZ=0; shift;;
        --no-vm) VM=0; shift;;
        --fuzz-time) FUZZ_TIME=$2; shift 2;;
        --fuzz-targets) FUZZ_TARGETS=$2; shift 2;;
        -h|--help) usage; exit 0;;
        *) usage >&2; echo "$PROG: unknown argument: $1" >&2; exit 2;;
    esac
done
case "$FUZZ_TIME" in ''|*[!0-9]*) echo "$PROG: --fuzz-time must be seconds" >&2; exit 2;; esac

cd "$ROOT"
LOGDIR=$(mktemp -d /tmp/ironsan-test.XXXXXX)
STEPS=() RESULTS=() TIMES=()
PASSED=0 FAILED=0
T0=$(date +%s)

banner() { printf '\n\033[1m=== %s\033[0m\n' "$*" 2>/dev/null || printf '\n=== %s\n' "$*"; }
record() {   # record NAME RC SECONDS
    STEPS+=("$1") TIMES+=("$3")
    if [ "$2" = 0 ]; then RESULTS+=(ok); else RESULTS+=("FAILED (rc=$2)"); fi
}
step() {     # step NAME CMD... ; counts as one check
    local name=$1 start rc=0; shift
    banner "$name: $*"
    start=$(date +%s)
    "$@" || rc=$?
    record "$name" "$rc" $(( $(date +%s) - start ))
    if [ "$rc" = 0 ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
    return 0
}

if [ "$DEPS" = 1 ]; then
    banner "dependencies: scripts/install-test-deps.sh"
    if ! "$ROOT/scripts/install-test-deps.sh"; then
        echo "$PROG: installing test dependencies failed; nothing else was run" >&2
        echo "0 passed, 1 failed"
        exit 1
    fi
fi

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings

# nextest: every test counts individually in the final line.
banner "tests: cargo nextest run --workspace"
start=$(date +%s) rc=0
cargo nextest run --workspace --no-fail-fast 2>&1 | tee "$LOGDIR/nextest.log" || rc=${PIPESTATUS[0]}
record nextest "$rc" $(( $(date +%s) - start ))
summary=$(grep -E '^ *Summary \[' "$LOGDIR/nextest.log" | tail -1 || true)
if [ -n "$summary" ]; then
    p=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
    f=$(grep -oE '[0-9]+ failed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
    t=$(grep -oE '[0-9]+ timed out' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
    PASSED=$((PASSED + p)) FAILED=$((FAILED + f + t))
    # A non-zero exit without failed tests (e.g. a test binary that did not build) is a failure too.
    if [ "$rc" != 0 ] && [ $((f + t)) = 0 ]; then FAILED=$((FAILED + 1)); fi
else
    [ "$rc" = 0 ] && PASSED=$((PASSED + 1)) || FAILED=$((FAILED + 1))   # did not build / no tests
fi

fuzz_one() {   # fuzz_one TARGET
    local t=$1 tdir=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
    local run=(cargo fuzz run ${tdir:+--target-dir "$tdir"})
    local lib=(-- -max_total_time="$FUZZ_TIME" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1)
    mkdir -p "fuzz/corpus/$t"
    local dirs=("corpus/$t")
    [ -d "fuzz/seeds/$t" ] && dirs+=("seeds/$t")
    ( cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build ${tdir:+--target-dir "$tdir"} "$t" ) > "$LOGDIR/fuzz-build-$t.log" 2>&1 || {
        if grep -q -iE 'sanitizer|asan' "$LOGDIR/fuzz-build-$t.log"; then
            echo "sanitizer build of $t failed; retrying with -s none"
            run+=(-s none)
        else
            tail -40 "$LOGDIR/fuzz-build-$t.log"
            echo "$PROG: fuzz target $t does not build (log: $LOGDIR/fuzz-build-$t.log)"
            return 1
        fi
    }
    ( cd fuzz && RUSTC_BOOTSTRAP=1 timeout -k 30 $((FUZZ_TIME + 600)) "${run[@]}" "$t" "${dirs[@]}" "${lib[@]}" ) \
        > "$LOGDIR/fuzz-$t.log" 2>&1
    local rc=$?
    grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|Done [0-9]+ runs)' "$LOGDIR/fuzz-$t.log" | tail -2 || true
    if [ "$rc" != 0 ]; then
        tail -60 "$LOGDIR/fuzz-$t.log"
        echo "$PROG: fuzz target $t failed (rc=$rc); crash inputs go to fuzz/artifacts/$t/ (log: $LOGDIR/fuzz-$t.log)"
    fi
    return "$rc"
}
if [ "$FUZZ" = 1 ]; then
    for t in ${FUZZ_TARGETS//,/ }; do
        step "fuzz $t (${FUZZ_TIME}s)" fuzz_one "$t"
    done
fi

# The Linux kernel initiator (open-iscsi in a qemu VM): no CHAP, one-way and mutual CHAP, and
# ext4 across a storage daemon killed during writes (a cluster started daemon by daemon).
if [ "$VM" = 1 ]; then
    step "vm initiator" tests/vm/test.sh
fi

banner "summary ($(( $(date +%s) - T0 ))s, logs in $LOGDIR)"
for i in "${!STEPS[@]}"; do
    printf '  %-22s %-16s %5ss\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
done
[ -n "${summary:-}" ] && echo "  nextest:${summary#*]}"
echo "(checks below = each nextest test + fmt, clippy, each fuzz target and the VM test)"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
