# rolling-upgrade.sh - sourced by test.sh (uses its pass/fail/vm_start/vm_wait,
# $BIN, $WORK, $RECOVERY_TIMEOUT, and storage-kill.sh's helpers). Not run on
# its own.
#
# A cluster started daemon by daemon on loopback, addressed the way a
# StatefulSet's headless service names its pods (localhost:PORT, the same
# --peer list on every manager): 3 managers, 3 storage daemons, 1 gateway, every
# one with --metrics. A 256 MiB volume with 3 replicas in 8 MiB chunks is
# attached to the gateway; the guest (run.sh --scenario rolling-upgrade) makes
# ext4 on it and writes and fsyncs files, timing a 4 KiB write + fsync every
# 0.5 s. Meanwhile the host restarts every daemon in turn exactly as Kubernetes
# rolls a StatefulSet or DaemonSet: SIGTERM, wait for the exit, start again with
# the same data dir and flags, wait for /readyz 200, next. Storage 1-3, then the
# managers from the highest ordinal down (3, 2, 1), then the gateway (same
# --node-id: the initiator must log in again within its replacement timeout).
# Then the host tells the guest to stop; the guest checks e2fsck and every
# sha256. Passes when the guest saw no I/O error, e2fsck is clean, every
# checksum matches, and `ironsan status --json` reports no degraded chunk.

RU_VOL=ruvol
RU_IQN=iqn.2026-11.io.ironsan:$RU_VOL
RU_CHUNKS=32   # 256 MiB / 8 MiB
RU_REPLICAS=3
RU_START_AFTER=${IRONSAN_VM_ROLL_AFTER:-5}      # seconds of writing before the first restart
RU_TAIL=${IRONSAN_VM_ROLL_TAIL:-8}              # seconds of writing after the last one
RU_READY_TIMEOUT=${IRONSAN_VM_READY_TIMEOUT:-120}

# ru_readyz PORT: "CODE BODY" of /readyz on 127.0.0.1:PORT (CODE 0: no answer)
ru_readyz() {
  local line body
  if ! exec 7<>"/dev/tcp/127.0.0.1/$1"; then echo "0 no answer"; return; fi 2>/dev/null
  printf 'GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n' >&7
  IFS= read -r -t 5 line <&7
  body=$(timeout 5 cat <&7 2>/dev/null | tr -d '\r' | sed -n '/^$/,$p' | sed '1d' | head -n 1)
  exec 7<&-
  line=${line%$'\r'}
  echo "$(echo "$line" | awk '{ print $2 + 0 }') $body"
}

# ru_wait_ready NAME PORT: poll /readyz until 200 (at most RU_READY_TIMEOUT s);
# the distinct 503 reasons seen go to $RU/NAME.readyz
ru_wait_ready() {
  local name=$1 port=$2 t0=$SECONDS r
  : > "$RU/$name.readyz"
  while :; do
    r=$(ru_readyz "$port")
    r=${r:-0 connection closed}   # a reset kills the subshell with SIGPIPE
    [ "${r%% *}" = 200 ] && return 0
    grep -qxF -- "$r" "$RU/$name.readyz" || echo "$r" >> "$RU/$name.readyz"
    [ $((SECONDS - t0)) -lt "$RU_READY_TIMEOUT" ] || return 1
    sleep 0.2
  done
}

# ru_launch NAME: start daemon NAME with its recorded command line; sets RU_PID[NAME]
ru_launch() {
  local name=$1 ready
  case "$name" in
    manager*) ready='manager ready' ;;
    node*) ready='storage ready' ;;
    gateway) ready='portal ready' ;;
  esac
  echo "==== start #$((RU_STARTS[$name] + 1)) of $name" >> "$RU/$name.log"
  RU_STARTS[$name]=$((RU_STARTS[$name] + 1))
  # sk_start truncates the log; keep every life of the daemon in one file
  sk_start "$name.run" "$ready" ${RU_ARGS[$name]} || { cat "$RU/$name.run.log" >> "$RU/$name.log"; return 1; }
  RU_PID[$name]=$SK_PID
}

# ru_collect NAME: append the current life's log to NAME.log
ru_collect() { cat "$RU/$1.run.log" >> "$RU/$1.log" 2>/dev/null; }

# ru_restart NAME: SIGTERM, exit 0, start again, /readyz 200; one line of timings
ru_restart() {
  local name=$1 pid=${RU_PID[$1]} t0 t1 t2 t3 rc i
  t0=$(date +%s.%N)
  kill -TERM "$pid"
  for i in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fail "rolling-upgrade: $name exits within 60s of SIGTERM"; fi
  wait "$pid"; rc=$?
  t1=$(date +%s.%N)
  ru_collect "$name"
  [ "$rc" -eq 0 ] || fail "rolling-upgrade: $name exit status $rc after SIGTERM (expected 0)"
  ru_launch "$name" || { fail "rolling-upgrade: $name started again"; return 1; }
  t2=$(date +%s.%N)
  if ! ru_wait_ready "$name" "${RU_METRICS[$name]}"; then
    fail "rolling-upgrade: $name /readyz 200 within ${RU_READY_TIMEOUT}s of its restart (last: $(tail -n 1 "$RU/$name.readyz"))"
    return 1
  fi
  t3=$(date +%s.%N)
  awk -v n="$name" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v rc="$rc" -v h="$RU_T_MARK" -v u="$RU_U_MARK" 'BEGIN {
    printf "%s: exited %.1fs after SIGTERM (status %s), started in %.1fs, /readyz 200 %.1fs after SIGTERM (guest uptime ~%.1f-%.1f)\n",
      n, b - a, rc, c - b, d - a, u + a - h, u + d - h }' \
    | tee -a "$RU/restarts.log"
  sed "s/^/    $name \/readyz meanwhile: /" "$RU/$name.readyz" | cut -c1-200
  return 0
}

# ru_stop_guest: connect to the guest's stop port until it answers IVM-STOP-OK
ru_stop_guest() {
  local i line
  for i in $(seq 60); do
    if { exec 6<>"/dev/tcp/127.0.0.1/$RU_STOP_PORT"; } 2>/dev/null; then
      IFS= read -r -t 5 line <&6
      exec 6<&-
      [[ "$line" == IVM-STOP-OK* ]] && return 0
    fi
    sleep 0.5
  done
  return 1
}

rolling_upgrade() {
  local n i mark_ok=0 rc poll t_roll nodes RU_T_MARK=0 RU_U_MARK=0
  local -A RU_PID=() RU_ARGS=() RU_METRICS=() RU_STARTS=()
  echo "==== rolling-upgrade: 3 managers, 3 storage daemons, a gateway; each restarted in turn while the guest writes"
  RU=$WORK/rolling; SK=$RU; mkdir -p "$RU/data"
  local p1 p2 p3 peers gwport
  p1=$(sk_free_port) && p2=$(sk_free_port) && p3=$(sk_free_port) && gwport=$(sk_free_port) \
    || { fail "rolling-upgrade: free ports"; return; }
  MGR=localhost:$p1,localhost:$p2,localhost:$p3
  peers="--peer 1=localhost:$p1 --peer 2=localhost:$p2 --peer 3=localhost:$p3"
  local -a mports=("" "$p1" "$p2" "$p3")
  for n in 1 2 3; do
    RU_METRICS[manager$n]=$(sk_free_port)
    RU_STARTS[manager$n]=0
    RU_ARGS[manager$n]="manager --id $n --listen 127.0.0.1:${mports[$n]} --advertise localhost:${mports[$n]} $peers --data-dir $RU/data/m$n --metrics 127.0.0.1:${RU_METRICS[manager$n]}"
  done
  for n in 1 2 3; do
    local sp; sp=$(sk_free_port)
    RU_METRICS[node$n]=$(sk_free_port)
    RU_STARTS[node$n]=0
    RU_ARGS[node$n]="storage --data-dir $RU/data/s$n --listen 127.0.0.1:$sp --advertise localhost:$sp --manager $MGR --node-id node$n --metrics 127.0.0.1:${RU_METRICS[node$n]}"
  done
  RU_METRICS[gateway]=$(sk_free_port)
  RU_STARTS[gateway]=0
  RU_ARGS[gateway]="gateway --manager $MGR --portal 127.0.0.1:$gwport --node-id gw1 --metrics 127.0.0.1:${RU_METRICS[gateway]}"
  RU_STOP_PORT=$(sk_free_port)

  # Daemon by daemon; each must be ready before the next role starts.
  for n in manager1 manager2 manager3; do
    ru_launch "$n" || { fail "rolling-upgrade: $n started"; return; }
  done
  for n in manager1 manager2 manager3; do
    ru_wait_ready "$n" "${RU_METRICS[$n]}" || { fail "rolling-upgrade: $n /readyz 200"; return; }
  done
  for n in node1 node2 node3; do
    ru_launch "$n" || { fail "rolling-upgrade: storage daemon $n started"; return; }
  done
  for n in node1 node2 node3; do
    ru_wait_ready "$n" "${RU_METRICS[$n]}" || { fail "rolling-upgrade: $n /readyz 200"; return; }
  done
  ru_launch gateway || { fail "rolling-upgrade: gateway started"; return; }
  ru_wait_ready gateway "${RU_METRICS[gateway]}" || { fail "rolling-upgrade: gateway /readyz 200"; return; }
  PORT=$gwport
  pass "rolling-upgrade: 3 managers ($MGR), 3 storage daemons and the gateway (portal 127.0.0.1:$PORT) started, each /readyz 200"

  if "$BIN" volume create "$RU_VOL" --size 256MiB --replicas "$RU_REPLICAS" --chunk-size 8MiB --manager "$MGR" > "$RU/volume.out" 2>&1 \
    && "$BIN" volume attach "$RU_VOL" --node gw1 --manager "$MGR" >> "$RU/volume.out" 2>&1; then
    pass "rolling-upgrade: volume $RU_VOL created (256MiB, 3 replicas, 8MiB chunks) and attached to gw1"
  else
    sed 's/^/  /' "$RU/volume.out"; fail "rolling-upgrade: volume $RU_VOL created and attached"; return
  fi
  for i in $(seq 300); do grep -q "target ready volume=$RU_VOL" "$RU/gateway.run.log" && break; sleep 0.1; done
  grep -q "target ready volume=$RU_VOL" "$RU/gateway.run.log" \
    || { tail -n 5 "$RU/gateway.run.log" | cut -c1-200 | sed 's/^/  /'; fail "rolling-upgrade: gateway serves $RU_VOL within 30s"; return; }

  IRONSAN_VM_WRITE_SECS=${IRONSAN_VM_ROLL_MAX_SECS:-400} VM_IQN=$RU_IQN vm_start rolling-upgrade --scenario rolling-upgrade --stop-port "$RU_STOP_PORT"
  for i in $(seq 3000); do
    if grep -q '^INFO write phase started' "$WORK/run-$VM_PHASE.out"; then
      mark_ok=1
      # host time and guest uptime at the start, to place restarts on the guest's clock
      RU_T_MARK=$(date +%s.%N)
      RU_U_MARK=$(sed -n 's/^INFO write phase started.* at uptime \([0-9.]*\).*/\1/p' "$WORK/run-$VM_PHASE.out" | head -n 1)
      RU_U_MARK=${RU_U_MARK:-0}
      break
    fi
    kill -0 "$RPID" 2>/dev/null || break
    sleep 0.1
  done
  if [ "$mark_ok" = 1 ]; then
    sleep "$RU_START_AFTER"
    t_roll=$SECONDS
    : > "$RU/restarts.log"
    # StatefulSet storage: ordinals in turn (the order does not matter for safety; each
    # waits for the previous to be ready). Managers: highest ordinal first, as a
    # StatefulSet rolls. Then the gateway DaemonSet's pod on this node.
    for n in node1 node2 node3 manager3 manager2 manager1 gateway; do
      kill -0 "$RPID" 2>/dev/null || { fail "rolling-upgrade: the guest ended before $n was restarted"; break; }
      ru_restart "$n" || break
    done
    echo "  rolling restart of 7 daemons took $((SECONDS - t_roll))s"
    [ "$(wc -l < "$RU/restarts.log")" -eq 7 ] && pass "rolling-upgrade: every daemon restarted (SIGTERM, exit 0, start, /readyz 200) in turn in $((SECONDS - t_roll))s while the guest wrote"
    sleep "$RU_TAIL"
    if ru_stop_guest; then
      pass "rolling-upgrade: the guest acknowledged the end of the write phase"
    else
      fail "rolling-upgrade: the guest answered on its stop port"
    fi
  else
    fail "rolling-upgrade: the guest reported its write phase (nothing restarted)"
  fi
  vm_wait
  [ "$mark_ok" = 1 ] || return

  # The guest's view: files completed during the restarts, the longest stalls.
  tr -d '\r' < "$WORK/vm-$VM_PHASE/console.log" | grep '^IVM-PROG ' > "$RU/progress"
  tr -d '\r' < "$WORK/vm-$VM_PHASE/console.log" | grep '^IVM-PROBE ' > "$RU/probe" || true
  echo "  guest: $(wc -l < "$RU/progress") files fsynced in all"
  sort -t' ' -k7,7gr "$RU/progress" | head -n 2 | awk '{ print "  slowest file: " $3 "/" $4 " " $5 " bytes in " $7 }'
  awk '{ t = $2 + 0; if (NR > 1 && t - last > gap) { gap = t - last; at = last } last = t }
       END { printf "  longest time without a file completing: %.1fs (from uptime %.1f)\n", gap, at }' "$RU/progress"
  grep -h '^probe\|INFO   probe' "$WORK/run-$VM_PHASE.out" | sed 's/^/  /'
  sed 's/^/  probe over 1s: /' "$RU/probe"

  # Redundancy: every chunk back at 3 replicas.
  sk_poll_redundant & poll=$!
  wait "$poll"; rc=$?
  tail -n 1 "$RU/status.log" | { read -r t d r nd _; echo "  status ${t}s after the guest finished: degraded_chunks $d, recovery_tasks $r, nodes_down $nd"; }
  if [ "$rc" -eq 0 ]; then
    pass "rolling-upgrade: no chunk degraded (degraded_chunks 0, recovery_tasks 0, no node down)"
  else
    fail "rolling-upgrade: no chunk degraded within ${RECOVERY_TIMEOUT}s (status: $RU/status.log)"
    "$BIN" status --manager "$MGR" 2>&1 | sed 's/^/  /'
  fi
  nodes=$(sk_nodes)
  echo "$nodes" | sed 's/^/  node after: /'
  if [ "$(echo "$nodes" | awk '$2 == "up" && $3 == '"$RU_CHUNKS"'' | wc -l)" -eq 3 ]; then
    pass "rolling-upgrade: the 3 nodes are up and hold all $((RU_CHUNKS * RU_REPLICAS)) replicas"
  else
    fail "rolling-upgrade: the 3 nodes up, each holding $RU_CHUNKS replicas"
  fi
  echo "  gateway: $(cat "$RU"/gateway*.log | grep -c 'replica failed') replica failures reported," \
    "$(cat "$RU"/gateway*.log | grep -c 'rebuild complete') rebuilds completed;" \
    "managers: $(cat "$RU"/manager*.log | grep -c 'leadership handed over') leadership handovers"

  for n in gateway node1 node2 node3 manager1 manager2 manager3; do
    sk_stop "$n" "${RU_PID[$n]}"
    ru_collect "$n"
  done
  rm -f "$RU"/*.run.log
  if grep -l panicked "$RU"/*.log > "$RU/panics" 2>/dev/null; then
    fail "rolling-upgrade: no panic in the daemons' logs ($(tr '\n' ' ' < "$RU/panics"))"
    grep -h -A3 panicked "$RU"/*.log | head -n 12
  else
    pass "rolling-upgrade: no panic in any daemon's log"
  fi
}

# sk_poll_redundant: like sk_poll_status, but done when nothing is degraded,
# nothing rebuilding and no node down
sk_poll_redundant() {
  local t0 t d r n
  t0=$(date +%s.%N)
  while :; do
    t=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
    if "$BIN" status --json --manager "$MGR" > "$SK/status.json" 2>&1; then
      d=$(sk_num degraded_chunks "$SK/status.json") r=$(sk_num recovery_tasks "$SK/status.json") n=$(sk_num nodes_down "$SK/status.json")
      echo "$t ${d:-?} ${r:-?} ${n:-?}" >> "$SK/status.log"
      [ "${n:-1}" = 0 ] && [ "$d" = 0 ] && [ "$r" = 0 ] && return 0
    else
      echo "$t status failed: $(head -c 200 "$SK/status.json")" >> "$SK/status.log"
    fi
    awk -v t="$t" -v m="$RECOVERY_TIMEOUT" 'BEGIN{exit !(t >= m)}' && return 1
    sleep 0.5
  done
}
