//! QEMU's Xen-style controller channel (`notify_dev`): ASCII strings, no terminator, in the
//! chardev framing.
//!
//! - comparer → controller: [`DO_CHECKPOINT`] when a checkpoint is needed;
//!   [`GET_XEN_INIT`] as the answer to the controller's [`PROXY_INIT`].
//! - controller → comparer: [`PROXY_INIT`] (handshake, optional), [`CHECKPOINT`] (checkpoint
//!   done: release held primary frames, drop secondary ones).
//!
//! QEMU's framing on this channel is asymmetric and we keep it so: what the comparer sends
//! never carries the vnet length field; what it receives carries it when `vnet_hdr_support` is
//! on (a controller written for QEMU does exactly that).

use colo_proto::frame::{Frame, FrameError, encode};

pub const DO_CHECKPOINT: &str = "DO_CHECKPOINT";
pub const GET_XEN_INIT: &str = "COLO_COMPARE_GET_XEN_INIT";
pub const PROXY_INIT: &str = "COLO_USERSPACE_PROXY_INIT";
pub const CHECKPOINT: &str = "COLO_CHECKPOINT";

/// A message received from the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyMsg {
    ProxyInit,
    CheckpointDone,
    /// Anything else (logged and ignored, as QEMU does).
    Unknown(Vec<u8>),
}

impl NotifyMsg {
    /// Interprets a received record (its payload after any vnet header).
    pub fn parse(frame: &Frame) -> Self {
        match frame.l2() {
            b if b == PROXY_INIT.as_bytes() => NotifyMsg::ProxyInit,
            b if b == CHECKPOINT.as_bytes() => NotifyMsg::CheckpointDone,
            b => NotifyMsg::Unknown(b.to_vec()),
        }
    }
}

/// Encodes a message to the controller (never with the vnet field).
pub fn encode_msg(msg: &str) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(4 + msg.len());
    encode(&Frame::ethernet(msg.as_bytes()), false, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn do_checkpoint_is_length_prefixed_ascii_without_vnet_field() {
        let b = encode_msg(DO_CHECKPOINT).unwrap();
        assert_eq!(&b[..4], &13u32.to_be_bytes());
        assert_eq!(&b[4..], b"DO_CHECKPOINT");
    }

    #[test]
    fn parses_controller_strings() {
        assert_eq!(
            NotifyMsg::parse(&Frame::ethernet(CHECKPOINT.as_bytes())),
            NotifyMsg::CheckpointDone
        );
        assert_eq!(
            NotifyMsg::parse(&Frame::ethernet(PROXY_INIT.as_bytes())),
            NotifyMsg::ProxyInit
        );
        assert!(matches!(
            NotifyMsg::parse(&Frame::ethernet(b"COLO_CHECKPOINTX".to_vec())),
            NotifyMsg::Unknown(_)
        ));
    }
}
