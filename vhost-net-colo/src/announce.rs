//! Announcing the guest after a migration: the RARP broadcast QEMU sends (its "self announce"
//! frame), so switches and bridges learn the guest's MAC on its new port.
//!
//! The frame: destination `ff:ff:ff:ff:ff:ff`, source the guest MAC, ethertype `0x8035`
//! (RARP), hardware type 1 (Ethernet), protocol type `0x0800`, lengths 6 and 4, operation 3
//! (reverse request), sender and target hardware address the guest MAC, both IPv4 addresses
//! 0, zero-padded to the 60-byte Ethernet minimum.
//!
//! Announces go straight to the netdev, after the filter chain (as if the guest had sent them
//! and the chain had let them through), never into the chain: the comparer and the mirror do
//! not see them (the secondary's guest did not send one, so comparing it would only force a
//! checkpoint), and a redirector does not divert them. While the link is down (`set_link`)
//! they are dropped like every other frame.

use std::sync::Arc;
use std::time::Duration;

use crate::path::NetPath;

/// Ethertype of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Length of the announce frame (Ethernet minimum without FCS).
pub const RARP_FRAME_LEN: usize = 60;

/// QEMU's announce frame for `mac`.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(RARP_FRAME_LEN);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f.push(6); // hardware address length
    f.push(4); // protocol address length
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(RARP_FRAME_LEN, 0);
    f
}

/// `announce-self` timing, QEMU's parameters and defaults (milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceParams {
    /// Delay before the first announce.
    pub initial: u64,
    /// Largest delay between two announces.
    pub max: u64,
    /// Number of announces.
    pub rounds: u64,
    /// Delay increase after each announce.
    pub step: u64,
}

impl Default for AnnounceParams {
    fn default() -> Self {
        Self {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

impl AnnounceParams {
    /// Upper bounds that keep a mistyped command from tying up a thread for days.
    pub const MAX_ROUNDS: u64 = 1000;
    pub const MAX_DELAY_MS: u64 = 60_000;

    /// The delay before each round.
    pub fn delays(&self) -> Vec<Duration> {
        (0..self.rounds.min(Self::MAX_ROUNDS))
            .map(|i| {
                let d = if i == 0 {
                    self.initial
                } else {
                    self.initial
                        .saturating_add(self.step.saturating_mul(i))
                        .min(self.max)
                };
                Duration::from_millis(d.min(Self::MAX_DELAY_MS))
            })
            .collect()
    }
}

/// Sends `rounds` announces of `mac` through `path` from a background thread.
pub fn spawn_announce(path: Arc<NetPath>, mac: [u8; 6], p: AnnounceParams) -> std::io::Result<()> {
    let delays = p.delays();
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let frame = rarp_frame(mac);
            for d in delays {
                std::thread::sleep(d);
                path.announce(frame.clone());
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, EthernetProtocol};

    #[test]
    fn rarp_frame_has_qemus_layout() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 60);
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        assert!(e.dst_addr().is_broadcast());
        assert_eq!(e.src_addr().0, mac);
        assert_eq!(e.ethertype(), EthernetProtocol::Unknown(0x8035));
        let p = e.payload();
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&p[8..14], &mac);
        assert_eq!(&p[18..24], &mac);
        assert!(p[14..18].iter().chain(&p[24..]).all(|&b| b == 0));
    }

    #[test]
    fn announce_delays_grow_by_step_up_to_max() {
        let d = AnnounceParams::default().delays();
        let ms: Vec<u128> = d.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![50, 150, 250, 350, 450]);
        let p = AnnounceParams {
            initial: 10,
            max: 30,
            rounds: 4,
            step: 15,
        };
        let ms: Vec<u128> = p.delays().iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![10, 25, 30, 30]);
        let p = AnnounceParams {
            rounds: u64::MAX,
            initial: u64::MAX,
            ..Default::default()
        };
        assert_eq!(p.delays().len(), 1000);
        assert!(p.delays().iter().all(|d| d.as_millis() <= 60_000));
    }
}
