#!/bin/bash
# gateway_vs_tgt.sh - IronSAN's gateway against Debian's tgt, same client, same machine.
#
# Builds `ironsan` in release, starts `ironsan dev` with a 1 GiB volume, starts a throw-away
# tgtd with a file-backed 1 GiB LUN in the same filesystem, prefills both, then runs the fio
# job files in benches/fio/ (fio's libiscsi engine: 4k randread/randwrite at QD1 and QD32,
# 1M sequential read/write at QD8) on each target in turn, and prints a comparison table.
# Only processes this script started are stopped. Needs root (tgtd), fio with the libiscsi
# engine (scripts/build-fio-libiscsi.sh, run automatically), tgt and jq. Shared parts:
# benches/lib.sh. The replicated cluster daemon by daemon: benches/replicated_vs_tgt.sh.
#
# Check the harness itself without the gateway: --ironsan-bin scripts/tgt-as-ironsan.sh
# --ironsan-lun 1 --dev-args "" (tgt vs tgt: ratios should be ~1.0).
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG [options]
  --runtime SEC       measured seconds per job (default 12)
  --ramp SEC          unmeasured warm-up per job (default 2)
  --size SIZE         volume / LUN size and region, fio syntax (default 1G)
  --tests LIST        subset of: $ALL_TESTS (default all)
  --ironsan-bin PATH  use this binary instead of building target/release/ironsan
  --ironsan-lun N     LUN of the ironsan volume (default 0)
  --dev-args ARGS     extra arguments of 'ironsan dev' (default "--manager-port 0
                      --storage-port 0": its in-process cluster takes free ports; add
                      --local for the single-process sparse-file gateway; "" with
                      scripts/tgt-as-ironsan.sh)
  --fio PATH          fio with the libiscsi engine (default: scripts/build-fio-libiscsi.sh)
  --work-dir DIR      data dirs, logs and fio JSON (default: mktemp under /var/tmp)
  -h, --help
EOF
}

RUNTIME=12 RAMP=2 SIZE=1G TESTS=$ALL_TESTS IRONSAN_BIN="" ILUN=0 FIO="" WORK=""
DEV_ARGS="--manager-port 0 --storage-port 0"
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=$2; shift 2;;
        --ramp) RAMP=$2; shift 2;;
        --size) SIZE=$2; shift 2;;
        --tests) TESTS=$2; shift 2;;
        --ironsan-bin) IRONSAN_BIN=$2; shift 2;;
        --ironsan-lun) ILUN=$2; shift 2;;
        --dev-args) DEV_ARGS=$2; shift 2;;
        --fio) FIO=$2; shift 2;;
        --work-dir) WORK=$2; shift 2;;
        -h|--help) usage; exit 0;;
        *) usage >&2; die "unknown argument: $1";;
    esac
done
for v in RUNTIME RAMP ILUN; do case "${!v}" in ''|*[!0-9]*) die "${v,,} must be a number";; esac; done
check_tests "$TESTS"
need_root_and_tools tgtd:tgt tgtadm:tgt jq:jq iscsi-inq:libiscsi-bin

WORK=${WORK:-$(mktemp -d /var/tmp/ironsan-bench.XXXXXX)}
mkdir -p "$WORK/ironsan" "$WORK/tgt" "$WORK/fio"
WORK=$(cd "$WORK" && pwd)
say "work dir: $WORK (both targets' data live here: same filesystem, $(df -T "$WORK" | awk 'NR==2 {print $2}'))"

# ----------------------------------------------------------------------------- client
setup_fio

# ----------------------------------------------------------------------------- targets
build_ironsan

IPID=""
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    [ -z "$IPID" ] || stop_pid "$IPID" 10
    tgt_stop
}
trap 'cleanup; rm -rf "$WORK/ironsan" "$WORK/tgt"' EXIT
trap 'exit 130' INT TERM

say "starting $IRONSAN_BIN dev $DEV_ARGS (volume bench:$SIZE)"
# shellcheck disable=SC2086 # DEV_ARGS is a list of words
"$IRONSAN_BIN" dev --data-dir "$WORK/ironsan" --portal 127.0.0.1:0 --volume "bench:${SIZE}iB" $DEV_ARGS \
    > /dev/null 2> "$WORK/ironsan.log" &
IPID=$!
READY=$(wait_for_log "$WORK/ironsan.log" "$IPID" 'portal ready' 60) || {
    tail -20 "$WORK/ironsan.log" >&2; die "ironsan dev exited or did not log 'portal ready' within 60 s"; }
IADDR=$(grep -oE 'addr="?[0-9.]+:[0-9]+' <<<"$READY" | head -1 | sed 's/addr="\{0,1\}//')
[ -n "$IADDR" ] || die "no addr=IP:PORT in: $READY"
IURL="iscsi://$IADDR/iqn.2026-11.io.ironsan:bench/$ILUN"
timeout 30 iscsi-inq "$IURL" > /dev/null || die "INQUIRY on $IURL failed"
say "ironsan ready: $IURL (pid $IPID)"

tgt_start "$WORK/tgt" "$SIZE"

# ----------------------------------------------------------------------------- runs
read -ra TLIST <<<"${TESTS//,/ }"
TOTAL=$(( ${#TLIST[@]} * 2 + 2 )) N=0
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
for t in "${TLIST[@]}"; do
    # Who goes first alternates from job to job, so drift (writeback, thermal, neighbours)
    # does not always hit the same target.
    for side in "${ORDER[@]}"; do
        N=$((N + 1)); url=$IURL; [ "$side" = tgt ] && url=$TURL
        say "[$N/$TOTAL] ${TEST_LABEL[$t]} on $side (${RUNTIME}s + ${RAMP}s ramp)"
        if r=$(run_job "$side" "$url" "${TEST_JOB[$t]}"); then RES[$side.$t]=$r; else RES[$side.$t]="- - - -"; FAILED=1; fi
        say "        -> $(awk '$1 != "-" {printf "%.0f IOPS, %.1f MB/s, p99 %.0f us", $1, $2 / 1e6, $4; ok = 1}
                              END {if (!ok) print "failed"}' <<<"${RES[$side.$t]}")"
    done
    ORDER=("${ORDER[1]}" "${ORDER[0]}")
done

echo
echo "IronSAN: $IURL   tgt $(dpkg-query -W -f='${Version}' tgt 2>/dev/null): $TURL"
echo "client: $("$FIO" --version) ioengine=libiscsi; ${RUNTIME}s per job; region $SIZE; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-18s | %12s %8s %9s | %9s %8s %9s | %6s\n' test "IronSAN IOPS" "MB/s" "p99(us)" "tgt IOPS" "MB/s" "p99(us)" ratio
printf '%-18s-+-%12s-%8s-%9s-+-%9s-%8s-%9s-+-%6s\n' '' '' '' '' '' '' '' '' | tr ' ' '-'
for t in "${TLIST[@]}"; do
    read -r ii ib _ ip <<<"${RES[ironsan.$t]}"
    read -r ti tb _ tp <<<"${RES[tgt.$t]}"
    awk -v l="${TEST_LABEL[$t]}" -v ii="$ii" -v ib="$ib" -v ip="$ip" -v ti="$ti" -v tb="$tb" -v tp="$tp" 'BEGIN {
        r = (ti + 0 > 0 && ii != "-") ? sprintf("%.2f", ii / ti) : "-"
        printf "%-18s | %12.0f %8.1f %9.0f | %9.0f %8.1f %9.0f | %6s\n", l, ii, ib / 1e6, ip, ti, tb / 1e6, tp, r }'
done
echo "(ratio = IronSAN IOPS / tgt IOPS; fio JSON in $WORK/fio)"
exit "$FAILED"
