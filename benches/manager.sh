#!/bin/bash
# manager.sh - committed metadata operations per second on a 3-member manager group, beside a
# 3-member etcd group (Debian's etcd-server) measured in the same run with the same closed-loop
# load, and the time from kill -9 of the leader to a new leader agreed by the survivors.
#
# Every member of both groups runs on this machine on loopback with its data on --work-dir, so
# both pay the same fsync per commit. Stops only the processes it started.
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<EOF
Usage: $PROG [--count N] [--concurrency LIST] [--rounds N] [--ironsan-bin PATH] [--work-dir DIR] [--no-etcd]
  --count N           operations per measurement (default 2000)
  --concurrency LIST  requests in flight, comma-separated (default 1,32)
  --rounds N          leader kills to time (default 5)
  --ironsan-bin PATH  use this binary instead of building target/release/ironsan
  --work-dir DIR      data dirs and logs (default: mktemp under /var/tmp)
  --no-etcd           skip the etcd peer (needs: apt-get install -y etcd-server)
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }
say() { echo "[$(date +%H:%M:%S)] $*" >&2; }

COUNT=2000 CONC=1,32 ROUNDS=5 BIN="" WORK="" ETCD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --count) COUNT=$2; shift 2;;
        --concurrency) CONC=$2; shift 2;;
        --rounds) ROUNDS=$2; shift 2;;
        --ironsan-bin) BIN=$2; shift 2;;
        --work-dir) WORK=$2; shift 2;;
        --no-etcd) ETCD=0; shift;;
        -h|--help) usage; exit 0;;
        *) usage >&2; die "unknown argument: $1";;
    esac
done
case "$COUNT$ROUNDS" in ''|*[!0-9]*) die "--count and --rounds must be numbers";; esac
if [ "$ETCD" = 1 ] && ! command -v etcd >/dev/null; then
    die "etcd not found: apt-get install -y etcd-server (or pass --no-etcd)"
fi
if [ -z "$BIN" ]; then
    say "building ironsan (release)"
    cargo build --release -q -p ironsan --manifest-path "$ROOT/Cargo.toml"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/ironsan"
fi
[ -x "$BIN" ] || die "no binary at $BIN"
WORK=${WORK:-$(mktemp -d /var/tmp/ironsan-bench-manager.XXXXXX)}
mkdir -p "$WORK"
say "work dir $WORK"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

declare -A PID ADDR
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

for i in 1 2 3; do ADDR[$i]=127.0.0.1:$(free_port); done
ALL="${ADDR[1]},${ADDR[2]},${ADDR[3]}"

start_member() {
    local i=$1 peers=() j
    for j in 1 2 3; do [ "$j" = "$i" ] || peers+=(--peer "$j=${ADDR[$j]}"); done
    "$BIN" manager --id "$i" --listen "${ADDR[$i]}" --data-dir "$WORK/m$i" "${peers[@]}" \
        >>"$WORK/m$i.log" 2>&1 &
    PID[$i]=$!
    PIDS+=("$!")
}

# The leader as member $1 sees it (0 when none or unreachable).
leader_seen_by() {
    "$BIN" status --manager "${ADDR[$1]}" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("leader",0))' 2>/dev/null || echo 0
}

# Waits until every member in "$@" reports the same non-zero leader other than $NOT; prints it.
NOT=0
wait_agreed_leader() {
    local deadline=$((SECONDS + 30)) l first
    while [ $SECONDS -lt $deadline ]; do
        first=""
        for m in "$@"; do
            l=$(leader_seen_by "$m")
            if [ "$l" = 0 ] || [ "$l" = "$NOT" ] || { [ -n "$first" ] && [ "$l" != "$first" ]; }; then first=bad; break; fi
            first=$l
        done
        if [ "$first" != bad ] && [ -n "$first" ]; then echo "$first"; return 0; fi
        sleep 0.02
    done
    return 1
}

for i in 1 2 3; do start_member "$i"; done
LEADER=$(wait_agreed_leader 1 2 3) || die "no leader; see $WORK/m*.log"
say "ironsan group up, leader $LEADER"

RESULTS=()
first=1
for c in ${CONC//,/ }; do
    reg=0; [ $first = 1 ] && reg=3; first=0
    line=$("$BIN" bench manager --manager "${ADDR[$LEADER]}" --op create --count "$COUNT" \
        --concurrency "$c" --register-nodes "$reg" | sed -n 1p)
    say "$line"; RESULTS+=("ironsan $line")
    line=$("$BIN" bench manager --manager "${ADDR[$LEADER]}" --op replica-change --count "$COUNT" \
        --concurrency "$c" | sed -n 1p)
    say "$line"; RESULTS+=("ironsan $line")
done

if [ "$ETCD" = 1 ]; then
    declare -A EC EP
    for i in 1 2 3; do EC[$i]=$(free_port); EP[$i]=$(free_port); done
    cluster="e1=http://127.0.0.1:${EP[1]},e2=http://127.0.0.1:${EP[2]},e3=http://127.0.0.1:${EP[3]}"
    for i in 1 2 3; do
        etcd --name "e$i" --data-dir "$WORK/etcd$i" \
            --listen-client-urls "http://127.0.0.1:${EC[$i]}" --advertise-client-urls "http://127.0.0.1:${EC[$i]}" \
            --listen-peer-urls "http://127.0.0.1:${EP[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${EP[$i]}" \
            --initial-cluster "$cluster" --initial-cluster-state new >"$WORK/etcd$i.log" 2>&1 &
        PIDS+=("$!")
    done
    deadline=$((SECONDS + 30))
    until ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:${EC[1]}" endpoint health >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "etcd did not start; see $WORK/etcd*.log"
        sleep 0.2
    done
    # Send to etcd's leader, as the manager bench does.
    eleader=1
    for i in 1 2 3; do
        if ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:${EC[$i]}" endpoint status -w json 2>/dev/null |
            python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["Status"]; sys.exit(0 if s["leader"]==s["header"]["member_id"] else 1)'; then
            eleader=$i
        fi
    done
    for c in ${CONC//,/ }; do
        line=$("$BIN" bench etcd --endpoint "127.0.0.1:${EC[$eleader]}" --count "$COUNT" --concurrency "$c" | sed -n 1p)
        say "$line"; RESULTS+=("etcd    $line")
    done
fi

# Failover: kill -9 the leader, time until both survivors agree on a new one.
TIMES=()
for r in $(seq 1 "$ROUNDS"); do
    LEADER=$(wait_agreed_leader 1 2 3) || die "no leader before round $r"
    survivors=(); for i in 1 2 3; do [ "$i" = "$LEADER" ] || survivors+=("$i"); done
    t0=$(date +%s%N)
    kill -9 "${PID[$LEADER]}"
    NOT=$LEADER
    NEW=$(wait_agreed_leader "${survivors[@]}") || die "no new leader after killing $LEADER"
    NOT=0
    t1=$(date +%s%N)
    ms=$(( (t1 - t0) / 1000000 ))
    say "round $r: killed leader $LEADER, member $NEW leads after $ms ms"
    TIMES+=("$ms")
    start_member "$LEADER"
    sleep 2
done

echo
echo "== committed metadata operations, 3 members on loopback ($COUNT ops each)"
printf '%s\n' "${RESULTS[@]}"
echo
echo "== leader kill -9 -> new leader agreed by both survivors (ms): ${TIMES[*]}"
printf '%s\n' "${TIMES[@]}" | sort -n | awk '{a[NR]=$1} END {printf "min %d  median %d  max %d\n", a[1], a[int((NR+1)/2)], a[NR]}'
