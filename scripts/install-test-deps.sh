#!/bin/bash
# install-test-deps.sh - install everything IronSAN's tests need on Debian 12 (bookworm).
# Idempotent: when everything is present it changes nothing and does not touch apt.
#
#   libiscsi-bin libiscsi-dev   iscsi-ls, iscsi-inq, iscsi-test-cu (+ headers for fio)
#   qemu-utils qemu-block-extra qemu-io / qemu-img with the iscsi:// driver; versions must match.
#                               If qemu-utils comes from bookworm-backports (as on the dev
#                               image), qemu-block-extra is taken from there too.
#   tgt sg3-utils fio jq        reference target, SCSI tools, benches
#   iproute2                    network namespaces for the manager's partition tests
#   xfsprogs util-linux         mkfs.xfs, xfs_growfs, blkid, mount for the CSI node plugin's VM test
#   etcd-server                 the peer of benches/manager.sh
#   mmdebstrap                  the image's runtime stage without a container engine (cli/tests/deploy.rs)
#   kubernetes-validate         PyPI, in the venv /opt/ironsan-venv: the manifests' offline schema check
#   fio build deps              dpkg-dev gcc make pkg-config libaio-dev zlib1g-dev libnbd-dev
#   build deps                  scripts/install-build-deps.sh (librocksdb-dev, libclang-dev)
#   cargo-fuzz, cargo-nextest   `cargo install` when missing
# With --bench it also builds fio with the libiscsi engine (scripts/build-fio-libiscsi.sh).
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
PROG=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)

usage() {
    cat <<EOF
Usage: $PROG [--bench] [--no-cargo-tools] [-h]
  --bench           also build fio with the libiscsi engine (for benches/, ~1-2 min once, cached)
  --no-cargo-tools  do not cargo-install cargo-fuzz / cargo-nextest
Run as root on Debian 12.
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }
log() { echo "== $PROG: $*"; }

BENCH=0 CARGO_TOOLS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --bench) BENCH=1; shift;;
        --no-cargo-tools) CARGO_TOOLS=0; shift;;
        -h|--help) usage; exit 0;;
        *) usage >&2; die "unknown argument: $1";;
    esac
done

PKGS=(libiscsi-bin libiscsi-dev tgt sg3-utils fio jq coreutils procps
      dpkg-dev gcc make pkg-config libaio-dev zlib1g-dev libnbd-dev
      open-iscsi busybox-static e2fsprogs xfsprogs util-linux kmod cpio zstd iproute2 etcd-server mmdebstrap)

"$HERE/install-build-deps.sh" || die "installing the build dependencies failed"

installed_version() { dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null | awk '$1 == "installed" {print $2}'; }

missing=()
for p in "${PKGS[@]}"; do
    [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
QU=$(installed_version qemu-utils)
QB=$(installed_version qemu-block-extra)
QS=$(installed_version qemu-system-x86)
qemu_ok=0
[ -n "$QU" ] && [ "$QU" = "$QB" ] && [ "$QU" = "$QS" ] && qemu_ok=1

if [ ${#missing[@]} -eq 0 ] && [ "$qemu_ok" = 1 ]; then
    log "Debian packages present (qemu-utils = qemu-block-extra = $QU)"
else
    [ "$(id -u)" = 0 ] || die "missing Debian packages and not root. Run as root, or: apt-get install ${missing[*]:-} qemu-utils qemu-block-extra"
    . /etc/os-release
    CODENAME=${VERSION_CODENAME:-}
    BPO=""
    if [ "$CODENAME" = bookworm ]; then
        BPO=bookworm-backports
        if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            log "adding $BPO to /etc/apt/sources.list.d/ironsan-bookworm-backports.list"
            echo "deb http://deb.debian.org/debian bookworm-backports main" \
                > /etc/apt/sources.list.d/ironsan-bookworm-backports.list
        fi
    fi
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" || die "apt-get install ${missing[*]} failed"
    fi
    if [ "$qemu_ok" = 0 ]; then
        if [ -n "$QU" ]; then
            # qemu-utils is installed (from backports or not): take the block modules of exactly
            # that version from whichever suite carries it.
            log "apt-get install qemu-block-extra=$QU qemu-system-x86=$QU (matching qemu-utils)"
            apt-get install -y -qq --no-install-recommends ${BPO:+-t "$BPO"} "qemu-block-extra=$QU" "qemu-system-x86=$QU" \
                || die "could not install qemu-block-extra=$QU qemu-system-x86=$QU to match qemu-utils $QU"
        elif [ -n "$BPO" ]; then
            log "apt-get install -t $BPO qemu-utils qemu-block-extra qemu-system-x86"
            apt-get install -y -qq --no-install-recommends -t "$BPO" qemu-utils qemu-block-extra qemu-system-x86 \
                || die "apt-get install -t $BPO qemu-utils qemu-block-extra qemu-system-x86 failed"
        else
            apt-get install -y -qq --no-install-recommends qemu-utils qemu-block-extra qemu-system-x86 \
                || die "apt-get install qemu-utils qemu-block-extra qemu-system-x86 failed"
        fi
    fi
    QU=$(installed_version qemu-utils) QB=$(installed_version qemu-block-extra) QS=$(installed_version qemu-system-x86)
    [ -n "$QU" ] && [ "$QU" = "$QB" ] && [ "$QU" = "$QS" ] \
        || die "qemu-utils ($QU), qemu-block-extra ($QB) and qemu-system-x86 ($QS) versions differ"
fi
ls /usr/lib/*/qemu/block-iscsi.so >/dev/null 2>&1 || die "qemu's block-iscsi.so is missing after installing qemu-block-extra"

# kubernetes-validate (PyPI) carries the Kubernetes OpenAPI schemas; deploy/tests/manifests.rs
# runs it from this venv. Debian's python3 needs python3-venv for `-m venv`.
KV_VERSION=1.37.0
VENV=/opt/ironsan-venv
if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" = "$KV_VERSION" ]; then
    log "kubernetes-validate $KV_VERSION present"
else
    [ "$(id -u)" = 0 ] || die "kubernetes-validate missing and not root"
    if ! python3 -m venv --clear "$VENV" >/dev/null 2>&1; then
        log "apt-get install python3-venv"
        apt-get install -y -qq --no-install-recommends python3-venv python3-pip \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv python3-pip; } \
            || die "apt-get install python3-venv failed"
        /usr/bin/python3 -m venv --clear "$VENV" || die "python3 -m venv $VENV failed"
    fi
    log "pip install kubernetes-validate==$KV_VERSION into $VENV"
    "$VENV/bin/pip" install -q "kubernetes-validate==$KV_VERSION" || die "pip install kubernetes-validate failed"
fi

if [ "$CARGO_TOOLS" = 1 ]; then
    command -v cargo >/dev/null || die "cargo not found in PATH (install Rust stable with rustup)"
    if cargo fuzz --version >/dev/null 2>&1; then
        log "$(cargo fuzz --version) present"
    else
        log "cargo install cargo-fuzz"
        cargo install --locked cargo-fuzz || die "cargo install cargo-fuzz failed"
    fi
    if cargo nextest --version >/dev/null 2>&1; then
        log "$(cargo nextest --version | head -1) present"
    else
        log "cargo install cargo-nextest"
        cargo install --locked cargo-nextest || die "cargo install cargo-nextest failed"
    fi
    for c in fmt clippy; do
        cargo "$c" --version >/dev/null 2>&1 || rustup component add "$( [ $c = fmt ] && echo rustfmt || echo clippy )" \
            || die "cargo $c missing: rustup component add $( [ $c = fmt ] && echo rustfmt || echo clippy )"
    done
fi

if [ "$BENCH" = 1 ]; then
    "$HERE/build-fio-libiscsi.sh"
fi
log "done"
