#!/bin/bash
# run.sh - log the Linux kernel iSCSI initiator (open-iscsi + iscsi_tcp, in a
# qemu TCG guest) into an IronSAN target listening on this host's 127.0.0.1,
# put ext4 on the LUN, and check the files survive logout/login.
#
# usage: tests/vm/run.sh [--chap USER:SECRET] [--mutual-chap USER:SECRET]
#                        [--scenario basic|storage-kill] PORT IQN
#        tests/vm/run.sh --scenario rolling-upgrade --stop-port HOSTPORT PORT IQN
#        tests/vm/run.sh --scenario csi-node --csi-bin IRONSAN --csi-port HOSTPORT
#                        --shell-port HOSTPORT PORT [IQN]
#
# The guest reaches the host's 127.0.0.1 as 10.0.2.2 (qemu user networking).
# Scenario basic (the default): files written, logout/login, verified.
# Scenario storage-kill: files written and fsynced for IRONSAN_VM_WRITE_SECS
# (the guest prints "IVM INFO write phase started" when it begins, so that the
# caller can kill a storage daemon meanwhile), then e2fsck and verification.
# Scenario rolling-upgrade: the same writers (plus a probe timing a 4 KiB write
# + fsync every 0.5 s) run until the host connects to 127.0.0.1:--stop-port
# (forwarded to guest port 10002; the guest answers "IVM-STOP-OK") or for at
# most IRONSAN_VM_WRITE_SECS, while the host restarts every daemon in turn.
# Scenario csi-node: the guest runs IRONSAN (`ironsan csi --mode node`, node id
# dev, portal 10.0.2.2:PORT) on guest port 10000, forwarded to the host's
# 127.0.0.1:--csi-port, and a command channel (busybox nc -e sh: one shell
# script per connection, its output and "IVM-RC=<status>" back) on guest port
# 10001, forwarded to 127.0.0.1:--shell-port; it announces "IVM INFO csi-node
# ready" and waits until the host creates /tmp/ivm-stop in the guest (or
# IRONSAN_VM_CSI_SECS pass), then checks that no iSCSI session is left, that
# the plugin stops on SIGTERM, and the kernel log. The host drives the rest
# (cli/tests/csi_vm.rs).
# THE LUN'S CONTENTS ARE OVERWRITTEN. Output: one "PASS name" / "FAIL name"
# line per step (plus INFO lines), last line "N passed, N failed".
# Exit status 0 only if every step passed and at least one ran.
# Needs root (apt-get, /var/cache) unless the host packages are installed and
# IRONSAN_VM_CACHE points somewhere writable. Knobs: see README.md.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TIMEOUT=${IRONSAN_VM_TIMEOUT:-600}
CACHE=${IRONSAN_VM_CACHE:-/var/cache/ironsan-vm}
MEM=${IRONSAN_VM_MEM:-512}
SMP=${IRONSAN_VM_SMP:-2}
FILEMB=${IRONSAN_VM_FILEMB:-8}
WRITE_SECS=${IRONSAN_VM_WRITE_SECS:-25}
LOG_DIR=${IRONSAN_VM_LOG_DIR:-}
CSI_SECS=${IRONSAN_VM_CSI_SECS:-540}
HOST_PKGS=(qemu-system-x86 open-iscsi busybox-static e2fsprogs xfsprogs util-linux mount kmod cpio zstd)
# kernel modules the guest loads (modprobe resolves their dependencies)
MODULES=(virtio_pci virtio_net crc32c_generic iscsi_tcp sd_mod ext4 xfs)
# the guest's tools: busybox for the rest; util-linux's mount and blkid as on a real node
GUEST_BINS=(/usr/bin/busybox /usr/sbin/iscsid /usr/sbin/iscsiadm /usr/sbin/mke2fs /usr/sbin/e2fsck
            /usr/sbin/resize2fs /usr/sbin/mkfs.xfs /usr/sbin/xfs_growfs
            /usr/sbin/blkid /usr/bin/mount /usr/bin/umount)
CSI_GUEST_PORT=10000 SHELL_GUEST_PORT=10001 STOP_GUEST_PORT=10002

usage() {
  echo "usage: $0 [--chap USER:SECRET] [--mutual-chap USER:SECRET] [--scenario basic|storage-kill] PORT IQN" >&2
  echo "       $0 --scenario rolling-upgrade --stop-port HOSTPORT PORT IQN" >&2
  echo "       $0 --scenario csi-node --csi-bin IRONSAN --csi-port HOSTPORT --shell-port HOSTPORT PORT [IQN]" >&2
}
# every exit path ends with the summary line, so callers can always parse it
die() { echo "FAIL setup: $*"; echo "0 passed, 1 failed"; exit 1; }
log() { echo "run.sh: $*" >&2; }

CHAP= MUTUAL= SCENARIO=basic CSI_BIN= CSI_PORT= SHELL_PORT= STOP_PORT=
while [ $# -gt 0 ]; do
  case "$1" in
    --chap) [ $# -ge 2 ] || { usage; die "--chap needs USER:SECRET"; }; CHAP=$2; shift 2 ;;
    --chap=*) CHAP=${1#*=}; shift ;;
    --mutual-chap) [ $# -ge 2 ] || { usage; die "--mutual-chap needs USER:SECRET"; }; MUTUAL=$2; shift 2 ;;
    --mutual-chap=*) MUTUAL=${1#*=}; shift ;;
    --scenario) [ $# -ge 2 ] || { usage; die "--scenario needs a name"; }; SCENARIO=$2; shift 2 ;;
    --scenario=*) SCENARIO=${1#*=}; shift ;;
    --csi-bin|--csi-port|--shell-port|--stop-port)
      [ $# -ge 2 ] || { usage; die "$1 needs a value"; }
      case "$1" in --csi-bin) CSI_BIN=$2 ;; --csi-port) CSI_PORT=$2 ;; --shell-port) SHELL_PORT=$2 ;; --stop-port) STOP_PORT=$2 ;; esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) usage; die "unknown option $1" ;;
    *) break ;;
  esac
done
# csi-node needs no IQN: the host's CSI calls name the volumes
[ "$SCENARIO" = csi-node ] && [ $# -eq 1 ] && set -- "$1" iqn.2026-11.io.ironsan:unused
[ $# -eq 2 ] || { usage; die "expected PORT and IQN"; }
PORT=$1 IQN=$2
port_ok() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
port_ok "$PORT" || die "bad PORT '$PORT'"
[[ "$IQN" =~ ^[a-z0-9][a-z0-9.:-]*$ ]] || die "bad IQN '$IQN'"
case "$SCENARIO" in basic|storage-kill|rolling-upgrade|csi-node) ;; *) usage; die "unknown scenario '$SCENARIO'" ;; esac
if [ "$SCENARIO" = rolling-upgrade ]; then
  port_ok "$STOP_PORT" || die "rolling-upgrade needs --stop-port HOSTPORT, got '$STOP_PORT'"
fi
if [ "$SCENARIO" = csi-node ]; then
  [ -n "$CSI_BIN" ] && [ -x "$CSI_BIN" ] || die "csi-node needs --csi-bin (an ironsan binary), got '$CSI_BIN'"
  port_ok "$CSI_PORT" || die "csi-node needs --csi-port HOSTPORT, got '$CSI_PORT'"
  port_ok "$SHELL_PORT" || die "csi-node needs --shell-port HOSTPORT, got '$SHELL_PORT'"
  # the plugin (a debug build with librocksdb) and xfs need more room than the default
  MEM=${IRONSAN_VM_MEM:-1024}
fi
for v in TIMEOUT MEM SMP FILEMB WRITE_SECS CSI_SECS; do [[ "${!v}" =~ ^[0-9]+$ ]] || die "IRONSAN_VM_$v must be a number"; done
[ -z "$CHAP" ] || [[ "$CHAP" == ?*:?* ]] || die "--chap wants USER:SECRET"
[ -z "$MUTUAL" ] || [[ "$MUTUAL" == ?*:?* ]] || die "--mutual-chap wants USER:SECRET"
[ -z "$MUTUAL" ] || [ -n "$CHAP" ] || die "--mutual-chap needs --chap too"

if [ -z "$LOG_DIR" ]; then LOG_DIR=$(mktemp -d /tmp/ironsan-vm.XXXXXX) || die "mktemp failed"; fi
mkdir -p "$LOG_DIR" && chmod 700 "$LOG_DIR" || die "cannot create $LOG_DIR"
T0=$SECONDS

# ---- host packages ----------------------------------------------------------
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >> "$LOG_DIR/apt.log" 2>&1; }
# A qemu-utils from another suite (here: bookworm-backports) Breaks the
# default qemu-system-common; take qemu-system-x86 from qemu-utils' suite.
qemu_from_utils_suite() {
  installed qemu-utils || return 1
  local v rel
  v=$(dpkg-query -W -f='${Version}' qemu-utils)
  rel=$(apt-cache madison qemu-utils | awk -F' [|] ' -v v="$v" '$2 == v {split($3, a, " "); sub("/.*", "", a[2]); print a[2]; exit}')
  [ -n "$rel" ] || return 1
  log "retrying qemu-system-x86 from $rel (the suite of the installed qemu-utils $v)"
  QEMU_CMD="apt-get install -y --no-install-recommends -t $rel qemu-system-x86"
  apt_install -t "$rel" qemu-system-x86
}
ensure_packages() {
  local missing=() p rest=()
  for p in "${HOST_PKGS[@]}"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local cmd="apt-get install -y --no-install-recommends ${missing[*]}"
  [ "$(id -u)" = 0 ] || die "host packages missing; as root run: $cmd"
  log "installing ${missing[*]} (log: $LOG_DIR/apt.log)"
  apt_install "${missing[@]}" && return 0
  apt-get update >> "$LOG_DIR/apt.log" 2>&1
  apt_install "${missing[@]}" && return 0
  for p in "${missing[@]}"; do [ "$p" = qemu-system-x86 ] || rest+=("$p"); done
  if [ ${#rest[@]} -lt ${#missing[@]} ]; then
    QEMU_CMD=
    { [ ${#rest[@]} -eq 0 ] || apt_install "${rest[@]}"; } && qemu_from_utils_suite && return 0
    [ -n "$QEMU_CMD" ] && cmd="$cmd  (and also failed: $QEMU_CMD)"
  fi
  tail -n 5 "$LOG_DIR/apt.log" >&2
  die "cannot install host packages; this failed: $cmd"
}

kernel_deb() {
  if [ -n "${IRONSAN_VM_KERNEL_DEB:-}" ]; then
    [ -f "$IRONSAN_VM_KERNEL_DEB" ] || die "IRONSAN_VM_KERNEL_DEB=$IRONSAN_VM_KERNEL_DEB does not exist"
    echo "$IRONSAN_VM_KERNEL_DEB"; return
  fi
  local f pkg
  mkdir -p "$CACHE/debs"
  f=$(ls -1 "$CACHE"/debs/linux-image-*.deb 2>/dev/null | sort -V | tail -n1)
  [ -n "$f" ] && { echo "$f"; return; }
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update >> "$LOG_DIR/apt.log" 2>&1
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 (apt-get update failed?)"
  log "downloading $pkg"
  (cd "$CACHE/debs" && apt-get download "$pkg" >> "$LOG_DIR/apt.log" 2>&1) \
    || die "kernel download failed: (cd $CACHE/debs && apt-get download $pkg)"
  ls -1 "$CACHE/debs/${pkg}"_*.deb | tail -n1
}

# ---- guest image (kernel + initramfs of this host's binaries) ----------------
# copy_libs BINARY ROOT: the shared libraries BINARY loads, into ROOT under their
# real directories (/lib is a symlink into /usr on this host and in the guest: a
# directory of that name in an appended archive would replace the guest's link).
copy_libs() {
  local lib dst
  for lib in $(ldd "$1" 2>/dev/null | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}'); do
    dst=$(readlink -f "${lib%/*}")/${lib##*/}
    [ -e "$2$dst" ] || { mkdir -p "$2${dst%/*}" && cp -L "$lib" "$2$dst"; } || return 1
  done
}
# Builds $1/vmlinuz and $1/base.img from kernel .deb $2. Its own text is part
# of the cache key, so editing it rebuilds the image.
build_image() {
  local out=$1 kdeb=$2 w kver r
  w=$(mktemp -d "$CACHE/build.XXXXXX") || return 1
  dpkg-deb -x "$kdeb" "$w/k" || return 1
  [ -d "$w/k/lib/modules" ] || ln -s usr/lib "$w/k/lib"
  kver=$(ls "$w/k/lib/modules" | head -n1)
  depmod -b "$w/k" "$kver" || return 1
  r=$w/root
  mkdir -p "$r"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc/iscsi,etc/ivm,proc,sys,dev,run,tmp,mnt}
  ln -s usr/bin "$r/bin"; ln -s usr/sbin "$r/sbin"; ln -s usr/lib "$r/lib"; ln -s usr/lib64 "$r/lib64"
  ln -s ../run "$r/var"
  local m src rel
  for m in "${MODULES[@]}"; do
    modprobe -d "$w/k" -S "$kver" --show-depends "$m" || { echo "no module $m in $kver" >&2; return 1; }
  done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' > "$w/mods"
  while read -r src; do   # uncompressed copies, so busybox insmod can load them
    rel=${src##*/}; rel=${rel%.xz}; rel=${rel%.zst}
    case "$src" in
      *.ko.xz) xz -dc "$src" > "$r/etc/ivm/$rel" ;;
      *.ko.zst) zstd -qdc "$src" > "$r/etc/ivm/$rel" ;;
      *) cp "$src" "$r/etc/ivm/$rel" ;;
    esac || return 1
    echo "/etc/ivm/$rel" >> "$r/etc/ivm/modules"
  done < "$w/mods"
  local b
  for b in "${GUEST_BINS[@]}"; do
    cp "$b" "$r$b" && copy_libs "$b" "$r" || return 1
  done
  ln -s mke2fs "$r/usr/sbin/mkfs.ext4"
  ln -s e2fsck "$r/usr/sbin/fsck.ext4"
  "$r/usr/bin/busybox" --list-full | while read -r a; do [ -e "$r/$a" ] || ln -s /usr/bin/busybox "$r/$a"; done
  echo 'root:x:0:0:root:/:/bin/sh' > "$r/etc/passwd"
  ln -s /proc/mounts "$r/etc/mtab"
  cp /etc/mke2fs.conf "$r/etc/" || return 1
  sed 's|^iscsid.startup *=.*|iscsid.startup = /sbin/iscsid|' /etc/iscsi/iscsid.conf > "$r/etc/iscsi/iscsid.conf" || return 1
  cp "$w/k/boot/vmlinuz-$kver" "$out/vmlinuz" || return 1
  (cd "$r" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | zstd -q -T0 -3 > "$out/base.img" || return 1
  echo "kernel $kver, $(wc -l < "$r/etc/ivm/modules") modules, initramfs $(( $(stat -c %s "$out/base.img") / 1048576 )) MiB" > "$out/info"
  rm -rf "$w"
}

ensure_image() {
  mkdir -p "$CACHE" || die "cannot create $CACHE (set IRONSAN_VM_CACHE)"
  exec 8> "$CACHE/.lock" && flock 8 || die "cannot lock $CACHE/.lock"
  local kdeb key
  # kernel_deb's die writes its FAIL lines into $kdeb: pass them on
  kdeb=$(kernel_deb) || { printf '%s\n' "$kdeb"; exit 1; }
  key=$( { declare -f build_image copy_libs; echo "${MODULES[*]} ${GUEST_BINS[*]}"; basename "$kdeb"; stat -c %s "$kdeb"
           dpkg-query -W open-iscsi busybox-static e2fsprogs xfsprogs util-linux mount libc6 kmod; } | sha256sum | cut -c1-16)
  IMG=$CACHE/img-$key
  if [ ! -f "$IMG/ok" ]; then
    log "building guest image $IMG from $(basename "$kdeb")"
    rm -rf "$IMG" "$CACHE"/build.*; mkdir -p "$IMG"
    build_image "$IMG" "$kdeb" >> "$LOG_DIR/build.log" 2>&1 || { tail -n 5 "$LOG_DIR/build.log" >&2; rm -rf "$IMG"; die "guest image build failed (see $LOG_DIR/build.log)"; }
    touch "$IMG/ok"
    for d in "$CACHE"/img-*; do [ "$d" = "$IMG" ] || rm -rf "$d"; done
    log "built in $((SECONDS - T0))s: $(cat "$IMG/info")"
  fi
  exec 8>&-
}

# ---- run ----------------------------------------------------------------------
timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null \
  || die "nothing listens on 127.0.0.1:$PORT (start the target first)"
ensure_packages
ensure_image

# Per-run parameters (incl. secrets) and the guest script go into a small
# uncompressed cpio appended to the cached initramfs; the kernel unpacks both.
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
OV=$LOG_DIR/overlay
rm -rf "$OV"; mkdir -p "$OV/etc" || die "cannot create $OV"
install -m 755 "$HERE/guest-init.sh" "$OV/init" || die "cannot copy guest-init.sh"
{
  echo "PORT=$PORT IQN=$IQN HOST=10.0.2.2 FILEMB=$FILEMB SCENARIO=$SCENARIO WRITE_SECS=$WRITE_SECS"
  echo "CSI_PORT=$CSI_GUEST_PORT SHELL_PORT=$SHELL_GUEST_PORT CSI_SECS=$CSI_SECS STOP_PORT=$STOP_GUEST_PORT"
  echo "CHAP_USER=$(sq "${CHAP%%:*}") CHAP_SECRET=$(sq "${CHAP#*:}")"
  echo "MUTUAL_USER=$(sq "${MUTUAL%%:*}") MUTUAL_SECRET=$(sq "${MUTUAL#*:}")"
} > "$OV/etc/ivm.conf"
[ -n "$CHAP" ] || sed -i 's/^CHAP_USER=.*/CHAP_USER= CHAP_SECRET=/' "$OV/etc/ivm.conf"
[ -n "$MUTUAL" ] || sed -i 's/^MUTUAL_USER=.*/MUTUAL_USER= MUTUAL_SECRET=/' "$OV/etc/ivm.conf"
if [ "$SCENARIO" = csi-node ]; then
  # the plugin changes with every build, so it rides in the per-run archive (stripped: it
  # is loaded into guest RAM), with the libraries it loads
  mkdir -p "$OV/usr/bin" || die "cannot create $OV/usr/bin"
  strip -o "$OV/usr/bin/ironsan" "$CSI_BIN" 2>/dev/null || cp "$CSI_BIN" "$OV/usr/bin/ironsan" || die "cannot copy $CSI_BIN"
  copy_libs "$CSI_BIN" "$OV" || die "cannot copy the libraries of $CSI_BIN"
fi
INITRD=$LOG_DIR/initrd.img
{
  cat "$IMG/base.img"
  # the next archive must start 4-byte aligned; the kernel skips zero padding
  head -c $(( (512 - $(stat -c %s "$IMG/base.img") % 512) % 512 )) /dev/zero
  (cd "$OV" && find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
} > "$INITRD" || die "cannot write $INITRD"
rm -rf "$OV"

CONSOLE=$LOG_DIR/console.log RESULTS=$LOG_DIR/results.log
: > "$CONSOLE"; : > "$RESULTS"
AUTH=none; [ -n "$CHAP" ] && AUTH="CHAP user ${CHAP%%:*}"; [ -n "$MUTUAL" ] && AUTH="$AUTH, mutual user ${MUTUAL%%:*}"
NET=user,id=n0
if [ "$SCENARIO" = csi-node ]; then
  # host side bound to 127.0.0.1 only: the command channel is a root shell in the guest
  NET="$NET,hostfwd=tcp:127.0.0.1:$CSI_PORT-:$CSI_GUEST_PORT,hostfwd=tcp:127.0.0.1:$SHELL_PORT-:$SHELL_GUEST_PORT"
  echo "INFO vm: scenario csi-node, gateway 127.0.0.1:$PORT, CSI on 127.0.0.1:$CSI_PORT, shell on 127.0.0.1:$SHELL_PORT; $(cat "$IMG/info"); limit ${TIMEOUT}s; logs $LOG_DIR"
elif [ "$SCENARIO" = rolling-upgrade ]; then
  # the stop signal only: the guest answers it and ends its write phase
  NET="$NET,hostfwd=tcp:127.0.0.1:$STOP_PORT-:$STOP_GUEST_PORT"
  echo "INFO vm: scenario $SCENARIO, $IQN at 127.0.0.1:$PORT, stop signal on 127.0.0.1:$STOP_PORT; $(cat "$IMG/info"); limit ${TIMEOUT}s; logs $LOG_DIR"
else
  echo "INFO vm: scenario $SCENARIO, $IQN at 127.0.0.1:$PORT, auth: $AUTH; $(cat "$IMG/info"); limit ${TIMEOUT}s; logs $LOG_DIR"
fi
T_BOOT=$SECONDS
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp "$SMP" -m "$MEM" \
  -nodefaults -no-user-config -display none -no-reboot -monitor none \
  -serial "file:$CONSOLE" -serial "file:$RESULTS" \
  -kernel "$IMG/vmlinuz" -initrd "$INITRD" -append "console=ttyS0 panic=1 loglevel=4" \
  -netdev "$NET" -device virtio-net-pci,netdev=n0,romfile= \
  < /dev/null > "$LOG_DIR/qemu.out" 2>&1 &
QPID=$!
trap 'kill "$QPID" 2>/dev/null; rm -f "$INITRD"; echo "FAIL interrupted"; echo "0 passed, 1 failed"; exit 1' INT TERM

DONE=
while IFS= read -r line; do
  line=${line%$'\r'}
  case "$line" in
    "IVM DONE "*) DONE=${line#IVM DONE } ;;
    "IVM "*) echo "${line#IVM }" ;;
  esac
done < <(tail -n +1 -f --pid="$QPID" "$RESULTS" 2>/dev/null)
wait "$QPID"; QRC=$?
trap - INT TERM
rm -f "$INITRD"   # holds the CHAP secrets

PASSED=$(tr -d '\r' < "$RESULTS" | grep -ac '^IVM PASS ')
FAILED=$(tr -d '\r' < "$RESULTS" | grep -ac '^IVM FAIL ')
if [ -z "$DONE" ]; then
  FAILED=$((FAILED + 1))
  if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
    echo "FAIL VM finished within ${TIMEOUT}s (killed after $((SECONDS - T_BOOT))s)"
  else
    echo "FAIL VM finished (qemu exited with status $QRC before the guest reported DONE)"
  fi
  echo "---- last console lines ($CONSOLE)"; tr -d '\r' < "$CONSOLE" | tail -n 20
  [ -s "$LOG_DIR/qemu.out" ] && { echo "---- qemu.out"; tail -n 5 "$LOG_DIR/qemu.out"; }
elif [ "$DONE" != "passed=$PASSED failed=$FAILED" ]; then
  echo "FAIL result lines lost (guest says $DONE, host saw passed=$PASSED failed=$FAILED)"
  FAILED=$((FAILED + 1))
fi
echo "INFO vm: $((SECONDS - T0))s in total, $((SECONDS - T_BOOT))s of it in the VM; console log $CONSOLE"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
