//! Counters an operator graphs (`query-colo-compare`).

use serde::Serialize;

/// Checkpoint requests by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckpointCounts {
    /// A frame waited `compare_timeout` for its twin.
    pub timeout: u64,
    /// Payload differed.
    pub payload_differs: u64,
    /// TCP control (SYN/FIN/RST vs data) differed.
    pub tcp_control_differs: u64,
    /// A queue reached `max_queue_size`.
    pub queue_full: u64,
    /// Requests not emitted because one was already outstanding.
    pub coalesced: u64,
}

/// Engine counters. Frame counts are totals since the engine was created.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Frames received from the primary.
    pub primary_in: u64,
    /// Frames received from the secondary.
    pub secondary_in: u64,
    /// Primary frames released (all reasons).
    pub released: u64,
    /// Primary frames released because the secondary matched.
    pub released_matched: u64,
    /// Primary TCP pure ACKs released uncompared (in order).
    pub released_pure_ack: u64,
    /// Primary TCP retransmissions of verified data released.
    pub released_already_verified: u64,
    /// Primary frames released by `checkpoint_done`.
    pub released_flushed: u64,
    /// Primary frames released uncompared because a queue overflowed.
    pub released_overflow: u64,
    /// Secondary frames dropped (all reasons).
    pub dropped: u64,
    /// Secondary frames dropped because their queue was full.
    pub dropped_queue_full: u64,
    /// Comparisons that succeeded (one per released matched primary frame).
    pub matched: u64,
    /// Checkpoints requested, by reason.
    pub checkpoints: CheckpointCounts,
    /// `checkpoint_done` calls.
    pub checkpoints_done: u64,
    /// Primary frames currently held.
    pub primary_queued: u64,
    /// Secondary frames currently held.
    pub secondary_queued: u64,
    /// The deepest single queue right now.
    pub max_queue_depth: u64,
    /// Flows (connections) currently tracked.
    pub connections: u64,
    /// Flows created since start.
    pub connections_total: u64,
    /// Flows expired (idle with empty queues, or closed).
    pub connections_expired: u64,
}
