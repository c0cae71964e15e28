#!/bin/bash
# build-fio-libiscsi.sh - build fio with its libiscsi ioengine (Debian's fio package lacks it)
# from Debian's fio source package, using a private deb-src list and private apt state, so
# the system's apt configuration is untouched. Result, cached across runs:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/ironsan/fio-libiscsi/fio
# Prints the binary's path on the last line. Does nothing if a working binary is cached.
set -euo pipefail
export LC_ALL=C
PROG=${0##*/}

usage() {
    cat <<EOF
Usage: $PROG [--force] [--keep] [DEST_DIR]
  DEST_DIR  default \${XDG_CACHE_HOME:-\$HOME/.cache}/ironsan/fio-libiscsi
  --force   rebuild even if DEST_DIR/fio exists and has the libiscsi engine
  --keep    keep the build directory
Needs: apt-get install dpkg-dev gcc make pkg-config libiscsi-dev libaio-dev zlib1g-dev libnbd-dev
       (scripts/install-test-deps.sh installs them)
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }

FORCE=0 KEEP=0 DEST=""
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1; shift;;
        --keep) KEEP=1; shift;;
        -h|--help) usage; exit 0;;
        -*) usage >&2; die "unknown option: $1";;
        *) [ -z "$DEST" ] || { usage >&2; exit 2; }; DEST=$1; shift;;
    esac
done
DEST=${DEST:-${XDG_CACHE_HOME:-$HOME/.cache}/ironsan/fio-libiscsi}

has_engine() { [ -x "$1" ] && "$1" --enghelp 2>/dev/null | grep -qw libiscsi; }
if [ "$FORCE" = 0 ] && has_engine "$DEST/fio"; then
    echo "$PROG: cached: $("$DEST/fio" --version) with libiscsi engine"
    echo "$DEST/fio"
    exit 0
fi

missing=""
for item in dpkg-source:dpkg-dev gcc:gcc make:make pkg-config:pkg-config; do
    command -v "${item%%:*}" >/dev/null 2>&1 || missing="$missing ${item#*:}"
done
if command -v pkg-config >/dev/null 2>&1; then
    pkg-config --exists libiscsi || missing="$missing libiscsi-dev"
    pkg-config --exists libnbd || missing="$missing libnbd-dev"
    pkg-config --exists zlib || missing="$missing zlib1g-dev"
fi
[ -e /usr/include/libaio.h ] || missing="$missing libaio-dev"
[ -z "$missing" ] || die "missing build dependencies. Fix with:  apt-get install$missing   (or scripts/install-test-deps.sh)"

. /etc/os-release
CODENAME=${VERSION_CODENAME:-bookworm}
MIRROR=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
         /etc/apt/sources.list.d/*.list 2>/dev/null | head -1 | tr -d ' ' || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}

WORK=$(mktemp -d /tmp/ironsan-fio-build.XXXXXX)
[ "$KEEP" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/parts" "$WORK/apt/cache/archives/partial" "$WORK/src"
cat > "$WORK/apt/parts/debian-src.sources" <<EOF
Types: deb-src
URIs: $MIRROR
Suites: $CODENAME
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
APTO=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$WORK/apt/parts"
      -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache" -o APT::Sandbox::User=root)

echo "$PROG: [1/4] apt-get source fio ($MIRROR $CODENAME, private deb-src list)"
apt-get "${APTO[@]}" update -qq || die "apt-get update with the private deb-src list failed"
( cd "$WORK/src" && apt-get "${APTO[@]}" source fio ) > "$WORK/source.log" 2>&1 \
    || { cat "$WORK/source.log" >&2; die "apt-get source fio failed"; }
SRC=$(find "$WORK/src" -maxdepth 1 -type d -name 'fio-*' | head -1)
[ -n "$SRC" ] || die "no fio source tree after apt-get source"

echo "$PROG: [2/4] configure $(basename "$SRC") --enable-libiscsi"
( cd "$SRC" && ./configure --disable-native --enable-libiscsi --enable-libnbd ) > "$WORK/configure.log" 2>&1 \
    || { tail -20 "$WORK/configure.log" >&2; die "configure failed"; }
grep -q '^iscsi engine *yes' "$WORK/configure.log" \
    || { grep -i iscsi "$WORK/configure.log" >&2; die "configure did not enable the libiscsi engine"; }

echo "$PROG: [3/4] make -j$(nproc) fio"
( cd "$SRC" && make -j"$(nproc)" fio ) > "$WORK/make.log" 2>&1 || { tail -30 "$WORK/make.log" >&2; die "make failed"; }

echo "$PROG: [4/4] install to $DEST"
mkdir -p "$DEST"
install -m 0755 "$SRC/fio" "$DEST/fio"
has_engine "$DEST/fio" || die "the built fio lacks the libiscsi engine"
echo "$PROG: built $("$DEST/fio" --version) with libiscsi engine"
echo "$DEST/fio"
