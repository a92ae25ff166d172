//! `filter-redirector`: with an `outdev`, every frame of its direction(s) is written there and
//! taken out of the normal path (dropped if the write fails); without one, frames pass. Frames
//! read from `indev` are injected from the filter's position by the I/O layer
//! ([`super::Chain::inject_from`]): towards the guest with `queue=tx`, towards the netdev with
//! `queue=rx`, both with `queue=all`.

use std::sync::Arc;

use super::{
    Counters, Direction, Filter, Outdev, RawFrame, Verdict, flush_outdev, send_record,
    send_record_raw,
};
use crate::offload::VnetHdr;
use crate::vnet;

pub struct FilterRedirector {
    outdev: Option<Arc<dyn Outdev>>,
    vnet_hdr_support: bool,
    vnet_hdr_len: usize,
}

impl FilterRedirector {
    pub fn new(outdev: Option<Arc<dyn Outdev>>, vnet_hdr_support: bool) -> Self {
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

impl Filter for FilterRedirector {
    fn kind(&self) -> &'static str {
        "filter-redirector"
    }

    fn receive(&mut self, _dir: Direction, frame: &mut Vec<u8>, c: &mut Counters) -> Verdict {
        let Some(out) = &self.outdev else {
            return Verdict::Pass;
        };
        let (h, n) = vnet::record_hdr(None, self.vnet_hdr_support, self.vnet_hdr_len);
        // On a send error the frame is dropped (consumed all the same), as QEMU's is.
        send_record(
            self.kind(),
            out.as_ref(),
            &h[..n],
            frame,
            self.vnet_hdr_support,
            c,
        );
        Verdict::Consumed
    }

    /// Without an outdev frames pass untouched; with one, an offloaded frame is written whole
    /// with its header when `vnet_hdr_support=on` and the header length holds one.
    fn takes_offloaded(&self) -> bool {
        self.outdev.is_none() || (self.vnet_hdr_support && self.vnet_hdr_len >= 10)
    }

    fn receive_offloaded(
        &mut self,
        _dir: Direction,
        hdr: &mut VnetHdr,
        frame: &mut Vec<u8>,
        c: &mut Counters,
    ) -> Verdict {
        let Some(out) = &self.outdev else {
            return Verdict::Pass;
        };
        let (h, n) = vnet::record_hdr(Some(hdr), true, self.vnet_hdr_len);
        send_record(self.kind(), out.as_ref(), &h[..n], frame, true, c);
        Verdict::Consumed
    }

    /// With an outdev every frame is consumed into it (an offloaded one when taken whole).
    fn consumes_raw(&self, offloaded: bool) -> bool {
        self.outdev.is_some() && (!offloaded || self.takes_offloaded())
    }

    fn consume_raw(
        &mut self,
        _dir: Direction,
        hdr: Option<&VnetHdr>,
        l2: RawFrame<'_>,
        c: &mut Counters,
    ) {
        let Some(out) = &self.outdev else { return };
        // The same header as `receive` (plain) and `receive_offloaded` write.
        let support = hdr.is_some() || self.vnet_hdr_support;
        let (h, n) = vnet::record_hdr(hdr, support, self.vnet_hdr_len);
        send_record_raw(self.kind(), out.as_ref(), &h[..n], l2, support, c);
    }

    fn begin_batch(&mut self) {
        if let Some(out) = self.outdev.as_ref() {
            out.begin_batch();
        }
    }

    fn end_batch(&mut self, c: &mut Counters) {
        if let Some(out) = self.outdev.as_ref() {
            flush_outdev(self.kind(), out.as_ref(), c);
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "outdev": self.outdev.as_ref().map(|o| o.name()),
            "vnet_hdr_support": self.vnet_hdr_support,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;

    #[test]
    fn redirector_with_outdev_steals_and_without_passes() {
        let out = Arc::new(RecOut::default());
        let mut c = Chain::new();
        c.insert(
            entry(
                "in",
                QueueSel::Rx,
                Box::new(FilterRedirector::new(None, false)),
            ),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        c.insert(
            entry(
                "out",
                QueueSel::Rx,
                Box::new(FilterRedirector::new(Some(out.clone()), false)),
            ),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        assert_eq!(c.process(Direction::Rx, vec![7; 60]), Outcome::Consumed);
        assert_eq!(
            c.process(Direction::Tx, vec![8; 60]),
            Outcome::Deliver(vec![8; 60])
        );
        assert_eq!(out.frames.lock().unwrap().len(), 1);
        // What the indev injects (queue=rx) walks on towards the head, past nothing here.
        assert_eq!(
            c.inject_from("in", Direction::Rx, vec![9; 60]).unwrap(),
            Outcome::Deliver(vec![9; 60])
        );
    }

    /// The primary's reference order m0, redire0, redire1 (section 1): guest egress is stolen by
    /// redire1 (tail, seen first for rx); frames released through redire0's indev go to the
    /// netdev without passing redire1 again; guest ingress is mirrored and delivered.
    #[test]
    fn primary_reference_chain_behaves() {
        let mirror = Arc::new(RecOut::default());
        let compare = Arc::new(RecOut::default());
        let mut c = Chain::new();
        let add = |c: &mut Chain, e| c.insert(e, &Position::Tail, Insert::Behind).unwrap();
        add(
            &mut c,
            entry(
                "m0",
                QueueSel::Tx,
                Box::new(FilterMirror::new(mirror.clone(), false)),
            ),
        );
        add(
            &mut c,
            entry(
                "redire0",
                QueueSel::Rx,
                Box::new(FilterRedirector::new(None, false)),
            ),
        );
        add(
            &mut c,
            entry(
                "redire1",
                QueueSel::Rx,
                Box::new(FilterRedirector::new(Some(compare.clone()), false)),
            ),
        );
        assert_eq!(c.process(Direction::Rx, vec![1; 60]), Outcome::Consumed);
        assert_eq!(compare.frames.lock().unwrap()[0].0.payload, vec![1; 60]);
        assert_eq!(
            c.inject_from("redire0", Direction::Rx, vec![2; 60])
                .unwrap(),
            Outcome::Deliver(vec![2; 60])
        );
        assert_eq!(compare.frames.lock().unwrap().len(), 1);
        assert_eq!(
            c.process(Direction::Tx, vec![3; 60]),
            Outcome::Deliver(vec![3; 60])
        );
        assert_eq!(mirror.frames.lock().unwrap()[0].0.payload, vec![3; 60]);
    }
}
