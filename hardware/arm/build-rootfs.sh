#!/usr/bin/env bash
# Build (once) an arm64 Debian bookworm root filesystem holding the agent's runtime dependencies, as a cached
# tarball; print its path on stdout.
#
#   debootstrap --arch=arm64 --variant=minbase bookworm (+ python3), run through qemu-user-static (binfmt);
#   the agent's dependencies from aarch64 wheels (hardware/arm/requirements.in, each pinned to the version in the
#   x86 venv) installed by the host's pip into /opt/edgefleet/site (no pip, no network inside the emulation).
#
# The tarball is keyed on those pins, the Debian suite and this script: $ARM_CACHE/rootfs-<key>.tar.gz. A new key
# builds a new tarball and removes the old ones. FORCE=1 rebuilds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ensure_tools
mkdir -p "$ARM_CACHE"

# Pin every requirement to the x86 venv's version, so both sides of the comparison run the same releases.
pins="$("$VENV_PY" - "$ARM_DIR/requirements.in" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for line in open(sys.argv[1]):
    name = line.split("#")[0].strip()
    if name:
        try:
            print(f"{name}=={version(name)}")
        except PackageNotFoundError:
            sys.exit(f"test-arm: {name} (hardware/arm/requirements.in) is not installed in the x86 venv")
EOF
)"
key="$( { echo "$SUITE"; echo "$pins"; cat "$ARM_DIR/build-rootfs.sh"; } | sha256sum | cut -c1-16)"
tarball="$ARM_CACHE/rootfs-$key.tar.gz"
if [[ -s $tarball && -z ${FORCE:-} ]]; then
    say "cached root filesystem $tarball"
    echo "$tarball"
    exit 0
fi

ensure_binfmt
build="$ARM_CACHE/build-$key"
rm -rf "$build"
mkdir -p "$build"
start=$SECONDS
say "debootstrap $SUITE arm64 (minbase + python3) into $build/rootfs (a few minutes the first time)"
# In a private mount namespace: the /proc and /sys debootstrap mounts vanish with it, even on failure.
unshare --mount --propagation private \
    debootstrap --arch=arm64 --variant=minbase --include=python3,libstdc++6 \
    "$SUITE" "$build/rootfs" "$MIRROR" >"$build/debootstrap.log" 2>&1 \
    || { tail -20 "$build/debootstrap.log" >&2; die "debootstrap failed (full log: $build/debootstrap.log)"; }
[[ -x $build/rootfs/usr/bin/python3 ]] || die "debootstrap finished without python3"
pyver="$(chroot "$build/rootfs" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
say "rootfs ready in $((SECONDS - start)) s (python $pyver); installing aarch64 wheels:" $pins

# manylinux tags up to bookworm's glibc 2.36 (pip does not expand a perennial tag to older ones by itself).
platforms=(--platform manylinux2014_aarch64)
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
# shellcheck disable=SC2086  # $pins: one requirement per word
"$VENV_PY" -m pip install -qq --disable-pip-version-check --no-warn-script-location \
    --target "$build/rootfs/opt/edgefleet/site" "${platforms[@]}" --implementation cp \
    --python-version "$pyver" --abi "cp${pyver/./}" --only-binary=:all: $pins \
    || die "pip could not install the aarch64 wheels of: $pins"
echo "$pins" >"$build/rootfs/opt/edgefleet/requirements.txt"

# Check the result under emulation once, before caching it.
chroot "$build/rootfs" /usr/bin/env PYTHONPATH=/opt/edgefleet/site /usr/bin/python3 -c \
    'import platform, numpy, cryptography, paho.mqtt; assert platform.machine() == "aarch64", platform.machine()' \
    || die "the new root filesystem cannot import the agent's dependencies under emulation"

say "packing $tarball"
tar -C "$build/rootfs" --numeric-owner -cf - . | gzip -1 >"$tarball.tmp"
mv "$tarball.tmp" "$tarball"
find "$ARM_CACHE" -maxdepth 1 -name 'rootfs-*.tar.gz' ! -name "rootfs-$key.tar.gz" -delete
rm -rf "$build"
say "root filesystem built and cached in $((SECONDS - start)) s"
echo "$tarball"
