#!/usr/bin/env bash
# host-check.sh: what this host offers to colo's tests and demos.
#
#   scripts/host-check.sh          a human-readable table
#   scripts/host-check.sh --json   one JSON object (same keys as colo_tests::host::facts())
#
# Checks: KVM (/dev/kvm usable) and whether it is PVM (kvm_pvm module, nested_pvm on the kernel
# command line: stock Linux guests do not boot under PVM), CPU vendor and svm/vmx, QEMU TCG,
# root, network namespaces (creates and deletes one with a unique name), /dev/net/tun, memfd,
# and the Debian tools the tests use. Changes nothing on the host. Exit status 0 always
# (it reports; it does not judge), 2 on a usage error.
set -u

json=0
case "${1:-}" in
    --json) json=1 ;;
    "") ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "host-check: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

# Each check sets ok_<key>=true|false and why_<key>=reason.
set_result() { # key ok reason
    printf -v "ok_$1" '%s' "$2"
    printf -v "why_$1" '%s' "$3"
}

# root
if [ "$(id -u)" = 0 ]; then set_result root true ""; else set_result root false "not root (euid $(id -u))"; fi

# KVM
if [ -c /dev/kvm ] && { exec 9<>/dev/kvm; } 2>/dev/null; then
    exec 9>&-
    set_result kvm true ""
else
    set_result kvm false "/dev/kvm missing or not read-writable"
fi
pvm=false
pvm_why=""
if [ -d /sys/module/kvm_pvm ]; then pvm=true; pvm_why="kvm_pvm module loaded"; fi
if tr ' ' '\n' </proc/cmdline 2>/dev/null | grep -q '^nested_pvm'; then
    pvm=true; pvm_why="${pvm_why:+$pvm_why, }nested_pvm on the kernel command line"
fi
if [ "$ok_kvm" = true ] && [ "$pvm" = false ]; then
    set_result kvm_for_linux_guests true ""
elif [ "$ok_kvm" = false ]; then
    set_result kvm_for_linux_guests false "$why_kvm"
else
    set_result kvm_for_linux_guests false "KVM is PVM ($pvm_why): stock Linux guests do not boot; use TCG or scripts/kvm-lab.sh"
fi
kvm_modules=$(for m in kvm_intel kvm_amd kvm_pvm; do [ -d /sys/module/$m ] && printf '%s ' $m; done)
kvm_modules=${kvm_modules% }

# CPU
cpu_vendor=$(awk -F': *' '/^vendor_id/ { print $2; exit }' /proc/cpuinfo 2>/dev/null)
cpu_vendor=${cpu_vendor:-unknown}
cpu_virt=$(awk -F': *' '/^flags/ { n = split($2, f, " "); for (i = 1; i <= n; i++) if (f[i] == "svm" || f[i] == "vmx") { print f[i]; exit } exit }' /proc/cpuinfo 2>/dev/null)
cpu_virt=${cpu_virt:-none}

# TCG
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    qemu_version=$(qemu-system-x86_64 --version 2>/dev/null | head -n1 | sed 's/.*version \([^ ]*\).*/\1/')
    set_result tcg true ""
else
    qemu_version=""
    set_result tcg false "qemu-system-x86_64 not installed (Debian: qemu-system-x86)"
fi

# netns: create and delete one with a unique name
if [ "$ok_root" = false ]; then
    set_result netns false "needs root"
elif ! command -v ip >/dev/null 2>&1; then
    set_result netns false "ip not installed (Debian: iproute2)"
else
    ns="hostchk$$"
    if err=$(ip netns add "$ns" 2>&1); then
        ip netns delete "$ns" 2>/dev/null
        set_result netns true ""
    else
        set_result netns false "ip netns add failed: $err"
    fi
fi

# tun (taps)
if [ -c /dev/net/tun ] && { exec 8<>/dev/net/tun; } 2>/dev/null; then
    exec 8>&-
    set_result tun true ""
else
    set_result tun false "/dev/net/tun missing or not read-writable"
fi

# memfd: memfd_create is Linux >= 3.17; check the syscall through /proc (a memfd shows up as
# /memfd:NAME in a process's fd links) with python3 if present, else by kernel version.
memfd_probe() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import os; os.close(os.memfd_create("colo-probe"))' 2>/dev/null
        return
    fi
    local v major minor
    v=$(uname -r); major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
    [ "$major" -gt 3 ] || { [ "$major" = 3 ] && [ "$minor" -ge 17 ]; }
}
if memfd_probe; then set_result memfd true ""; else set_result memfd false "memfd_create failed"; fi

tools="qemu-system-x86_64 qemu-img qemu-nbd qemu-io qemu-storage-daemon socat tcpdump busybox ip"
declare -A pkg=(
    [qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils [qemu-nbd]=qemu-utils
    [qemu-io]=qemu-utils [qemu-storage-daemon]=qemu-system-common [socat]=socat
    [tcpdump]=tcpdump [busybox]=busybox-static [ip]=iproute2
)

checks="root kvm kvm_for_linux_guests tcg netns tun memfd"

if [ "$json" = 1 ]; then
    esc() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }
    printf '{'
    for c in $checks; do
        ok_var="ok_$c"; why_var="why_$c"
        if [ "${!ok_var}" = true ]; then
            printf '"%s": {"ok": true}, ' "$c"
        else
            printf '"%s": {"ok": false, "reason": "%s"}, ' "$c" "$(esc "${!why_var}")"
        fi
    done
    printf '"pvm": %s, "kvm_modules": "%s", "cpu_vendor": "%s", "cpu_virt": "%s", "qemu_version": "%s", "tools": {' \
        "$pvm" "$kvm_modules" "$(esc "$cpu_vendor")" "$cpu_virt" "$(esc "$qemu_version")"
    first=1
    for t in $tools; do
        [ $first = 1 ] || printf ', '
        first=0
        if command -v "$t" >/dev/null 2>&1; then printf '"%s": true' "$t"; else printf '"%s": false' "$t"; fi
    done
    printf '}}\n'
    exit 0
fi

row() { printf '  %-22s %-5s %s\n' "$1" "$2" "$3"; }
yn() { if [ "$1" = true ]; then echo yes; else echo no; fi; }
echo "colo host check ($(uname -srm))"
echo
row "check" "ok" "notes"
row "-----" "--" "-----"
row "root" "$(yn "$ok_root")" "$why_root"
row "kvm (/dev/kvm)" "$(yn "$ok_kvm")" "${why_kvm}${kvm_modules:+modules: $kvm_modules}"
row "kvm is PVM" "$(yn "$pvm")" "$pvm_why"
row "kvm for Linux guests" "$(yn "$ok_kvm_for_linux_guests")" "$why_kvm_for_linux_guests"
row "cpu" "-" "$cpu_vendor, virtualisation flag: $cpu_virt"
row "tcg (qemu)" "$(yn "$ok_tcg")" "${why_tcg}${qemu_version:+QEMU $qemu_version}"
row "netns" "$(yn "$ok_netns")" "$why_netns"
row "tap (/dev/net/tun)" "$(yn "$ok_tun")" "$why_tun"
row "memfd" "$(yn "$ok_memfd")" "$why_memfd"
echo
row "tool" "found" "Debian package"
row "----" "-----" "--------------"
for t in $tools; do
    if command -v "$t" >/dev/null 2>&1; then f=yes; else f=no; fi
    row "$t" "$f" "${pkg[$t]}"
done
echo
if [ "$ok_kvm_for_linux_guests" = true ]; then
    echo "Full guests: KVM. Unit, integration and TCG tiers: all."
elif [ "$ok_tcg" = true ]; then
    echo "Full guests: QEMU TCG here, or real KVM inside scripts/kvm-lab.sh. KVM-only tests skip or use the lab."
else
    echo "Full guests: none here (no usable KVM, no QEMU). Guest tests will skip."
fi
