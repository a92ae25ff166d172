//! `mem` driver: a disk held in RAM (tests, scratch exports, fuzzing).

use std::sync::RwLock;

use super::{BlockError, BlockNode, BlockResult, Pending, WriteOp, check_op, check_range};

/// A RAM disk.
#[derive(Debug)]
pub struct MemNode {
    data: RwLock<Vec<u8>>,
    size: u64,
}

impl MemNode {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        MemNode {
            data: RwLock::new(vec![0; size]),
            size: size as u64,
        }
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        let size = data.len() as u64;
        MemNode {
            data: RwLock::new(data),
            size,
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }
}

impl BlockNode for MemNode {
    fn size(&self) -> u64 {
        self.size
    }

    fn driver(&self) -> &'static str {
        "mem"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range("read", offset, buf.len() as u64, self.size)?;
        let d = self
            .data
            .read()
            .map_err(|_| BlockError::Config("mem node lock poisoned".into()))?;
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        Pending::Ready((|| {
            check_op(&op, self.size)?;
            let mut d = self
                .data
                .write()
                .map_err(|_| BlockError::Config("mem node lock poisoned".into()))?;
            match op {
                WriteOp::Write { buf, offset, .. } => {
                    let o = offset as usize;
                    d[o..o + buf.len()].copy_from_slice(buf);
                }
                WriteOp::WriteZeroes { offset, len, .. } => {
                    d[offset as usize..(offset + len) as usize].fill(0);
                }
                WriteOp::Discard { .. } | WriteOp::Flush => {}
            }
            Ok(())
        })())
    }
}
