//! Live-mode options, spelled as QEMU's `colo-compare` object and socket chardevs.
//!
//! Two ways to say the same thing:
//!
//! ```text
//! comparer --primary_in unix:/run/p.sock,server=on --secondary_in tcp:127.0.0.1:9004,server=on \
//!          --outdev unix:/run/o.sock --qmp unix:/run/c.sock \
//!          [--compare_timeout 3000] [--expired_scan_cycle 1000] [--max_queue_size 1024] \
//!          [--vnet_hdr_support] [--notify_dev SPEC] [--id comp0]
//!
//! comparer -chardev socket,id=compare0,host=127.0.0.1,port=9001,server=on,wait=off \
//!          -chardev socket,id=compare1,host=127.0.0.1,port=9004,server=on,wait=off \
//!          -chardev socket,id=compare_out,host=127.0.0.1,port=9005 \
//!          -object iothread,id=iothread1 \
//!          -object colo-compare,id=comp0,primary_in=compare0,secondary_in=compare1,outdev=compare_out,iothread=iothread1 \
//!          -qmp unix:/run/c.sock,server=on,wait=off
//! ```
//!
//! Socket specs are [`colo_proto::chardev::ChardevSpec`]s. `iothread` objects are accepted and
//! ignored (the comparer has its own threads). Options given after `-object colo-compare`
//! with `--` spelling override the object's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use colo_proto::chardev::{ChardevSpec, SocketAddress};

use super::LiveError;

/// Everything the live comparer needs to run.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// Instance name (`id=` of the object), reported in events and `query-colo-compare`.
    pub id: String,
    pub primary_in: ChardevSpec,
    pub secondary_in: ChardevSpec,
    pub outdev: ChardevSpec,
    /// QEMU's Xen-style controller channel (`DO_CHECKPOINT` / `COLO_CHECKPOINT`).
    pub notify_dev: Option<ChardevSpec>,
    /// The QMP control channel.
    pub qmp: Option<QmpAddr>,
    pub compare_timeout: Duration,
    pub expired_scan_cycle: Duration,
    pub max_queue_size: usize,
    pub vnet_hdr_support: bool,
}

/// Where QMP is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QmpAddr {
    /// A Unix socket we listen on.
    Unix(PathBuf),
    /// stdin/stdout (`--qmp stdio`).
    Stdio,
}

/// The live comparer's command line (clap), after `-object`/`-chardev`/`-qmp` were given their
/// long spelling.
#[derive(Parser, Debug, Default)]
#[command(
    name = "comparer",
    about = "colo-compare live over sockets (QEMU option spelling); `comparer replay --help` for offline mode"
)]
pub struct LiveArgs {
    /// Primary input: a chardev spec (unix:PATH / tcp:HOST:PORT / socket,..., server=on|off).
    #[arg(long = "primary_in", alias = "primary-in")]
    pub primary_in: Option<String>,
    /// Secondary input (chardev spec).
    #[arg(long = "secondary_in", alias = "secondary-in")]
    pub secondary_in: Option<String>,
    /// Output of released primary frames (chardev spec).
    #[arg(long)]
    pub outdev: Option<String>,
    /// Xen-style controller channel (chardev spec).
    #[arg(long = "notify_dev", alias = "notify-dev")]
    pub notify_dev: Option<String>,
    /// QMP control socket: unix:PATH[,server=on,wait=off], a path, or stdio.
    #[arg(long)]
    pub qmp: Option<String>,
    /// Milliseconds a frame may wait for its twin (QEMU default 3000).
    #[arg(long = "compare_timeout", alias = "compare-timeout")]
    pub compare_timeout: Option<u64>,
    /// Milliseconds between timeout scans (QEMU default 1000).
    #[arg(long = "expired_scan_cycle", alias = "expired-scan-cycle")]
    pub expired_scan_cycle: Option<u64>,
    /// Frames per connection and side (QEMU default 1024).
    #[arg(long = "max_queue_size", alias = "max-queue-size")]
    pub max_queue_size: Option<u64>,
    /// Frames carry the vnet header length field ([=on|off]).
    #[arg(long = "vnet_hdr_support", alias = "vnet-hdr-support", num_args = 0..=1, default_missing_value = "on")]
    pub vnet_hdr_support: Option<String>,
    /// Instance id.
    #[arg(long)]
    pub id: Option<String>,
    /// QEMU-style chardev definition: socket,id=ID,path=P|host=H,port=N[,server=on][,...].
    #[arg(long)]
    pub chardev: Vec<String>,
    /// QEMU-style object: colo-compare,id=...,primary_in=ID,secondary_in=ID,outdev=ID[,...]
    /// (iothread objects are accepted and ignored).
    #[arg(long)]
    pub object: Vec<String>,
}

/// Gives QEMU's single-dash long options (`-object`, `-chardev`, `-qmp`) clap's spelling.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    args.into_iter()
        .map(|a| match a.as_str() {
            "-object" | "-chardev" | "-qmp" | "-id" => format!("-{a}"),
            _ => a,
        })
        .collect()
}

fn bad(msg: impl Into<String>) -> LiveError {
    LiveError::Config(msg.into())
}

fn parse_onoff(key: &str, v: &str) -> Result<bool, LiveError> {
    match v {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(bad(format!("{key}={v}: expected on or off"))),
    }
}

fn parse_ms(key: &str, v: &str) -> Result<u64, LiveError> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 && n <= u64::from(u32::MAX) => Ok(n),
        _ => Err(bad(format!(
            "{key}={v}: expected a number between 1 and {}",
            u32::MAX
        ))),
    }
}

/// Splits `type,k=v,...` into the type and its keys (a bare key means `on`).
fn kv_list(s: &str) -> Result<(String, Vec<(String, String)>), LiveError> {
    let mut it = s.split(',');
    let ty = it.next().unwrap_or_default().to_owned();
    let mut kvs = Vec::new();
    for kv in it.filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some((k, v)) => kvs.push((k.to_owned(), v.to_owned())),
            None => kvs.push((kv.to_owned(), "on".to_owned())),
        }
    }
    if ty.is_empty() {
        return Err(bad(format!(
            "{s:?}: missing the type before the first comma"
        )));
    }
    Ok((ty, kvs))
}

fn parse_qmp(s: &str) -> Result<QmpAddr, LiveError> {
    if s == "stdio" {
        return Ok(QmpAddr::Stdio);
    }
    parse_qmp_path(s).map(QmpAddr::Unix)
}

fn parse_qmp_path(s: &str) -> Result<PathBuf, LiveError> {
    if let Some(rest) = s.strip_prefix("unix:") {
        let path = rest.split(',').next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad(format!("--qmp {s:?}: empty path")));
        }
        return Ok(PathBuf::from(path));
    }
    if s.contains(',') || s.starts_with("tcp:") {
        let spec: ChardevSpec = s.parse()?;
        return match spec.addr {
            SocketAddress::Unix(p) => Ok(p),
            SocketAddress::Tcp { .. } => Err(bad(format!(
                "--qmp {s:?}: only Unix sockets are supported for QMP"
            ))),
        };
    }
    if s.is_empty() {
        return Err(bad("--qmp: empty path"));
    }
    Ok(PathBuf::from(s))
}

impl LiveConfig {
    /// Parses a command line (without the program name).
    pub fn from_cli<I: IntoIterator<Item = String>>(args: I) -> Result<Self, LiveError> {
        let mut argv = vec!["comparer".to_owned()];
        argv.extend(normalize_args(args));
        let parsed = LiveArgs::try_parse_from(argv).map_err(|e| match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                LiveError::Help(e.to_string())
            }
            _ => LiveError::Usage(e.to_string()),
        })?;
        Self::from_args(parsed)
    }

    /// Builds the configuration from parsed arguments.
    pub fn from_args(a: LiveArgs) -> Result<Self, LiveError> {
        let mut chardevs: HashMap<String, ChardevSpec> = HashMap::new();
        for c in &a.chardev {
            let spec: ChardevSpec = c.parse()?;
            let Some(id) = spec.id.clone() else {
                return Err(bad(format!("-chardev {c:?}: needs id=")));
            };
            if chardevs.insert(id.clone(), spec).is_some() {
                return Err(bad(format!("-chardev: duplicate id {id:?}")));
            }
        }
        let mut id = None;
        let mut primary_in = None;
        let mut secondary_in = None;
        let mut outdev = None;
        let mut notify_dev = None;
        let mut compare_timeout = 3000;
        let mut expired_scan_cycle = 1000;
        let mut max_queue_size = 1024;
        let mut vnet_hdr_support = false;
        let mut seen_compare = false;
        for o in &a.object {
            let (ty, kvs) = kv_list(o)?;
            match ty.as_str() {
                "iothread" => continue,
                "colo-compare" => {}
                _ => {
                    return Err(bad(format!(
                        "-object {ty}: only colo-compare (and iothread) objects are known here"
                    )));
                }
            }
            if seen_compare {
                return Err(bad(
                    "-object colo-compare given twice: one instance per process",
                ));
            }
            seen_compare = true;
            let chardev = |k: &str, v: &str| {
                chardevs
                    .get(v)
                    .cloned()
                    .ok_or_else(|| bad(format!("colo-compare {k}={v}: no -chardev with id {v:?}")))
            };
            for (k, v) in &kvs {
                match k.as_str() {
                    "id" => id = Some(v.clone()),
                    "primary_in" => primary_in = Some(chardev(k, v)?),
                    "secondary_in" => secondary_in = Some(chardev(k, v)?),
                    "outdev" => outdev = Some(chardev(k, v)?),
                    "notify_dev" => notify_dev = Some(chardev(k, v)?),
                    "iothread" => {}
                    "compare_timeout" => compare_timeout = parse_ms(k, v)?,
                    "expired_scan_cycle" => expired_scan_cycle = parse_ms(k, v)?,
                    "max_queue_size" => max_queue_size = parse_ms(k, v)?,
                    "vnet_hdr_support" => vnet_hdr_support = parse_onoff(k, v)?,
                    _ => return Err(bad(format!("colo-compare: unknown property {k:?}"))),
                }
            }
        }
        if let Some(s) = &a.primary_in {
            primary_in = Some(s.parse()?);
        }
        if let Some(s) = &a.secondary_in {
            secondary_in = Some(s.parse()?);
        }
        if let Some(s) = &a.outdev {
            outdev = Some(s.parse()?);
        }
        if let Some(s) = &a.notify_dev {
            notify_dev = Some(s.parse()?);
        }
        if let Some(v) = a.compare_timeout {
            compare_timeout = parse_ms("compare_timeout", &v.to_string())?;
        }
        if let Some(v) = a.expired_scan_cycle {
            expired_scan_cycle = parse_ms("expired_scan_cycle", &v.to_string())?;
        }
        if let Some(v) = a.max_queue_size {
            max_queue_size = parse_ms("max_queue_size", &v.to_string())?;
        }
        if let Some(v) = &a.vnet_hdr_support {
            vnet_hdr_support = parse_onoff("vnet_hdr_support", v)?;
        }
        let qmp = a.qmp.as_deref().map(parse_qmp).transpose()?;
        let need = |v: Option<ChardevSpec>, name: &str| {
            v.ok_or_else(|| {
                bad(format!(
                    "{name} is required (--{name} SPEC or -object colo-compare,{name}=ID)"
                ))
            })
        };
        let primary_in = need(primary_in, "primary_in")?;
        let secondary_in = need(secondary_in, "secondary_in")?;
        let outdev = need(outdev, "outdev")?;
        if primary_in.addr == secondary_in.addr
            || primary_in.addr == outdev.addr
            || secondary_in.addr == outdev.addr
        {
            return Err(bad(
                "primary_in, secondary_in and outdev must be three different sockets",
            ));
        }
        Ok(LiveConfig {
            id: a.id.or(id).unwrap_or_else(|| "comp0".to_owned()),
            primary_in,
            secondary_in,
            outdev,
            notify_dev,
            qmp,
            compare_timeout: Duration::from_millis(compare_timeout),
            expired_scan_cycle: Duration::from_millis(expired_scan_cycle),
            max_queue_size: max_queue_size as usize,
            vnet_hdr_support,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(s: &str) -> Result<LiveConfig, LiveError> {
        LiveConfig::from_cli(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn long_options_with_defaults() {
        let c = cli("--primary_in unix:/p.sock,server=on --secondary_in tcp:127.0.0.1:9004,server=on --outdev unix:/o.sock --qmp unix:/c.sock").unwrap();
        assert!(c.primary_in.server);
        assert!(c.secondary_in.server);
        assert!(!c.outdev.server);
        assert_eq!(c.qmp, Some(QmpAddr::Unix(PathBuf::from("/c.sock"))));
        assert_eq!(c.compare_timeout, Duration::from_millis(3000));
        assert_eq!(c.expired_scan_cycle, Duration::from_millis(1000));
        assert_eq!(c.max_queue_size, 1024);
        assert!(!c.vnet_hdr_support);
        let c = cli("--primary_in unix:/p --secondary_in unix:/s --outdev unix:/o --vnet_hdr_support --compare_timeout 50").unwrap();
        assert!(c.vnet_hdr_support);
        assert_eq!(c.compare_timeout, Duration::from_millis(50));
    }

    #[test]
    fn qemu_object_and_chardevs_as_in_the_seed() {
        let c = cli("-chardev socket,id=compare0,host=10.22.1.2,port=9001,server,nowait \
             -chardev socket,id=compare1,host=10.22.1.2,port=9004,server,nowait \
             -chardev socket,id=compare_out0,host=10.22.1.2,port=9005 \
             -object iothread,id=iothread1 \
             -object colo-compare,id=comp0,primary_in=compare0,secondary_in=compare1,outdev=compare_out0,iothread=iothread1,compare_timeout=500,vnet_hdr_support=on \
             -qmp unix:/tmp/q.sock,server=on,wait=off")
        .unwrap();
        assert_eq!(c.id, "comp0");
        assert!(c.primary_in.server && !c.outdev.server);
        assert_eq!(c.compare_timeout, Duration::from_millis(500));
        assert!(c.vnet_hdr_support);
        assert_eq!(c.qmp, Some(QmpAddr::Unix(PathBuf::from("/tmp/q.sock"))));
    }

    #[test]
    fn bad_command_lines_are_clear_errors() {
        for (s, needle) in [
            (
                "--secondary_in unix:/s --outdev unix:/o",
                "primary_in is required",
            ),
            (
                "--primary_in unix:/p --secondary_in unix:/p --outdev unix:/o",
                "different",
            ),
            (
                "--primary_in bogus --secondary_in unix:/s --outdev unix:/o",
                "bogus",
            ),
            ("-object colo-compare,primary_in=nope", "no -chardev"),
            ("-object colo-compare,frob=1", "unknown property"),
            (
                "--primary_in unix:/p --secondary_in unix:/s --outdev unix:/o --compare_timeout 0",
                "compare_timeout",
            ),
            (
                "--primary_in unix:/p --secondary_in unix:/s --outdev unix:/o --vnet_hdr_support=maybe",
                "vnet_hdr_support",
            ),
            ("--frobnicate", "frobnicate"),
        ] {
            let e = cli(s).unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }
}
