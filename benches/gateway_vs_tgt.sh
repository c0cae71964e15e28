#!/bin/bash
# gateway_vs_tgt.sh - IronSAN's gateway against Debian's tgt, same client, same machine.
#
# Builds `ironsan` in release, starts `ironsan dev` with a 1 GiB volume, starts a throw-away
# tgtd with a file-backed 1 GiB LUN in the same filesystem, prefills both, then runs the fio
# job files in benches/fio/ (fio's libiscsi engine: 4k randread/randwrite at QD1 and QD32,
# 1M sequential read/write at QD8) on each target in turn, and prints a comparison table.
# Only processes this script started are stopped. Needs root (tgtd), fio with the libiscsi
# engine (scripts/build-fio-libiscsi.sh, run automatically), tgt and jq.
#
# Check the harness itself without the gateway: --ironsan-bin scripts/tgt-as-ironsan.sh
# --ironsan-lun 1 (tgt vs tgt: ratios should be ~1.0).
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
JOBS_DIR=$ROOT/benches/fio

usage() {
    cat <<EOF
Usage: $PROG [options]
  --runtime SEC       measured seconds per job (default 12)
  --ramp SEC          unmeasured warm-up per job (default 2)
  --size SIZE         volume / LUN size and region, fio syntax (default 1G)
  --tests LIST        subset of: rr1,rw1,rr32,rw32,sr,sw (default all)
  --ironsan-bin PATH  use this binary instead of building target/release/ironsan
  --ironsan-lun N     LUN of the ironsan volume (default 0)
  --fio PATH          fio with the libiscsi engine (default: scripts/build-fio-libiscsi.sh)
  --work-dir DIR      data dirs, logs and fio JSON (default: mktemp under /var/tmp)
  -h, --help
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }
say() { echo "[$(date +%H:%M:%S)] $*"; }

RUNTIME=12 RAMP=2 SIZE=1G TESTS=rr1,rw1,rr32,rw32,sr,sw IRONSAN_BIN="" ILUN=0 FIO="" WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=$2; shift 2;;
        --ramp) RAMP=$2; shift 2;;
        --size) SIZE=$2; shift 2;;
        --tests) TESTS=$2; shift 2;;
        --ironsan-bin) IRONSAN_BIN=$2; shift 2;;
        --ironsan-lun) ILUN=$2; shift 2;;
        --fio) FIO=$2; shift 2;;
        --work-dir) WORK=$2; shift 2;;
        -h|--help) usage; exit 0;;
        *) usage >&2; die "unknown argument: $1";;
    esac
done
for v in RUNTIME RAMP ILUN; do case "${!v}" in ''|*[!0-9]*) die "${v,,} must be a number";; esac; done
for t in ${TESTS//,/ }; do case "$t" in rr1|rw1|rr32|rw32|sr|sw) ;; *) die "unknown test $t";; esac; done
[ "$(id -u)" = 0 ] || die "needs root (tgtd)"
for c in tgtd:tgt tgtadm:tgt jq:jq iscsi-inq:libiscsi-bin; do
    command -v "${c%%:*}" >/dev/null || die "${c%%:*} missing. Fix with:  apt-get install ${c#*:}   (or scripts/install-test-deps.sh)"
done

WORK=${WORK:-$(mktemp -d /var/tmp/ironsan-bench.XXXXXX)}
mkdir -p "$WORK/ironsan" "$WORK/tgt" "$WORK/fio"
WORK=$(cd "$WORK" && pwd)
say "work dir: $WORK (both targets' data live here: same filesystem, $(df -T "$WORK" | awk 'NR==2 {print $2}'))"

# ----------------------------------------------------------------------------- client
if [ -z "$FIO" ]; then
    say "fio with the libiscsi engine: scripts/build-fio-libiscsi.sh (cached after the first build)"
    FIO=$("$ROOT/scripts/build-fio-libiscsi.sh" | tail -1)
fi
"$FIO" --enghelp 2>/dev/null | grep -qw libiscsi || die "$FIO has no libiscsi engine (scripts/build-fio-libiscsi.sh builds one)"

# ----------------------------------------------------------------------------- targets
if [ -z "$IRONSAN_BIN" ]; then
    say "cargo build --release -p ironsan"
    (cd "$ROOT" && cargo build --release -p ironsan) || die "release build failed"
    IRONSAN_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/ironsan
fi
[ -x "$IRONSAN_BIN" ] || die "$IRONSAN_BIN is not executable"

IPID="" TPID="" CPORT=""
cleanup() {
    if [ -n "$IPID" ] && kill -0 "$IPID" 2>/dev/null; then
        kill -TERM "$IPID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$IPID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$IPID" 2>/dev/null && kill -KILL "$IPID" 2>/dev/null || true
    fi
    if [ -n "$TPID" ] && kill -0 "$TPID" 2>/dev/null; then
        # tgtd ignores SIGTERM: shut it down through its control port, SIGKILL only as fallback.
        tgtadm -C "$CPORT" --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
        tgtadm -C "$CPORT" --lld iscsi --op delete --force --mode target --tid 1 >/dev/null 2>&1 || true
        tgtadm -C "$CPORT" --op delete --mode system >/dev/null 2>&1 || true
        for _ in $(seq 1 50); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$TPID" 2>/dev/null && kill -KILL "$TPID" 2>/dev/null || true
    fi
}
trap 'cleanup; rm -rf "$WORK/ironsan" "$WORK/tgt"' EXIT
trap 'exit 130' INT TERM

say "starting $IRONSAN_BIN dev (volume bench:$SIZE)"
"$IRONSAN_BIN" dev --data-dir "$WORK/ironsan" --portal 127.0.0.1:0 --volume "bench:${SIZE}iB" \
    > /dev/null 2> "$WORK/ironsan.log" &
IPID=$!
# Event-driven wait for the ready line: follow the log until the line appears, ironsan
# exits (tail --pid) or 60 s pass (timeout).
exec 4< <(exec timeout 60 tail -n +1 -F --pid="$IPID" "$WORK/ironsan.log" 2>/dev/null)
TAILPID=$! READY=""
while IFS= read -r -u 4 line; do
    case "$line" in *"portal ready"*) READY=$line; break;; esac
done
kill "$TAILPID" 2>/dev/null || true
exec 4<&-
if [ -z "$READY" ]; then
    tail -20 "$WORK/ironsan.log" >&2; die "ironsan dev exited or did not log 'portal ready' within 60 s"
fi
IADDR=$(sed 's/\x1b\[[0-9;]*m//g' <<<"$READY" | grep -oE 'addr="?[0-9.]+:[0-9]+' | head -1 | sed 's/addr="\{0,1\}//')
[ -n "$IADDR" ] || die "no addr=IP:PORT in: $READY"
IURL="iscsi://$IADDR/iqn.2026-11.io.ironsan:bench/$ILUN"
say "ironsan ready: $IURL (pid $IPID)"

free_port() {
    local p
    for p in $(seq 13260 13400); do
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return 0; }
    done
    return 1
}
TPORT=$(free_port) || die "no free port for tgtd"
for c in $(seq 700 799); do tgtadm -C "$c" --op show --mode sys >/dev/null 2>&1 || { CPORT=$c; break; }; done
[ -n "$CPORT" ] || die "no free tgtd control port"
truncate -s "$SIZE" "$WORK/tgt/lun1.img"
say "starting tgtd on 127.0.0.1:$TPORT (control port $CPORT), LUN 1 = $WORK/tgt/lun1.img"
tgtd -f -C "$CPORT" --iscsi portal="127.0.0.1:$TPORT" > "$WORK/tgtd.log" 2>&1 &
TPID=$!
for _ in $(seq 1 100); do
    tgtadm -C "$CPORT" --lld iscsi --op show --mode target >/dev/null 2>&1 && break
    kill -0 "$TPID" 2>/dev/null || { cat "$WORK/tgtd.log" >&2; die "tgtd exited"; }
    sleep 0.1
done
TIQN=iqn.2024-01.org.example:bench-tgt
tgtadm -C "$CPORT" --lld iscsi --op new --mode target --tid 1 -T "$TIQN"
tgtadm -C "$CPORT" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/tgt/lun1.img"
tgtadm -C "$CPORT" --lld iscsi --op bind --mode target --tid 1 -I ALL
TURL="iscsi://127.0.0.1:$TPORT/$TIQN/1"
for u in "$IURL" "$TURL"; do
    timeout 30 iscsi-inq "$u" > /dev/null || die "INQUIRY on $u failed"
done
say "tgt ready: $TURL (pid $TPID)"

# ----------------------------------------------------------------------------- runs
run_job() {   # run_job SIDE URL JOB -> prints "iops MBps p99us"
    local side=$1 url=$2 job=$3 json="$WORK/fio/$1-$3.json"
    FIO_URL=${url//:/\\:} FIO_SIZE=$SIZE FIO_RUNTIME=$RUNTIME FIO_RAMP=$RAMP \
        timeout -k 10 $((RUNTIME + RAMP + 300)) "$FIO" --output-format=json "$JOBS_DIR/$job.fio" \
        2> "$WORK/fio/$side-$job.err" | sed -n '/^{/,$p' > "$json" || true
    jq -e '.jobs[0]' "$json" > /dev/null 2>&1 \
        || { echo "$PROG: fio $job on $side failed: $(grep -v '^note:' "$WORK/fio/$side-$job.err" | head -3)" >&2; return 1; }
    jq -r '.jobs[0] as $j | (if ($j.read.io_bytes // 0) > 0 then $j.read else $j.write end) as $x
        | "\($x.iops) \($x.bw_bytes / 1e6) \((($x.lat_ns.percentile // {})["99.000000"] // 0) / 1e3)"' "$json"
}

declare -A LABEL=([rr1]="4k randread QD1" [rw1]="4k randwrite QD1" [rr32]="4k randread QD32"
                  [rw32]="4k randwrite QD32" [sr]="1M seq read QD8" [sw]="1M seq write QD8")
declare -A JOB=([rr1]=randread-4k-qd1 [rw1]=randwrite-4k-qd1 [rr32]=randread-4k-qd32
                [rw32]=randwrite-4k-qd32 [sr]=seqread-1m-qd8 [sw]=seqwrite-1m-qd8)
set -- ${TESTS//,/ }
TOTAL=$(( $# * 2 + 2 )) N=0
for side in ironsan tgt; do
    N=$((N + 1)); url=$IURL; [ "$side" = tgt ] && url=$TURL
    say "[$N/$TOTAL] prefill $side ($SIZE sequential 1M writes)"
    run_job "$side" "$url" prefill > /dev/null || die "prefill of $side failed"
done
# Write the prefills' dirty pages back now: left to the kernel, writeback starts ~30 s later
# and lands on whichever job runs then.
say "sync (flush the prefills' dirty pages before measuring)"
sync
say "load average before runs: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A RES
FAILED=0
ORDER=(ironsan tgt)
for t in "$@"; do
    # Who goes first alternates from job to job, so drift (writeback, thermal, neighbours)
    # does not always hit the same target.
    for side in "${ORDER[@]}"; do
        N=$((N + 1)); url=$IURL; [ "$side" = tgt ] && url=$TURL
        say "[$N/$TOTAL] ${LABEL[$t]} on $side (${RUNTIME}s + ${RAMP}s ramp)"
        if r=$(run_job "$side" "$url" "${JOB[$t]}"); then RES[$side.$t]=$r; else RES[$side.$t]="- - -"; FAILED=1; fi
        say "        -> $(awk '{printf "%.0f IOPS, %.1f MB/s, p99 %.0f us", $1, $2, $3}' <<<"${RES[$side.$t]}" 2>/dev/null || echo failed)"
    done
    ORDER=("${ORDER[1]}" "${ORDER[0]}")
done

echo
echo "IronSAN: $IURL   tgt $(dpkg-query -W -f='${Version}' tgt 2>/dev/null): $TURL"
echo "client: $("$FIO" --version) ioengine=libiscsi; ${RUNTIME}s per job; region $SIZE; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-18s | %12s %8s %9s | %9s %8s %9s | %6s\n' test "IronSAN IOPS" "MB/s" "p99(us)" "tgt IOPS" "MB/s" "p99(us)" ratio
printf '%-18s-+-%12s-%8s-%9s-+-%9s-%8s-%9s-+-%6s\n' | tr ' ' '-'
for t in "$@"; do
    read -r ii im ip <<<"${RES[ironsan.$t]}"
    read -r ti tm tp <<<"${RES[tgt.$t]}"
    awk -v l="${LABEL[$t]}" -v ii="$ii" -v im="$im" -v ip="$ip" -v ti="$ti" -v tm="$tm" -v tp="$tp" 'BEGIN {
        r = (ti + 0 > 0 && ii != "-") ? sprintf("%.2f", ii / ti) : "-"
        printf "%-18s | %12.0f %8.1f %9.0f | %9.0f %8.1f %9.0f | %6s\n", l, ii, im, ip, ti, tm, tp, r }'
done
echo "(ratio = IronSAN IOPS / tgt IOPS; fio JSON in $WORK/fio)"
exit "$FAILED"
