//! Offline mode: two captures (primary and secondary guest output) merged by timestamp drive
//! the engine on a virtual clock. Deterministic: the same captures give the same decisions.
//!
//! The replay plays the checkpoint engine too: a requested checkpoint is done at once (at the
//! same virtual instant), which releases the held primary frames. Because two captures are two
//! independent runs, the secondary's TCP sequence offset is kept across those checkpoints
//! ([`Engine::keep_seq_alignment_across_checkpoints`]).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use colo_proto::frame::Frame;
use serde::Serialize;

use crate::engine::{
    CheckpointReason, CompareConfig, Decision, DropReason, Engine, ReleaseReason, Stats,
};
use crate::pcap::Packet;

/// How capture timestamps are put on one clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Timestamps {
    /// Use them as recorded (captures taken at the same time on one clock).
    Absolute,
    /// Each capture starts at 0 (two runs at different times).
    Relative,
    /// `Relative` if the captures start more than `compare_timeout` apart, else `Absolute`.
    Auto,
}

/// Replay options.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The engine's options.
    pub cfg: CompareConfig,
    /// With `cfg.vnet_hdr_support`, every captured packet starts with a virtio-net header of
    /// this length.
    pub vnet_hdr_len: u32,
    /// Timestamp handling.
    pub timestamps: Timestamps,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            cfg: CompareConfig::default(),
            vnet_hdr_len: 12,
            timestamps: Timestamps::Auto,
        }
    }
}

/// One decision as written to the events file (one JSON object per line).
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Virtual time in microseconds since the replay's clock origin.
    pub t_us: u64,
    /// `release`, `drop_secondary` or `checkpoint`, or `checkpoint_done` (the replay's own
    /// checkpoint engine acting).
    pub decision: &'static str,
    /// The reason (absent for `checkpoint_done`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<serde_json::Value>,
    /// Index of the frame in its capture (0-based), for release/drop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The frame's connection, if IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn: Option<String>,
    /// Frame length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<usize>,
}

/// A released primary frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// Virtual time of the release.
    pub at: Duration,
    /// Index in the primary capture.
    pub index: usize,
    /// Why.
    pub reason: ReleaseReason,
}

/// What a replay found.
#[derive(Clone, Debug)]
pub struct ReplayReport {
    /// The timestamp mode actually used.
    pub timestamps: Timestamps,
    /// Frames in the primary capture.
    pub primary_frames: usize,
    /// Frames in the secondary capture.
    pub secondary_frames: usize,
    /// Released primary frames, in release order.
    pub released: Vec<Released>,
    /// Dropped secondary frames: (capture index, reason).
    pub dropped: Vec<(usize, DropReason)>,
    /// Checkpoint requests with their virtual time.
    pub checkpoints: Vec<(Duration, CheckpointReason)>,
    /// Engine counters at the end.
    pub stats: Stats,
}

impl ReplayReport {
    /// The first divergence (first checkpoint request), if any.
    pub fn first_divergence(&self) -> Option<&(Duration, CheckpointReason)> {
        self.checkpoints.first()
    }

    /// Checkpoints by reason name.
    pub fn checkpoints_by_reason(&self) -> Vec<(&'static str, usize)> {
        let mut v: Vec<(&'static str, usize)> = Vec::new();
        for (_, r) in &self.checkpoints {
            match v.iter_mut().find(|(n, _)| *n == r.name()) {
                Some((_, c)) => *c += 1,
                None => v.push((r.name(), 1)),
            }
        }
        v
    }

    /// A human-readable summary table.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let s = &self.stats;
        let mut o = String::new();
        let _ = writeln!(o, "timestamps           {:?}", self.timestamps);
        let _ = writeln!(o, "connections          {}", s.connections_total);
        let _ = writeln!(
            o,
            "frames               primary {}  secondary {}",
            self.primary_frames, self.secondary_frames
        );
        let _ = writeln!(
            o,
            "released             {} of {}  (matched {}, pure ACK {}, retransmission {}, flushed {}, overflow {})",
            s.released,
            self.primary_frames,
            s.released_matched,
            s.released_pure_ack,
            s.released_already_verified,
            s.released_flushed,
            s.released_overflow
        );
        let _ = writeln!(o, "matches              {}", s.matched);
        let _ = writeln!(o, "secondary dropped    {}", s.dropped);
        let by: Vec<String> = self
            .checkpoints_by_reason()
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        let _ = writeln!(
            o,
            "checkpoints          {}{}",
            self.checkpoints.len(),
            if by.is_empty() {
                String::new()
            } else {
                format!("  ({})", by.join(", "))
            }
        );
        match self.first_divergence() {
            Some((t, r)) => {
                let _ = writeln!(
                    o,
                    "first divergence     at {:.3} ms: {r}",
                    t.as_secs_f64() * 1e3
                );
            }
            None => {
                let _ = writeln!(o, "first divergence     none");
            }
        }
        o
    }
}

/// Errors of the replay's outputs.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Writing an output failed.
    #[error("writing {what}: {error}")]
    Output {
        /// Which output.
        what: &'static str,
        /// The cause.
        error: std::io::Error,
    },
}

/// Where the replay's decisions go besides the report.
pub trait ReplaySink {
    /// A decision (or the replay's own checkpoint_done) happened.
    fn event(&mut self, ev: &Event) -> Result<(), ReplayError>;
    /// A primary frame was released (as captured, including any virtio-net header).
    fn released(&mut self, at: Duration, frame: &Frame) -> Result<(), ReplayError>;
}

/// A sink that keeps nothing.
pub struct NoSink;

impl ReplaySink for NoSink {
    fn event(&mut self, _: &Event) -> Result<(), ReplayError> {
        Ok(())
    }
    fn released(&mut self, _: Duration, _: &Frame) -> Result<(), ReplayError> {
        Ok(())
    }
}

/// Maps frames back to their capture indices (equal frames are interchangeable).
#[derive(Default)]
struct Indexer {
    map: HashMap<Vec<u8>, VecDeque<usize>>,
}

impl Indexer {
    fn add(&mut self, bytes: &[u8], i: usize) {
        self.map.entry(bytes.to_vec()).or_default().push_back(i);
    }
    fn take(&mut self, bytes: &[u8]) -> Option<usize> {
        self.map.get_mut(bytes).and_then(VecDeque::pop_front)
    }
}

struct Run<'a, S: ReplaySink> {
    engine: Engine,
    sink: &'a mut S,
    origin: Duration,
    pidx: Indexer,
    sidx: Indexer,
    report: ReplayReport,
}

impl<S: ReplaySink> Run<'_, S> {
    fn t_us(&self, now: Duration) -> u64 {
        u64::try_from(now.saturating_sub(self.origin).as_micros()).unwrap_or(u64::MAX)
    }

    /// Handles the engine's decisions; performs a requested checkpoint at once.
    fn drain(&mut self, now: Duration) -> Result<(), ReplayError> {
        loop {
            let decisions = self.engine.take_decisions();
            if decisions.is_empty() {
                return Ok(());
            }
            let mut checkpoint = false;
            for d in decisions {
                let t_us = self.t_us(now);
                let ev = match d {
                    Decision::Release {
                        frame,
                        conn,
                        reason,
                    } => {
                        let index = self.pidx.take(&frame.payload);
                        self.sink.released(now, &frame)?;
                        self.report.released.push(Released {
                            at: now,
                            index: index.unwrap_or(usize::MAX),
                            reason,
                        });
                        Event {
                            t_us,
                            decision: "release",
                            reason: serde_json::to_value(reason).ok(),
                            index,
                            conn: conn.map(|c| c.to_string()),
                            len: Some(frame.payload.len()),
                        }
                    }
                    Decision::DropSecondary {
                        frame,
                        conn,
                        reason,
                    } => {
                        let index = self.sidx.take(&frame.payload);
                        self.report
                            .dropped
                            .push((index.unwrap_or(usize::MAX), reason));
                        Event {
                            t_us,
                            decision: "drop_secondary",
                            reason: serde_json::to_value(reason).ok(),
                            index,
                            conn: conn.map(|c| c.to_string()),
                            len: Some(frame.payload.len()),
                        }
                    }
                    Decision::Checkpoint { reason } => {
                        checkpoint = true;
                        let ev = Event {
                            t_us,
                            decision: "checkpoint",
                            reason: serde_json::to_value(&reason).ok(),
                            index: None,
                            conn: None,
                            len: None,
                        };
                        self.report
                            .checkpoints
                            .push((now.saturating_sub(self.origin), reason));
                        ev
                    }
                };
                self.sink.event(&ev)?;
            }
            if checkpoint {
                self.sink.event(&Event {
                    t_us: self.t_us(now),
                    decision: "checkpoint_done",
                    reason: None,
                    index: None,
                    conn: None,
                    len: None,
                })?;
                self.engine.checkpoint_done(now);
            }
        }
    }

    fn tick_until(&mut self, t: Duration) -> Result<(), ReplayError> {
        while let Some(d) = self.engine.next_deadline() {
            if d > t {
                break;
            }
            self.engine.on_tick(d);
            self.drain(d)?;
            // A deadline that does not move would loop forever; the engine guarantees progress
            // (a scan moves last_scan, a timeout requests a checkpoint which is done at once).
            if self.engine.next_deadline() == Some(d) {
                break;
            }
        }
        Ok(())
    }
}

/// Replays two captures through the engine.
pub fn replay<S: ReplaySink>(
    primary: &[Packet],
    secondary: &[Packet],
    opts: &ReplayOptions,
    sink: &mut S,
) -> Result<ReplayReport, ReplayError> {
    let p0 = primary.first().map(|p| p.ts);
    let s0 = secondary.first().map(|p| p.ts);
    let timestamps = match opts.timestamps {
        Timestamps::Auto => match (p0, s0) {
            (Some(a), Some(b)) if a.abs_diff(b) > opts.cfg.compare_timeout => Timestamps::Relative,
            _ => Timestamps::Absolute,
        },
        t => t,
    };
    // Virtual clock: every capture timestamp is shifted so that the earliest event is at
    // `origin` (kept away from 0 so that nothing before it underflows).
    let origin = Duration::from_secs(1);
    let (pshift, sshift) = match timestamps {
        Timestamps::Relative => (p0.unwrap_or_default(), s0.unwrap_or_default()),
        _ => {
            let m = match (p0, s0) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or_default(),
            };
            (m, m)
        }
    };
    let vnet = if opts.cfg.vnet_hdr_support {
        opts.vnet_hdr_len
    } else {
        0
    };
    let mk = |p: &Packet| Frame {
        vnet_hdr_len: vnet,
        payload: p.data.clone(),
    };
    let mut engine = Engine::new(opts.cfg);
    engine.keep_seq_alignment_across_checkpoints(true);
    let mut run = Run {
        engine,
        sink,
        origin,
        pidx: Indexer::default(),
        sidx: Indexer::default(),
        report: ReplayReport {
            timestamps,
            primary_frames: primary.len(),
            secondary_frames: secondary.len(),
            released: Vec::new(),
            dropped: Vec::new(),
            checkpoints: Vec::new(),
            stats: Stats::default(),
        },
    };
    let (mut i, mut j) = (0usize, 0usize);
    // Virtual time never goes backwards, even if a capture's timestamps do.
    let mut now = origin;
    loop {
        let pt = primary.get(i).map(|p| origin + p.ts.saturating_sub(pshift));
        let st = secondary
            .get(j)
            .map(|p| origin + p.ts.saturating_sub(sshift));
        let (take_primary, t) = match (pt, st) {
            (None, None) => break,
            (Some(a), None) => (true, a),
            (None, Some(b)) => (false, b),
            (Some(a), Some(b)) => {
                if a <= b {
                    (true, a)
                } else {
                    (false, b)
                }
            }
        };
        now = now.max(t);
        run.tick_until(now)?;
        if take_primary {
            let f = mk(&primary[i]);
            run.pidx.add(&f.payload, i);
            run.engine.on_primary(f, now);
            i += 1;
        } else {
            let f = mk(&secondary[j]);
            run.sidx.add(&f.payload, j);
            run.engine.on_secondary(f, now);
            j += 1;
        }
        run.drain(now)?;
    }
    // Let the clock run until nothing is held: timeouts fire, checkpoints flush.
    let mut guard = 0;
    while run.engine.stats().primary_queued + run.engine.stats().secondary_queued > 0 {
        let Some(d) = run.engine.next_deadline() else {
            break;
        };
        now = now.max(d);
        run.engine.on_tick(now);
        run.drain(now)?;
        guard += 1;
        if guard > 1_000_000 {
            break;
        }
    }
    run.report.stats = run.engine.stats();
    Ok(run.report)
}
