#!/bin/bash
# install-build-deps.sh - the Debian packages `cargo build` needs for IronSAN (Debian 12).
# Idempotent: when they are present it changes nothing and does not touch apt.
#
#   librocksdb-dev   RocksDB 7.8, which the storage daemon links against (see .cargo/config.toml;
#                    the bundled C++ build would take ~12 minutes on two cores)
#   libclang-dev     bindgen, for librocksdb-sys
#   gcc pkg-config   C toolchain for the -sys crates
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive
PKGS=(librocksdb-dev libclang-dev gcc pkg-config)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "== ${0##*/}: build dependencies present"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "${0##*/}: error: missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 2
fi
echo "== ${0##*/}: apt-get install ${missing[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
