//! The image file: positioned reads and writes with context. In unit tests a write budget can
//! simulate a crash: once it is spent, every later write fails, as if the process had died
//! there (the crash-ordering tests reopen the file afterwards).

use std::{fs::File, os::unix::fs::FileExt};

use super::header::Qcow2Error;

/// The open image file.
#[derive(Debug)]
pub(super) struct ImageFile {
    file: File,
    name: String,
    #[cfg(test)]
    pub budget: std::sync::atomic::AtomicI64,
}

impl ImageFile {
    pub fn new(file: File, path: &std::path::Path) -> Self {
        ImageFile {
            file,
            name: path.display().to_string(),
            #[cfg(test)]
            budget: std::sync::atomic::AtomicI64::new(i64::MAX),
        }
    }

    #[cfg(test)]
    fn spend(&self, what: &str) -> Result<(), Qcow2Error> {
        use std::sync::atomic::Ordering;
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(Qcow2Error::io(
                format!("{}: injected crash before {what}", self.name),
                std::io::Error::other("crash"),
            ));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline]
    fn spend(&self, _what: &str) -> Result<(), Qcow2Error> {
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn pwrite(&self, buf: &[u8], offset: u64, what: &str) -> Result<(), Qcow2Error> {
        self.spend(what)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Qcow2Error::io(format!("{}: writing {what} at {offset:#x}", self.name), e))
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zero.
    pub fn pread(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<(), Qcow2Error> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Qcow2Error::io(
                        format!("{}: reading {what} at {offset:#x}", self.name),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The file's length.
    pub fn len(&self) -> Result<u64, Qcow2Error> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Qcow2Error::io(format!("{}: size", self.name), e))
    }

    /// Truncates (or extends) the file.
    pub fn set_len(&self, len: u64) -> Result<(), Qcow2Error> {
        self.spend("truncate")?;
        self.file
            .set_len(len)
            .map_err(|e| Qcow2Error::io(format!("{}: truncating to {len}", self.name), e))
    }

    /// fdatasync.
    pub fn sync(&self) -> Result<(), Qcow2Error> {
        self.file
            .sync_data()
            .map_err(|e| Qcow2Error::io(format!("{}: fdatasync", self.name), e))
    }
}
