# storage-kill.sh - sourced by test.sh (uses its pass/fail/vm_start/vm_wait,
# $BIN, $WORK, $KILL_AFTER, $RECOVERY_TIMEOUT). Not run on its own.
#
# A cluster started daemon by daemon: one manager (--node-timeout 3s
# --recovery-grace 3s), 4 storage daemons, one gateway. A 256 MiB volume with 3
# replicas in 8 MiB chunks is attached to the gateway; the guest (run.sh
# --scenario storage-kill) makes ext4 on it and writes and fsyncs files. When
# the guest reports its write phase started, we wait KILL_AFTER seconds and
# take a snapshot of the volume and kill -9 the storage daemon holding the most
# chunks of the volume. The guest goes on writing, then checks e2fsck and every
# sha256. After the rebuild, the snapshot must hold a clean ext4 (after journal
# replay) with every file fsynced before it was taken. Meanwhile we poll
# `ironsan status --json` until the manager has declared the node down and
# reports degraded_chunks 0 and recovery_tasks 0: the replicas were rebuilt.

SK_VOL=vmvol
SK_IQN=iqn.2026-11.io.ironsan:$SK_VOL
SK_CHUNKS=32   # 256 MiB / 8 MiB
SK_REPLICAS=3

# sk_free_port: a port nothing on 127.0.0.1 answers on (the manager needs a
# fixed one: it advertises its --listen address)
sk_free_port() {
  local p i
  for i in $(seq 50); do
    # Below the kernel's ephemeral range (32768 and up by default): a port picked there can
    # be taken by any outgoing connection before the daemon binds it.
    p=$((20000 + RANDOM % 12000))
    # Never the same port twice in one run (each pick runs in its own subshell).
    grep -qx "$p" "$WORK/.ports-picked" 2>/dev/null && continue
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p" >> "$WORK/.ports-picked"; echo "$p"; return 0; }
  done
  return 1
}

# sk_start NAME READY ARGS...: start `ironsan ARGS` with its log in
# $SK/NAME.log, wait up to 30 s for a line matching READY; sets SK_PID.
sk_start() {
  local name=$1 ready=$2 log=$SK/$1.log i; shift 2
  "$BIN" "$@" > "$log" 2>&1 &
  SK_PID=$!
  DAEMONS+=("$SK_PID")
  for i in $(seq 300); do
    grep -q "$ready" "$log" && break
    kill -0 "$SK_PID" 2>/dev/null || break
    sleep 0.1
  done
  if grep -q "$ready" "$log"; then
    echo "$name: pid $SK_PID, $(grep -m1 "$ready" "$log" | sed 's/^[^ ]* *//' | cut -c1-150)"
    return 0
  fi
  echo "$name did not log /$ready/ within 30s; last lines of $log:"
  tail -n 5 "$log" | cut -c1-200 | sed 's/^/  /'
  return 1
}

# sk_num FIELD FILE: the number of top-level field FIELD in pretty JSON
sk_num() { sed -n "s/^  \"$1\": \\([0-9]*\\),*\$/\\1/p" "$2" | head -n1; }

# sk_nodes: "ID STATE CHUNKS" per storage node, from `ironsan node list`
sk_nodes() {
  "$BIN" node list --manager "$MGR" | awk '
    NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    { print $col["ID"], $col["STATE"], $col["CHUNKS"] }'
}

# sk_poll_status T0: every 0.5 s, "SECONDS_SINCE_T0 DEGRADED TASKS NODES_DOWN"
# to $SK/status.log; stops once a node is down and nothing is degraded or
# being rebuilt, or after RECOVERY_TIMEOUT seconds.
sk_poll_status() {
  local t0=$1 t d r n
  while :; do
    t=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
    if "$BIN" status --json --manager "$MGR" > "$SK/status.json" 2>&1; then
      d=$(sk_num degraded_chunks "$SK/status.json") r=$(sk_num recovery_tasks "$SK/status.json") n=$(sk_num nodes_down "$SK/status.json")
      echo "$t ${d:-?} ${r:-?} ${n:-?}" >> "$SK/status.log"
      [ "${n:-0}" -ge 1 ] && [ "$d" = 0 ] && [ "$r" = 0 ] && return 0
    else
      echo "$t status failed: $(head -c 200 "$SK/status.json")" >> "$SK/status.log"
    fi
    awk -v t="$t" -v m="$RECOVERY_TIMEOUT" 'BEGIN{exit !(t >= m)}' && return 1
    sleep 0.5
  done
}

# sk_snapshot: a snapshot of the volume while the guest writes and fsyncs files (just before
# the kill); S0 := the files the guest had reported fsynced when the snapshot was asked for.
sk_snapshot() {
  local t0 t1
  S0=$(tr -d '\r' < "$WORK/vm-$VM_PHASE/console.log" | grep -c '^IVM-PROG ')
  t0=$(date +%s.%N)
  if "$BIN" volume snapshot create "$SK_VOL" under-writes --manager "$MGR" > "$SK/snapshot.out" 2>&1; then
    t1=$(date +%s.%N)
    pass "storage-kill: snapshot $SK_VOL@under-writes taken while the guest writes ($S0 files fsynced before it; $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b - a}')s)"
  else
    sed 's/^/  /' "$SK/snapshot.out"; fail "storage-kill: snapshot of $SK_VOL taken while the guest writes"; S0=
  fi
}

# sk_snapshot_check: after the kill and the rebuild, the snapshot (read through its read-only
# target) is a filesystem that a crash would have left: the journal replays, e2fsck finds it
# clean, and every file fsynced before the snapshot was asked for reads its sha256.
sk_snapshot_check() {
  local img=$SK/snapshot.img url="iscsi://127.0.0.1:$PORT/$SK_IQN:under-writes/0" n=0 bad=0 rc t w f sz sum
  [ -n "${S0:-}" ] || return
  for i in $(seq 50); do qemu-img info "$url" > /dev/null 2>&1 && break; sleep 0.2; done
  if ! qemu-img convert -f raw -O raw "$url" "$img" > "$SK/snapshot-copy.out" 2>&1; then
    sed 's/^/  /' "$SK/snapshot-copy.out"; fail "storage-kill: the snapshot reads through its target after the rebuild"; return
  fi
  pass "storage-kill: the snapshot reads whole through $SK_IQN:under-writes after the rebuild"
  e2fsck -fy "$img" > "$SK/snapshot-fsck1.out" 2>&1; rc=$?
  if [ "$rc" -le 1 ] && e2fsck -fn "$img" > "$SK/snapshot-fsck2.out" 2>&1; then
    pass "storage-kill: the snapshot's ext4 replays its journal and e2fsck -fn finds it clean (first pass exit $rc)"
  else
    sed 's/^/  /' "$SK/snapshot-fsck1.out" "$SK/snapshot-fsck2.out" | head -n 20
    fail "storage-kill: the snapshot's filesystem is clean after journal replay (e2fsck -fy exit $rc)"
    return
  fi
  while read -r _ t w f sz _ _ sum; do
    n=$((n + 1))
    debugfs -R "dump /$w/$f $SK/snapshot-file" "$img" > /dev/null 2>&1
    [ "$(sha256sum < "$SK/snapshot-file" 2>/dev/null | cut -d' ' -f1)" = "$sum" ] \
      || { bad=$((bad + 1)); [ "$bad" -le 5 ] && echo "  $w/$f ($sz bytes, fsynced at uptime $t): sha256 differs in the snapshot"; }
  done < <(tr -d '\r' < "$WORK/vm-$VM_PHASE/console.log" | grep '^IVM-PROG ' | head -n "$S0")
  if [ "$n" -eq "$S0" ] && [ "$bad" -eq 0 ]; then
    pass "storage-kill: all $n files fsynced before the snapshot read back from it with their sha256"
  else
    fail "storage-kill: files fsynced before the snapshot in it ($bad of $n differ; $S0 expected)"
  fi
  rm -f "$img" "$SK/snapshot-file"
}

sk_stop() {   # sk_stop NAME PID: SIGTERM, exit status 0 within 30 s
  local name=$1 pid=$2 rc
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid"; rc=$?
    fail "$name was already gone before our SIGTERM (exit status $rc)"; tail -n 3 "$SK/$name.log" | cut -c1-200 | sed 's/^/  /'
    return
  fi
  kill -TERM "$pid"
  timeout 30 tail --pid="$pid" -f /dev/null
  kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; fail "$name still running 30s after SIGTERM"; }
  wait "$pid"; rc=$?
  [ "$rc" -eq 0 ] && pass "$name stopped by SIGTERM, exit status 0" || fail "$name exit status $rc after SIGTERM"
}

storage_kill() {
  local n pid victim= vchunks=0 line t_kill k0 k1 total mark_ok=0 i rc poll
  local -A PIDS=()
  echo "==== storage-kill: a cluster daemon by daemon; a storage daemon killed while the guest writes"
  SK=$WORK/cluster; mkdir -p "$SK/data"
  MGR=127.0.0.1:$(sk_free_port) || { fail "storage-kill: no free port for the manager"; return; }

  sk_start manager 'manager ready' manager --id 1 --listen "$MGR" --data-dir "$SK/data/m1" \
    --node-timeout 3s --recovery-grace 3s || { fail "storage-kill: manager started"; return; }
  PIDS[manager]=$SK_PID
  for n in 1 2 3 4; do
    sk_start "node$n" 'storage ready' storage --data-dir "$SK/data/s$n" --listen 127.0.0.1:0 \
      --manager "$MGR" --node-id "node$n" || { fail "storage-kill: storage daemon node$n started"; return; }
    PIDS[node$n]=$SK_PID
  done
  for i in $(seq 100); do   # registered and heartbeating
    [ "$(sk_nodes 2>/dev/null | awk '$2 == "up"' | wc -l)" -eq 4 ] && break
    sleep 0.2
  done
  sk_start gateway 'portal ready' gateway --manager "$MGR" --portal 127.0.0.1:0 --node-id gw1 \
    || { fail "storage-kill: gateway started"; return; }
  PIDS[gateway]=$SK_PID
  PORT=$(sed -n 's/.*portal ready.*addr=[^ ]*:\([0-9]*\).*/\1/p' "$SK/gateway.log" | head -n1)
  pass "storage-kill: manager ($MGR), 4 storage daemons and gateway (portal 127.0.0.1:$PORT) started"

  if "$BIN" volume create "$SK_VOL" --size 256MiB --replicas "$SK_REPLICAS" --chunk-size 8MiB --manager "$MGR" > "$SK/volume.out" 2>&1 \
    && "$BIN" volume attach "$SK_VOL" --node gw1 --manager "$MGR" >> "$SK/volume.out" 2>&1; then
    pass "storage-kill: volume $SK_VOL created (256MiB, 3 replicas, 8MiB chunks) and attached to gw1"
  else
    sed 's/^/  /' "$SK/volume.out"; fail "storage-kill: volume $SK_VOL created and attached"; return
  fi
  for i in $(seq 300); do grep -q "target ready volume=$SK_VOL" "$SK/gateway.log" && break; sleep 0.1; done
  grep -q "target ready volume=$SK_VOL" "$SK/gateway.log" \
    && pass "storage-kill: gateway logged 'target ready volume=$SK_VOL'" \
    || { tail -n 5 "$SK/gateway.log" | cut -c1-200 | sed 's/^/  /'; fail "storage-kill: gateway serves $SK_VOL within 30s"; return; }

  # the victim: the node holding the most chunks of the volume (the only one)
  sk_nodes > "$SK/nodes.before"
  sed 's/^/  node before: /' "$SK/nodes.before"
  read -r victim vchunks < <(awk '$2 == "up" && $3 > m { m = $3; id = $1 } END { print id, m + 0 }' "$SK/nodes.before")
  if [ -z "$victim" ] || [ "$vchunks" -eq 0 ]; then fail "storage-kill: a storage node holds replicas of $SK_VOL"; return; fi

  VM_IQN=$SK_IQN vm_start storage-kill --scenario storage-kill
  # wait for the guest's write phase (boot, login and mkfs come first)
  for i in $(seq 3000); do
    grep -q '^INFO write phase started' "$WORK/run-$VM_PHASE.out" && { mark_ok=1; break; }
    kill -0 "$RPID" 2>/dev/null || break
    sleep 0.1
  done
  if [ "$mark_ok" = 1 ]; then
    sleep "$KILL_AFTER"
    if grep -q '^INFO write phase ended' "$WORK/run-$VM_PHASE.out"; then
      fail "storage-kill: the guest was still writing ${KILL_AFTER}s into its write phase"
    fi
    sk_snapshot
    k0=$(tr -d '\r' < "$WORK/vm-$VM_PHASE/console.log" | grep -c '^IVM-PROG ')
    kill -KILL "${PIDS[$victim]}"; t_kill=$(date +%s.%N)
    wait "${PIDS[$victim]}" 2>/dev/null
    echo "$(date -u +%H:%M:%S.%N | cut -c1-12) killed $victim (pid ${PIDS[$victim]}) with SIGKILL after the guest fsynced $k0 files" | tee "$SK/kill.log"
    pass "storage-kill: storage daemon $victim (holding $vchunks chunks) killed -9 ${KILL_AFTER}s into the guest's write phase"
    sk_poll_status "$t_kill" & poll=$!
  else
    fail "storage-kill: the guest reported its write phase (no storage daemon killed)"
  fi
  vm_wait
  [ "$mark_ok" = 1 ] || return

  k1=$(tr -d '\r' < "$WORK/vm-$VM_PHASE/console.log" | grep -c '^IVM-PROG ')
  if [ $((k1 - k0)) -gt 0 ]; then
    pass "storage-kill: the guest kept writing after the kill: $((k1 - k0)) of $k1 files fsynced after it"
  else
    fail "storage-kill: the guest kept writing after the kill ($k0 files before it, $k1 in all)"
  fi
  # how long files took (write + fsync + manifest): the ones in flight at the kill, the slowest
  tr -d '\r' < "$WORK/vm-$VM_PHASE/console.log" | grep '^IVM-PROG ' > "$SK/progress"
  sed -n "$((k0 + 1)),$((k0 + 2))p" "$SK/progress" \
    | awk '{ print "  first file done after the kill: " $3 "/" $4 " " $5 " bytes in " $7 }'
  sort -t' ' -k7,7gr "$SK/progress" | head -n 2 | awk '{ print "  slowest file: " $3 "/" $4 " " $5 " bytes in " $7 }'

  wait "$poll"; rc=$?
  tail -n 1 "$SK/status.log" | { read -r t d r nd _; echo "  last status: ${t}s after the kill: degraded_chunks $d, recovery_tasks $r, nodes_down $nd"; }
  awk '$4 >= 1 { print "  manager declared the node down " $1 "s after the kill"; exit }' "$SK/status.log"
  awk '$2 ~ /^[0-9]+$/ && $2 > md { md = $2 } $3 ~ /^[0-9]+$/ && $3 > mr { mr = $3 }
       END { print "  peak: degraded_chunks " md + 0 ", recovery_tasks " mr + 0 }' "$SK/status.log"
  if [ "$rc" -eq 0 ]; then
    pass "storage-kill: replicas rebuilt: degraded_chunks 0, recovery_tasks 0 $(tail -n 1 "$SK/status.log" | cut -d' ' -f1)s after the kill"
  else
    fail "storage-kill: replicas rebuilt within ${RECOVERY_TIMEOUT}s of the kill (status: $SK/status.log)"
    "$BIN" status --manager "$MGR" 2>&1 | sed 's/^/  /'
  fi
  sk_snapshot_check
  sk_nodes > "$SK/nodes.after"
  sed 's/^/  node after: /' "$SK/nodes.after"
  total=$(awk -v v="$victim" '$1 != v { s += $3 } END { print s + 0 }' "$SK/nodes.after")
  if [ "$total" -eq $((SK_CHUNKS * SK_REPLICAS)) ] && awk -v v="$victim" '$1 == v && $2 == "down" { ok = 1 } END { exit !ok }' "$SK/nodes.after"; then
    pass "storage-kill: $victim down, the 3 other nodes hold all $((SK_CHUNKS * SK_REPLICAS)) replicas"
  else
    fail "storage-kill: $victim down and the 3 other nodes holding all $((SK_CHUNKS * SK_REPLICAS)) replicas (they hold $total)"
  fi

  echo "  gateway log: $(grep -c 'replica failed' "$SK/gateway.log") replica failures reported," \
    "$(grep -c 'rebuild complete' "$SK/gateway.log") rebuilds completed" \
    "($(grep 'rebuild complete' "$SK/gateway.log" | sed -n 's/.* bytes=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { printf "%.1f", s / 1048576 }') MiB copied);" \
    "$(grep -c ' WARN ' "$SK/gateway.log") WARN, $(grep -c ' ERROR ' "$SK/gateway.log") ERROR lines"
  grep -E ' (WARN|ERROR) ' "$SK/gateway.log" | head -n 8 | cut -c1-220 | sed 's/^/    /'
  kill -0 "${PIDS[gateway]}" 2>/dev/null || echo "WARNING: the gateway exited during the storage-kill phase; see $SK/gateway.log"
  sk_stop gateway "${PIDS[gateway]}"
  for n in 1 2 3 4; do [ "node$n" = "$victim" ] || sk_stop "node$n" "${PIDS[node$n]}"; done
  sk_stop manager "${PIDS[manager]}"
  if grep -l panicked "$SK"/*.log > "$SK/panics" 2>/dev/null; then
    fail "storage-kill: no panic in the daemons' logs ($(tr '\n' ' ' < "$SK/panics"))"
    grep -h -A3 panicked "$SK"/*.log | head -n 12
  else
    pass "storage-kill: no panic in the gateway's (or any daemon's) log"
  fi
}
