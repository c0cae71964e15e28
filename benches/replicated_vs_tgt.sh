#!/bin/bash
# replicated_vs_tgt.sh - a 3-replica IronSAN volume, a 1-replica volume and Debian's tgt in one
# run on one machine with the same client, then the rebuild throughput of the 3-replica volume
# after kill -9 of a storage daemon.
#
# Builds `ironsan` in release and starts a cluster daemon by daemon on loopback: one manager
# (--node-timeout 3s --recovery-grace 2s), four storage daemons (node1..node4) and a gateway
# (gw1). Creates r3 (3 replicas) and r1 (1 replica) of --size each, attaches both to gw1, and
# starts a throw-away tgtd with a sparse file-backed LUN of the same size. Every data dir and
# tgt's backing file live under --work-dir, so all three share one filesystem. Each target
# gets a sequential 1M prefill, then each fio job of benches/fio/ (fio's libiscsi engine: 4k
# randread/randwrite at QD1 and QD32, 1M sequential read/write at QD8) runs on the three
# targets in turn; which goes first rotates from job to job. The table shows IOPS, MiB/s and
# mean/p99 latency per target and the IOPS ratios r3/tgt and r1/tgt, then the issue's goals
# at QD32 (3-replica reads >= 0.9x tgt, writes >= 0.5x tgt) as met / not met: reported,
# never a failure.
#
# Rebuild (skip with --no-rebuild): r1 is detached and deleted first (its chunks have a single
# replica: the killed node's would have nothing to be rebuilt from). The storage daemon with
# the largest share of r3 is killed with SIGKILL and `ironsan status --json` is polled until
# degraded_chunks and recovery_tasks are both 0 again. Reported: bytes to rebuild (the killed
# node's placement share of r3, all written by the prefill; `ironsan node list` before r1
# existed), seconds from the kill to Down, to the first recovery task and to fully redundant,
# MiB/s from the first task to fully redundant, the bytes the gateway copied
# (ironsan_gateway_rebuild_bytes_total) and, unless --no-rebuild-reads, the IOPS of a 4k
# randread QD32 job on r3 from the first recovery task to the end (beside the figure measured
# before; note that this load also slows the rebuild).
#
# --json FILE writes every figure. Only processes this script started are stopped; logs and
# fio JSON stay in the work dir, data dirs are removed. Needs root (tgtd), fio with the
# libiscsi engine (scripts/build-fio-libiscsi.sh, run automatically), tgt, jq, and curl for
# the rebuild's progress lines. Shared parts: benches/lib.sh.
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG [options]
  --runtime SEC          measured seconds per job (default 12)
  --ramp SEC             unmeasured warm-up per job (default 2)
  --size SIZE            size of r3, r1 and the tgt LUN, and the jobs' region: a number with
                         K, M, G or T (binary units, as fio reads them; default 1G)
  --tests LIST           subset of: $ALL_TESTS (default all)
  --no-rebuild           skip the rebuild measurement
  --no-rebuild-reads     measure the rebuild without the randread load on r3
  --rebuild-timeout SEC  give up waiting for full redundancy after SEC (default 600)
  --json FILE            also write every figure to FILE
  --ironsan-bin PATH     use this binary instead of building target/release/ironsan
  --fio PATH             fio with the libiscsi engine (default: scripts/build-fio-libiscsi.sh)
  --work-dir DIR         data dirs, logs and fio JSON (default: mktemp under /var/tmp)
  -h, --help
EOF
}

RUNTIME=12 RAMP=2 SIZE=1G TESTS=$ALL_TESTS REBUILD=1 REBUILD_READS=1 REBUILD_TIMEOUT=600
JSON_OUT="" IRONSAN_BIN="" FIO="" WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) RUNTIME=${2:-}; shift 2 || die "--runtime needs a value";;
        --ramp) RAMP=${2:-}; shift 2 || die "--ramp needs a value";;
        --size) SIZE=${2:-}; shift 2 || die "--size needs a value";;
        --tests) TESTS=${2:-}; shift 2 || die "--tests needs a value";;
        --no-rebuild) REBUILD=0; shift;;
        --no-rebuild-reads) REBUILD_READS=0; shift;;
        --rebuild-timeout) REBUILD_TIMEOUT=${2:-}; shift 2 || die "--rebuild-timeout needs a value";;
        --json) JSON_OUT=${2:-}; shift 2 || die "--json needs a file";;
        --ironsan-bin) IRONSAN_BIN=${2:-}; shift 2 || die "--ironsan-bin needs a path";;
        --fio) FIO=${2:-}; shift 2 || die "--fio needs a path";;
        --work-dir) WORK=${2:-}; shift 2 || die "--work-dir needs a directory";;
        -h|--help) usage; exit 0;;
        *) usage >&2; die "unknown argument: $1";;
    esac
done
for v in RUNTIME RAMP REBUILD_TIMEOUT; do case "${!v}" in ''|*[!0-9]*) die "${v,,} must be a number";; esac; done
[[ $SIZE =~ ^[1-9][0-9]*[KMGT]$ ]] || die "--size must look like 256M or 1G, not '$SIZE'"
SIZE_BYTES=$(numfmt --from=iec "$SIZE")
check_tests "$TESTS"
read -ra TLIST <<<"${TESTS//,/ }"
[ -z "$JSON_OUT" ] || : > "$JSON_OUT" || die "cannot write $JSON_OUT"
[ -z "$JSON_OUT" ] || JSON_OUT=$(cd "$(dirname "$JSON_OUT")" && pwd)/$(basename "$JSON_OUT")
need_root_and_tools tgtd:tgt tgtadm:tgt jq:jq iscsi-inq:libiscsi-bin numfmt:coreutils
HAVE_CURL=0; command -v curl >/dev/null && HAVE_CURL=1

WORK=${WORK:-$(mktemp -d /var/tmp/ironsan-bench-replicated.XXXXXX)}
mkdir -p "$WORK/data" "$WORK/logs" "$WORK/fio"
WORK=$(cd "$WORK" && pwd)
say "work dir: $WORK (all data dirs and tgt's file here: one filesystem, $(df -T "$WORK" | awk 'NR==2 {print $2}'))"

setup_fio
build_ironsan

# ----------------------------------------------------------------------------- processes
declare -A PID=()
DAEMONS=()       # in start order; stopped in reverse (gateway first, manager last)
READ_PID=""      # the randread job during the rebuild
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    local i
    if [ -n "$READ_PID" ]; then kill -KILL "$READ_PID" 2>/dev/null || true; fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_pid "${PID[${DAEMONS[i]}]}" 15; done
    tgt_stop
}
trap 'cleanup; rm -rf "$WORK/data"' EXIT
trap 'exit 130' INT TERM

rebuild_copied() {   # bytes the gateway copied for r3's recovery tasks so far
    [ "$HAVE_CURL" = 1 ] || { echo 0; return 0; }
    { curl -sf --max-time 2 "http://127.0.0.1:$GW_METRICS/metrics" || true; } \
        | awk '/^ironsan_gateway_rebuild_bytes_total\{.*volume="r3"/ {v = $NF} END {printf "%d\n", v + 0}'
}

# ----------------------------------------------------------------------------- cluster
alloc_port MPORT
MGR=127.0.0.1:$MPORT
say "starting the manager on $MGR (--node-timeout 3s --recovery-grace 2s)"
start_daemon manager manager --id 1 --listen "$MGR" --data-dir "$WORK/data/manager" \
    --node-timeout 3s --recovery-grace 2s
await_log manager 'manager ready' 60
wait_status '.leader > 0' 30 "manager leader"

NODES=(node1 node2 node3 node4)
p=""
for n in "${NODES[@]}"; do
    alloc_port p
    say "starting storage daemon $n on 127.0.0.1:$p"
    start_daemon "$n" storage --data-dir "$WORK/data/$n" --listen "127.0.0.1:$p" --manager "$MGR" --node-id "$n"
done
for n in "${NODES[@]}"; do await_log "$n" 'storage ready' 60; done
wait_status ".nodes_up == ${#NODES[@]}" 30 "${#NODES[@]} storage nodes up"

alloc_port GPORT
alloc_port GW_METRICS
say "starting the gateway gw1 on 127.0.0.1:$GPORT (metrics 127.0.0.1:$GW_METRICS)"
start_daemon gateway gateway --manager "$MGR" --portal "127.0.0.1:$GPORT" --node-id gw1 \
    --metrics "127.0.0.1:$GW_METRICS"
await_log gateway 'portal ready' 60

say "creating r3 (3 replicas) and r1 (1 replica) of ${SIZE}iB, attaching both to gw1"
adm volume create r3 --size "${SIZE}iB" --replicas 3 >> "$WORK/logs/admin.log" || die "volume create r3 failed"
# Placement happens at create: the nodes' allocations now are r3's replicas alone.
R3_PLACEMENT=$(adm node list --json) || die "ironsan node list failed"
adm volume create r1 --size "${SIZE}iB" --replicas 1 >> "$WORK/logs/admin.log" || die "volume create r1 failed"
CHUNK_SIZE=$(adm volume get r3 --json | jq -r .chunk_size) || die "ironsan volume get r3 failed"
for v in r3 r1; do
    adm volume attach "$v" --node gw1 >> "$WORK/logs/admin.log" || die "volume attach $v failed"
done
declare -A URL=()
for v in r3 r1; do
    await_log gateway "target ready.* volume=$v( |\$)" 60
    URL[$v]="iscsi://127.0.0.1:$GPORT/iqn.2026-11.io.ironsan:$v/0"
    timeout 30 iscsi-inq "${URL[$v]}" > /dev/null || die "INQUIRY on ${URL[$v]} failed"
    say "$v ready: ${URL[$v]}"
done

tgt_start "$WORK/data/tgt" "$SIZE"
URL[tgt]=$TURL

# ----------------------------------------------------------------------------- I/O jobs
SIDES=(r3 r1 tgt)
TOTAL=$(( ${#TLIST[@]} * ${#SIDES[@]} + ${#SIDES[@]} )) N=0
for side in "${SIDES[@]}"; do
    N=$((N + 1))
    say "[$N/$TOTAL] prefill $side ($SIZE sequential 1M writes)"
    run_job "$side" "${URL[$side]}" prefill > /dev/null || die "prefill of $side failed"
done
# Write the prefills' dirty pages back now: left to the kernel, writeback starts ~30 s later
# and lands on whichever job runs then.
say "sync (flush the prefills' dirty pages before measuring)"
sync
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
say "load average before runs: $LOAD_BEFORE"
declare -A RES=()
FAILED=0
ORDER=("${SIDES[@]}")
for t in "${TLIST[@]}"; do
    # Who goes first rotates from job to job, so drift (writeback, thermal, neighbours) does
    # not always hit the same target.
    for side in "${ORDER[@]}"; do
        N=$((N + 1))
        say "[$N/$TOTAL] ${TEST_LABEL[$t]} on $side (${RUNTIME}s + ${RAMP}s ramp)"
        if r=$(run_job "$side" "${URL[$side]}" "${TEST_JOB[$t]}"); then RES[$side.$t]=$r; else RES[$side.$t]="- - - -"; FAILED=1; fi
        say "        -> $(awk '$1 != "-" {printf "%.0f IOPS, %.1f MiB/s, mean %.0f us, p99 %.0f us", $1, $2 / 1048576, $3, $4; ok = 1}
                              END {if (!ok) print "failed"}' <<<"${RES[$side.$t]}")"
    done
    ORDER=("${ORDER[@]:1}" "${ORDER[0]}")
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ----------------------------------------------------------------------------- rebuild
RB_DONE=0 VICTIM="" RB_BYTES=0 RB_CHUNKS=0 T0="" T_DOWN="" T_TASK="" T_DONE="" RB_COPIED=0 RB_TOTAL=0
RB_READS="" RB_READS_MS=""
if [ "$REBUILD" = 1 ]; then
    say "rebuild: detaching and deleting r1 (a 1-replica chunk on the killed node could not be rebuilt)"
    adm volume detach r1 --node gw1 >> "$WORK/logs/admin.log" || die "volume detach r1 failed"
    await_log gateway 'stopping service of volume.* volume=r1( |$)' 30
    adm volume delete r1 >> "$WORK/logs/admin.log" || die "volume delete r1 failed"
    read -r VICTIM RB_BYTES RB_CHUNKS < <(jq -r '.nodes | max_by(.allocated) | "\(.id) \(.allocated) \(.chunks)"' <<<"$R3_PLACEMENT")
    if [ -z "${PID[$VICTIM]:-}" ] || ! [ "$RB_BYTES" -gt 0 ]; then
        die "no storage node of ours holds r3 replicas: $R3_PLACEMENT"
    fi
    # The jobs' writes to tgt's file and the storage daemons' files go to disk now, not
    # during the rebuild.
    sync
    wait_status '.degraded_chunks == 0 and .recovery_tasks == 0 and .nodes_down == 0' 60 "healthy cluster before the kill"
    COPIED0=$(rebuild_copied)
    T0=$(now)
    kill -KILL "${PID[$VICTIM]}"
    wait "${PID[$VICTIM]}" 2>/dev/null || true
    say "rebuild: killed $VICTIM (kill -9, pid ${PID[$VICTIM]}): $RB_CHUNKS of r3's chunk replicas," \
        "$((RB_BYTES / 1048576)) MiB to rebuild; Down expected after ~3 s, recovery tasks ~2 s later"
    SEEN=0 NEXT_SAY=$((EPOCHSECONDS + 2)) DEADLINE=$((EPOCHSECONDS + REBUILD_TIMEOUT))
    while :; do
        t=$(now)
        if st=$(adm status --json 2>/dev/null) \
            && read -r down deg tasks copied total < <(jq -r '[.nodes_down, .degraded_chunks, .recovery_tasks,
                   .recovery_bytes_copied // 0, .recovery_bytes_total // 0] | map(tostring) | join(" ")' <<<"$st"); then
            if [ "$total" -gt "$RB_TOTAL" ]; then RB_TOTAL=$total; fi
            if [ -z "$T_DOWN" ] && [ "$down" -gt 0 ]; then
                T_DOWN=$t; say "rebuild: $VICTIM Down after $(secs "$T0" "$t") s"
            fi
            if [ -z "$T_TASK" ] && [ "$tasks" -gt 0 ]; then
                T_TASK=$t; say "rebuild: first recovery task after $(secs "$T0" "$t") s ($tasks tasks)"
                if [ "$REBUILD_READS" = 1 ]; then
                    ( fio_env "${URL[r3]}" "$REBUILD_TIMEOUT" 0
                      exec "$FIO" --output-format=json --output="$WORK/fio/r3-rebuild-randread-4k-qd32.out" \
                          "$JOBS_DIR/randread-4k-qd32.fio" 2> "$WORK/fio/r3-rebuild-randread-4k-qd32.err" ) &
                    READ_PID=$!
                fi
            fi
            if [ "$deg" -gt 0 ] || [ "$tasks" -gt 0 ]; then SEEN=1; fi
            if [ "$SEEN" = 1 ] && [ "$deg" = 0 ] && [ "$tasks" = 0 ]; then T_DONE=$t; RB_DONE=1; break; fi
            if [ "$EPOCHSECONDS" -ge "$NEXT_SAY" ]; then
                NEXT_SAY=$((EPOCHSECONDS + 2))
                say "rebuild: $(secs "$T0" "$t") s: $down node(s) down, $deg degraded chunks, $tasks recovery tasks," \
                    "$((copied / 1048576)) of $((total / 1048576)) MiB copied (status)," \
                    "$(( ($(rebuild_copied) - COPIED0) / 1048576 )) MiB (gateway metric)"
            fi
        fi
        if [ "$EPOCHSECONDS" -ge "$DEADLINE" ]; then
            adm status >&2 || true
            echo "$PROG: rebuild not finished after $REBUILD_TIMEOUT s (logs in $WORK/logs)" >&2
            FAILED=1; break
        fi
        sleep 0.2
    done
    RB_COPIED=$(( $(rebuild_copied) - COPIED0 ))
    if [ -n "$READ_PID" ]; then
        kill -INT "$READ_PID" 2>/dev/null || true   # fio stops its job and writes its report
        wait "$READ_PID" 2>/dev/null || true
        READ_PID=""
        if r=$(fio_result r3-rebuild randread-4k-qd32); then
            RB_READS=$r
            RB_READS_MS=$(sed -n '/^{/,$p' "$WORK/fio/r3-rebuild-randread-4k-qd32.out" | jq -r '.jobs[0].read.runtime')
        else
            FAILED=1
        fi
    fi
    # The gateway logs each copy: the first start and the last completion bound the copying
    # itself, without the detection delays and the status polling.
    read -r CP_FIRST CP_LAST CP_BYTES CP_N < <(
        grep -E '(rebuild started|rebuild complete).* volume=r3( |$)' "$WORK/logs/gateway.log" \
        | awk '{ ts = $1; gsub(/[-:TZ]/, " ", ts); split(ts, f, " ")
                 t = f[4] * 3600 + f[5] * 60 + f[6]; if (first != "" && t < first) t += 86400
                 if (/rebuild started/ && first == "") first = t
                 if (/rebuild complete/) { last = t; n++; if (match($0, /bytes=[0-9]+/)) b += substr($0, RSTART + 6, RLENGTH - 6) } }
               END { if (first != "" && last != "") printf "%.3f %.3f %d %d\n", first, last, b, n; else print "- - 0 0" }')
    if [ "$RB_DONE" = 1 ]; then
        say "rebuild: fully redundant $(secs "$T0" "$T_DONE") s after the kill"
        deg=$(adm volume get r3 --json | jq -r .degraded_chunks) || deg="?"
        [ "$deg" = 0 ] || { echo "$PROG: r3 reports $deg degraded chunks after the cluster's count reached 0" >&2; FAILED=1; }
    fi
fi

# ----------------------------------------------------------------------------- report
TGT_VERSION=$(dpkg-query -W -f='${Version}' tgt 2>/dev/null || echo unknown)
FIO_VERSION=$("$FIO" --version)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a != "-" && b + 0 > 0) printf "%.2f", a / b; else printf "-"}'; }
declare -A GOAL_MIN=([rr32]=0.9 [rw32]=0.5) GOAL_WHAT=([rr32]=reads [rw32]=writes)

echo
echo "IronSAN $COMMIT: r3 ${URL[r3]} (3 replicas), r1 ${URL[r1]} (1 replica); 4 storage daemons, 1 manager, 1 gateway"
echo "tgt $TGT_VERSION: $TURL"
echo "client: $FIO_VERSION ioengine=libiscsi; ${RUNTIME}s + ${RAMP}s ramp per job; region $SIZE; $(nproc) CPUs;" \
     "load before $LOAD_BEFORE, after $LOAD_AFTER"
HEAD=$(printf ' %8s %7s %15s' IOPS MiB/s 'avg/p99 us')
printf '%-17s |%-33s|%-33s|%s\n' "" " r3 (3 replicas)" " r1 (1 replica)" " tgt"
printf '%-17s |%s|%s|%s| %6s %6s\n' test "$HEAD" "$HEAD" "$HEAD" r3/tgt r1/tgt
printf '%s\n' "$(printf '%.0s-' {1..135})"
for t in "${TLIST[@]}"; do
    line=$(printf '%-17s |' "${TEST_LABEL[$t]}")
    for side in "${SIDES[@]}"; do
        line+=$(awk '{ if ($1 == "-") printf "%33s", "failed  "
                       else printf " %8.0f %7.1f %7s/%-7s", $1, $2 / 1048576, sprintf("%.0f", $3), sprintf("%.0f", $4) }' <<<"${RES[$side.$t]}")"|"
    done
    read -r i3 _ <<<"${RES[r3.$t]}"; read -r i1 _ <<<"${RES[r1.$t]}"; read -r it _ <<<"${RES[tgt.$t]}"
    printf '%s %6s %6s\n' "$line" "$(ratio "$i3" "$it")" "$(ratio "$i1" "$it")"
done
echo "(ratios of IOPS; fio JSON in $WORK/fio)"
GOALS_JSON="[]"
for t in rr32 rw32; do
    what="goal: 3-replica ${GOAL_WHAT[$t]} (${TEST_LABEL[$t]}) >= ${GOAL_MIN[$t]}x tgt:"
    if [ -z "${RES[r3.$t]:-}" ]; then
        r="-" met=null; echo "$what not measured (--tests)"
    else
        read -r i3 _ <<<"${RES[r3.$t]}"; read -r it _ <<<"${RES[tgt.$t]}"
        r=$(ratio "$i3" "$it")
        if [ "$r" = "-" ]; then met=null; echo "$what no figure (a job failed)"
        elif awk -v r="$r" -v m="${GOAL_MIN[$t]}" 'BEGIN {exit !(r >= m)}'; then met=true; echo "$what ${r}x  met"
        else met=false; echo "$what ${r}x  NOT met"; fi
    fi
    GOALS_JSON=$(jq -c --arg t "$t" --arg w "${GOAL_WHAT[$t]}" --argjson min "${GOAL_MIN[$t]}" \
        --arg r "$r" --argjson met "$met" \
        '. + [{test: $t, what: $w, min_ratio_vs_tgt: $min, ratio: ($r | tonumber? // null), met: $met}]' <<<"$GOALS_JSON")
done

REBUILD_JSON=null
if [ "$REBUILD" = 1 ]; then
    MIBS="-" SEC_TASK="-"
    if [ "$RB_DONE" = 1 ] && [ -n "$T_TASK" ]; then
        SEC_TASK=$(secs "$T_TASK" "$T_DONE")
        MIBS=$(awk -v b="$RB_BYTES" -v s="$SEC_TASK" 'BEGIN {if (s > 0) printf "%.1f", b / 1048576 / s; else printf "-"}')
    fi
    echo
    echo "rebuild of r3 after kill -9 of $VICTIM (manager --node-timeout 3s --recovery-grace 2s; status polled every 0.2 s):"
    printf '  %-34s %s\n' "bytes to rebuild" "$RB_BYTES ($((RB_BYTES / 1048576)) MiB: $RB_CHUNKS chunk replicas of $((CHUNK_SIZE / 1048576)) MiB)"
    printf '  %-34s %s\n' "kill -> node Down" "${T_DOWN:+$(secs "$T0" "$T_DOWN") s}"
    printf '  %-34s %s\n' "kill -> first recovery task" "${T_TASK:+$(secs "$T0" "$T_TASK") s}"
    if [ "$RB_DONE" = 1 ]; then
        printf '  %-34s %s\n' "kill -> fully redundant" "$(secs "$T0" "$T_DONE") s"
        printf '  %-34s %s\n' "first task -> fully redundant" "$SEC_TASK s"
        printf '  %-34s %s\n' "rebuild throughput" "$MIBS MiB/s (bytes to rebuild / first task -> fully redundant)"
    else
        printf '  %-34s %s\n' "fully redundant" "NOT within $REBUILD_TIMEOUT s"
    fi
    CP_SECS="-" CP_MIBS="-"
    if [ "$CP_FIRST" != "-" ]; then
        CP_SECS=$(secs "$CP_FIRST" "$CP_LAST")
        CP_MIBS=$(awk -v b="$CP_BYTES" -v s="$CP_SECS" 'BEGIN {if (s > 0) printf "%.1f", b / 1048576 / s; else printf "-"}')
        printf '  %-34s %s\n' "copies in the gateway's log" \
            "$CP_N, $((CP_BYTES / 1048576)) MiB in $CP_SECS s (first started -> last complete): $CP_MIBS MiB/s"
    fi
    printf '  %-34s %s\n' "recovery bytes (ironsan status)" "$RB_TOTAL ($((RB_TOTAL / 1048576)) MiB, the most recovery_bytes_total showed)"
    printf '  %-34s %s\n' "copied by the gateway" \
        "$([ "$HAVE_CURL" = 1 ] && echo "$RB_COPIED ($((RB_COPIED / 1048576)) MiB, ironsan_gateway_rebuild_bytes_total)" || echo "- (no curl)")"
    RB_READS_JSON=null
    if [ "$REBUILD_READS" = 1 ]; then
        if [ -n "$RB_READS" ]; then
            read -r ri rb rm rp <<<"$RB_READS"
            read -r bi _ <<<"${RES[r3.rr32]:-- -}"
            printf '  %-34s %s\n' "4k randread QD32 on r3 meanwhile" \
                "$(awk -v i="$ri" -v m="$rm" -v p="$rp" -v ms="$RB_READS_MS" 'BEGIN {printf "%.0f IOPS, mean %.0f us, p99 %.0f us over %.1f s", i, m, p, ms / 1000}') ($(ratio "$ri" "$bi")x the $(awk -v i="$bi" 'BEGIN {if (i == "-") print "unmeasured"; else printf "%.0f", i}') IOPS before)"
            RB_READS_JSON=$(jq -n --argjson i "$ri" --argjson b "$rb" --argjson m "$rm" --argjson p "$rp" \
                --argjson ms "${RB_READS_MS:-0}" --arg before "$bi" \
                '{iops: $i, mib_s: ($b / 1048576), lat_mean_us: $m, lat_p99_us: $p, seconds: ($ms / 1000),
                  iops_before: ($before | tonumber? // null)}')
        else
            printf '  %-34s %s\n' "4k randread QD32 on r3 meanwhile" "failed or not started (see $WORK/fio/r3-rebuild-*)"
        fi
    fi
    j() { if [ -n "$1" ]; then secs "$T0" "$1"; else echo null; fi; }
    REBUILD_JSON=$(jq -n --arg node "$VICTIM" --argjson bytes "$RB_BYTES" --argjson chunks "$RB_CHUNKS" \
        --argjson chunk_size "$CHUNK_SIZE" --argjson redundant "$([ "$RB_DONE" = 1 ] && echo true || echo false)" \
        --argjson down "$(j "$T_DOWN")" --argjson task "$(j "$T_TASK")" --argjson full "$(j "$T_DONE")" \
        --arg task_to_full "$SEC_TASK" --arg mibs "$MIBS" \
        --argjson copied "$([ "$HAVE_CURL" = 1 ] && echo "$RB_COPIED" || echo null)" \
        --argjson reads "$RB_READS_JSON" --argjson cp_n "$CP_N" --argjson cp_bytes "$CP_BYTES" \
        --arg cp_secs "$CP_SECS" --arg cp_mibs "$CP_MIBS" --argjson rb_total "$RB_TOTAL" \
        '{killed_node: $node, bytes_to_rebuild: $bytes, chunk_replicas: $chunks, chunk_size: $chunk_size,
          node_timeout_s: 3, recovery_grace_s: 2, fully_redundant: $redundant,
          seconds_kill_to_down: $down, seconds_kill_to_first_task: $task, seconds_kill_to_redundant: $full,
          seconds_first_task_to_redundant: ($task_to_full | tonumber? // null),
          mib_per_s: ($mibs | tonumber? // null), gateway_copied_bytes: $copied, status_recovery_bytes_total: $rb_total,
          gateway_log_copies: {count: $cp_n, bytes: $cp_bytes, seconds_first_start_to_last_complete: ($cp_secs | tonumber? // null),
                               mib_per_s: ($cp_mibs | tonumber? // null)},
          reads_during_rebuild: $reads}')
fi

if [ -n "$JSON_OUT" ]; then
    for t in "${TLIST[@]}"; do
        for side in "${SIDES[@]}"; do
            printf '%s\t%s\t%s\n' "$t" "$side" "${RES[$side.$t]}"
        done
    done | jq -Rn --argjson goals "$GOALS_JSON" --argjson rebuild "$REBUILD_JSON" \
        --arg commit "$COMMIT" --arg size "$SIZE" --argjson size_bytes "$SIZE_BYTES" \
        --argjson runtime "$RUNTIME" --argjson ramp "$RAMP" --arg fio "$FIO_VERSION" --arg tgt "$TGT_VERSION" \
        --argjson cpus "$(nproc)" --arg load_before "$LOAD_BEFORE" --arg load_after "$LOAD_AFTER" \
        --arg labels "$(for t in "${TLIST[@]}"; do printf '%s\t%s\n' "$t" "${TEST_LABEL[$t]}"; done)" '
        def num: tonumber? // null;
        ($labels | split("\n") | map(select(. != "") | split("\t") | {(.[0]): .[1]}) | add) as $names
        | [inputs | split("\t") | {test: .[0], side: .[1], f: (.[2] | split(" "))}] as $rows
        | {ironsan_commit: $commit, fio: $fio, tgt: $tgt, cpus: $cpus, size: $size, size_bytes: $size_bytes,
           runtime_s: $runtime, ramp_s: $ramp, load_before: $load_before, load_after: $load_after,
           results: ($rows | group_by(.test) | map({(.[0].test): (
                 {label: $names[.[0].test]}
                 + (map({(.side): {iops: (.f[0] | num), mib_s: ((.f[1] | num) as $b | if $b then $b / 1048576 else null end),
                                   lat_mean_us: (.f[2] | num), lat_p99_us: (.f[3] | num)}}) | add)
                 | . + {r3_vs_tgt: (if .r3.iops and (.tgt.iops // 0) > 0 then .r3.iops / .tgt.iops else null end),
                        r1_vs_tgt: (if .r1.iops and (.tgt.iops // 0) > 0 then .r1.iops / .tgt.iops else null end)})}) | add),
           goals: $goals, rebuild: $rebuild}' > "$JSON_OUT"
    echo "(all figures in $JSON_OUT)"
fi
exit "$FAILED"
