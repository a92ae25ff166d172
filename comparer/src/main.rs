//! colo-compare: one comparison engine driven live over sockets or offline over pcap files.
//!
//! `comparer replay --primary P.pcap --secondary S.pcap [...]` is the offline mode; anything
//! else is the live mode (QEMU-style options, see `comparer --help`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser};
use colo_proto::frame::Frame;
use comparer::engine::CompareConfig;
use comparer::pcap::{PcapOut, read_capture};
use comparer::replay::{Event, ReplayError, ReplayOptions, ReplaySink, Timestamps, replay};

/// Subcommands parsed with clap. The live mode keeps its own QEMU-style parser
/// (`comparer::live::run_cli`), reached when the first argument is not a subcommand.
#[derive(Parser, Debug)]
#[command(
    name = "comparer",
    about = "colo-compare: compare primary and secondary output"
)]
enum Cli {
    /// Offline mode: compare two captures (pcap or pcapng) on a virtual clock.
    Replay(ReplayArgs),
}

/// Options of `comparer replay` (QEMU's spelling; dashes accepted too).
#[derive(Args, Debug)]
struct ReplayArgs {
    /// Capture of the primary's output.
    #[arg(long)]
    primary: PathBuf,
    /// Capture of the secondary's output.
    #[arg(long)]
    secondary: PathBuf,
    /// Write the released primary frames here (pcap).
    #[arg(long)]
    released: Option<PathBuf>,
    /// Write every decision here as JSON lines.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Milliseconds a frame may wait for its twin.
    #[arg(long = "compare_timeout", alias = "compare-timeout", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(1..))]
    compare_timeout: u64,
    /// Milliseconds between expiry scans.
    #[arg(long = "expired_scan_cycle", alias = "expired-scan-cycle", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    expired_scan_cycle: u64,
    /// Frames per queue before a checkpoint is requested.
    #[arg(long = "max_queue_size", alias = "max-queue-size", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_queue_size: u64,
    /// Captured packets start with a virtio-net header (of --vnet_hdr_len bytes).
    #[arg(long = "vnet_hdr_support", alias = "vnet-hdr-support")]
    vnet_hdr_support: bool,
    /// Length of that virtio-net header.
    #[arg(long = "vnet_hdr_len", alias = "vnet-hdr-len", default_value_t = 12,
          value_parser = clap::value_parser!(u32).range(0..=20))]
    vnet_hdr_len: u32,
    /// Timestamps: absolute, relative (each capture from 0) or auto.
    #[arg(long, default_value = "auto", value_parser = ["auto", "absolute", "relative"])]
    timestamps: String,
}

struct FileSink {
    events: Option<std::io::BufWriter<std::fs::File>>,
    released: Option<PcapOut>,
    vnet: bool,
}

impl ReplaySink for FileSink {
    fn event(&mut self, ev: &Event) -> Result<(), ReplayError> {
        if let Some(w) = self.events.as_mut() {
            let line = serde_json::to_string(ev).map_err(|e| ReplayError::Output {
                what: "events",
                error: std::io::Error::other(e),
            })?;
            writeln!(w, "{line}").map_err(|error| ReplayError::Output {
                what: "events",
                error,
            })?;
        }
        Ok(())
    }
    fn released(&mut self, at: Duration, frame: &Frame) -> Result<(), ReplayError> {
        if let Some(out) = self.released.as_mut() {
            let bytes = if self.vnet {
                &frame.payload[..]
            } else {
                frame.l2()
            };
            out.write(at, bytes).map_err(|e| ReplayError::Output {
                what: "released pcap",
                error: std::io::Error::other(e),
            })?;
        }
        Ok(())
    }
}

fn run_replay(a: ReplayArgs) -> anyhow::Result<()> {
    let primary = read_capture(&a.primary)?;
    let secondary = read_capture(&a.secondary)?;
    let opts = ReplayOptions {
        cfg: CompareConfig {
            compare_timeout: Duration::from_millis(a.compare_timeout),
            expired_scan_cycle: Duration::from_millis(a.expired_scan_cycle),
            max_queue_size: usize::try_from(a.max_queue_size).unwrap_or(usize::MAX),
            vnet_hdr_support: a.vnet_hdr_support,
        },
        vnet_hdr_len: a.vnet_hdr_len,
        timestamps: match a.timestamps.as_str() {
            "absolute" => Timestamps::Absolute,
            "relative" => Timestamps::Relative,
            _ => Timestamps::Auto,
        },
    };
    let mut sink = FileSink {
        events: match &a.events {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("{}", p.display()))?,
            )),
            None => None,
        },
        released: match &a.released {
            Some(p) => Some(PcapOut::create(p)?),
            None => None,
        },
        // The released pcap holds Ethernet frames; with a vnet header it keeps it, as captured.
        vnet: a.vnet_hdr_support,
    };
    let report = replay(&primary, &secondary, &opts, &mut sink)?;
    if let Some(w) = sink.events.as_mut() {
        w.flush().context("writing events")?;
    }
    if let Some(out) = sink.released.take() {
        out.finish()?;
    }
    println!(
        "comparer replay: primary {} ({} frames), secondary {} ({} frames)",
        a.primary.display(),
        primary.len(),
        a.secondary.display(),
        secondary.len()
    );
    print!("{}", report.summary());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if args.first().map(String::as_str) == Some("replay") {
        let cli = match Cli::try_parse_from(std::iter::once("comparer".to_string()).chain(args)) {
            Ok(c) => c,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
        };
        let Cli::Replay(a) = cli;
        return match run_replay(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("comparer replay: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    // Live mode (comparer::live): QEMU-style options, see `comparer --help`.
    match comparer::live::run_cli(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(comparer::live::LiveError::Help(msg)) => {
            print!("{msg}");
            ExitCode::SUCCESS
        }
        Err(comparer::live::LiveError::Usage(msg)) => {
            eprint!("{msg}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("comparer: {e}");
            ExitCode::from(1)
        }
    }
}
