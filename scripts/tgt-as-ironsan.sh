#!/bin/bash
# tgt-as-ironsan.sh - a stand-in for `ironsan dev` built on Debian's tgtd, so the
# integration tests (cli/tests/initiators.rs) and benches can be checked against a
# reference target:
#
#   IRONSAN_TEST_BIN=$PWD/scripts/tgt-as-ironsan.sh IRONSAN_TEST_LUN=1 \
#       cargo nextest run -p ironsan --test initiators
#
# It accepts the same flags as `ironsan dev`, serves every volume as target
# iqn.2026-11.io.ironsan:NAME (tgt always puts a controller on LUN 0, so the disk
# is LUN 1), logs "portal ready addr=IP:PORT" to stderr once the portal listens and
# stops its tgtd on SIGTERM/SIGINT. After a SIGKILL of this script the orphaned tgtd
# is killed by the next start on the same data dir (pid kept in DATA_DIR/tgtd.pid).
set -euo pipefail
PROG=${0##*/}

usage() {
    cat <<EOF
Usage: $PROG dev [--data-dir DIR] [--portal HOST:PORT] [--volume NAME:SIZE]...
                 [--chap USER:SECRET] [--mutual-chap USER:SECRET] [--metrics HOST:PORT]
Needs root and: apt-get install tgt
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in dev) shift;; -h|--help) usage; exit 0;; *) usage >&2; die "only 'dev' is supported";; esac
DATA=./ironsan-data PORTAL=127.0.0.1:3260 CHAP="" MUTUAL="" VOLUMES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir)    DATA=$2; shift 2;;
        --portal)      PORTAL=$2; shift 2;;
        --volume)      VOLUMES+=("$2"); shift 2;;
        --chap)        CHAP=$2; shift 2;;
        --mutual-chap) MUTUAL=$2; shift 2;;
        --metrics)     shift 2;;   # not emulated
        -h|--help)     usage; exit 0;;
        *)             usage >&2; die "unknown argument: $1";;
    esac
done
command -v tgtd >/dev/null && command -v tgtadm >/dev/null || die "tgtd missing. Fix with:  apt-get install tgt"
[ "$(id -u)" = 0 ] || die "tgtd needs root"
mkdir -p "$DATA"
DATA=$(cd "$DATA" && pwd)

# A previous instance killed with SIGKILL leaves its tgtd behind: that is our "crash".
if [ -f "$DATA/tgtd.pid" ]; then
    old=$(cat "$DATA/tgtd.pid")
    if kill -0 "$old" 2>/dev/null && grep -q tgtd "/proc/$old/comm" 2>/dev/null; then
        kill -9 "$old"
        while kill -0 "$old" 2>/dev/null; do sleep 0.05; done
    fi
    rm -f "$DATA/tgtd.pid"
fi

HOST=${PORTAL%:*} PORT=${PORTAL##*:}
if [ "$PORT" = 0 ]; then
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
# tgtd's control channel is an abstract unix socket numbered -C N; find a free number.
CPORT=""
for _ in $(seq 1 50); do
    c=$(( (RANDOM % 990) + 5 ))
    if ! tgtadm -C "$c" --op show --mode sys >/dev/null 2>&1; then CPORT=$c; break; fi
done
[ -n "$CPORT" ] || die "no free tgtd control port"

tgtd -f -C "$CPORT" --iscsi portal="$HOST:$PORT" >"$DATA/tgtd.log" 2>&1 &
TGTD=$!
echo "$TGTD" >"$DATA/tgtd.pid"
stop() {
    tgtadm -C "$CPORT" --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
    local tid=1
    for _ in "${VOLUMES[@]}"; do
        tgtadm -C "$CPORT" --lld iscsi --op delete --force --mode target --tid "$tid" >/dev/null 2>&1 || true
        tid=$((tid + 1))
    done
    tgtadm -C "$CPORT" --op delete --mode system >/dev/null 2>&1 || true
    wait "$TGTD" 2>/dev/null || true
    rm -f "$DATA/tgtd.pid"
}
trap 'stop; exit 0' TERM INT
ready=0
for _ in $(seq 1 100); do
    tgtadm -C "$CPORT" --lld iscsi --op show --mode target >/dev/null 2>&1 && { ready=1; break; }
    kill -0 "$TGTD" 2>/dev/null || break
    sleep 0.05
done
[ "$ready" = 1 ] || { cat "$DATA/tgtd.log" >&2; die "tgtd did not start"; }

A=(-C "$CPORT" --lld iscsi)
if [ -n "$CHAP" ]; then
    tgtadm "${A[@]}" --op new --mode account --user "${CHAP%%:*}" --password "${CHAP#*:}"
fi
if [ -n "$MUTUAL" ]; then
    tgtadm "${A[@]}" --op new --mode account --user "${MUTUAL%%:*}" --password "${MUTUAL#*:}"
fi
tid=1
for v in "${VOLUMES[@]}"; do
    name=${v%%:*} size=${v#*:}
    size=${size%iB}; size=${size%B}
    img="$DATA/$name.img"
    [ -e "$img" ] || truncate -s "$size" "$img"
    tgtadm "${A[@]}" --op new --mode target --tid "$tid" -T "iqn.2026-11.io.ironsan:$name"
    tgtadm "${A[@]}" --op new --mode logicalunit --tid "$tid" --lun 1 -b "$img"
    tgtadm "${A[@]}" --op update --mode logicalunit --tid "$tid" --lun 1 --params "scsi_sn=$name,scsi_id=$name"
    tgtadm "${A[@]}" --op bind --mode target --tid "$tid" -I ALL
    [ -n "$CHAP" ] && tgtadm "${A[@]}" --op bind --mode account --tid "$tid" --user "${CHAP%%:*}"
    [ -n "$MUTUAL" ] && tgtadm "${A[@]}" --op bind --mode account --tid "$tid" --user "${MUTUAL%%:*}" --outgoing
    tid=$((tid + 1))
done
echo "INFO tgt-as-ironsan: portal ready addr=$HOST:$PORT" >&2
wait "$TGTD" || true
