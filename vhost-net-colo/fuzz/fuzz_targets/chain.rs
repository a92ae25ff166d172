//! A netdev's filter chain (`filter::Chain`) as `-object`/`object-add`/`object-del` and
//! frames drive it: filters built from specs (`filter-mirror`, `filter-redirector` with
//! outdev and/or indev, `filter-rewriter`; `queue=`, `status=`, `position=`, `insert=`,
//! `vnet_hdr_support=`, `vnet_hdr_len=` chosen by the fuzzer) added and removed at any
//! time, frames walking it in both directions, plain or with offloads pending (when the chain
//! takes them), injected from a filter's indev, in batches, with `set_status`, checkpoint
//! and failover. Outdevs record what they are given.
//!
//! Checks: no panic; a delivered frame has the length it entered with (no filter resizes
//! one); every record written has no header or a 10, 12 or 20-byte one, and a header only
//! when its filter has `vnet_hdr_support=on`; `query` works at any time.
#![no_main]

use std::sync::{Arc, Mutex};

use colo_proto::packet::build::{Link, TcpSegment, tcp_frame};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost_net_colo::filter::{Chain, ChardevLookup, Direction, ObjectSpec, Outcome, Outdev, build};
use vhost_net_colo::offload::VnetHdr;

/// Records (header length, frame length, vnet_hdr_support) of everything written.
#[derive(Default)]
struct Rec(Mutex<Vec<(usize, usize, bool)>>);

impl Outdev for Rec {
    fn send_parts(&self, hdr: &[u8], l2: &[u8], vnet: bool) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v.push((hdr.len(), l2.len(), vnet));
        if v.len() > 4096 {
            v.clear();
        }
        Ok(())
    }
    fn name(&self) -> String {
        "rec".into()
    }
}

struct Devs(Arc<Rec>);

impl ChardevLookup for Devs {
    fn outdev(&self, id: &str) -> Option<Arc<dyn Outdev>> {
        (id != "missing").then(|| self.0.clone() as Arc<dyn Outdev>)
    }
}

const IDS: [&str; 4] = ["f0", "f1", "f2", "f3"];

fn spec(u: &mut Unstructured<'_>) -> Result<String> {
    let id = u.choose(&IDS)?;
    let kind = *u.choose(&[
        "filter-mirror,outdev=c0",
        "filter-redirector,outdev=c1",
        "filter-redirector,indev=c2",
        "filter-redirector,outdev=c0,indev=c2",
        "filter-redirector,outdev=c2,indev=c2",
        "filter-rewriter",
        "filter-mirror,outdev=missing",
    ])?;
    let mut s = format!("{kind},id={id},netdev=hn0");
    if u.arbitrary()? {
        s += u.choose(&[",queue=rx", ",queue=tx", ",queue=all", ",queue=both"])?;
    }
    if u.arbitrary()? {
        s += u.choose(&[",status=off", ",status=on"])?;
    }
    if u.arbitrary()? {
        s += u.choose(&[",vnet_hdr_support=on", ",vnet_hdr_support=off"])?;
    }
    if u.arbitrary()? {
        s += u.choose(&[
            ",vnet_hdr_len=10",
            ",vnet_hdr_len=12",
            ",vnet_hdr_len=20",
            ",vnet_hdr_len=11",
        ])?;
    }
    if u.arbitrary()? {
        s += &format!(
            ",position={}",
            u.choose(&["head", "tail", "id=f0", "id=f1", "id=f2", "id=nope"])?
        );
        s += u.choose(&["", ",insert=before", ",insert=behind"])?;
    }
    Ok(s)
}

fn frame(u: &mut Unstructured<'_>, dir: Direction) -> Result<Vec<u8>> {
    if u.ratio(1, 4)? {
        let n = usize::from(u.arbitrary::<u8>()?);
        return Ok(u.bytes(n.min(u.len()))?.to_vec());
    }
    let (g, p) = (
        "10.0.0.2:80".parse().expect("c"),
        "10.0.0.9:4000".parse().expect("c"),
    );
    let (src, dst, link) = match dir {
        Direction::Tx => (p, g, Link::default()),
        Direction::Rx => (g, p, Link::default().reversed()),
    };
    let payload_len = usize::from(u.arbitrary::<u8>()? % 32);
    Ok(tcp_frame(
        &link,
        &TcpSegment {
            src,
            dst,
            seq: *u.choose(&[0u32, 1, 1000, 1001])?,
            ack: *u.choose(&[0u32, 1, 1000, 1001])?,
            flags: u16::from(u.arbitrary::<u8>()? & 0x1f),
            window: 100,
            payload: u.bytes(payload_len.min(u.len()))?,
        },
    ))
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let rec = Arc::new(Rec::default());
    let devs = Devs(rec.clone());
    let mut chain = Chain::new();
    let mut in_batch = false;
    while !u.is_empty() {
        let dir = if u.arbitrary()? {
            Direction::Rx
        } else {
            Direction::Tx
        };
        match u.int_in_range(0..=11u8)? {
            0 | 1 => {
                let s = spec(u)?;
                if let Ok(b) = ObjectSpec::parse_cli(&s).and_then(|sp| build(sp, &devs)) {
                    let _ = chain.insert(b.entry, &b.position, b.insert);
                }
            }
            2 => {
                let id = u.choose(&IDS)?;
                let _ = chain.remove(id);
            }
            3 => {
                let _ = chain.set_status(u.choose(&IDS)?, u.arbitrary()?);
            }
            4..=6 => {
                let f = frame(u, dir)?;
                let len = f.len();
                if let Outcome::Deliver(out) = chain.process(dir, f) {
                    assert_eq!(out.len(), len);
                }
            }
            7 => {
                let f = frame(u, dir)?;
                let len = f.len();
                let mut raw = [0u8; 10];
                u.fill_buffer(&mut raw)?;
                let mut h = VnetHdr::parse(&raw).expect("10 bytes");
                if chain.takes_offloaded(dir)
                    && let Outcome::Deliver(out) = chain.process_offloaded(dir, &mut h, f)
                {
                    assert_eq!(out.len(), len);
                }
            }
            8 => {
                let id = u.choose(&IDS)?;
                let f = frame(u, dir)?;
                let len = f.len();
                if let Ok(Outcome::Deliver(out)) = chain.inject_from(id, dir, f) {
                    assert_eq!(out.len(), len);
                }
            }
            9 => {
                if in_batch {
                    chain.end_batch();
                } else {
                    chain.begin_batch();
                }
                in_batch = !in_batch;
            }
            10 => chain.checkpoint(),
            _ => chain.failover(),
        }
        let _ = chain.query();
        for (h, _, v) in rec.0.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            assert!(matches!(h, 0 | 10 | 12 | 20), "record header of {h} bytes");
            assert!(h == 0 || v, "a header without vnet_hdr_support");
        }
    }
    if in_batch {
        chain.end_batch();
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
