#!/usr/bin/env python3
"""Writes the seed inputs of the vhost-net-colo fuzz targets into seeds/<target>/ (run from
anywhere; the files are committed, so this only needs re-running when the input layouts
change). Frames are built as the existing unit tests build them (offload::tcp_gso_frame,
the DHCP tests' client messages); specs are those of docs/OPERATIONS.md and the tests."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def eth(dst, src, ethertype):
    return bytes(dst) + bytes(src) + struct.pack("!H", ethertype)


def ipv4(src, dst, proto, payload_len, ident=1):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000, 64, proto, 0,
                    bytes(src), bytes(dst))
    c = ~csum(h) & 0xFFFF
    return h[:10] + struct.pack("!H", c) + h[12:]


def ipv6(src, dst, proto, payload_len):
    return struct.pack("!IHBB", 0x60000000, payload_len, proto, 64) + bytes(src) + bytes(dst)


def tcp_hdr(sport, dport, seq, ack, flags, csum_field=0):
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)  # NOP NOP timestamp
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (32 // 4) << 4, flags, 65535,
                       csum_field, 0) + opts


def pseudo4(src, dst, length):
    return bytes(src) + bytes(dst) + struct.pack("!BBH", 0, 6, length)


def pseudo6(src, dst, length):
    return bytes(src) + bytes(dst) + struct.pack("!IxxxB", length, 6)


def gso_frame(v6, payload, fin, mss, needs_csum=True):
    """A TCP frame as a guest with TSO hands it over, with its 12-byte virtio-net header."""
    mac_a, mac_b = [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]
    flags = 0x18 | 0x80 | (1 if fin else 0)  # PSH ACK CWR
    tcp_len = 32 + len(payload)
    if v6:
        src, dst = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
        ph = csum(pseudo6(src, dst, tcp_len))
        l3 = ipv6(src, dst, 6, tcp_len)
        frame = eth(mac_a, mac_b, 0x86DD) + l3
        gso = 4
    else:
        src, dst = [10, 0, 2, 15], [10, 0, 2, 2]
        ph = csum(pseudo4(src, dst, tcp_len))
        frame = eth(mac_a, mac_b, 0x0800) + ipv4(src, dst, 6, tcp_len)
        gso = 1
    l4 = len(frame)
    frame += tcp_hdr(40000, 7, 0xFFFFFFF6, 1, flags, ph) + payload
    hdr = struct.pack("<BBHHHHH", 1 if needs_csum else 0, gso if mss else 0, l4 + 32, mss, l4,
                      16, 0)
    return hdr, frame


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# offload: byte 0 = header length (mod 13), header, frame.
for v6 in (False, True):
    for n, mss, fin in ((3000, 1448, True), (100, 1448, False), (0, 536, True), (900, 0, False)):
        hdr, frame = gso_frame(v6, bytes((i * 7) & 0xFF for i in range(n)), fin, mss)
        for hl in (10, 12):
            write("offload", "gso_v%d_%d_%d_%d" % (6 if v6 else 4, n, mss, hl),
                  bytes([hl]) + hdr[:hl] + frame)
# UFO (gso_type 3) and USO (gso_type 5) datagrams as offload::udp_gso_frame builds them.
def udp_gso(v6, payload, gso_type, gso_size):
    mac_a, mac_b = [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]
    udp_len = 8 + len(payload)
    if v6:
        src, dst = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
        ph = csum(bytes(src) + bytes(dst) + struct.pack("!IxxxB", udp_len, 17))
        frame = eth(mac_a, mac_b, 0x86DD) + ipv6(src, dst, 17, udp_len)
    else:
        src, dst = [10, 0, 2, 15], [10, 0, 2, 2]
        ph = csum(bytes(src) + bytes(dst) + struct.pack("!BBH", 0, 17, udp_len))
        frame = eth(mac_a, mac_b, 0x0800) + ipv4(src, dst, 17, udp_len, 0x1234)
    l4 = len(frame)
    frame += struct.pack("!HHHH", 40000, 9, udp_len, ph) + payload
    hdr = struct.pack("<BBHHHHH", 1, gso_type, l4 + 8, gso_size, l4, 6, 0)
    return hdr, frame


for v6 in (False, True):
    for gso_type, size in ((3, 1400), (3, 13), (5, 1000), (5, 0)):
        hdr, frame = udp_gso(v6, bytes((i * 3) & 0xFF for i in range(3000)), gso_type, size)
        write("offload", "udp_v%d_gso%d_%d" % (6 if v6 else 4, gso_type, size),
              bytes([12]) + hdr + frame)

# A partial UDP checksum (no GSO).
udp = struct.pack("!HHHH", 5000, 53, 8 + 4, csum(pseudo4([10, 0, 2, 15], [10, 0, 2, 3], 12)[:-3] + b"\x11" + struct.pack("!H", 12))) + b"abcd"
f = eth([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], 0x0800) + ipv4([10, 0, 2, 15], [10, 0, 2, 3], 17, 12) + udp
write("offload", "udp_partial", bytes([10]) + struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 6) + f)


# dhcp: byte 0 even = DHCP message only (the target wraps it), odd = whole frame.
def dhcp_msg(mtype, requested=None, sid=None):
    chaddr = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
    m = struct.pack("!BBBBIHH4s4s4s4s", 1, 1, 6, 0, 0x12345678, 0, 0, b"\0" * 4, b"\0" * 4,
                    b"\0" * 4, b"\0" * 4)
    m += chaddr + b"\0" * 10 + b"\0" * 64 + b"\0" * 128 + bytes([99, 130, 83, 99])
    m += bytes([53, 1, mtype])
    m += bytes([61, 7, 1]) + chaddr
    if requested:
        m += bytes([50, 4]) + bytes(requested)
    if sid:
        m += bytes([54, 4]) + bytes(sid)
    m += bytes([55, 4, 1, 3, 6, 51]) + bytes([57, 2, 5, 220]) + bytes([255])
    return m


msgs = {
    "discover": dhcp_msg(1),
    "request": dhcp_msg(3, [10, 0, 2, 15], [10, 0, 2, 2]),
    "request_other": dhcp_msg(3, [10, 0, 2, 99]),
    "request_other_server": dhcp_msg(3, [10, 0, 2, 15], [10, 0, 2, 9]),
    "release": dhcp_msg(7),
}
for name, m in msgs.items():
    write("dhcp", name, b"\0" + m)
udp = struct.pack("!HHHH", 68, 67, 8 + len(msgs["discover"]), 0) + msgs["discover"]
frame = eth([0xFF] * 6, [0x52, 0x54, 0, 0x12, 0x34, 0x56], 0x0800) + ipv4([0] * 4, [255] * 4, 17, len(udp)) + udp
write("dhcp", "discover_frame", b"\x01" + frame)

# object_spec: option strings as users give them.
specs = [
    "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
    "filter-redirector,id=r0,netdev=hn0,queue=rx,indev=red0,vnet_hdr_support=on",
    "filter-redirector,id=r1,netdev=hn0,queue=rx,outdev=red1,position=id=m0,insert=before",
    "filter-rewriter,id=rew0,netdev=hn0,queue=all,status=off,position=head",
    "filter-dump,id=d0,netdev=hn0,file=/tmp/x.pcap,maxlen=128",
    "filter-mirror,id=m1,netdev=hn0,outdev=c0,vnet_hdr_support=on,vnet_hdr_len=12",
    "user,id=hn0,net=10.0.2.0/24,host=10.0.2.2,dhcpstart=10.0.2.15,dns=10.0.2.3,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp::2222-10.0.2.15:22",
    "tap,id=hn0,ifname=tap0,script=no,downscript=no,vhost=off,vnet_hdr=on,queues=2",
    "stream,id=hn0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=9000",
    "dgram,id=hn0,local.type=unix,local.path=/tmp/a,remote.type=unix,remote.path=/tmp/b",
    "socket,id=mirror0,host=127.0.0.1,port=9003,server=on,wait=off",
    "unix:/tmp/red0.sock,server=on,wait=off",
    "tcp:127.0.0.1:9004,reconnect=1",
    "52:54:00:12:34:56",
    '{"qom-type":"filter-mirror","id":"m0","netdev":"hn0","queue":"tx","outdev":"c0","vnet_hdr_support":true}',
    '{"qom-type":"filter-dump","id":"d0","props":{"netdev":"hn0","file":"x","maxlen":100}}',
]
for i, s in enumerate(specs):
    write("object_spec", "spec%02d" % i, s.encode())

# rewriter: op bytes with built segments (see the target): a handshake, data, FIN, RST.
write("rewriter", "handshake", bytes([
    0x07, 0, 0, 0, 0, 0x02, 0, 0,             # Tx SYN from the peer
    0x06, 0, 0, 2, 0, 0x12, 0, 0,             # Rx SYN+ACK from the guest
    0x07, 0, 0, 0, 1, 0x10, 3, 0,             # Tx ACK
    0x00,                                     # checkpoint
    0x06, 0, 0, 2, 1, 0x18, 4, 0,             # Rx data
    0x07, 0, 0, 0, 1, 0x11, 0, 0,             # Tx FIN
    0x06, 0, 0, 2, 1, 0x11, 0, 0,             # Rx FIN
    0x96, 0, 0, 2, 1, 0x04, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,  # Rx RST, offloaded
]))
