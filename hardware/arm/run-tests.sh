#!/usr/bin/env bash
# `make test-arm`: the agent's tests on an emulated Raspberry Pi 4 (aarch64, Cortex-A72, Debian bookworm).
#
#  1. build-rootfs.sh: the cached arm64 root filesystem tarball with the agent's dependencies (once per pin
#     set), unpacked once next to it ($ARM_CACHE/rootfs-<key>/, kept read-only from then on);
#  2. in a private mount namespace: a fresh copy-on-write view of it (overlayfs, changes in a tmpfs that vanishes
#     with the namespace), a Pi 4's /proc/cpuinfo and CPU tree, the agent's code;
#  3. x86: x86_side.py prepare makes signed rpi4-aarch64 packages, inputs and the x86 run's outputs;
#  4. ARM: pytest on tests/arm inside it (chroot through qemu-user, QEMU_CPU=cortex-a72);
#  5. x86: x86_side.py check verifies the summary the ARM agent signed.
# What the ARM side wrote (out/) is copied to $ARM_CACHE/last-run/. Correctness only: emulated timings mean
# nothing. Extra pytest arguments: ARM_PYTEST_ARGS="-k summary".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -z ${_ARM_IN_NAMESPACE:-} ]]; then
    t0=$(date +%s)
    tarball="$(bash "$ARM_DIR/build-rootfs.sh")"
    ensure_binfmt
    lower="${tarball%.tar.gz}"
    if [[ ! -e $lower/.unpacked ]]; then
        say "unpacking $tarball (once per tarball)"
        rm -rf "$lower"
        mkdir -p "$lower"
        tar -C "$lower" -xzf "$tarball"
        touch "$lower/.unpacked"
    fi
    for old in "$ARM_CACHE"/rootfs-*/; do  # unpacked trees of older tarballs
        [[ ${old%/} == "$lower" ]] || rm -rf "${old%/}"
    done
    rm -rf "$ARM_CACHE/run"  # an earlier layout's leftovers; from now on only a mount point
    say "root filesystem ready in $(($(date +%s) - t0)) s"
    # The mounts below are private to this namespace and vanish with it, whatever happens.
    exec unshare --mount --propagation private /usr/bin/env _ARM_IN_NAMESPACE=1 ARM_LOWER="$lower" \
        ARM_T0="$t0" bash "${BASH_SOURCE[0]}"
fi

run="$ARM_CACHE/run"
rootfs="$run/rootfs"
mkdir -p "$run"
mount -t tmpfs -o size=4g edgefleet-arm "$run"
mkdir -p "$run/upper" "$run/ovl-work" "$rootfs"
mount -t overlay overlay -o "lowerdir=$ARM_LOWER,upperdir=$run/upper,workdir=$run/ovl-work" "$rootfs" \
    || die "cannot mount an overlay on $ARM_LOWER (overlayfs missing from this kernel?)"
mount --bind /dev "$rootfs/dev"
bash "$ARM_DIR/fake-pi4-cpu.sh" "$rootfs"

# The agent's code as a device would hold it (no packager, no server), and the ARM-side tests.
src="$rootfs/opt/edgefleet/src"
mkdir -p "$src/hardware" "$src/tests"
cp -r "$REPO/edgefleet_contracts" "$REPO/device_agent" "$src/"
cp -r "$REPO/hardware/targets" "$src/hardware/"
cp -r "$REPO/tests/arm" "$src/tests/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"$VENV_PY" -m compileall -q "$src"  # same bytecode magic as the rootfs's 3.11: spares each emulated start

work="$rootfs/opt/edgefleet/work"
say "x86: building signed rpi4-aarch64 packages and the x86 outputs"
"$VENV_PY" "$ARM_DIR/x86_side.py" prepare "$work"

say "ARM: pytest tests/arm under qemu-aarch64 ($QEMU_CPU)"
status=0
# No /proc or /sys is mounted in the chroot: the files fake-pi4-cpu.sh wrote are what the emulated programs see.
# shellcheck disable=SC2086  # ARM_PYTEST_ARGS: extra words for pytest
chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" \
    PYTHONPATH=/opt/edgefleet/src:/opt/edgefleet/site EDGEFLEET_ARM_WORK=/opt/edgefleet/work \
    /usr/bin/python3 -m pytest -c /opt/edgefleet/src/tests/arm/pytest.ini --rootdir /opt/edgefleet/src/tests/arm \
    -q /opt/edgefleet/src/tests/arm ${ARM_PYTEST_ARGS:-} || status=$?

rm -rf "$ARM_CACHE/last-run"
mkdir -p "$ARM_CACHE/last-run"
cp -r "$work/out/." "$ARM_CACHE/last-run/" 2>/dev/null || true
((status == 0)) || die "the ARM tests failed (exit $status); their outputs are in $ARM_CACHE/last-run"
"$VENV_PY" "$ARM_DIR/x86_side.py" check "$work"
say "done in $(($(date +%s) - ARM_T0)) s"
