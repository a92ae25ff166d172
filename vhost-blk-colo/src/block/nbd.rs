//! `nbd` driver: a block node backed by an [`NbdClient`] connection.
//!
//! Writes are pipelined: [`BlockNode::submit`] sends the request and returns a completion that
//! waits for the reply, so a quorum parent overlaps the network round trip with its local
//! write. Every wait is bounded by the node's timeout.

use std::time::Duration;

use tokio::runtime::Handle;

use super::{BlockError, BlockNode, BlockResult, Pending, WriteOp, check_range};
use crate::nbd::{
    NbdClient, NbdClientError,
    proto::{
        CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
        MAX_REQUEST,
    },
};

/// Default bound on one NBD request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A block node over NBD.
#[derive(Debug)]
pub struct NbdNode {
    client: NbdClient,
    timeout: Duration,
    /// Shared with each request's completion (no copy per request).
    desc: std::sync::Arc<str>,
}

fn remote(e: NbdClientError) -> BlockError {
    BlockError::Remote(e.to_string())
}

/// The error of a waited-for request: a timeout stays a timeout.
fn waited(e: NbdClientError, desc: &str) -> BlockError {
    match e {
        NbdClientError::Timeout { .. } => BlockError::Timeout(format!("request to {desc}")),
        e => remote(e),
    }
}

impl NbdNode {
    /// Connects to `host:port`, export `export`, on the runtime `rt` (must not be called from
    /// inside that runtime's worker threads).
    pub fn connect(
        rt: &Handle,
        host: &str,
        port: u16,
        export: &str,
        timeout: Duration,
    ) -> BlockResult<Self> {
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let client = rt
            .block_on(async {
                tokio::time::timeout(timeout, NbdClient::connect_direct(&addr, export)).await
            })
            .map_err(|_| BlockError::Timeout(format!("connecting to nbd://{addr}/{export}")))?
            .map_err(remote)?;
        Ok(NbdNode {
            client,
            timeout,
            desc: format!("nbd://{addr}/{export}").into(),
        })
    }

    /// Wraps an existing client.
    pub fn from_client(client: NbdClient, timeout: Duration, desc: String) -> Self {
        NbdNode {
            client,
            timeout,
            desc: desc.into(),
        }
    }

    /// `nbd://host:port/export`.
    pub fn description(&self) -> &str {
        &self.desc
    }

    /// The reason the connection closed, if it did.
    pub fn closed(&self) -> Option<String> {
        self.client.closed()
    }

    fn start(&self, cmd: u16, flags: u16, offset: u64, len: u32, data: Option<&[u8]>) -> Pending {
        let w = match self.client.submit_sync(cmd, flags, offset, len, data) {
            Ok(w) => w,
            Err(e) => return Pending::Ready(Err(remote(e))),
        };
        let timeout = self.timeout;
        let desc = self.desc.clone();
        Pending::Wait(Box::new(move || {
            w.wait(timeout).map(drop).map_err(|e| waited(e, &desc))
        }))
    }

    fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let step = u64::from(MAX_REQUEST);
        (0..len.div_ceil(step)).map(move |i| {
            let o = i * step;
            (offset + o, (len - o).min(step) as u32)
        })
    }
}

fn join_all(p: Vec<Pending>) -> Pending {
    if p.len() == 1 {
        return p.into_iter().next().unwrap_or(Pending::Ready(Ok(())));
    }
    Pending::Wait(Box::new(move || {
        let mut res = Ok(());
        for x in p {
            if let Err(e) = x.wait() {
                res = Err(e);
            }
        }
        res
    }))
}

impl BlockNode for NbdNode {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn driver(&self) -> &'static str {
        "nbd"
    }

    fn read_only(&self) -> bool {
        self.client.read_only()
    }

    fn submits_async(&self) -> bool {
        true
    }

    fn responsive(&self) -> bool {
        self.client.responsive()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range("read", offset, buf.len() as u64, self.size())?;
        let mut waits = Vec::new();
        for (o, l) in Self::chunks(offset, buf.len() as u64) {
            waits.push((
                o,
                l,
                self.client
                    .submit_sync(CMD_READ, 0, o, l, None)
                    .map_err(remote)?,
            ));
        }
        for (o, l, w) in waits {
            let data = w.wait(self.timeout).map_err(|e| waited(e, &self.desc))?;
            let s = (o - offset) as usize;
            if data.len() != l as usize {
                return Err(BlockError::Remote(format!("{}: short read", self.desc)));
            }
            buf[s..s + l as usize].copy_from_slice(&data);
        }
        Ok(())
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        if let Some((offset, len)) = op.range()
            && let Err(e) = check_range(op.name(), offset, len, self.size())
        {
            return Pending::Ready(Err(e));
        }
        match op {
            WriteOp::Write { buf, offset, fua } => {
                let f = if fua { CMD_FLAG_FUA } else { 0 };
                let p = Self::chunks(offset, buf.len() as u64)
                    .map(|(o, l)| {
                        let s = (o - offset) as usize;
                        self.start(CMD_WRITE, f, o, l, Some(&buf[s..s + l as usize]))
                    })
                    .collect();
                join_all(p)
            }
            WriteOp::WriteZeroes {
                offset,
                len,
                unmap,
                fua,
            } => {
                let mut f = if fua { CMD_FLAG_FUA } else { 0 };
                if !unmap {
                    f |= CMD_FLAG_NO_HOLE;
                }
                join_all(
                    Self::chunks(offset, len)
                        .map(|(o, l)| self.start(CMD_WRITE_ZEROES, f, o, l, None))
                        .collect(),
                )
            }
            WriteOp::Discard { offset, len } => join_all(
                Self::chunks(offset, len)
                    .map(|(o, l)| self.start(CMD_TRIM, 0, o, l, None))
                    .collect(),
            ),
            WriteOp::Flush => self.start(CMD_FLUSH, 0, 0, 0, None),
        }
    }
}

impl Drop for NbdNode {
    fn drop(&mut self) {
        self.client.disconnect();
    }
}
