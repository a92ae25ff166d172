//! `filter-mirror`: copies every frame of its direction(s) to `outdev`; the frame goes on
//! unchanged. Send errors are counted and logged, never disturb the normal path.

use std::sync::Arc;

use super::{Counters, Direction, Filter, Outdev, Verdict, flush_outdev, send_record};
use crate::offload::VnetHdr;
use crate::vnet;

pub struct FilterMirror {
    outdev: Arc<dyn Outdev>,
    vnet_hdr_support: bool,
    vnet_hdr_len: usize,
}

impl FilterMirror {
    pub fn new(outdev: Arc<dyn Outdev>, vnet_hdr_support: bool) -> Self {
        Self {
            outdev,
            vnet_hdr_support,
            vnet_hdr_len: 0,
        }
    }

    /// The `vnet_hdr_len` to send (see [`crate::vnet`]); 0 by default.
    pub fn with_vnet_hdr_len(mut self, n: usize) -> Self {
        self.vnet_hdr_len = n;
        self
    }
}

impl Filter for FilterMirror {
    fn kind(&self) -> &'static str {
        "filter-mirror"
    }

    fn receive(&mut self, _dir: Direction, frame: &mut Vec<u8>, c: &mut Counters) -> Verdict {
        let (h, n) = vnet::record_hdr(None, self.vnet_hdr_support, self.vnet_hdr_len);
        send_record(
            self.kind(),
            self.outdev.as_ref(),
            &h[..n],
            frame,
            self.vnet_hdr_support,
            c,
        );
        Verdict::Pass
    }

    /// With `vnet_hdr_support=on` and a header length that holds one (a tap with vnet
    /// headers), an offloaded frame is copied whole with its header, as QEMU's filter does.
    fn takes_offloaded(&self) -> bool {
        self.vnet_hdr_support && self.vnet_hdr_len >= 10
    }

    fn receive_offloaded(
        &mut self,
        _dir: Direction,
        hdr: &mut VnetHdr,
        frame: &mut Vec<u8>,
        c: &mut Counters,
    ) -> Verdict {
        let (h, n) = vnet::record_hdr(Some(hdr), true, self.vnet_hdr_len);
        send_record(self.kind(), self.outdev.as_ref(), &h[..n], frame, true, c);
        Verdict::Pass
    }

    fn begin_batch(&mut self) {
        self.outdev.begin_batch();
    }

    fn end_batch(&mut self, c: &mut Counters) {
        flush_outdev(self.kind(), self.outdev.as_ref(), c);
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"outdev": self.outdev.name(), "vnet_hdr_support": self.vnet_hdr_support})
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;

    #[test]
    fn mirror_copies_and_passes_even_when_the_link_fails() {
        let out = Arc::new(RecOut::default());
        let mut c = Chain::new();
        c.insert(
            entry(
                "m0",
                QueueSel::Tx,
                Box::new(FilterMirror::new(out.clone(), true).with_vnet_hdr_len(12)),
            ),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        let f = vec![1u8, 2, 3];
        assert_eq!(
            c.process(Direction::Tx, f.clone()),
            Outcome::Deliver(f.clone())
        );
        assert_eq!(
            c.process(Direction::Rx, f.clone()),
            Outcome::Deliver(f.clone())
        );
        let got = out.frames.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.l2(), &f[..]);
        assert_eq!(got[0].0.vnet_hdr_len, 12);

        let bad = Arc::new(RecOut {
            fail: true,
            ..Default::default()
        });
        let mut c = Chain::new();
        c.insert(
            entry("m1", QueueSel::All, Box::new(FilterMirror::new(bad, false))),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        assert_eq!(c.process(Direction::Tx, f.clone()), Outcome::Deliver(f));
        assert_eq!(c.get("m1").unwrap().counters.errors, 1);
    }
}
