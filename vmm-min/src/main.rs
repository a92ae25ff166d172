//! vmm-min command line: parse options (QEMU spellings where QEMU has them), run the machine,
//! exit with the guest's status: 0 poweroff/quit, 3 reset, 1 error, 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm_min::boot::BootSpec;
use vmm_min::devices::serial::SerialSpec;
use vmm_min::machine::{self, MachineConfig};
use vmm_min::qmp::QmpSpec;
use vmm_min::virtio::vhost_user::{Kind, VhostUserSpec};

#[derive(Parser, Debug)]
#[command(
    name = "vmm-min",
    about = "A minimal KVM VMM whose net and disks are vhost-user backends"
)]
struct Args {
    /// bzImage to boot (not needed with --restore or --incoming).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Resume the guest from a snapshot file (QMP snapshot-save-file) instead of booting.
    #[arg(long, conflicts_with = "incoming")]
    restore: Option<PathBuf>,
    /// Receive a live migration on tcp:HOST:PORT and resume the guest from it.
    #[arg(long)]
    incoming: Option<String>,
    /// initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Guest RAM: a number with suffix K, M, G (no suffix: MiB, as QEMU's -m).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// vCPU count.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Console: stdio, null, file:PATH, unix:PATH.
    #[arg(long, default_value = "stdio")]
    serial: SerialSpec,
    /// Network device: vhost-user,socket=PATH[,mac=52:54:00:12:34:56] (repeatable).
    #[arg(long)]
    net: Vec<String>,
    /// Disk: vhost-user,socket=PATH (repeatable).
    #[arg(long)]
    disk: Vec<String>,
    /// Also put virtio_mmio.device= entries on the kernel command line.
    #[arg(long)]
    virtio_mmio_cmdline: bool,
    /// QMP: unix:PATH or stdio.
    #[arg(long)]
    qmp: Option<QmpSpec>,
    /// Seconds to wait for each backend socket.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a size (examples: 512M, 2G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let start = match (&args.restore, &args.incoming) {
        (Some(p), _) => machine::StartFrom::Restore(p.clone()),
        (None, Some(uri)) => {
            if let Err(e) = vmm_min::migrate::parse_tcp_uri(uri) {
                eprintln!("vmm-min: --incoming {e}");
                return ExitCode::from(2);
            }
            machine::StartFrom::Incoming(uri.clone())
        }
        (None, None) => machine::StartFrom::Boot,
    };
    let kernel = match (&args.kernel, &start) {
        (Some(k), _) => k.clone(),
        (None, machine::StartFrom::Boot) => {
            eprintln!(
                "vmm-min: --kernel is required (unless --restore FILE or --incoming tcp:HOST:PORT)"
            );
            return ExitCode::from(2);
        }
        (None, _) => PathBuf::new(),
    };
    let mut devices = Vec::new();
    for (kind, list) in [(Kind::Net, &args.net), (Kind::Block, &args.disk)] {
        for s in list {
            match VhostUserSpec::parse(kind, s) {
                Ok(d) => devices.push(d),
                Err(e) => {
                    eprintln!("vmm-min: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    let cfg = MachineConfig {
        memory: args.memory,
        cpus: args.cpus,
        boot: BootSpec {
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
        serial: args.serial,
        devices,
        virtio_cmdline: args.virtio_mmio_cmdline,
        connect_wait: std::time::Duration::from_secs(args.connect_timeout),
        qmp: args.qmp,
        start,
    };
    match machine::run(&cfg) {
        Ok(reason) => {
            if let vmm_min::control::ExitReason::Error(e) = &reason {
                eprintln!("vmm-min: {e}");
            } else {
                eprintln!("vmm-min: guest {reason:?}");
            }
            ExitCode::from(reason.exit_code())
        }
        Err(e) => {
            eprintln!("vmm-min: {e}");
            ExitCode::from(1)
        }
    }
}
