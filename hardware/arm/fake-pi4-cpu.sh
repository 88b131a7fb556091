#!/usr/bin/env bash
# fake-pi4-cpu.sh ROOTFS [CPUS]: give the root filesystem the CPU description a Raspberry Pi 4 kernel shows, with
# CPUS cores (default: this host's, so thread pools match the real parallelism).
#
# Why: onnxruntime's CPU-info library reads /proc/cpuinfo and /sys/devices/system/cpu. Under qemu-user with the
# host's x86 files visible it crashes on import; with none it warns and guesses. The chroot mounts neither
# /proc nor /sys, so these plain files are what it reads: CPU implementer 0x41 (Arm), part 0xd08 (Cortex-A72).
set -euo pipefail
root="${1:?usage: fake-pi4-cpu.sh ROOTFS [CPUS]}"
cpus="${2:-$(nproc)}"
last=$((cpus - 1))

mkdir -p "$root/proc"
{
    for ((i = 0; i < cpus; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n'
        printf 'CPU revision\t: 3\n\n'
    done
    printf 'Hardware\t: BCM2835\nRevision\t: c03111\nSerial\t\t: 100000000000e0f1\n'
    printf 'Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n'
} >"$root/proc/cpuinfo"

sys="$root/sys/devices/system/cpu"
rm -rf "$sys"
mkdir -p "$sys"
for f in possible present online; do echo "0-$last" >"$sys/$f"; done
echo "$last" >"$sys/kernel_max"
for ((i = 0; i < cpus; i++)); do
    mkdir -p "$sys/cpu$i/topology" "$sys/cpu$i/cpufreq"
    echo 0 >"$sys/cpu$i/topology/physical_package_id"
    echo "$i" >"$sys/cpu$i/topology/core_id"
    echo "$i" >"$sys/cpu$i/topology/thread_siblings_list"
    echo "$i" >"$sys/cpu$i/topology/core_cpus_list"
    echo "0-$last" >"$sys/cpu$i/topology/core_siblings_list"
    echo "0-$last" >"$sys/cpu$i/topology/package_cpus_list"
    echo "0-$last" >"$sys/cpu$i/topology/cluster_cpus_list"
    echo 1500000 >"$sys/cpu$i/cpufreq/cpuinfo_max_freq"
    echo 600000 >"$sys/cpu$i/cpufreq/cpuinfo_min_freq"
    echo 1 >"$sys/cpu$i/online"
done
