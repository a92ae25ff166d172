//! vhost-blk-colo: a vhost-user-blk backend whose disk is a small block graph with quorum,
//! COLO block replication and NBD, controlled over QMP.
//!
//! Primary (the seed's quorum drive):
//! ```text
//! vhost-blk-colo --socket /run/blk0.sock --qmp unix:/run/blk0.qmp \
//!   --drive driver=quorum,id=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0.file.filename=disk.img,children.0.driver=raw
//! ```
//! Secondary (base exported over NBD, active/hidden overlays in RAM):
//! ```text
//! vhost-blk-colo --socket /run/blk0.sock --qmp unix:/run/blk0.qmp \
//!   --drive if=none,id=colo-disk0,driver=raw,file.filename=disk.img \
//!   --drive id=active-disk0,driver=replication,mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=colo-disk0
//! ```

use std::{path::PathBuf, sync::Arc, sync::atomic::AtomicBool, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use colo_proto::qmp::{Registry, serve_stdio, serve_unix};
use serde_json::json;
use vhost_blk_colo::{
    control::BlkControl,
    vhost_user::{self, BlkConfig, VhostUserBlk},
};

#[derive(Debug, Parser)]
#[command(
    name = "vhost-blk-colo",
    version,
    about = "vhost-user-blk backend with quorum, COLO replication and NBD"
)]
struct Args {
    /// vhost-user socket to listen on (served again after each disconnect).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A drive, QEMU -drive syntax (repeatable). The last drive without if=none is the guest's.
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// QMP control socket: unix:PATH or stdio.
    #[arg(long)]
    qmp: Option<String>,
    /// Number of request queues.
    #[arg(long, default_value_t = 1)]
    num_queues: usize,
    /// Largest queue size (virtio-mmio guests ask for up to 1024).
    #[arg(long, default_value_t = 1024)]
    queue_size: usize,
    /// I/O worker threads shared by all queues (requests of a queue run in parallel on them).
    /// A replicated write holds its worker until the secondary answers, so the pool bounds
    /// the writes in flight to the secondary (4 workers: replicated 4k QD16 ~8.5k IOPS, 16:
    /// ~13k on the 2-vCPU bench host; local-only unchanged).
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Device id returned to the guest (GET_ID).
    #[arg(long, default_value = "vhost-blk-colo")]
    serial: String,
    /// Expose the disk read-only.
    #[arg(long)]
    read_only: bool,
    /// Bound on one NBD request to the secondary, in milliseconds; a slower secondary is dropped.
    #[arg(long, default_value_t = 5000)]
    nbd_timeout_ms: u64,
}

fn main() -> anyhow::Result<()> {
    keep_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.num_queues == 0 || args.num_queues > 64 {
        bail!("--num-queues must be between 1 and 64");
    }
    if args.workers == 0 || args.workers > 256 {
        bail!("--workers must be between 1 and 256");
    }
    if !args.queue_size.is_power_of_two() || args.queue_size > 32768 {
        bail!("--queue-size must be a power of two <= 32768");
    }
    let mut registry =
        Registry::new().with_package(format!("vhost-blk-colo {}", env!("CARGO_PKG_VERSION")));
    let sink = registry.events();
    let events: vhost_blk_colo::block::EventSink = Arc::new(move |name: &str, data| {
        sink.emit(name, data);
    });
    let control = Arc::new(BlkControl::new(
        events,
        Duration::from_millis(args.nbd_timeout_ms),
    )?);
    for d in &args.drives {
        control
            .add_drive_str(d)
            .with_context(|| format!("--drive {d}"))?;
    }
    control.register(&mut registry);
    registry.add("quit", |_| {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            std::process::exit(0)
        });
        Ok(json!({}))
    });
    let _qmp = match args.qmp.as_deref() {
        None => None,
        Some("stdio") => Some(serve_stdio(registry).context("QMP on stdio")?),
        Some(s) => {
            let path = s
                .strip_prefix("unix:")
                .context("--qmp takes unix:PATH or stdio")?;
            let path = path.split(',').next().unwrap_or(path);
            Some(serve_unix(path, registry).with_context(|| format!("QMP on {path}"))?)
        }
    };
    match &args.socket {
        Some(sock) => {
            let node = control
                .guest_node()
                .context("--socket needs a guest drive (a --drive without if=none)")?;
            let cfg = BlkConfig {
                num_queues: args.num_queues,
                queue_size: args.queue_size,
                read_only: args.read_only,
                serial: args.serial.clone(),
                workers: args.workers,
                ..BlkConfig::default()
            };
            let dev = Arc::new(VhostUserBlk::new(node, cfg));
            let stop = AtomicBool::new(false);
            vhost_user::serve(sock, dev, &stop)
                .with_context(|| format!("vhost-user on {}", sock.display()))?;
        }
        None => loop {
            std::thread::park();
        },
    }
    Ok(())
}

/// Request buffers up to 1 MiB and more come and go at every large request. With glibc's
/// defaults each one is a fresh mmap whose pages are faulted in and zeroed by the kernel (seen in
/// profiles of 1 MiB writes); served from the heap and kept there on free, they are reused.
fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator's thresholds; called before any other thread
    // starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}
