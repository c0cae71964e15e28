#!/bin/sh
# /init of the IronSAN test guest (busybox sh inside qemu). Logs the Linux
# kernel initiator (open-iscsi + iscsi_tcp) into an IronSAN target on the host
# and checks that a filesystem survives logout/login (SCENARIO=basic), or
# writes and fsyncs files for WRITE_SECS seconds while the host kills a storage
# daemon, then checks the filesystem and every file (SCENARIO=storage-kill),
# or writes the same way while the host restarts every daemon in turn until the
# host says stop, timing a small write + fsync meanwhile (SCENARIO=rolling-upgrade),
# or serves the CSI node plugin and a command channel to the host, which drives
# them (SCENARIO=csi-node, cli/tests/csi_vm.rs).
# Parameters come from /etc/ivm.conf, which run.sh adds to the initramfs for
# each run.
#
# Results go to ttyS1 (nothing else writes there) as "IVM PASS name",
# "IVM FAIL name", "IVM INFO text" and finally "IVM DONE passed=N failed=N".
# Each step's full output goes to the console (ttyS0) as "  | " lines; the
# storage-kill writers also print one "IVM-PROG" line per file written there,
# as it happens (the host counts them to see writes go on after the kill).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
exec 8>/dev/console
mount -t tmpfs tmpfs /run
mkdir -p /run/lock/iscsi /mnt/t /etc/iscsi/nodes /etc/iscsi/send_targets /etc/iscsi/ifaces

# PORT IQN HOST CHAP_USER CHAP_SECRET MUTUAL_USER MUTUAL_SECRET FILEMB SCENARIO WRITE_SECS
# CSI_PORT SHELL_PORT CSI_SECS STOP_PORT
SCENARIO=basic WRITE_SECS=25 CSI_PORT=10000 SHELL_PORT=10001 CSI_SECS=540 STOP_PORT=10002
. /etc/ivm.conf
PORTAL=$HOST:$PORT

if stty -F /dev/ttyS1 raw -echo 2>/dev/null; then exec 9>/dev/ttyS1; else exec 9>/dev/console; fi
PASSED=0 FAILED=0
say()  { echo "IVM $*" >&9; echo "IVM $*"; }
now()  { cut -d' ' -f1 /proc/uptime; }

# step NAME CMD...: run CMD, output to the console, one PASS/FAIL result line.
N=0
step() {
  _name=$1; shift
  N=$((N + 1)); _t0=$(now)
  echo "== step $N: $_name"
  "$@" > /tmp/out.$N 2>&1
  _rc=$?
  sed 's/^/  | /' /tmp/out.$N
  _dt=$(awk -v a="$_t0" -v b="$(now)" 'BEGIN{printf "%.1f", b - a}')
  if [ $_rc -eq 0 ]; then
    PASSED=$((PASSED + 1)); say "PASS $_name (${_dt}s)"
  else
    FAILED=$((FAILED + 1)); say "FAIL $_name (rc=$_rc, ${_dt}s)"
    tail -n 8 /tmp/out.$N | while IFS= read -r l; do say "INFO   $l"; done
  fi
  return $_rc
}

boot() {
  while read -r m; do insmod "$m" || { echo "insmod $m failed"; return 1; }; done < /etc/ivm/modules
  ip link set lo up
  i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
}

start_iscsid() {
  echo "InitiatorName=iqn.2026-11.io.ironsan.test:vm-guest" > /etc/iscsi/initiatorname.iscsi
  iscsid -f > /tmp/iscsid.log 2>&1 &
  i=0   # ready once its abstract control socket exists
  while ! grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix; do
    [ $i -lt 100 ] || { cat /tmp/iscsid.log; return 1; }
    usleep 100000; i=$((i + 1))
  done
}

discover() {
  timeout 60 iscsiadm -m discovery -t st -p "$PORTAL" > /tmp/disc || { cat /tmp/disc; return 1; }
  cat /tmp/disc
  grep -q " $IQN\$" /tmp/disc || { echo "$IQN not listed"; return 1; }
}

node() { iscsiadm -m node -T "$IQN" -p "$PORTAL" "$@"; }
set_opt() { node -o update -n "$1" -v "$2"; }

# SendTargets reports the target's own address (127.0.0.1), which the guest
# cannot reach, so the node record always uses the portal we discovered through.
node_setup() {
  node -o delete >/dev/null 2>&1
  node -o new || return 1
  set_opt node.session.initial_login_retry_max 1 || return 1
  set_opt node.session.timeo.replacement_timeout 20 || return 1
  if [ -n "$CHAP_USER" ]; then
    set_opt node.session.auth.authmethod CHAP || return 1
    set_opt node.session.auth.username "$CHAP_USER" || return 1
    set_opt node.session.auth.password "$CHAP_SECRET" || return 1
  fi
  if [ -n "$MUTUAL_USER" ]; then
    set_opt node.session.auth.username_in "$MUTUAL_USER" || return 1
    set_opt node.session.auth.password_in "$MUTUAL_SECRET" || return 1
  fi
  node -o show | grep -E '^node.session.auth|retry_max' | sed 's/\(password[_in]* = \).*/\1<hidden>/'
}

login() { timeout 90 iscsiadm -m node -T "$IQN" -p "$PORTAL" --login; }

# login must fail (rc 24 = ISCSI_ERR_LOGIN_AUTH_FAILED) and leave no session
# login_refused RC WHY: the login must fail with iscsiadm exit status RC,
# iscsid must log WHY (a regex), and no session may remain.
# The kernel logs "detected conn error (1020)" when the target closes the
# connection after refusing a login; lines logged during this step are kept
# in /tmp/klog.expected so that klog_clean ignores them (and only them).
login_refused() {
  dmesg > /tmp/klog.a
  _n=$(wc -l < /tmp/iscsid.log)
  login; _r=$?
  echo "iscsiadm --login exit status $_r"
  usleep 500000
  tail -n +$((_n + 1)) /tmp/iscsid.log > /tmp/iscsid.new
  sed 's/^/iscsid log: /' /tmp/iscsid.new
  dmesg | grep -vxF -f /tmp/klog.a | tee -a /tmp/klog.expected | sed 's/^/expected kernel message: /'
  if iscsiadm -m session 2>/dev/null | grep -qF "$IQN"; then
    echo "a session exists after the login that had to fail"
    timeout 60 iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout
    return 1
  fi
  [ $_r -eq "$1" ] || { echo "expected exit status $1"; return 1; }
  grep -qE "$2" /tmp/iscsid.new || { echo "iscsid did not log /$2/"; return 1; }
}
# the target must refuse our response (login status 0201, iscsiadm: 24)
wrong_password() {
  set_opt node.session.auth.password "wrong-$CHAP_SECRET" || return 1
  login_refused 24 'Login failed to authenticate|authorization failure'; _r=$?
  set_opt node.session.auth.password "$CHAP_SECRET" || return 1
  return $_r
}
# the initiator must reject the target's answer: proves the target did answer
# the mutual challenge, and with something computed from its own secret
wrong_mutual() {
  set_opt node.session.auth.password_in "wrong-$MUTUAL_SECRET" || return 1
  login_refused 19 'incorrect CHAP response from target'; _r=$?
  set_opt node.session.auth.password_in "$MUTUAL_SECRET" || return 1
  return $_r
}

DISK=
wait_disk() {
  DISK= i=0
  while [ -z "$DISK" ] && [ $i -lt 300 ]; do
    for b in /sys/class/iscsi_session/session*/device/target*/*/block/*; do
      [ -e "$b" ] && [ "$(cat "$b/size")" -gt 0 ] && [ -b "/dev/${b##*/}" ] && DISK=${b##*/}
    done
    [ -n "$DISK" ] || { usleep 100000; i=$((i + 1)); }
  done
  [ -n "$DISK" ] || { echo "no disk within 30s"; cat /proc/scsi/scsi; return 1; }
  say "INFO   /dev/$DISK: $(( $(cat /sys/block/$DISK/size) / 2048 )) MiB," \
    "vendor '$(cat /sys/block/$DISK/device/vendor | tr -s ' ')' model '$(cat /sys/block/$DISK/device/model | tr -s ' ')'"
}

logout() {
  timeout 90 iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout || return 1
  i=0; while [ -e "/sys/block/$DISK" ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
  [ ! -e "/sys/block/$DISK" ] || { echo "/dev/$DISK still there 10s after logout"; return 1; }
  ! iscsiadm -m session 2>/dev/null | grep -F "$IQN"
}

write_files() {
  dd if=/dev/urandom of=/mnt/t/big.bin bs=1M count="$FILEMB" 2>&1 || return 1
  head -c 1000003 /dev/urandom > /mnt/t/odd.bin || return 1
  mkdir -p /mnt/t/small || return 1
  i=0
  while [ $i -lt 50 ]; do head -c $((i * 331 + 1)) /dev/urandom > /mnt/t/small/f$i || return 1; i=$((i + 1)); done
  sync || return 1
  (cd /mnt/t && find . -type f | sort | xargs sha256sum) > /tmp/sums || return 1
  echo "$(wc -l < /tmp/sums) files, $(du -sk /mnt/t | cut -f1) KiB"
}

verify_files() {
  (cd /mnt/t && sha256sum -c /tmp/sums) > /tmp/verify 2>&1; _r=$?
  grep -v ': OK$' /tmp/verify
  echo "$(grep -c ': OK$' /tmp/verify) of $(wc -l < /tmp/sums) files match"
  [ $_r -eq 0 ] && [ "$(grep -c ': OK$' /tmp/verify)" -eq "$(wc -l < /tmp/sums)" ]
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

klog_clean() {
  echo "(no expected kernel messages)" >> /tmp/klog.expected   # never empty: busybox grep -f
  dmesg | grep -vxF -f /tmp/klog.expected | grep -E 'conn error|I/O error|Buffer I/O|EXT4-fs (error|warning)|XFS .*([Cc]orrupt|I/O error|Internal error|shut down)|[Aa]bort|(LU|[Tt]arget|[Hh]ost|[Bb]us) [Rr]eset|Sense Key|hostbyte=|timing out|blocked for more than|WARNING:|BUG:|Call Trace' \
    && return 1
  echo "no iSCSI/SCSI/ext4/xfs errors in the kernel log"
}

# ---- storage-kill: write while the host kills a storage daemon ----------------
# writer NAME: write files of varied sizes into /mnt/t/NAME until WRITE_SECS
# after the write phase began, each fsynced before its sha256 is appended to
# /mnt/t/MANIFEST.NAME (fdatasynced) and to /tmp/manifest.NAME (guest RAM).
# One "IVM-PROG" console line per file; /tmp/stats.NAME: files bytes longest.
writer() {
  _w=$1 _i=0 _bytes=0 _max=0 _maxf=-
  mkdir -p "/mnt/t/$_w" || return 1
  : > "/tmp/manifest.$_w"; : > "/mnt/t/MANIFEST.$_w"
  while [ ! -e /tmp/ivm-stop ] && awk -v t="$(now)" -v e="$END" 'BEGIN{exit !(t < e)}'; do
    # every 8th file 1-2 MiB, the others up to 128 KiB; odd sizes
    if [ $((_i % 8)) -eq 7 ]; then _sz=$((1048576 + (_i * 7919) % 1048576)); else _sz=$(( (_i * 7919) % 131072 + 1 )); fi
    _t0=$(now)
    head -c "$_sz" /dev/urandom | dd of="/mnt/t/$_w/f$_i" bs=64k conv=fsync 2>/dev/null || { echo "$_w: writing f$_i failed"; return 1; }
    _sum=$(cd /mnt/t && sha256sum "$_w/f$_i") || return 1
    echo "$_sum" >> "/mnt/t/MANIFEST.$_w" && sync -d "/mnt/t/MANIFEST.$_w" || { echo "$_w: manifest update failed"; return 1; }
    echo "$_sum" >> "/tmp/manifest.$_w"
    _dt=$(awk -v a="$_t0" -v b="$(now)" 'BEGIN{printf "%.2f", b - a}')
    echo "IVM-PROG $(now) $_w f$_i $_sz bytes ${_dt}s ${_sum%% *}" >&8
    if awk -v a="$_dt" -v b="$_max" 'BEGIN{exit !(a > b)}'; then _max=$_dt _maxf=f$_i; fi
    _i=$((_i + 1)) _bytes=$((_bytes + _sz))
    [ $_bytes -lt $((60 * 1048576)) ] || break   # the volume is 256 MiB; two writers
  done
  echo "$_i $_bytes $_max $_maxf" > "/tmp/stats.$_w"
}

write_phase() {
  END=$(awk -v t="$(now)" -v d="$WRITE_SECS" 'BEGIN{printf "%.2f", t + d}')
  say "INFO write phase started (${WRITE_SECS}s, 2 writers) at uptime $(now)"
  writer w0 > /tmp/writer.w0 2>&1 & _p0=$!
  writer w1 > /tmp/writer.w1 2>&1 & _p1=$!
  wait $_p0; _r0=$?
  wait $_p1; _r1=$?
  cat /tmp/writer.w0 /tmp/writer.w1
  say "INFO write phase ended"
  [ $_r0 -eq 0 ] && [ $_r1 -eq 0 ] || return 1
  _files=0 _bytes=0
  for w in w0 w1; do
    read -r f b m mf < "/tmp/stats.$w" || return 1
    _files=$((_files + f)) _bytes=$((_bytes + b))
    say "INFO   writer $w: $f files, $((b / 1024)) KiB, slowest file $mf took ${m}s (write + fsync + manifest)"
  done
  echo "$_files files, $((_bytes / 1024)) KiB written and fsynced"
  [ $_files -gt 0 ]
}

verify_manifests() {
  _n=0
  for w in w0 w1; do
    cmp "/tmp/manifest.$w" "/mnt/t/MANIFEST.$w" || { echo "MANIFEST.$w on disk differs from the copy in guest RAM"; return 1; }
    (cd /mnt/t && sha256sum -c "MANIFEST.$w") > /tmp/verify 2>&1; _r=$?
    grep -v ': OK$' /tmp/verify
    _ok=$(grep -c ': OK$' /tmp/verify)
    echo "$w: $_ok of $(wc -l < "/tmp/manifest.$w") files match"
    [ $_r -eq 0 ] && [ "$_ok" -eq "$(wc -l < "/tmp/manifest.$w")" ] || return 1
    _n=$((_n + _ok))
  done
  say "INFO   $_n files verified"
}

# ---- rolling-upgrade: write while the host restarts every daemon in turn -------
# The host ends the write phase by connecting to STOP_PORT (forwarded from the
# host's 127.0.0.1); WRITE_SECS bounds it in case that never comes.
start_stop_listener() {
  printf '#!/bin/sh\ntouch /tmp/ivm-stop\necho IVM-STOP-OK\n' > /etc/ivm-stop-sh || return 1
  chmod 755 /etc/ivm-stop-sh || return 1
  nc -ll -p "$STOP_PORT" -e /etc/ivm-stop-sh > /tmp/stop.log 2>&1 &
  STOP_PID=$!
  usleep 300000
  kill -0 $STOP_PID || { cat /tmp/stop.log; return 1; }
}

# probe: a 4 KiB write + fsync every 0.5 s until the writers are done: the
# longest one is the longest I/O stall the filesystem saw. Each over 1 s goes
# to the console as an "IVM-PROBE uptime seconds" line.
probe() {
  _n=0 _max=0 _at=-
  while [ ! -e /tmp/ivm-writers-done ]; do
    _t0=$(now)
    dd if=/dev/urandom of=/mnt/t/probe bs=4k count=1 conv=notrunc,fsync 2>/dev/null || { echo "probe: write + fsync failed"; return 1; }
    _dt=$(awk -v a="$_t0" -v b="$(now)" 'BEGIN{printf "%.2f", b - a}')
    _n=$((_n + 1))
    if awk -v a="$_dt" -v b="$_max" 'BEGIN{exit !(a > b)}'; then _max=$_dt _at=$_t0; fi
    awk -v a="$_dt" 'BEGIN{exit !(a >= 1)}' && echo "IVM-PROBE $_t0 ${_dt}s" >&8
    usleep 500000
  done
  echo "$_n $_max $_at" > /tmp/stats.probe
}

write_phase_until_stopped() {
  rm -f /tmp/ivm-stop /tmp/ivm-writers-done
  probe > /tmp/probe.out 2>&1 & _pp=$!
  write_phase; _r=$?
  touch /tmp/ivm-writers-done
  wait $_pp; _rp=$?
  cat /tmp/probe.out
  if [ -e /tmp/ivm-stop ]; then echo "stopped by the host"; else echo "no stop from the host within ${WRITE_SECS}s"; _r=1; fi
  read -r n m at < /tmp/stats.probe || return 1
  say "INFO   probe: $n writes of 4 KiB + fsync, the slowest took ${m}s (at uptime $at)"
  [ $_r -eq 0 ] && [ $_rp -eq 0 ]
}

# The gateway's restart closes the connection: the kernel logs "detected conn
# error (1020)" and recovers the session. Those lines are expected here, and
# counted; every other line klog_clean looks for is not.
expect_conn_errors() {
  _c=$(dmesg | grep -cE 'connection[0-9]+:[0-9]+: detected conn error \(10(11|20)\)')
  dmesg | grep -E 'connection[0-9]+:[0-9]+: detected conn error \(10(11|20)\)' >> /tmp/klog.expected
  say "INFO   kernel: $_c connection errors (the gateway's restart); iscsid: $(grep -c 'operational after recovery' /tmp/iscsid.log) session recoveries"
  grep -E 'operational after recovery|conn error' /tmp/iscsid.log | sed 's/^/  iscsid| /' 
  true
}

main_rolling_upgrade() {
  say "INFO guest: kernel $(uname -r); target $IQN at $PORTAL; scenario rolling-upgrade, writing until the host says stop (at most ${WRITE_SECS}s)"
  step "guest boot (modules, network)" boot || return
  step "iscsid started" start_iscsid || return
  step "discovery lists $IQN" discover || return
  step "node record" node_setup || return
  step "login" login || return
  step "disk appears after login" wait_disk || return
  step "mkfs.ext4" mkfs.ext4 -F -q "/dev/$DISK" || return
  step "mount #1" mount -t ext4 "/dev/$DISK" /mnt/t || return
  step "stop signal listener on :$STOP_PORT" start_stop_listener || return
  step "write and fsync files until the host's rolling restart is done, sha256 manifest on the fs" write_phase_until_stopped
  step "sync" sync
  step "umount #1" umount /mnt/t || return
  step "e2fsck -fn: filesystem clean after the rolling restart" e2fsck -fn "/dev/$DISK"
  drop_caches
  if step "mount #2" mount -t ext4 "/dev/$DISK" /mnt/t; then
    step "manifests intact, every sha256 verified" verify_manifests
    step "umount #2" umount /mnt/t
  fi
  step "logout, disk gone" logout
  expect_conn_errors
}

main_storage_kill() {
  say "INFO guest: kernel $(uname -r); target $IQN at $PORTAL; scenario storage-kill, writing ${WRITE_SECS}s"
  step "guest boot (modules, network)" boot || return
  step "iscsid started" start_iscsid || return
  step "discovery lists $IQN" discover || return
  step "node record" node_setup || return
  step "login" login || return
  step "disk appears after login" wait_disk || return
  step "mkfs.ext4" mkfs.ext4 -F -q "/dev/$DISK" || return
  step "mount #1" mount -t ext4 "/dev/$DISK" /mnt/t || return
  step "write and fsync files for ${WRITE_SECS}s, sha256 manifest on the fs" write_phase
  step "sync" sync
  step "umount #1" umount /mnt/t || return
  step "e2fsck -fn: filesystem clean after the storage daemon kill" e2fsck -fn "/dev/$DISK"
  drop_caches
  if step "mount #2" mount -t ext4 "/dev/$DISK" /mnt/t; then
    step "manifests intact, every sha256 verified" verify_manifests
    step "umount #2" umount /mnt/t
  fi
  step "logout, disk gone" logout
}

# ---- csi-node: the host drives the CSI node plugin through its gRPC port -------
# The plugin logs in, makes filesystems and mounts by itself; the command channel
# lets the host look at the result (files, df, iscsiadm -m session). Both ports
# are forwarded to the host's 127.0.0.1 only.
start_csi() {
  mkdir -p /run/csi-state /var/lib/kubelet || return 1
  RUST_LOG=info NO_COLOR=1 ironsan csi --mode node --endpoint "tcp://0.0.0.0:$CSI_PORT" \
    --node-id dev --portal "$PORTAL" --state-dir /run/csi-state > /tmp/csi.log 2>&1 &
  CSI_PID=$!
  i=0
  while ! grep -q 'CSI driver serving' /tmp/csi.log; do
    kill -0 $CSI_PID 2>/dev/null || { cat /tmp/csi.log; return 1; }
    [ $i -lt 600 ] || { echo "not serving after 60s"; cat /tmp/csi.log; return 1; }
    usleep 100000; i=$((i + 1))
  done
  cat /tmp/csi.log
}

# One shell script per connection (busybox nc -ll forks per connection): read
# until the host half-closes, run it, answer its output and "IVM-RC=<status>".
start_shell() {
  cat > /etc/ivm-shell <<'EOF'
#!/bin/sh
f=/tmp/ivm-shell.$$
cat > $f
sh $f 2>&1
echo "IVM-RC=$?"
rm -f $f
EOF
  chmod 755 /etc/ivm-shell || return 1
  nc -ll -p "$SHELL_PORT" -e /etc/ivm-shell > /tmp/shell.log 2>&1 &
  SHELL_PID=$!
  usleep 300000
  kill -0 $SHELL_PID || { cat /tmp/shell.log; return 1; }
}

# The host creates /tmp/ivm-stop (through the channel) when it is done.
wait_for_host() {
  _t0=$(now)
  while [ ! -e /tmp/ivm-stop ]; do
    awk -v a="$_t0" -v b="$(now)" -v m="$CSI_SECS" 'BEGIN{exit !(b - a < m)}' \
      || { echo "the host did not finish within ${CSI_SECS}s"; return 1; }
    sleep 1
  done
  echo "the host finished after $(awk -v a="$_t0" -v b="$(now)" 'BEGIN{printf "%.0f", b - a}')s"
}

no_sessions() { iscsiadm -m session; [ $? -eq 21 ]; }   # 21: no active sessions
stop_csi() {
  kill -TERM $CSI_PID; wait $CSI_PID; _r=$?
  echo "exit status $_r"; [ $_r -eq 0 ]
}

main_csi_node() {
  say "INFO guest: kernel $(uname -r); CSI node plugin against the gateway at $PORTAL"
  step "guest boot (modules, network)" boot || return
  step "iscsid started" start_iscsid || return
  step "csi node plugin serving on :$CSI_PORT" start_csi || return
  step "command channel on :$SHELL_PORT" start_shell || return
  say "INFO csi-node ready"
  step "host finished its CSI calls" wait_for_host
  step "csi plugin still running" kill -0 $CSI_PID
  step "no iSCSI session left" no_sessions
  step "no staging record left" sh -c '[ -z "$(ls /run/csi-state)" ]'
  step "csi plugin stopped by SIGTERM, exit status 0" stop_csi
  step "csi plugin log has no panic" sh -c '! grep -q panicked /tmp/csi.log'
  echo "== csi plugin log"; sed 's/^/  csi| /' /tmp/csi.log
}

main() {
  AUTH=none; [ -n "$CHAP_USER" ] && AUTH=CHAP; [ -n "$MUTUAL_USER" ] && AUTH="mutual CHAP"
  say "INFO guest: kernel $(uname -r); target $IQN at $PORTAL; auth: $AUTH"
  step "guest boot (modules, network)" boot || return
  step "iscsid started" start_iscsid || return
  step "discovery lists $IQN" discover || return
  step "node record (auth: $AUTH)" node_setup || return
  if [ -n "$CHAP_USER" ]; then step "login with wrong CHAP password refused" wrong_password; fi
  if [ -n "$MUTUAL_USER" ]; then step "login with wrong mutual CHAP secret refused" wrong_mutual; fi
  step "login #1" login || return
  step "disk appears after login #1" wait_disk || return
  if step "mkfs.ext4" mkfs.ext4 -F -q "/dev/$DISK" && step "mount #1" mount -t ext4 "/dev/$DISK" /mnt/t; then
    step "write files ($FILEMB MiB random + 51 small) and record sha256" write_files
    step "umount #1" umount /mnt/t && step "e2fsck -fn: filesystem clean" e2fsck -fn "/dev/$DISK"
  fi
  step "logout #1, disk gone" logout || return
  drop_caches
  step "login #2" login || return
  step "disk appears after login #2" wait_disk || return
  if step "mount #2" mount -t ext4 "/dev/$DISK" /mnt/t; then
    step "all sha256 sums verified after re-login" verify_files
    step "umount #2" umount /mnt/t
  fi
  step "logout #2, disk gone" logout
}

case "$SCENARIO" in
  storage-kill) main_storage_kill ;;
  rolling-upgrade) main_rolling_upgrade ;;
  csi-node) main_csi_node ;;
  *) main ;;
esac
step "kernel log clean" klog_clean
[ $FAILED -gt 0 ] && { echo "== iscsid log"; cat /tmp/iscsid.log; }
echo "== dmesg"; dmesg
say "DONE passed=$PASSED failed=$FAILED"
sync
poweroff -f
