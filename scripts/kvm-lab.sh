#!/bin/bash
# kvm-lab.sh: run a host command inside an L1 VM (QEMU TCG, emulated AMD SVM) whose /dev/kvm is
# a real hardware-style KVM (kvm_amd, nested paging). See docs/TESTING.md.
#
#   scripts/kvm-lab.sh [-w DIR]... [-t SEC] [-m MiB] [-c CPUS] [-v] -- COMMAND [ARG]...
#   scripts/kvm-lab.sh --check     (prepare the cache; exit 0 if the lab can run, else 125)
#
#   -w DIR   share DIR read-write at the same path (repeatable; no spaces or commas)
#   -t SEC   deadline for the whole run, default 600; then QEMU is killed and we exit 124
#   -m MiB   L1 RAM, default 3072
#   -c CPUS  L1 vCPUs, default 1 (KVM_LAB_CPUS)
#   -v       copy the L1 console to stderr, print timings
#
# The command sees the host root read-only under a throw-away overlay (writes vanish, except in
# -w dirs), runs as root with the caller's environment (plus KVM_LAB=1, KVM_LAB_SHARE=<run share>)
# and working directory, stdin /dev/null. Its stdout and stderr stream back separately.
# Exit status: the command's; 125 = the lab itself failed; 124 = deadline reached.
# Environment: KVM_LAB_DIR (cache, default <repo>/.cache/kvm-lab), KVM_LAB_KEEP=1 (keep the run
# dir), KVM_LAB_TIMES=1 (print timings), KVM_LAB_ROOT=ro (plain ro root + tmpfs /tmp),
# KVM_LAB_MODULES (modules to load at start, default "overlay kvm_amd"), KVM_LAB_QEMU (QEMU binary), KVM_LAB_APPEND
# (extra L1 kernel parameters), KVM_LAB_PVH=0 (boot the compressed kernel instead of PVH).
set -u
set -o pipefail

readonly LAB_RC_FAIL=125 LAB_RC_TIMEOUT=124
SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) || exit $LAB_RC_FAIL
REPO=$(cd "$SELF_DIR/.." && pwd) || exit $LAB_RC_FAIL
INIT_SRC=$SELF_DIR/lab/init
CACHE=${KVM_LAB_DIR:-$REPO/.cache/kvm-lab}
QEMU=${KVM_LAB_QEMU:-qemu-system-x86_64}
# Loaded at start; others (tun, vhost_net, veth, bridge, ...) load on demand.
MODULES=${KVM_LAB_MODULES:-overlay kvm_amd}
# Bump when the cache layout or the initramfs recipe changes.
readonly CACHE_FORMAT=3

T0=$EPOCHREALTIME
# One vCPU by default: on this 2-core host, usually busy, 2 vCPUs (MTTCG) burned 1.5 to 2 times
# the CPU time (cross-CPU waits spin) and were slower in wall time. KVM_LAB_CPUS overrides.
TIMEOUT=600 MEM=3072 CPUS=${KVM_LAB_CPUS:-1} VERBOSE=0 CHECK=0
RW=()

say() { printf 'kvm-lab: %s\n' "$*" >&2; }
die() { say "error: $*"; exit $LAB_RC_FAIL; }
usage() { # $1 = exit status (default: the lab failed)
	sed -n '2,/^set -u/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
	exit "${1:-$LAB_RC_FAIL}"
}
# elapsed seconds since T0, 2 decimals
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

while [ $# -gt 0 ]; do
	case $1 in
	-w) [ $# -ge 2 ] || usage; RW+=("$2"); shift 2 ;;
	-t) [ $# -ge 2 ] || usage; TIMEOUT=$2; shift 2 ;;
	-m) [ $# -ge 2 ] || usage; MEM=$2; shift 2 ;;
	-c) [ $# -ge 2 ] || usage; CPUS=$2; shift 2 ;;
	-v) VERBOSE=1; shift ;;
	--check) CHECK=1; shift ;;
	-h|--help) usage 0 ;;
	--) shift; break ;;
	*) say "unknown option: $1"; usage ;;
	esac
done
[ $# -ge 1 ] || [ "$CHECK" = 1 ] || { say "no command given"; usage; }
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "-t wants a whole number of seconds, got '$TIMEOUT'"
[[ $MEM =~ ^[1-9][0-9]*$ ]] || die "-m wants MiB, got '$MEM'"
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "-c wants a CPU count, got '$CPUS'"
[ "${KVM_LAB_TIMES:-0}" = 1 ] && VERBOSE_TIMES=1 || VERBOSE_TIMES=$VERBOSE
DEADLINE=$((${EPOCHSECONDS} + TIMEOUT))

RW_ABS=()
for d in "${RW[@]}"; do
	[ -d "$d" ] || die "-w $d: not a directory"
	a=$(realpath -e -- "$d") || die "-w $d: cannot resolve"
	[[ $a =~ [[:space:],] ]] && die "-w $a: spaces and commas are not supported"
	[ "$a" = / ] && die "-w /: share something smaller"
	RW_ABS+=("$a")
done
command -v "$QEMU" >/dev/null || die "$QEMU not found (Debian package qemu-system-x86)"

# ---------------------------------------------------------------- cache: kernel + initramfs
find_deb() { # $1 = glob; the newest match in our cache or the guest build's cache
	local f gc=${COLO_CACHE:-$REPO/.cache}/guest
	for f in "$CACHE"/debs/$1 "$gc"/$1 "$gc"/*/$1 "$gc"/*/*/$1; do
		case $f in *cloud*|*-rt-*|*-dbg_*|*unsigned*) continue ;; esac
		[ -f "$f" ] && printf '%s %s\n' "${f##*/}" "$f"
	done | sort -V -k1,1 | tail -n 1 | cut -d' ' -f2-
}

get_debs() {
	KDEB=$(find_deb 'linux-image-6.1*-amd64_*_amd64.deb')
	if [ -z "$KDEB" ]; then
		local pkg
		pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
			awk '/Depends: linux-image-[0-9].*-amd64$/ { print $2; exit }')
		[ -n "$pkg" ] || pkg=linux-image-6.1.0-56-amd64
		say "downloading $pkg (apt-get download) into $CACHE/debs"
		mkdir -p "$CACHE/debs" || return 1
		(cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) || return 1
		KDEB=$(find_deb 'linux-image-6.1*-amd64_*_amd64.deb')
		[ -n "$KDEB" ] || return 1
	fi
	BBDEB=$(find_deb 'busybox-static_*_amd64.deb')
	if [ -z "$BBDEB" ]; then
		mkdir -p "$CACHE/debs" || return 1
		say "downloading busybox-static (apt-get download) into $CACHE/debs"
		(cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root busybox-static >&2) || return 1
		BBDEB=$(find_deb 'busybox-static_*_amd64.deb')
		[ -n "$BBDEB" ] || return 1
	fi
}

build_kernel() { # $1 = target dir (does not exist yet): the unpacked kernel package
	local out=$1 tmp kver off
	tmp=$out.tmp.$$
	rm -rf "$tmp" && mkdir -p "$tmp/k" || return 1
	say "unpacking ${KDEB##*/} into $out (once per kernel package)"
	dpkg-deb -x "$KDEB" "$tmp/k" || return 1
	kver=$(ls "$tmp/k/lib/modules" | head -n 1)
	[ -n "$kver" ] && [ -f "$tmp/k/boot/vmlinuz-$kver" ] || { say "no kernel in ${KDEB##*/}"; return 1; }
	cp "$tmp/k/boot/vmlinuz-$kver" "$tmp/vmlinuz" || return 1
	# The uncompressed ELF kernel boots through PVH (its Xen PHYS32 entry note), which skips
	# the xz decompression that costs L1 several seconds under TCG. Same kernel, unchanged.
	off=$(grep -abo $'\xfd7zXZ' "$tmp/vmlinuz" | head -n 1 | cut -d: -f1)
	if [ -n "$off" ] && command -v xz >/dev/null; then
		tail -c +$((off + 1)) "$tmp/vmlinuz" | xz -dc 2>/dev/null >"$tmp/vmlinux"
		if ! head -c 4 "$tmp/vmlinux" | grep -q $'^\x7fELF'; then
			say "note: could not extract vmlinux; booting the compressed kernel"
			rm -f "$tmp/vmlinux"
		fi
	fi
	# busybox depmod writes modules.dep/.alias for the initramfs's busybox modprobe.
	"$BB" depmod -b "$tmp/k" "$kver" || return 1
	echo "$kver" >"$tmp/kver"
	mv "$tmp" "$out"
}

build_initrd() { # $1 = target file: busybox, /init, the virtio, 9p, overlay and kvm_amd modules
	local out=$1 kver tmp m f
	kver=$(cat "$KDIR/kver")
	tmp=$out.tmp.$$
	rm -rf "$tmp" && mkdir -p "$tmp" || return 1
	local ir=$tmp/initrd
	mkdir -p "$ir"/{bin,sbin,proc,sys,dev,etc,lib/lab-modules,lib/modules} || return 1
	cp "$BB" "$ir/bin/busybox" || return 1
	for f in $("$BB" --list); do
		[ "$f" = busybox ] || ln -s busybox "$ir/bin/$f"
	done
	ln -s ../bin/modprobe "$ir/sbin/modprobe" || return 1
	ln -s ../bin/insmod "$ir/sbin/insmod" || return 1
	for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
		netfs fscache 9pnet 9pnet_virtio 9p overlay irqbypass kvm ccp kvm-amd; do
		f=$(find "$KDIR/k/lib/modules/$kver/kernel" -name "$m.ko" | head -n 1)
		[ -n "$f" ] || { say "module $m not in ${KDEB##*/}"; return 1; }
		cp "$f" "$ir/lib/lab-modules/" || return 1
	done
	cp "$INIT_SRC" "$ir/init" && chmod 755 "$ir/init" || return 1
	(cd "$ir" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 >"$tmp/initrd.cpio.gz") ||
		return 1
	mv "$tmp/initrd.cpio.gz" "$out" && rm -rf "$tmp"
}

ensure_cache() {
	mkdir -p "$CACHE" || die "cannot create $CACHE"
	exec {lockfd}>"$CACHE/.build.lock" || die "cannot open $CACHE/.build.lock"
	flock -w "$TIMEOUT" "$lockfd" || die "timed out waiting for the cache build lock"
	get_debs || die "no kernel/busybox .deb found and apt-get download failed"
	local kkey ikey tb f
	kkey=$(echo "$CACHE_FORMAT ${KDEB##*/}" | sha256sum | cut -c1-12)
	KDIR=$CACHE/kernel-$kkey
	BBDIR=$CACHE/busybox-$(echo "${BBDEB##*/}" | sha256sum | cut -c1-12)
	BB=$BBDIR/bin/busybox
	if [ ! -x "$BB" ]; then
		rm -rf "$BBDIR" "$BBDIR.tmp"
		dpkg-deb -x "$BBDEB" "$BBDIR.tmp" && mv "$BBDIR.tmp" "$BBDIR" && [ -x "$BB" ] ||
			die "no busybox in ${BBDEB##*/}"
	fi
	if [ ! -f "$KDIR/kver" ]; then
		tb=$EPOCHREALTIME
		# Only the current kernel is kept (also removes the old single-directory layout).
		for f in "$CACHE"/kernel-* "$CACHE"/build-*; do [ -d "$f" ] && [ "$f" != "$KDIR" ] && rm -rf "$f"; done
		build_kernel "$KDIR" || { rm -rf "$KDIR.tmp.$$"; die "unpacking the kernel failed"; }
		say "kernel unpacked in $(since "$tb") s"
	fi
	ikey=$({ echo "$CACHE_FORMAT $kkey ${BBDEB##*/}"; cat "$INIT_SRC"; declare -f build_initrd; } |
		sha256sum | cut -c1-12)
	INITRD=$CACHE/initrd-$ikey.cpio.gz
	if [ ! -f "$INITRD" ]; then
		for f in "$CACHE"/initrd-*.cpio.gz; do [ -f "$f" ] && rm -f "$f"; done
		build_initrd "$INITRD" || { rm -rf "$INITRD.tmp.$$"; die "building the initramfs failed"; }
	fi
	exec {lockfd}>&-
}

# ---------------------------------------------------------------- one run
RUN= QPID= LAST_QPID= CONPID= OUTPID= ERRPID= KEEP=${KVM_LAB_KEEP:-0}

kill_pid() { # kill by PID and reap
	local p=$1
	[ -n "$p" ] || return 0
	kill -KILL "$p" 2>/dev/null
	wait "$p" 2>/dev/null
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM HUP
	kill_pid "$QPID"; QPID=
	kill_pid "$OUTPID"; kill_pid "$ERRPID"; kill_pid "$CONPID"
	if [ -n "$RUN" ] && [ -d "$RUN" ]; then
		if [ "$KEEP" = 1 ]; then say "run dir kept: $RUN"; else rm -rf "$RUN"; fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM
trap 'exit 129' HUP

ensure_cache
KVER=$(cat "$KDIR/kver")
KERNEL=$KDIR/vmlinuz
[ -f "$KDIR/vmlinux" ] && [ "${KVM_LAB_PVH:-1}" = 1 ] && KERNEL=$KDIR/vmlinux
if [ "$CHECK" = 1 ]; then
	say "ready: kernel $KVER ($KERNEL), initramfs $INITRD"
	exit 0
fi
T_CACHE=$EPOCHREALTIME

# Run dirs of runners that were SIGKILLed (no trap ran) are swept here.
for f in "${TMPDIR:-/tmp}"/kvm-lab.*/pid; do
	[ -f "$f" ] || continue
	p=$(cat "$f" 2>/dev/null)
	[[ $p =~ ^[0-9]+$ ]] && ! kill -0 "$p" 2>/dev/null && rm -rf "${f%/pid}"
done
RUN=$(mktemp -d "${TMPDIR:-/tmp}/kvm-lab.XXXXXXXX") || die "mktemp failed"
echo $$ >"$RUN/pid"
[[ $RUN =~ [[:space:],] ]] && die "run dir $RUN has spaces or commas; set TMPDIR"
SHARE=$RUN/share
mkdir "$SHARE" || die "mkdir $SHARE"

{
	echo "LAB_KDIR='$KDIR/k'"
	echo "LAB_MODULES='$MODULES'"
	echo "LAB_RW='${RW_ABS[*]}'"
	echo "LAB_SHARE='$SHARE'"
	echo "LAB_ROOT='${KVM_LAB_ROOT:-overlay}'"
} >"$SHARE/lab.conf"

{
	echo '# generated by kvm-lab.sh'
	export -p | grep -Ev '^declare -[-a-zA-Z]* (BASHOPTS|SHELLOPTS|BASH_VERSINFO|EUID|PPID|UID|_|SHLVL|OLDPWD|PWD)(=|$)'
	printf 'export KVM_LAB=1 KVM_LAB_SHARE=%q\n' "$SHARE"
	printf 'cd -- %q || { echo "kvm-lab: cannot cd to %q in the lab" >&2; exit 125; }\n' "$PWD" "$PWD"
	printf 'exec'
	printf ' %q' "$@"
	printf '\n'
} >"$SHARE/run.sh"

QARGS=(-M pc -accel tcg,thread=multi -cpu max -smp "$CPUS" -m "$MEM"
	-nodefaults -no-user-config -no-reboot -display none
	-kernel "$KERNEL" -initrd "$INITRD"
	-append "console=ttyS0 quiet loglevel=4 panic=-1 softlockup_panic=1 cryptomgr.notests${KVM_LAB_APPEND:+ $KVM_LAB_APPEND}"
	-chardev "file,id=con,path=$RUN/console.fifo" -serial chardev:con
	-chardev "file,id=out,path=$RUN/stdout.fifo" -serial chardev:out
	-chardev "file,id=err,path=$RUN/stderr.fifo" -serial chardev:err
	-fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap
	-device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
	-fsdev "local,id=labrun,path=$SHARE,security_model=none"
	-device virtio-9p-pci,fsdev=labrun,mount_tag=labrun)
i=0
for d in "${RW_ABS[@]}"; do
	QARGS+=(-fsdev "local,id=rw$i,path=$d,security_model=none,multidevs=remap"
		-device "virtio-9p-pci,fsdev=rw$i,mount_tag=rw$i")
	i=$((i + 1))
done
printf '%q ' "$QEMU" "${QARGS[@]}" >"$RUN/qemu.cmd"

console_reader() { # copies the console into console.log (and stderr with -v), stamps LAB: lines
	local line
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line%$'\r'}
		printf '%s\n' "$line" >>"$RUN/console.log"
		case $line in
		LAB:*|KVM-LAB-*) printf '%s %s\n' "$EPOCHREALTIME" "$line" >>"$RUN/times.log" ;;
		esac
		[ "$VERBOSE" = 1 ] && printf '[L1] %s\n' "$line" >&2
	done
}

# Returns: 0 = got the command's status in CMD_RC; 1 = L1 ended without a status (reset?);
# 2 = lab failure (message printed); 3 = deadline.
run_once() {
	local f
	rm -f "$SHARE/rc" "$SHARE/fail" "$RUN"/*.fifo "$RUN/console.log" "$RUN/times.log"
	for f in console stdout stderr; do mkfifo "$RUN/$f.fifo" || return 2; done
	# Hold every FIFO open read-write, so neither QEMU's open() nor the readers' block, even
	# if the other side never comes. Closed once QEMU is gone: then the readers see EOF.
	exec {fc}<>"$RUN/console.fifo" {fo}<>"$RUN/stdout.fifo" {fe}<>"$RUN/stderr.fifo"
	console_reader <"$RUN/console.fifo" {fc}>&- {fo}>&- {fe}>&- &
	CONPID=$!
	cat <"$RUN/stdout.fifo" {fc}>&- {fo}>&- {fe}>&- &
	OUTPID=$!
	cat <"$RUN/stderr.fifo" >&2 {fc}>&- {fo}>&- {fe}>&- &
	ERRPID=$!
	T_QEMU=$EPOCHREALTIME
	# pdeathsig: QEMU dies with us even if we are SIGKILLed (then no trap runs).
	setpriv --pdeathsig KILL -- "$QEMU" "${QARGS[@]}" </dev/null >"$RUN/qemu.log" 2>&1 {fc}>&- {fo}>&- {fe}>&- &
	QPID=$!
	# Poll (no long-lived helper process that could outlive us if we are SIGKILLed).
	local timed_out=0
	while kill -0 "$QPID" 2>/dev/null; do
		if [ "$EPOCHSECONDS" -ge "$DEADLINE" ]; then timed_out=1; break; fi
		sleep 0.2 {fc}>&- {fo}>&- {fe}>&-
	done
	[ "$timed_out" = 1 ] && kill -KILL "$QPID" 2>/dev/null
	wait "$QPID" 2>/dev/null
	QRC=$?
	LAST_QPID=$QPID QPID=
	T_END=$EPOCHREALTIME
	exec {fc}>&- {fo}>&- {fe}>&-
	# Readers end at EOF; they are bounded anyway.
	local n=0
	while [ $n -lt 50 ] && { kill -0 "$OUTPID" || kill -0 "$ERRPID" || kill -0 "$CONPID"; } 2>/dev/null; do
		sleep 0.1; n=$((n + 1))
	done
	kill_pid "$OUTPID"; kill_pid "$ERRPID"; kill_pid "$CONPID"
	OUTPID= ERRPID= CONPID=
	if [ "$timed_out" = 1 ]; then return 3; fi
	if [ -s "$SHARE/rc" ]; then CMD_RC=$(cat "$SHARE/rc"); fi
	if [[ ${CMD_RC:-} =~ ^[0-9]+$ ]]; then return 0; fi
	CMD_RC=$(sed -n 's/^KVM-LAB-EXIT=\([0-9]*\).*/\1/p' "$RUN/console.log" 2>/dev/null | tail -n 1)
	if [[ $CMD_RC =~ ^[0-9]+$ ]]; then return 0; fi
	if grep -q '^KVM-LAB-FAIL' "$RUN/console.log" 2>/dev/null; then
		say "the lab failed: $(grep '^KVM-LAB-FAIL' "$RUN/console.log" | head -n 1)"
		return 2
	fi
	if [ "$QRC" != 0 ]; then
		say "QEMU failed (exit $QRC): $(tail -n 5 "$RUN/qemu.log" 2>/dev/null)"
		return 2
	fi
	return 1
}

diff_s() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "") print "?"; else printf "%.2f", b - a }'; }

print_times() {
	[ "$VERBOSE_TIMES" = 1 ] || return 0
	local run up
	run=$(awk '$2 == "LAB:" && $4 == "run" { print $1; exit }' "$RUN/times.log" 2>/dev/null)
	up=$(awk '$2 == "LAB:" && $4 == "run" { print $3; exit }' "$RUN/times.log" 2>/dev/null)
	say "timings (host wall clock, s): cache check $(diff_s "$T0" "$T_CACHE")," \
		"QEMU start to command start $(diff_s "$T_QEMU" "$run") (L1 uptime then: ${up:-?})," \
		"command $(diff_s "$run" "$T_END"), total $(since "$T0")"
	[ -f "$RUN/times.log" ] && awk -v q="$T_QEMU" '{ t = $1; $1 = ""; printf "kvm-lab:   +%.2f s%s\n", t - q, $0 }' "$RUN/times.log" >&2
	return 0
}

attempt=1
while :; do
	CMD_RC=
	run_once
	r=$?
	print_times
	case $r in
	0) exit "$CMD_RC" ;;
	3)
		say "deadline of $TIMEOUT s reached: QEMU (PID $LAST_QPID) killed. L1 console tail:"
		tail -n 10 "$RUN/console.log" >&2 2>/dev/null
		exit $LAB_RC_TIMEOUT
		;;
	2)
		say "console tail:"; tail -n 20 "$RUN/console.log" >&2 2>/dev/null
		exit $LAB_RC_FAIL
		;;
	1)
		if [ "$attempt" -ge 2 ] || [ "$EPOCHSECONDS" -ge "$DEADLINE" ]; then
			say "the L1 ended again without an exit status (reset or crash); giving up. console tail:"
			tail -n 20 "$RUN/console.log" >&2 2>/dev/null
			exit $LAB_RC_FAIL
		fi
		say "the L1 ended without an exit status (a spontaneous reset, a known TCG fault); retrying once"
		tail -n 5 "$RUN/console.log" >&2 2>/dev/null
		attempt=2
		;;
	esac
done
