#!/bin/bash
# KVM-side counts of a measurement in the KVM tier (bench/net/guest.sh --tier kvm, PROFILE_DIR
# set, PROFILE_PERF=kvm): what the guest makes its VMM's KVM do, the same for vmm-min and QEMU.
#
#   kvmprof.sh mount             debugfs and tracefs mounted (the lab's L1 has neither)
#   kvmprof.sh snap              KVM's per-VM debugfs statistics, summed over every VM
#                                (/sys/kernel/debug/kvm/<pid>-<fd>/*: exits, io_exits,
#                                mmio_exits, halt_exits, irq_injections, ...), "name value" lines
#   kvmprof.sh perf-args OUT     the `perf stat` arguments that count KVM tracepoints, exits by
#                                SVM exit code, MSR exits by MSR, MMIO by region (into OUT)
#   kvmprof.sh report SNAP0 SNAP1 PERFSTAT MIB
#                                both as counts and per MiB (MIB: the MiB moved each way)
set -euo pipefail

# SVM exit codes (kvm:kvm_exit exit_reason on AMD; the lab emulates SVM)
svm_exits=(
    "interrupt 0x060" "vintr 0x064" "cpuid 0x072" "pause 0x077" "hlt 0x078" "io 0x07b"
    "msr 0x07c" "hypercall 0x081" "rdtsc 0x06e" "rdtscp 0x087" "npf 0x400"
)
# MSRs written/read by exits (x2APIC registers, timer, KVM paravirt MSRs)
msrs=(
    "x2apic_eoi 0x80b" "x2apic_icr 0x830" "x2apic_tmict 0x838" "tsc_deadline 0x6e0"
    "kvm_system_time 0x4b564d01" "kvm_pv_eoi 0x4b564d04"
)
# plain tracepoints
points=(
    kvm_exit kvm_userspace_exit kvm_mmio kvm_fast_mmio kvm_pio kvm_msr kvm_inj_virq kvm_set_irq
    kvm_ioapic_set_irq kvm_msi_set_irq kvm_pv_eoi kvm_eoi kvm_apic_accept_irq kvm_vcpu_wakeup
    kvm_hypercall kvm_apic kvm_emulate_insn kvm_page_fault
)

case "${1:-}" in
    mount)
        mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
        mountpoint -q /sys/kernel/tracing || mount -t tracefs none /sys/kernel/tracing
        ;;
    snap)
        for d in /sys/kernel/debug/kvm/*-*/; do
            [ -d "$d" ] || continue
            for f in "$d"*; do
                if [ -f "$f" ]; then
                    printf '%s %s\n' "${f##*/}" "$(cat "$f" 2>/dev/null || echo 0)"
                fi
            done
        done | awk '$2 ~ /^[0-9]+$/ {s[$1] += $2} END {for (k in s) print k, s[k]}' | sort
        ;;
    perf-args)
        out=$2
        args=(stat -a -x, -o "$out")
        for p in "${points[@]}"; do
            if [ -d "/sys/kernel/tracing/events/kvm/$p" ]; then args+=(-e "kvm:$p"); fi
        done
        for e in "${svm_exits[@]}"; do
            set -- $e
            args+=(-e kvm:kvm_exit --filter "exit_reason==$2")
        done
        for e in "${msrs[@]}"; do
            set -- $e
            args+=(-e kvm:kvm_msr --filter "ecx==$2")
        done
        # MMIO by region: LAPIC (xAPIC mode), the rest (virtio-mmio windows of either VMM)
        args+=(-e kvm:kvm_mmio --filter "gpa>=0xfee00000 && gpa<0xfee01000")
        args+=(-e kvm:kvm_mmio --filter "gpa<0xfee00000 || gpa>=0xfee01000")
        printf '%s\n' "${args[@]}"
        ;;
    report)
        s0=$2 s1=$3 ps=$4 mib=$5
        # perf stat -x, rows: value,,event,... in the order of perf-args; name them again
        names=()
        for p in "${points[@]}"; do
            if [ -d "/sys/kernel/tracing/events/kvm/$p" ]; then names+=("$p"); fi
        done
        for e in "${svm_exits[@]}"; do set -- $e; names+=("exit:$1"); done
        for e in "${msrs[@]}"; do set -- $e; names+=("msr:$1"); done
        names+=("mmio:lapic" "mmio:other")
        echo "KVM debugfs (all VMs): count, per MiB ($mib MiB each way)"
        join -a2 -e 0 -o 0,1.2,2.2 "$s0" "$s1" |
            awk -v m="$mib" '{d = $3 - $2; if (d) printf "  %-28s %12d %10.1f\n", $1, d, d / m}'
        if [ -s "$ps" ]; then
            echo "KVM tracepoints (perf stat -a): count, per MiB"
            t=$(mktemp)
            printf '%s\n' "${names[@]}" >"$t"
            grep -v '^#' "$ps" | grep -v '^$' | awk -F, '{print $1}' | paste -d' ' "$t" - |
                awk -v m="$mib" '$2 ~ /^[0-9]+$/ {printf "  %-28s %12d %10.1f\n", $1, $2, $2 / m}'
            rm -f "$t"
        fi
        ;;
    *) sed -n '2,14p' "$0"; exit 2 ;;
esac
