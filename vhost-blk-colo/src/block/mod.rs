//! The block graph: nodes that read and write byte ranges of a virtual disk.
//!
//! Every node implements [`BlockNode`]. The trait is synchronous because its callers are the
//! vhost-user worker threads and the NBD server's blocking pool; nodes that talk to the network
//! (the NBD client) expose their latency through [`BlockNode::submit`], which returns a
//! [`Pending`] completion, so a parent (quorum) can start a write on every child before it waits
//! for any of them.
//!
//! Drivers: [`file`] (raw image, optional O_DIRECT), [`mem`] (RAM disk, for tests and scratch),
//! [`overlay`] (sparse copy-on-write layer with an allocation map), [`qcow2`] (qcow2 image
//! files as copy-on-write overlays), [`nbd`] (NBD client),
//! [`quorum`] and [`replication`] (COLO).

pub mod file;
pub mod mem;
pub mod nbd;
pub mod overlay;
pub mod qcow2;
pub mod quorum;
pub mod replication;

use std::{io, sync::Arc};

/// Errors of block nodes. Each carries enough context to say which request failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request does not fit inside the device.
    #[error(
        "{op} of {len} bytes at offset {offset} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange {
        /// The operation name.
        op: &'static str,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// An I/O error from the host.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The node is read-only.
    #[error("{0}: the device is read-only")]
    ReadOnly(String),
    /// The node does not support this operation.
    #[error("{0} is not supported by this node")]
    Unsupported(&'static str),
    /// The remote (NBD) end reported an error or went away.
    #[error("remote: {0}")]
    Remote(String),
    /// A request timed out.
    #[error("{0} timed out")]
    Timeout(String),
    /// The replication node refuses I/O in its current stage.
    #[error("replication: {0}")]
    Replication(String),
    /// Quorum could not reach its vote threshold.
    #[error("quorum: {0}")]
    Quorum(String),
    /// Invalid configuration of a node.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl BlockError {
    /// Wraps an `io::Error` with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        BlockError::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno that best describes this error (for NBD replies and logs).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { op, .. } if *op == "write" || *op == "write-zeroes" => {
                libc::ENOSPC
            }
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            BlockError::ReadOnly(_) => libc::EPERM,
            BlockError::Unsupported(_) => libc::ENOTSUP,
            BlockError::Config(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

impl From<BlockError> for io::Error {
    fn from(e: BlockError) -> Self {
        io::Error::other(e)
    }
}

/// Result of a block operation.
pub type BlockResult<T> = Result<T, BlockError>;

/// A modifying request, as accepted by [`BlockNode::submit`].
#[derive(Debug, Clone, Copy)]
pub enum WriteOp<'a> {
    /// Write `buf` at `offset`; with `fua` the data is durable when the request completes.
    Write {
        /// Data.
        buf: &'a [u8],
        /// Byte offset.
        offset: u64,
        /// Force unit access.
        fua: bool,
    },
    /// Make the range read as zeroes; `unmap` allows deallocation.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Deallocation allowed.
        unmap: bool,
        /// Force unit access.
        fua: bool,
    },
    /// The range's content is no longer needed (it may read as anything afterwards).
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make every completed write durable.
    Flush,
}

impl WriteOp<'_> {
    /// Short operation name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            WriteOp::Write { .. } => "write",
            WriteOp::WriteZeroes { .. } => "write-zeroes",
            WriteOp::Discard { .. } => "discard",
            WriteOp::Flush => "flush",
        }
    }

    /// The byte range touched, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            WriteOp::Write { buf, offset, .. } => Some((offset, buf.len() as u64)),
            WriteOp::WriteZeroes { offset, len, .. } | WriteOp::Discard { offset, len } => {
                Some((offset, len))
            }
            WriteOp::Flush => None,
        }
    }
}

/// A submitted request: either already complete or waitable.
pub enum Pending {
    /// Completed during submission.
    Ready(BlockResult<()>),
    /// Completes when the closure returns.
    Wait(Box<dyn FnOnce() -> BlockResult<()> + Send>),
}

impl Pending {
    /// Waits for the result.
    pub fn wait(self) -> BlockResult<()> {
        match self {
            Pending::Ready(r) => r,
            Pending::Wait(f) => f(),
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::Ready(r) => write!(f, "Ready({r:?})"),
            Pending::Wait(_) => write!(f, "Wait"),
        }
    }
}

/// A node of the block graph.
pub trait BlockNode: Send + Sync {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()>;

    /// Starts a modifying request. Nodes whose requests complete synchronously return
    /// [`Pending::Ready`].
    fn submit(&self, op: WriteOp<'_>) -> Pending;

    /// Driver name, as QEMU spells it (`raw`, `quorum`, ...).
    fn driver(&self) -> &'static str;

    /// True when writes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// True when [`BlockNode::submit`] returns before the data is written (the request is in
    /// flight elsewhere, e.g. on the network). A parent that writes to several children (quorum)
    /// starts such children first, so their latency overlaps the synchronous children's I/O.
    fn submits_async(&self) -> bool {
        false
    }

    /// True when a small write is expected to complete within about a network round trip, so
    /// that the vhost-user queue thread may run a lone one itself instead of handing it to a
    /// worker (which keeps the queue taking requests while it waits). Nodes that submit
    /// asynchronously are not, unless they know better: a replication child whose secondary
    /// has been answering quickly and has nothing in flight is.
    fn responsive(&self) -> bool {
        !self.submits_async()
    }

    /// Reads into several buffers, back to back from `offset` (a scatter list of guest
    /// memory). The default reads once into a bounce buffer; `file` uses `preadv`.
    fn read_vectored_at(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> BlockResult<()> {
        if let [one] = bufs {
            return self.read_at(one, offset);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut tmp = vec![0u8; total];
        self.read_at(&mut tmp, offset)?;
        let mut pos = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&tmp[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    /// Writes several buffers back to back from `offset` as one request (a gather list of
    /// guest memory). The default gathers into one buffer; `file` uses `pwritev`.
    fn write_vectored_at(
        &self,
        bufs: &[io::IoSlice<'_>],
        offset: u64,
        fua: bool,
    ) -> BlockResult<()> {
        if let [one] = bufs {
            return self.write_at(one, offset, fua);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut tmp = Vec::with_capacity(total);
        for b in bufs {
            tmp.extend_from_slice(b);
        }
        self.write_at(&tmp, offset, fua)
    }

    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> BlockResult<()> {
        self.submit(WriteOp::Write { buf, offset, fua }).wait()
    }

    /// Makes completed writes durable.
    fn flush(&self) -> BlockResult<()> {
        self.submit(WriteOp::Flush).wait()
    }

    /// Discards a range.
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.submit(WriteOp::Discard { offset, len }).wait()
    }

    /// Zeroes a range.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> BlockResult<()> {
        self.submit(WriteOp::WriteZeroes {
            offset,
            len,
            unmap,
            fua: false,
        })
        .wait()
    }
}

/// A shared node.
pub type NodeRef = Arc<dyn BlockNode>;

/// Checks that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_range(op: &'static str, offset: u64, len: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            op,
            offset,
            len,
            size,
        }),
    }
}

/// Applies a [`WriteOp`] through simple per-operation callbacks (used by synchronous nodes).
pub(crate) fn check_op(op: &WriteOp<'_>, size: u64) -> BlockResult<()> {
    if let Some((offset, len)) = op.range() {
        check_range(op.name(), offset, len, size)?;
    }
    Ok(())
}

/// Callback used to report block events (QMP events) as `(name, data)`.
pub type EventSink = Arc<dyn Fn(&str, serde_json::Value) + Send + Sync>;

/// An event sink that drops every event.
pub fn null_events() -> EventSink {
    Arc::new(|_, _| {})
}
