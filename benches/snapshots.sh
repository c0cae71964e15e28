#!/bin/bash
# snapshots.sh - what snapshots cost end to end: how long `ironsan volume snapshot create`
# takes (and how long the gateway paused the volume's writes), and 4k random-write speed on a
# volume with 10 snapshots against the same volume kind without any, measured in one run.
#
# Builds `ironsan` in release and starts a cluster on loopback: one manager, three storage
# daemons, one gateway (gw1). Two volumes of --size each, 3 replicas: `plain` (never
# snapshotted, the peer) and `snapped`. Both get a sequential 1M prefill. Then, 10 times: a
# short randwrite burst on `snapped` (so every snapshot has blocks of its own to copy), and a
# snapshot of it, timed from the command's start to READY; the gateway's pause (its log's
# `pause_ms`) is reported beside it. Then 4k randwrite at QD32 runs on `plain` and `snapped` in
# turn: the first pass after the last snapshot pays the copy-on-write of every block it
# overwrites first (one 4 KiB read, a synced 4 KiB copy and a synced record per block, on each
# replica). Then both volumes are overwritten sequentially once (timed: on `snapped` that
# copies every block left), and the steady pass runs on both: 10 snapshots and no copy left.
# The table shows IOPS, mean and p99 latency per volume and pass, and the ratio snapped/plain.
#
# --json FILE writes every figure. Only processes this script started are stopped. Needs fio
# with the libiscsi engine (scripts/build-fio-libiscsi.sh, run automatically) and jq.
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG [options]
  --runtime SEC        measured seconds per randwrite pass (default 15)
  --ramp SEC           unmeasured warm-up per pass (default 2)
  --size SIZE          size of each volume and the jobs' region (K, M, G; default 1G)
  --snapshots N        snapshots of the snapped volume (default 10)
  --json FILE          also write every figure to FILE
  --ironsan-bin PATH   use this binary instead of building target/release/ironsan
  --fio PATH           fio with the libiscsi engine (default: scripts/build-fio-libiscsi.sh)
  --work-dir DIR       data dirs, logs and fio JSON (default: mktemp under /var/tmp)
  -h, --help
EOF
}

RUNTIME=15 RAMP=2 SIZE=1G SNAPS=10 JSON_OUT="" IRONSAN_BIN="" FIO="" WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=${2:-}; shift 2 || die "--runtime needs a value";;
        --ramp) RAMP=${2:-}; shift 2 || die "--ramp needs a value";;
        --size) SIZE=${2:-}; shift 2 || die "--size needs a value";;
        --snapshots) SNAPS=${2:-}; shift 2 || die "--snapshots needs a value";;
        --json) JSON_OUT=${2:-}; shift 2 || die "--json needs a file";;
        --ironsan-bin) IRONSAN_BIN=${2:-}; shift 2 || die "--ironsan-bin needs a path";;
        --fio) FIO=${2:-}; shift 2 || die "--fio needs a path";;
        --work-dir) WORK=${2:-}; shift 2 || die "--work-dir needs a directory";;
        -h|--help) usage; exit 0;;
        *) usage >&2; die "unknown argument: $1";;
    esac
done
for v in RUNTIME RAMP SNAPS; do case "${!v}" in ''|*[!0-9]*) die "${v,,} must be a number";; esac; done
if [ "$SNAPS" -lt 1 ] || [ "$SNAPS" -gt 256 ]; then die "--snapshots must be 1 to 256"; fi
[[ $SIZE =~ ^[1-9][0-9]*[KMG]$ ]] || die "--size must look like 256M or 1G, not '$SIZE'"
[ -z "$JSON_OUT" ] || : > "$JSON_OUT" || die "cannot write $JSON_OUT"
[ -z "$JSON_OUT" ] || JSON_OUT=$(cd "$(dirname "$JSON_OUT")" && pwd)/$(basename "$JSON_OUT")
for c in jq:jq numfmt:coreutils; do
    command -v "${c%%:*}" >/dev/null || die "${c%%:*} missing. Fix with:  apt-get install ${c#*:}"
done

WORK=${WORK:-$(mktemp -d /var/tmp/ironsan-bench-snapshots.XXXXXX)}
mkdir -p "$WORK/data" "$WORK/logs" "$WORK/fio"
WORK=$(cd "$WORK" && pwd)
say "work dir: $WORK"
setup_fio
build_ironsan

declare -A PID=()
DAEMONS=()
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_pid "${PID[${DAEMONS[i]}]}" 15; done
}
trap 'cleanup; rm -rf "$WORK/data"' EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------------------- cluster
alloc_port MPORT
MGR=127.0.0.1:$MPORT
start_daemon manager manager --id 1 --listen "$MGR" --data-dir "$WORK/data/manager"
await_log manager 'manager ready' 60
wait_status '.leader > 0' 30 "manager leader"
p=""
for n in node1 node2 node3; do
    alloc_port p
    start_daemon "$n" storage --data-dir "$WORK/data/$n" --listen "127.0.0.1:$p" --manager "$MGR" --node-id "$n"
done
for n in node1 node2 node3; do await_log "$n" 'storage ready' 60; done
wait_status '.nodes_up == 3' 30 "3 storage nodes up"
alloc_port GPORT
start_daemon gateway gateway --manager "$MGR" --portal "127.0.0.1:$GPORT" --node-id gw1
await_log gateway 'portal ready' 60

declare -A URL=()
for v in plain snapped; do
    adm volume create "$v" --size "${SIZE}iB" --replicas 3 >> "$WORK/logs/admin.log" || die "volume create $v failed"
    adm volume attach "$v" --node gw1 >> "$WORK/logs/admin.log" || die "volume attach $v failed"
    await_log gateway "target ready.* volume=$v( |\$)" 60
    URL[$v]="iscsi://127.0.0.1:$GPORT/iqn.2026-11.io.ironsan:$v/0"
done
for v in plain snapped; do
    say "prefill $v ($SIZE sequential 1M writes)"
    run_job "$v" "${URL[$v]}" prefill > /dev/null || die "prefill of $v failed"
done
sync

# ----------------------------------------------------------------------------- snapshots
burst() {   # burst I: 2 s of 4k randwrite QD32 on `snapped`
    local RUNTIME=2 RAMP=0
    run_job "burst$1" "${URL[snapped]}" randwrite-4k-qd32 > /dev/null
}
CREATE=() PAUSE=()
for ((i = 1; i <= SNAPS; i++)); do
    burst "$i" || die "randwrite burst $i failed"
    t0=$(now)
    adm volume snapshot create snapped "s$i" >> "$WORK/logs/admin.log" || die "snapshot s$i failed"
    t1=$(now)
    CREATE+=("$(secs "$t0" "$t1")")
    PAUSE+=("$(grep -a 'snapshot taken' "$WORK/logs/gateway.log" | tail -1 \
        | sed -n 's/.*pause_ms=\([0-9]*\).*/\1/p')")
    say "snapshot s$i: ready in ${CREATE[-1]} s (writes paused ${PAUSE[-1]:-?} ms)"
done

# ----------------------------------------------------------------------------- writes
declare -A RES=()
randwrite() {   # randwrite PASS: 4k randwrite QD32 on both volumes, snapped first
    local v
    for v in snapped plain; do
        say "4k randwrite QD32 on $v ($1 pass, ${RUNTIME} s)"
        RES[$v-$1]=$(run_job "$v-$1" "${URL[$v]}" randwrite-4k-qd32) || die "randwrite on $v failed"
    done
}
randwrite first
# Overwrite everything once: on `snapped` every block not yet copied since the last snapshot
# is copied now, so the next pass measures writes with 10 snapshots and nothing left to copy.
declare -A REWRITE=()
for v in snapped plain; do
    say "sequential 1M overwrite of all of $v"
    t0=$(now)
    run_job "$v-rewrite" "${URL[$v]}" prefill > /dev/null || die "overwrite of $v failed"
    REWRITE[$v]=$(secs "$t0" "$(now)")
done
randwrite steady

# ----------------------------------------------------------------------------- report
stats() { printf '%s\n' "$@" | awk 'NF {n++; s += $1; if (min == "" || $1 < min) min = $1; if ($1 > max) max = $1}
    END {if (n) printf "min %.2f  mean %.2f  max %.2f", min, s / n, max; else printf "n/a"}'; }
echo
echo "snapshot create (command start to READY, s): $(stats "${CREATE[@]}")"
echo "gateway write pause (ms):                    $(stats "${PAUSE[@]}")"
echo "sequential overwrite of all ${SIZE}: plain ${REWRITE[plain]} s, snapped ${REWRITE[snapped]} s"
echo
printf '%-8s %-8s %10s %10s %10s %8s\n' pass volume IOPS mean_us p99_us ratio
for pass in first steady; do
    read -r pi _ pm pp <<<"${RES[plain-$pass]}"
    read -r si _ sm sp <<<"${RES[snapped-$pass]}"
    printf '%-8s %-8s %10.0f %10.0f %10.0f %8s\n' "$pass" plain "$pi" "$pm" "$pp" ""
    printf '%-8s %-8s %10.0f %10.0f %10.0f %8.2f\n' "$pass" "snapped" "$si" "$sm" "$sp" \
        "$(awk -v a="$si" -v b="$pi" 'BEGIN {print (b > 0 ? a / b : 0)}')"
done
if [ -n "$JSON_OUT" ]; then
    jq -n --arg c "${CREATE[*]}" --arg p "${PAUSE[*]}" \
        --arg pf "${RES[plain-first]}" --arg sf "${RES[snapped-first]}" \
        --arg ps "${RES[plain-steady]}" --arg ss "${RES[snapped-steady]}" \
        --arg rp "${REWRITE[plain]}" --arg rs "${REWRITE[snapped]}" \
        '{create_s: ($c | split(" ") | map(tonumber)), pause_ms: ($p | split(" ") | map(select(. != "") | tonumber)),
          plain_first: $pf, snapped_first: $sf, plain_steady: $ps, snapped_steady: $ss,
          rewrite_s: {plain: ($rp | tonumber), snapped: ($rs | tonumber)}}' > "$JSON_OUT"
fi
