//! The 16550 console on COM1 (`vm-superio`), its interrupt through an irqfd, and where its
//! output goes: stdout, a file, or a Unix socket vmm-min listens on (like QEMU's
//! `-serial unix:PATH,server=on,wait=off`). Input comes from stdin or the socket client.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Where the console goes (`--serial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// Standard output (input from standard input).
    Stdio,
    /// Append to a file.
    File(PathBuf),
    /// Listen on a Unix socket; one client at a time gets output and sends input.
    Unix(PathBuf),
    /// Discard.
    Null,
}

/// Errors parsing or opening a serial backend.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Unknown `--serial` value.
    #[error("--serial {0:?}: expected stdio, null, file:PATH or unix:PATH")]
    Parse(String),
    /// Opening the file or socket failed.
    #[error("--serial {what}: {source}")]
    Open {
        /// The spec.
        what: String,
        /// OS error.
        source: io::Error,
    },
}

impl std::str::FromStr for SerialSpec {
    type Err = SerialError;
    fn from_str(s: &str) -> Result<Self, SerialError> {
        let s_main = s.split(',').next().unwrap_or("");
        match s_main {
            "stdio" => Ok(Self::Stdio),
            "null" | "none" => Ok(Self::Null),
            _ => {
                if let Some(p) = s_main.strip_prefix("file:").filter(|p| !p.is_empty()) {
                    Ok(Self::File(p.into()))
                } else if let Some(p) = s_main.strip_prefix("unix:").filter(|p| !p.is_empty()) {
                    Ok(Self::Unix(p.into()))
                } else {
                    Err(SerialError::Parse(s.to_string()))
                }
            }
        }
    }
}

/// The serial's interrupt line: an eventfd registered as irqfd for IRQ 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Output sink shared with the socket acceptor thread.
#[derive(Clone)]
pub struct SerialOut(Arc<Mutex<Sink>>);

enum Sink {
    Stdout,
    File(File),
    Socket(Option<UnixStream>),
    Null,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *g {
            Sink::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(buf)?;
                if buf.contains(&b'\n') {
                    o.flush()?;
                }
            }
            Sink::File(f) => f.write_all(buf)?,
            Sink::Socket(s) => {
                if let Some(c) = s
                    && c.write_all(buf).is_err()
                {
                    *s = None;
                }
            }
            Sink::Null => {}
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *g {
            Sink::Stdout => io::stdout().flush(),
            Sink::File(f) => f.flush(),
            _ => Ok(()),
        }
    }
}

/// Plain serde copy of the 16550 registers, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Pending input bytes.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        Self {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        let r = s.regs;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A serial whose interrupt is `irq` and whose output goes to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Feeds guest input.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Register state for snapshots.
    pub fn snapshot(&self) -> SerialSnapshot {
        SerialSnapshot::from(&self.serial.state())
    }

    /// Restores registers and pending input from a snapshot (same interrupt and output).
    pub fn restore(&mut self, snap: &SerialSnapshot) -> Result<(), String> {
        let irq = self
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("serial restore: irq eventfd: {e}"))?;
        let out = self.serial.writer().clone();
        self.serial = Serial::from_state(&SerialState::from(snap), IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial restore: {e:?}"))?;
        // An interrupt pending in IIR may have been raised (irqfd) after the interrupt
        // controllers were captured: raise it again (the driver reads IIR; a spare edge is
        // harmless, a lost one stalls the console).
        if snap.regs[3] & 1 == 0 {
            let _ = self.serial.interrupt_evt().trigger();
        }
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first()
            && let Err(e) = self.serial.write(offset as u8, *b)
        {
            tracing::debug!("serial write: {e:?}");
        }
    }
}

/// Opens the sink for `spec` and starts the input thread (stdin or socket clients) that feeds
/// `serial` once it is set in the returned slot.
pub fn open(spec: &SerialSpec) -> Result<(SerialOut, InputSource), SerialError> {
    let open_err = |source| SerialError::Open {
        what: format!("{spec:?}"),
        source,
    };
    match spec {
        SerialSpec::Stdio => Ok((
            SerialOut(Arc::new(Mutex::new(Sink::Stdout))),
            InputSource::Stdin,
        )),
        SerialSpec::Null => Ok((
            SerialOut(Arc::new(Mutex::new(Sink::Null))),
            InputSource::None,
        )),
        SerialSpec::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(open_err)?;
            Ok((
                SerialOut(Arc::new(Mutex::new(Sink::File(f)))),
                InputSource::None,
            ))
        }
        SerialSpec::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(open_err)?;
            Ok((
                SerialOut(Arc::new(Mutex::new(Sink::Socket(None)))),
                InputSource::Listener(l),
            ))
        }
    }
}

/// Where guest input comes from.
pub enum InputSource {
    /// No input.
    None,
    /// Standard input.
    Stdin,
    /// Clients of this socket.
    Listener(UnixListener),
}

fn pump(mut r: impl Read, dev: &Arc<Mutex<SerialDevice>>) {
    let mut buf = [0u8; 64];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut done = 0;
                // The 16550 FIFO is small: wait for the guest to drain it.
                while done < n {
                    let k = dev
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .enqueue(&buf[done..n]);
                    done += k;
                    if k == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
    }
}

/// Starts the thread feeding guest input into `dev`.
pub fn start_input(src: InputSource, out: SerialOut, dev: Arc<Mutex<SerialDevice>>) {
    match src {
        InputSource::None => {}
        InputSource::Stdin => {
            let _ = std::thread::Builder::new()
                .name("serial-in".into())
                .spawn(move || pump(io::stdin(), &dev));
        }
        InputSource::Listener(l) => {
            let _ = std::thread::Builder::new()
                .name("serial-accept".into())
                .spawn(move || {
                    for c in l.incoming().flatten() {
                        let Ok(w) = c.try_clone() else { continue };
                        if let Sink::Socket(s) =
                            &mut *out.0.lock().unwrap_or_else(PoisonError::into_inner)
                        {
                            *s = Some(w);
                        }
                        pump(c, &dev);
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_specs_parse_and_bad_ones_are_refused() {
        assert_eq!("stdio".parse::<SerialSpec>().unwrap(), SerialSpec::Stdio);
        assert_eq!(
            "file:/x/y".parse::<SerialSpec>().unwrap(),
            SerialSpec::File("/x/y".into())
        );
        assert_eq!(
            "unix:/s,server=on,wait=off".parse::<SerialSpec>().unwrap(),
            SerialSpec::Unix("/s".into())
        );
        assert!("file:".parse::<SerialSpec>().is_err());
        assert!("tcp:1".parse::<SerialSpec>().is_err());
    }

    #[test]
    fn guest_bytes_reach_the_file_and_raise_the_interrupt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("con");
        let (out, _) = open(&SerialSpec::File(p.clone())).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), out);
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        let snap = dev.snapshot();
        assert_eq!(snap.regs[2], 0x02);
        let back = SerialSnapshot::from(&SerialState::from(&snap));
        assert_eq!(back, snap);
    }
}
