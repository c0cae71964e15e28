#!/bin/bash
# test.sh - build ironsan, serve a 256 MiB volume with `ironsan dev`, and run
# the Linux kernel initiator against it (tests/vm/run.sh) three times:
# without CHAP, then (restarted on the same data dir with --chap and
# --mutual-chap) with one-way CHAP and with mutual CHAP. Each ironsan must stop
# on SIGTERM with exit status 0.
# Then storage-kill: a cluster started daemon by daemon (manager, 4 storage
# daemons, gateway), a 3-replica volume, and the guest writing and fsyncing
# files while one storage daemon holding replicas is killed with SIGKILL; the
# filesystem must stay clean and every file intact, and the manager must
# report every chunk rebuilt (degraded_chunks 0, recovery_tasks 0). A snapshot
# taken just before the kill must then read back as a clean ext4 (after journal
# replay) holding every file fsynced before it.
# Then rolling-upgrade: 3 managers, 3 storage daemons and a gateway, each
# restarted in turn as Kubernetes rolls them (SIGTERM, start, /readyz 200)
# while the guest writes and fsyncs files; no I/O error, e2fsck clean, every
# checksum matching and no chunk degraded at the end (rolling-upgrade.sh).
#
# usage: tests/vm/test.sh          (non-interactive; needs root + apt + cargo)
# Output: the run.sh lines prefixed with their phase, a summary, and as the
# last line "N passed, N failed". Exit status 0 only if everything passed.
# env: IRONSAN_VM_KEEP=1 keeps the temp dir (logs, data) even on success;
#      IRONSAN_VM_PHASES (default "dev storage-kill rolling-upgrade") runs
#      only those;
#      IRONSAN_VM_KILL_AFTER (default 5): seconds into the write phase the
#      storage daemon is killed; IRONSAN_VM_RECOVERY_TIMEOUT (default 180);
#      the IRONSAN_VM_* knobs of run.sh pass through (IRONSAN_VM_WRITE_SECS:
#      length of the storage-kill write phase, default 25).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
IQN=iqn.2026-11.io.ironsan:vol1
CHAP=ironsan-test:vm-test-secret-1
MUTUAL=ironsan-target:vm-target-secret-2
T0=$SECONDS

PHASES=${IRONSAN_VM_PHASES:-dev storage-kill rolling-upgrade}
KILL_AFTER=${IRONSAN_VM_KILL_AFTER:-5}
RECOVERY_TIMEOUT=${IRONSAN_VM_RECOVERY_TIMEOUT:-180}
PASSED=0 FAILED=0 SUMMARY=() TPID= PORT=0 RPID= DAEMONS=()
for v in KILL_AFTER RECOVERY_TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "FAIL IRONSAN_VM_$v must be a number of seconds"; echo "0 passed, 1 failed"; exit 1; }
done
pass() { PASSED=$((PASSED + 1)); echo "PASS $*"; SUMMARY+=("PASS $*"); }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; SUMMARY+=("FAIL $*"); }
finish() {
  local where="logs in $WORK"
  [ "$FAILED" -eq 0 ] && [ "${IRONSAN_VM_KEEP:-0}" != 1 ] && where="logs deleted: all passed; IRONSAN_VM_KEEP=1 keeps them"
  echo "==== summary ($((SECONDS - T0))s, $where)"
  printf '%s\n' "${SUMMARY[@]}"
  echo "$PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
  exit
}

WORK=$(mktemp -d /tmp/ironsan-vm-test.XXXXXX) || { echo "FAIL mktemp"; echo "0 passed, 1 failed"; exit 1; }
cleanup() {
  local p
  [ -n "$RPID" ] && kill -TERM "$RPID" 2>/dev/null   # run.sh kills its qemu
  for p in "$TPID" "${DAEMONS[@]}"; do
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null && kill -TERM "$p"
  done
  sleep 2
  for p in "$TPID" "${DAEMONS[@]}"; do
    [ -n "$p" ] && kill -KILL "$p" 2>/dev/null
  done
  rm -rf "$WORK/data" "$WORK/cluster/data" "$WORK/rolling/data"
  if [ "$FAILED" -eq 0 ] && [ "${IRONSAN_VM_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'fail "interrupted"; finish' INT TERM

# ---- build ---------------------------------------------------------------------
echo "==== cargo build -p ironsan"
if (cd "$REPO" && cargo build -p ironsan) > "$WORK/build.log" 2>&1; then
  TDIR=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  BIN=${TDIR:-$REPO/target}/debug/ironsan
  [ -x "$BIN" ] && pass "cargo build -p ironsan" || { fail "cargo build -p ironsan: no binary at $BIN"; finish; }
else
  tail -n 20 "$WORK/build.log"; fail "cargo build -p ironsan (log: $WORK/build.log)"; finish
fi

# start_target NAME ARGS...: start ironsan dev on $PORT (0 = any free port),
# wait for "portal ready", set TPID and PORT.
start_target() {
  local name=$1 log=$WORK/target-$1.log i; shift
  "$BIN" dev --data-dir "$WORK/data" --portal "127.0.0.1:$PORT" --volume vol1:256MiB "$@" > "$log" 2>&1 &
  TPID=$!
  for i in $(seq 300); do
    grep -q 'portal ready' "$log" && break
    kill -0 "$TPID" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q 'portal ready' "$log"; then
    tail -n 5 "$log"; kill -KILL "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null; TPID=
    return 1
  fi
  PORT=$(sed -n 's/.*portal ready.*addr=[^ ]*:\([0-9]*\).*/\1/p' "$log" | head -n1)
  echo "ironsan dev ($name) pid $TPID on 127.0.0.1:$PORT, log $log"
}

stop_target() {
  local name=$1 rc log=$WORK/target-$1.log
  if ! kill -0 "$TPID" 2>/dev/null; then
    wait "$TPID"; rc=$?; TPID=
    fail "ironsan ($name) was already gone before our SIGTERM (exit status $rc; last log lines below)"
    tail -n 3 "$log" | cut -c1-200 | sed 's/^/  /'
    return
  fi
  kill -TERM "$TPID"
  timeout 30 tail --pid="$TPID" -f /dev/null
  kill -0 "$TPID" 2>/dev/null && { kill -KILL "$TPID"; fail "ironsan ($name) still running 30s after SIGTERM"; }
  wait "$TPID"; rc=$?; TPID=
  [ "$rc" -eq 0 ] && pass "ironsan ($name) stopped by SIGTERM, exit status 0" \
    || fail "ironsan ($name) exit status $rc after SIGTERM"
  if grep -q 'panicked' "$log"; then fail "ironsan ($name) log shows a panic"; grep -A3 panicked "$log" | head; fi
  echo "ironsan ($name) log: $(grep -c ' WARN ' "$log") WARN, $(grep -c ' ERROR ' "$log") ERROR lines"
  grep -E ' (WARN|ERROR) ' "$log" | head -n 5 | cut -c1-200 | sed 's/^/  /'
}

# vm_start PHASE RUN.SH-ARGS...: start one run.sh pass against $PORT/$VM_IQN in
# the background (RPID); its output goes to $WORK/run-PHASE.out and, prefixed
# with [PHASE], to ours. vm_wait adds its counts to ours.
vm_start() {
  VM_PHASE=$1; shift
  echo "==== $VM_PHASE: run.sh $*" | sed 's/\(--[a-z-]*chap [^:]*:\)[^ ]*/\1***/g'
  : > "$WORK/run-$VM_PHASE.out"
  IRONSAN_VM_LOG_DIR=$WORK/vm-$VM_PHASE "$HERE/run.sh" "$@" "$PORT" "${VM_IQN:-$IQN}" > "$WORK/run-$VM_PHASE.out" 2>&1 &
  RPID=$!
  tail -n +1 -f --pid="$RPID" "$WORK/run-$VM_PHASE.out" | sed -u "s/^/[$VM_PHASE] /" &
  VM_TAIL=$!
}
vm_wait() {
  local last p f
  wait "$RPID"; wait "$VM_TAIL"; RPID=
  last=$(tail -n 1 "$WORK/run-$VM_PHASE.out")
  if [[ "$last" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then p=${BASH_REMATCH[1]} f=${BASH_REMATCH[2]}; else p=0 f=1; fi
  PASSED=$((PASSED + p)) FAILED=$((FAILED + f))
  SUMMARY+=("$VM_PHASE: $p passed, $f failed")
}
# vm PHASE RUN.SH-ARGS...: one run.sh pass against ironsan dev (TPID)
vm() {
  vm_start "$@"
  vm_wait
  kill -0 "$TPID" 2>/dev/null || echo "WARNING: ironsan (pid $TPID) exited during phase $VM_PHASE; see the end of its log"
}

has_phase() { [[ " $PHASES " == *" $1 "* ]]; }

if has_phase dev; then
echo "==== target without CHAP"
if start_target plain; then
  pass "ironsan dev started (no CHAP)"
  vm nochap
  stop_target plain
else
  fail "ironsan dev started (no CHAP)"
fi

echo "==== target with --chap and --mutual-chap, same data dir"
if start_target chap --chap "$CHAP" --mutual-chap "$MUTUAL" || { PORT=0; start_target chap --chap "$CHAP" --mutual-chap "$MUTUAL"; }; then
  pass "ironsan dev restarted with CHAP on the same data dir"
  vm chap --chap "$CHAP"
  vm mutual --chap "$CHAP" --mutual-chap "$MUTUAL"
  stop_target chap
else
  fail "ironsan dev restarted with CHAP on the same data dir"
fi
fi

# rolling-upgrade.sh uses storage-kill.sh's helpers
. "$HERE/storage-kill.sh"
has_phase storage-kill && storage_kill
has_phase rolling-upgrade && { . "$HERE/rolling-upgrade.sh"; rolling_upgrade; }
finish
