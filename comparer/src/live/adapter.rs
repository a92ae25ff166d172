//! Connects the live driver to the comparison engine ([`crate::engine::Engine`]).

use std::time::Duration;

use colo_proto::frame::Frame;
use serde_json::Value;

use super::LiveConfig;
use super::runtime::{LiveEngine, Outputs};
use crate::engine::{CompareConfig, Decision, Engine};

/// The engine configured from the live options.
pub fn new_engine(c: &LiveConfig) -> Engine {
    Engine::new(CompareConfig {
        compare_timeout: c.compare_timeout,
        expired_scan_cycle: c.expired_scan_cycle,
        max_queue_size: c.max_queue_size,
        vnet_hdr_support: c.vnet_hdr_support,
    })
}

impl LiveEngine for Engine {
    fn on_primary(&mut self, frame: Frame, now: Duration) {
        Engine::on_primary(self, frame, now);
    }

    fn on_secondary(&mut self, frame: Frame, now: Duration) {
        Engine::on_secondary(self, frame, now);
    }

    fn on_tick(&mut self, now: Duration) {
        Engine::on_tick(self, now);
    }

    fn checkpoint_done(&mut self, now: Duration) {
        Engine::checkpoint_done(self, now);
    }

    fn next_deadline(&self) -> Option<Duration> {
        Engine::next_deadline(self)
    }

    fn drain(&mut self, out: &mut Outputs) {
        for d in self.take_decisions() {
            match d {
                Decision::Release { frame, .. } => out.released.push(frame),
                Decision::DropSecondary { .. } => out.dropped_secondary += 1,
                Decision::Checkpoint { reason } => out.checkpoints.push((
                    reason.name().to_owned(),
                    reason.to_string(),
                    serde_json::to_value(&reason).unwrap_or(Value::Null),
                )),
            }
        }
    }

    fn stats_json(&self) -> Value {
        serde_json::to_value(self.stats()).unwrap_or(Value::Null)
    }
}
