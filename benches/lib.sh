# shellcheck shell=bash
# benches/lib.sh - shared by the benches that drive iSCSI targets with fio's libiscsi engine
# (gateway_vs_tgt.sh, replicated_vs_tgt.sh, snapshots.sh). Source it after setting PROG and ROOT, with
# `set -euo pipefail` in effect. It defines:
#   die, say                      messages (die exits 2)
#   check_tests LIST              validate a --tests list against TEST_LABEL / TEST_JOB
#   need_root_and_tools CMD:PKG.. root (tgtd) and the commands, with the apt-get line to fix
#   setup_fio                     FIO := fio with the libiscsi engine (built once, cached)
#   build_ironsan                 IRONSAN_BIN := the release binary (built unless given)
#   alloc_port VAR                VAR := a free loopback port not handed out before
#   wait_for_log FILE PID ERE SEC print the first line of FILE matching ERE (colours stripped)
#   stop_pid PID [SEC]            SIGTERM, then SIGKILL after SEC (default 10)
#   tgt_start DIR SIZE / tgt_stop a throw-away tgtd with one file-backed LUN: TURL, TPID
#   run_job SIDE URL JOB          one job file of benches/fio/: "iops bw_bytes mean_us p99_us"
#   start_daemon NAME ARGS...     ironsan ARGS... in the background (PID[NAME], DAEMONS, log)
#   await_log NAME ERE SEC        wait for a line of NAME's log, or die with its tail
#   adm ARGS...                   an operator command against MGR
#   wait_status JQ_EXPR SEC WHAT  poll `ironsan status --json` until JQ_EXPR holds
#   now, secs FROM TO             wall-clock seconds ($EPOCHREALTIME) and their difference
# The caller sets WORK (with WORK/fio), SIZE, RUNTIME and RAMP before running jobs.

shopt -s extglob
JOBS_DIR=$ROOT/benches/fio

die() { echo "$PROG: error: $*" >&2; exit 2; }
say() { echo "[$(date +%H:%M:%S)] $*"; }

ALL_TESTS=rr1,rw1,rr32,rw32,sr,sw
# shellcheck disable=SC2034 # used by the scripts that source this file
declare -A TEST_LABEL=([rr1]="4k randread QD1" [rw1]="4k randwrite QD1" [rr32]="4k randread QD32"
                       [rw32]="4k randwrite QD32" [sr]="1M seq read QD8" [sw]="1M seq write QD8")
declare -A TEST_JOB=([rr1]=randread-4k-qd1 [rw1]=randwrite-4k-qd1 [rr32]=randread-4k-qd32
                     [rw32]=randwrite-4k-qd32 [sr]=seqread-1m-qd8 [sw]=seqwrite-1m-qd8)

check_tests() {
    local t
    for t in ${1//,/ }; do [ -n "${TEST_JOB[$t]:-}" ] || die "unknown test $t (known: $ALL_TESTS)"; done
}

need_root_and_tools() {   # need_root_and_tools CMD:PACKAGE...
    local c
    [ "$(id -u)" = 0 ] || die "needs root (tgtd)"
    for c in "$@"; do
        command -v "${c%%:*}" >/dev/null \
            || die "${c%%:*} missing. Fix with:  apt-get install ${c#*:}   (or scripts/install-test-deps.sh)"
    done
}

setup_fio() {
    if [ -z "${FIO:-}" ]; then
        say "fio with the libiscsi engine: scripts/build-fio-libiscsi.sh (cached after the first build)"
        FIO=$("$ROOT/scripts/build-fio-libiscsi.sh" | tail -1) || die "scripts/build-fio-libiscsi.sh failed"
    fi
    "$FIO" --enghelp 2>/dev/null | grep -qw libiscsi \
        || die "$FIO has no libiscsi engine (scripts/build-fio-libiscsi.sh builds one)"
}

build_ironsan() {
    if [ -z "${IRONSAN_BIN:-}" ]; then
        say "cargo build --release -p ironsan"
        (cd "$ROOT" && cargo build --release -p ironsan) || die "release build failed"
        IRONSAN_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/ironsan
    fi
    [ -x "$IRONSAN_BIN" ] || die "$IRONSAN_BIN is not executable"
}

# Ports are picked by probing (nothing listens) and remembered, so that several can be picked
# before anything binds them. Another process may still take one in between: the daemon then
# fails to bind, which its log says.
ALLOCATED_PORTS=" "
alloc_port() {   # alloc_port VAR (VAR must not be _port)
    local _port
    for _port in $(seq 13260 13999); do
        case "$ALLOCATED_PORTS" in *" $_port "*) continue;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$_port") 2>/dev/null; then
            ALLOCATED_PORTS+="$_port "
            printf -v "$1" '%s' "$_port"
            return 0
        fi
    done
    die "no free port in 13260-13999"
}

strip_ansi() { local s=$1; printf '%s\n' "${s//$'\e['*([0-9;])m/}"; }

# Event-driven wait: follows FILE until a line matches ERE, PID exits (tail --pid) or SEC
# seconds pass. Prints the line (colours stripped); returns 1 if none matched.
wait_for_log() {   # wait_for_log FILE PID ERE SEC
    local file=$1 pid=$2 re=$3 secs=$4 line found="" fd tailpid
    exec {fd}< <(exec timeout "$secs" tail -n +1 -F --pid="$pid" "$file" 2>/dev/null)
    tailpid=$!
    while IFS= read -r -u "$fd" line; do
        line=${line//$'\e['*([0-9;])m/}
        if [[ $line =~ $re ]]; then found=$line; break; fi
    done
    kill "$tailpid" 2>/dev/null || true
    exec {fd}<&-
    [ -n "$found" ] || return 1
    printf '%s\n' "$found"
}

stop_pid() {   # stop_pid PID [SEC]: SIGTERM, wait up to SEC, then SIGKILL
    local pid=$1 secs=${2:-10} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

# ----------------------------------------------------------------------------- tgt
TPID="" TCPORT="" TURL=""
TIQN=iqn.2024-01.org.example:bench-tgt
tgt_start() {   # tgt_start DIR SIZE: tgtd on loopback, LUN 1 = DIR/lun1.img (sparse, SIZE)
    local dir=$1 size=$2 tport c
    alloc_port tport
    for c in $(seq 700 799); do tgtadm -C "$c" --op show --mode sys >/dev/null 2>&1 || { TCPORT=$c; break; }; done
    [ -n "$TCPORT" ] || die "no free tgtd control port"
    mkdir -p "$dir"
    truncate -s "$size" "$dir/lun1.img"
    say "starting tgtd on 127.0.0.1:$tport (control port $TCPORT), LUN 1 = $dir/lun1.img"
    tgtd -f -C "$TCPORT" --iscsi portal="127.0.0.1:$tport" > "$WORK/tgtd.log" 2>&1 &
    TPID=$!
    for _ in $(seq 1 100); do
        tgtadm -C "$TCPORT" --lld iscsi --op show --mode target >/dev/null 2>&1 && break
        kill -0 "$TPID" 2>/dev/null || { cat "$WORK/tgtd.log" >&2; die "tgtd exited"; }
        sleep 0.1
    done
    tgtadm -C "$TCPORT" --lld iscsi --op new --mode target --tid 1 -T "$TIQN"
    tgtadm -C "$TCPORT" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$dir/lun1.img"
    tgtadm -C "$TCPORT" --lld iscsi --op bind --mode target --tid 1 -I ALL
    TURL="iscsi://127.0.0.1:$tport/$TIQN/1"
    timeout 30 iscsi-inq "$TURL" > /dev/null || die "INQUIRY on $TURL failed"
    say "tgt ready: $TURL (pid $TPID)"
}

tgt_stop() {
    [ -n "$TPID" ] && kill -0 "$TPID" 2>/dev/null || return 0
    # tgtd ignores SIGTERM: shut it down through its control port, SIGKILL only as fallback.
    tgtadm -C "$TCPORT" --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
    tgtadm -C "$TCPORT" --lld iscsi --op delete --force --mode target --tid 1 >/dev/null 2>&1 || true
    tgtadm -C "$TCPORT" --op delete --mode system >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$TPID" 2>/dev/null; then kill -KILL "$TPID" 2>/dev/null || true; fi
}

# ----------------------------------------------------------------------------- fio
fio_env() {   # fio_env URL RUNTIME RAMP: the variables the job files read (SIZE: the caller's)
    # shellcheck disable=SC2153
    FIO_URL=${1//:/\\:} FIO_SIZE=$SIZE FIO_RUNTIME=$2 FIO_RAMP=$3
    export FIO_URL FIO_SIZE FIO_RUNTIME FIO_RAMP
}

fio_result() {   # fio_result SIDE JOB: "iops bw_bytes mean_us p99_us" from WORK/fio/SIDE-JOB.json
    local side=$1 job=$2 base="$WORK/fio/$1-$2"
    sed -n '/^{/,$p' "$base.out" > "$base.json" 2>/dev/null || true
    jq -e '.jobs[0]' "$base.json" > /dev/null 2>&1 \
        || { echo "$PROG: fio $job on $side failed: $(grep -v '^note:' "$base.err" | head -3)" >&2; return 1; }
    jq -r '.jobs[0] as $j | (if ($j.read.io_bytes // 0) > 0 then $j.read else $j.write end) as $x
        | "\($x.iops) \($x.bw_bytes) \(($x.lat_ns.mean // 0) / 1e3) \((($x.lat_ns.percentile // {})["99.000000"] // 0) / 1e3)"' \
        "$base.json"
}

run_job() {   # run_job SIDE URL JOB: runs RUNTIME s after RAMP s; prints "iops bw_bytes mean_us p99_us"
    local side=$1 url=$2 job=$3 base="$WORK/fio/$1-$3"
    ( fio_env "$url" "$RUNTIME" "$RAMP"
      timeout -k 10 $((RUNTIME + RAMP + 300)) "$FIO" --output-format=json --output="$base.out" \
          "$JOBS_DIR/$job.fio" 2> "$base.err" ) || true
    fio_result "$side" "$job"
}

# ----------------------------------------------------------------------------- daemons
# The caller declares `declare -A PID=()` and `DAEMONS=()`, and sets WORK, IRONSAN_BIN and MGR.
start_daemon() {   # start_daemon NAME ARGS...: ironsan ARGS..., logging to WORK/logs/NAME.log
    local name=$1; shift
    RUST_LOG=info "$IRONSAN_BIN" "$@" > "$WORK/logs/$name.log" 2>&1 &
    # shellcheck disable=SC2004 # PID is the caller's associative array
    PID[$name]=$!
    DAEMONS+=("$name")
}
await_log() {   # await_log NAME ERE SEC: wait for a line of NAME's log, or die with its tail
    wait_for_log "$WORK/logs/$1.log" "${PID[$1]}" "$2" "$3" > /dev/null || {
        tail -20 "$WORK/logs/$1.log" >&2
        if kill -0 "${PID[$1]}" 2>/dev/null; then die "$1 did not log /$2/ within $3 s (log: $WORK/logs/$1.log)"; fi
        die "$1 exited (log: $WORK/logs/$1.log)"
    }
}
adm() { "$IRONSAN_BIN" "$@" --manager "$MGR"; }   # operator commands against our manager
status_is() {   # status_is JQ_EXPR: ironsan status --json satisfies it
    local st
    st=$(adm status --json 2>/dev/null) && jq -e "$1" <<<"$st" > /dev/null 2>&1
}
wait_status() {   # wait_status JQ_EXPR SEC WHAT
    local i
    for ((i = 0; i < $2 * 5; i++)); do status_is "$1" && return 0; sleep 0.2; done
    adm status >&2 || true
    die "no $3 within $2 s (ironsan status above; logs in $WORK/logs)"
}
now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }   # secs FROM TO
