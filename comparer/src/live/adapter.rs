//! Connects the live driver to the comparison engine (temporary exact-match stand-in until
//! the engine lands).

use std::collections::VecDeque;
use std::time::Duration;

use colo_proto::frame::Frame;
use serde_json::{Value, json};

use super::LiveConfig;
use super::runtime::{LiveEngine, Outputs};

pub struct Exact {
    p: VecDeque<(Frame, Duration)>,
    s: VecDeque<(Frame, Duration)>,
    out: Outputs,
    timeout: Duration,
}

pub fn new_engine(c: &LiveConfig) -> Exact {
    Exact {
        p: VecDeque::new(),
        s: VecDeque::new(),
        out: Outputs::default(),
        timeout: c.compare_timeout,
    }
}

impl Exact {
    fn cmp(&mut self) {
        while let (Some(p), Some(s)) = (self.p.front(), self.s.front()) {
            if p.0.l2() == s.0.l2() {
                let (p, _) = self.p.pop_front().unwrap_or_default();
                self.s.pop_front();
                self.out.released.push(p);
                self.out.dropped_secondary += 1;
            } else {
                self.out
                    .checkpoints
                    .push(("payload_differs".into(), "x".into()));
                break;
            }
        }
    }
}

impl LiveEngine for Exact {
    fn on_primary(&mut self, frame: Frame, now: Duration) {
        self.p.push_back((frame, now));
        self.cmp();
    }
    fn on_secondary(&mut self, frame: Frame, now: Duration) {
        self.s.push_back((frame, now));
        self.cmp();
    }
    fn on_tick(&mut self, _now: Duration) {
        self.out.checkpoints.push(("timeout".into(), "t".into()));
    }
    fn checkpoint_done(&mut self, _now: Duration) {
        let n = self.s.len() as u64;
        self.out.released.extend(self.p.drain(..).map(|x| x.0));
        self.s.clear();
        self.out.dropped_secondary += n;
    }
    fn next_deadline(&self) -> Option<Duration> {
        let a = self.p.front().map(|x| x.1);
        let b = self.s.front().map(|x| x.1);
        a.into_iter().chain(b).min().map(|t| t + self.timeout)
    }
    fn drain(&mut self, out: &mut Outputs) {
        out.released.append(&mut self.out.released);
        out.dropped_secondary += std::mem::take(&mut self.out.dropped_secondary);
        out.checkpoints.append(&mut self.out.checkpoints);
    }
    fn stats_json(&self) -> Value {
        json!({"queued_primary": self.p.len(), "queued_secondary": self.s.len()})
    }
}
