# Shared by build-rootfs.sh and run-tests.sh (sourced, not run): paths, tool checks, binfmt registration.
# shellcheck shell=bash

ARM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$ARM_DIR/../.." && pwd)"
ARM_CACHE="${ARM_CACHE:-$REPO/.cache/arm}"
VENV_PY="${VENV_PY:-$REPO/.venv/bin/python}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Pi 4 instruction set (ARMv8.0-A + NEON, no dot product); also ~15x faster to emulate than the default "max".
export QEMU_CPU=cortex-a72

die() { echo "test-arm: $*" >&2; exit 1; }
say() { echo "test-arm: $*" >&2; }

# debootstrap, qemu-user-static and binfmt-support from the system package manager (installed when missing, as root).
ensure_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    command -v unshare >/dev/null || missing+=(util-linux)
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (sudo apt-get install ${missing[*]}) or run as root"
        command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them with"
        say "installing ${missing[*]} with apt-get"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap, chroot and mount need root; run make test-arm as root"
    [[ -x "$VENV_PY" ]] || die "no venv at $VENV_PY; run make test (or make .venv/.installed-stamp) first"
}

# Let the kernel run aarch64 binaries through qemu (needed by debootstrap's second stage and by chroot).
# Debian registers qemu-aarch64 with the F flag, so the chroot does not need its own copy of qemu.
ensure_binfmt() {
    local bm=/proc/sys/fs/binfmt_misc
    if [[ ! -e $bm/register ]]; then
        mount -t binfmt_misc binfmt_misc "$bm" 2>/dev/null \
            || die "cannot mount binfmt_misc at $bm (a container without CAP_SYS_ADMIN?); aarch64 binaries cannot run"
    fi
    if [[ ! -e $bm/qemu-aarch64 ]] || ! grep -q '^enabled' "$bm/qemu-aarch64"; then
        update-binfmts --enable qemu-aarch64 >&2 || die "update-binfmts --enable qemu-aarch64 failed"
    fi
    grep -q '^flags: .*F' "$bm/qemu-aarch64" \
        || die "qemu-aarch64 is registered without the F flag; a chroot cannot find its interpreter"
}
