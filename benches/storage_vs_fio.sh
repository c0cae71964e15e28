#!/bin/bash
# storage_vs_fio.sh - one storage daemon's data path (`ironsan bench storage`) against raw fio
# on the same filesystem.
#
# Builds `ironsan` in release, starts `ironsan storage` on a data dir under --work-dir, and
# runs the same jobs through the data path and through fio (--ioengine=io_uring --direct=1)
# on a file in that same filesystem, in the same order: 4 KiB randread/randwrite at QD1 and
# QD32, 1 MiB sequential read/write at QD8. Prints both results and the ratio (daemon / fio;
# latency ratios >1 mean the daemon is slower). Stops only the daemon it started.
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<EOF
Usage: $PROG [--runtime SEC] [--size SIZE] [--tests LIST] [--ironsan-bin PATH] [--work-dir DIR]
  --runtime SEC       measured seconds per job (default 10)
  --size SIZE         region per job, e.g. 1GiB (default 1GiB)
  --tests LIST        subset of rr1,rw1,rr32,rw32,sr,sw (default all, in that order)
  --ironsan-bin PATH  use this binary instead of building target/release/ironsan
  --work-dir DIR      data dir, fio file and logs (default: mktemp under /var/tmp)
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }
say() { echo "[$(date +%H:%M:%S)] $*"; }

RUNTIME=10 SIZE=1GiB TESTS=rr1,rw1,rr32,rw32,sr,sw BIN="" WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=$2; shift 2;;
        --size) SIZE=$2; shift 2;;
        --tests) TESTS=$2; shift 2;;
        --ironsan-bin) BIN=$2; shift 2;;
        --work-dir) WORK=$2; shift 2;;
        -h|--help) usage; exit 0;;
        *) usage >&2; die "unknown argument: $1";;
    esac
done
case "$RUNTIME" in ''|*[!0-9]*) die "--runtime must be seconds";; esac
command -v fio >/dev/null || die "fio missing. Fix with:  apt-get install fio"
command -v jq >/dev/null || die "jq missing. Fix with:  apt-get install jq"

WORK=${WORK:-$(mktemp -d /var/tmp/ironsan-storage-bench.XXXXXX)}
mkdir -p "$WORK/data" "$WORK/fio"
if [ -z "$BIN" ]; then
    say "building ironsan (release)"
    (cd "$ROOT" && cargo build --release -j2 -p ironsan >/dev/null)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/ironsan
fi
[ -x "$BIN" ] || die "$BIN is not executable"

# Byte count of a human size (1GiB, 512MiB, 4096).
SIZE_BYTES=$(numfmt --from=iec "$(sed -E 's/i?B$//' <<<"$SIZE")") || die "bad --size $SIZE"

"$BIN" storage --data-dir "$WORK/data" --listen 127.0.0.1:0 >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
trap 'kill "$DAEMON" 2>/dev/null; wait "$DAEMON" 2>/dev/null || true' EXIT
ADDR=""
for _ in $(seq 100); do
    ADDR=$(grep -m1 'storage ready' "$WORK/daemon.log" | grep -oE 'addr=[0-9.:]+' | cut -d= -f2 || true)
    [ -n "$ADDR" ] && break
    kill -0 "$DAEMON" 2>/dev/null || { cat "$WORK/daemon.log"; die "daemon exited"; }
    sleep 0.1
done
[ -n "$ADDR" ] || die "daemon not ready (log: $WORK/daemon.log)"
say "daemon on $ADDR, data in $WORK/data"

job() {   # job NAME -> "rw bs qd"
    case "$1" in
        rr1) echo "randread 4096 1";;
        rw1) echo "randwrite 4096 1";;
        rr32) echo "randread 4096 32";;
        rw32) echo "randwrite 4096 32";;
        sr) echo "read 1048576 8";;
        sw) echo "write 1048576 8";;
        *) echo "";;
    esac
}
kv() { grep -oE "(^| )$2=[^ ]+" <<<"$1" | head -1 | cut -d= -f2; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

printf '%-6s %12s %12s %7s %11s %11s %7s %11s %11s %7s\n' job daemon_iops fio_iops ratio \
    daemon_us fio_us ratio daemon_p99 fio_p99 ratio
VOL=$((RANDOM * 65536 + RANDOM + 1)) FIRST=1
for t in ${TESTS//,/ }; do
    read -r RW BS QD <<<"$(job "$t")" || true
    [ -n "${RW:-}" ] || die "unknown test $t"
    prefill=()
    [ "$FIRST" = 1 ] && prefill=(--prefill)
    FIRST=0
    out=$("$BIN" bench storage --addr "$ADDR" --volume "$VOL" --rw "$RW" --bs "$BS" \
        --iodepth "$QD" --size "$SIZE_BYTES" --runtime "$RUNTIME" "${prefill[@]}") \
        || die "bench $t failed (daemon log: $WORK/daemon.log)"
    d=$(grep -m1 '^rw=' <<<"$out")
    fio --name="$t" --filename="$WORK/fio/file" --size="$SIZE_BYTES" --ioengine=io_uring \
        --direct=1 --lat_percentiles=1 --rw="$RW" --bs="$BS" --iodepth="$QD" --time_based --runtime="$RUNTIME" \
        --output-format=json >"$WORK/fio/$t.json" 2>"$WORK/fio/$t.err"
    dir=read
    case "$RW" in *write) dir=write;; esac
    f_iops=$(jq ".jobs[0].$dir.iops" "$WORK/fio/$t.json")
    f_mean=$(jq ".jobs[0].$dir.lat_ns.mean / 1000" "$WORK/fio/$t.json")
    f_p99=$(jq ".jobs[0].$dir.lat_ns.percentile[\"99.000000\"] / 1000" "$WORK/fio/$t.json")
    d_iops=$(kv "$d" iops) d_mean=$(kv "$d" lat_mean_us) d_p99=$(kv "$d" lat_p99_us)
    printf '%-6s %12.0f %12.0f %7s %11.1f %11.1f %7s %11.0f %11.0f %7s\n' "$t" \
        "$d_iops" "$f_iops" "$(ratio "$d_iops" "$f_iops")" \
        "$d_mean" "$f_mean" "$(ratio "$d_mean" "$f_mean")" \
        "$d_p99" "$f_p99" "$(ratio "$d_p99" "$f_p99")"
done
say "logs and fio JSON in $WORK"
