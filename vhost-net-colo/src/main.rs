//! vhost-net-colo: vhost-user-net backend with QEMU-style netdevs and COLO filters.

use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Parser;
use vhost_net_colo::app::{App, parse_mac};
use vhost_net_colo::filter::ObjectSpec;

/// vhost-user-net backend whose packet path runs through COLO filters (QEMU spelling).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Opts {
    /// vhost-user socket to listen on (served again after each frontend disconnects).
    #[arg(long)]
    socket: String,
    /// The netdev: tap,id=hn0,ifname=..,script=..,downscript=..[,vnet_hdr=on|off]
    /// | user,id=n0[,net=..,host=..,guest=..,dns=..],hostfwd=tcp:127.0.0.1:8080-:80
    /// | stream,id=s0,server=on|off,addr.type=unix|inet,... | dgram,id=d0,local.*,remote.*;
    /// each also takes queues=N (queue pairs, 1..16)
    #[arg(long)]
    netdev: String,
    /// Guest MAC address, in config space.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    mac: String,
    /// Socket chardevs for filters: socket,id=mirror0,host=127.0.0.1,port=9003,server=on,wait=off
    #[arg(long)]
    chardev: Vec<String>,
    /// Filters: filter-mirror|filter-redirector|filter-rewriter|filter-dump,id=..,netdev=..,...
    #[arg(long)]
    object: Vec<String>,
    /// QMP control socket: unix:PATH
    #[arg(long)]
    qmp: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let o = Opts::parse();
    // SIGTERM/SIGINT/SIGHUP are taken by a thread that releases the netdev (downscript) and
    // exits; they are blocked here, before any other thread exists, so every thread inherits it.
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset/pthread_sigmask take valid pointers.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mac = parse_mac(&o.mac)?;
    let app = App::new(&o.netdev, &o.chardev)?;
    for obj in &o.object {
        let spec = ObjectSpec::parse_cli(obj).with_context(|| format!("--object {obj}"))?;
        app.add_object(spec)
            .map_err(|e| anyhow::anyhow!("--object {obj}: {e}"))?;
    }
    let _qmp = match &o.qmp {
        Some(q) => {
            let p = q
                .strip_prefix("unix:")
                .with_context(|| format!("--qmp {q}: expected unix:PATH"))?;
            let p = p.split(',').next().unwrap_or(p);
            Some(
                colo_proto::qmp::serve_unix(p, app.registry())
                    .with_context(|| format!("--qmp {q}"))?,
            )
        }
        None => None,
    };
    let sig_app = app.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` is an initialised sigset; `sig` is a valid out pointer.
            unsafe { libc::sigwait(&set, &mut sig) };
            tracing::info!("signal {sig}: shutting down");
            if let Some(n) = sig_app.path.netdev() {
                n.shutdown();
            }
            std::process::exit(0);
        })?;
    let stop = AtomicBool::new(false);
    app.serve(&o.socket, mac, &stop)?;
    Ok(())
}
