#!/usr/bin/env python3
"""Writes the seed inputs of the vmm-min fuzz targets into seeds/<target>/ (the files are
committed; re-run only when the input layouts change). state_stream needs no seeds (its
template modes build valid streams in the target); these are a VM state JSON for state_json
(KVM structures as empty hex strings, which kvm-bindings pads with zeros) and a minimal
bzImage setup header and ELF64 image for kernel_load."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


fpu = {"fpr": [[0] * 16] * 8, "fcw": 0x37F, "fsw": 0, "ftwx": 0, "last_opcode": 0,
       "last_ip": 0, "last_dp": 0, "xmm": [[0] * 16] * 16, "mxcsr": 0x1F80}
vcpu = {"id": 0, "mp_state": "", "regs": "00" * 8, "sregs": "", "fpu": fpu,
        "xsave": "00000000" * 4, "xcrs": "", "debug_regs": "", "lapic": "", "tsc_khz": 1000000,
        "msrs": [{"index": 16, "data": 1234}], "events": ""}
state = {
    "shape": {"memory": 16 << 20, "cpus": 1, "irqchip": True,
              "devices": ["serial@0x3f8", "virtio-net@0xd0000000"]},
    "vm": {"irqchip": {"pic_master": "", "pic_slave": "", "ioapic": "", "pit": ""}, "clock": "ff"},
    "vcpus": [vcpu],
    "devices": [
        {"Serial": {"id": "serial@0x3f8",
                    "state": {"regs": [1, 0, 0, 1, 3, 0x60, 8, 0xB0, 0], "in_buffer": [97, 98]}}},
        {"VirtioMmio": {"id": "virtio-net@0xd0000000",
                        "transport": {"status": 15, "driver_features": 1 << 32,
                                      "device_features_sel": 0, "driver_features_sel": 1,
                                      "queue_sel": 1,
                                      "queues": [{"max_size": 256, "size": 256, "ready": True,
                                                  "desc": 4096, "avail": 8192, "used": 12288}],
                                      "interrupt_status": 0, "config_generation": 0,
                                      "activated": True, "shm_sel": 0},
                        "vring_bases": [0, 7]}},
    ],
}
write("state_json", "state", json.dumps(state).encode())
write("state_json", "uri", b"tcp:127.0.0.1:4444")
write("state_json", "serial", b"unix:/tmp/console.sock,server=on")
write("state_json", "net", b"vhost-user,socket=/tmp/net.sock,mac=52:54:00:12:34:56,id=n0")

# kernel_load: [mode, cmdline length, initrd length / 16, cmdline, kernel (, initrd)].
cmd = b"console=ttyS0 root=/dev/vda"
# bzImage: one setup sector + the boot sector, "HdrS" version 2.15, loadflags LOADED_HIGH,
# then 4 KiB of "protected-mode code".
setup = bytearray(512 * 2)
setup[0x1F1] = 1                                   # setup_sects
setup[0x1FE:0x200] = b"\x55\xaa"                   # boot_flag
setup[0x202:0x206] = b"HdrS"
setup[0x206:0x208] = struct.pack("<H", 0x020F)     # version
setup[0x211] = 0x01                                # loadflags: LOADED_HIGH
setup[0x214:0x218] = struct.pack("<I", 0x100000)   # code32_start
setup[0x22C:0x230] = struct.pack("<I", 0x37FFFFFF) # initrd_addr_max
setup[0x230:0x234] = struct.pack("<I", 0x200000)   # kernel_alignment
setup[0x260:0x264] = struct.pack("<I", 0x10000)    # init_size
bz = bytes(setup) + bytes(range(256)) * 16
write("kernel_load", "bzimage", bytes([0, len(cmd), 0]) + cmd + bz)
write("kernel_load", "bzimage_initrd", bytes([1, len(cmd), 4]) + cmd + bz + b"initrd!!" * 8)

# ELF64 x86-64 executable, one PT_LOAD of 4 KiB at 2 MiB, entry at its start.
code = b"\xf4" * 4096
ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7, 2, 62, 1,
                   0x200000, 64, 0, 0, 64, 56, 1, 64, 0, 0)
phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0x200000, 0x200000, len(code), len(code), 0x1000)
elf = ehdr + phdr + b"\0" * (0x1000 - 64 - 56) + code
write("kernel_load", "elf", bytes([0, len(cmd), 0]) + cmd + elf)

# state_stream: the template modes (byte 0 bit 1), unedited, with one edit, and cut.
write("state_stream", "snapshot_template", b"\x02")
write("state_stream", "migration_template", b"\x03")
write("state_stream", "migration_edit", b"\x03\x00\x10\x05")
write("state_stream", "snapshot_cut", b"\x06\x00\x80\x00")
