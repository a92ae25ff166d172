//! `quorum` driver, with QEMU's semantics for what COLO uses.
//!
//! Writes, write-zeroes, discards and flushes go to every child at once; the request completes
//! when every child has answered and succeeds when at least `vote-threshold` children did.
//! Each failing child is reported with `QUORUM_REPORT_BAD`; an overall failure with
//! `QUORUM_FAILURE`. Reads: `fifo` tries the children in order and the first success wins;
//! `quorum` reads all and returns content that at least `vote-threshold` children agree on.
//! Children are added (`children.N`, the next index) and removed at run time
//! (`x-blockdev-change`); removal is refused if fewer than `vote-threshold` would remain.

use std::sync::{Arc, RwLock};

use serde_json::json;

use super::{
    BlockError, BlockNode, BlockResult, EventSink, NodeRef, Pending, WriteOp, check_range,
};

/// How reads are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// First child that succeeds.
    Fifo,
    /// Vote among all children.
    Quorum,
}

impl std::str::FromStr for ReadPattern {
    type Err = BlockError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fifo" => Ok(ReadPattern::Fifo),
            "quorum" => Ok(ReadPattern::Quorum),
            o => Err(BlockError::Config(format!(
                "read-pattern must be fifo or quorum, not {o:?}"
            ))),
        }
    }
}

/// One child: its name in the quorum (`children.N`), node name, and node.
#[derive(Clone)]
pub struct Child {
    /// `children.N`.
    pub name: String,
    /// Node name (for events and query-block).
    pub node_name: String,
    /// The node.
    pub node: NodeRef,
}

struct Children {
    /// Shared with the writes in flight: a write takes a snapshot without copying the list
    /// (no allocation per write); a change makes a new list.
    list: Arc<Vec<Child>>,
    next_index: usize,
}

/// The quorum node.
pub struct QuorumNode {
    id: Arc<str>,
    threshold: usize,
    pattern: ReadPattern,
    size: u64,
    children: RwLock<Children>,
    events: EventSink,
}

impl std::fmt::Debug for QuorumNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuorumNode")
            .field("id", &self.id)
            .field("threshold", &self.threshold)
            .finish()
    }
}

fn poisoned() -> BlockError {
    BlockError::Config("quorum lock poisoned".into())
}

impl QuorumNode {
    /// A quorum named `id` over `children` (given as `(node name, node)`).
    pub fn new(
        id: &str,
        children: Vec<(String, NodeRef)>,
        threshold: usize,
        pattern: ReadPattern,
        events: EventSink,
    ) -> BlockResult<Self> {
        if children.is_empty() {
            return Err(BlockError::Config(format!(
                "quorum {id}: at least one child is needed"
            )));
        }
        if threshold < 1 || threshold > children.len() {
            return Err(BlockError::Config(format!(
                "quorum {id}: vote-threshold {threshold} must be between 1 and the number of children ({})",
                children.len()
            )));
        }
        let size = children[0].1.size();
        let mut list = Vec::new();
        for (i, (node_name, node)) in children.into_iter().enumerate() {
            if node.size() != size {
                return Err(BlockError::Config(format!(
                    "quorum {id}: child {node_name} has {} bytes, children.0 has {size}",
                    node.size()
                )));
            }
            list.push(Child {
                name: format!("children.{i}"),
                node_name,
                node,
            });
        }
        let next_index = list.len();
        Ok(QuorumNode {
            id: id.into(),
            threshold,
            pattern,
            size,
            children: RwLock::new(Children {
                list: Arc::new(list),
                next_index,
            }),
            events,
        })
    }

    /// The quorum's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The vote threshold.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The read pattern.
    pub fn read_pattern(&self) -> ReadPattern {
        self.pattern
    }

    /// A snapshot of the children.
    pub fn children(&self) -> Vec<Child> {
        self.snapshot().to_vec()
    }

    /// The current children without copying them.
    fn snapshot(&self) -> Arc<Vec<Child>> {
        self.children
            .read()
            .map(|c| c.list.clone())
            .unwrap_or_default()
    }

    /// Adds a child; returns its name (`children.N`).
    pub fn add_child(&self, node_name: &str, node: NodeRef) -> BlockResult<String> {
        if node.size() != self.size {
            return Err(BlockError::Config(format!(
                "quorum {}: node {node_name} has {} bytes, the quorum has {}",
                self.id,
                node.size(),
                self.size
            )));
        }
        let mut c = self.children.write().map_err(|_| poisoned())?;
        if c.list.iter().any(|x| x.node_name == node_name) {
            return Err(BlockError::Config(format!(
                "quorum {}: {node_name} is already a child",
                self.id
            )));
        }
        let name = format!("children.{}", c.next_index);
        c.next_index += 1;
        Arc::make_mut(&mut c.list).push(Child {
            name: name.clone(),
            node_name: node_name.to_owned(),
            node,
        });
        tracing::info!(quorum = %self.id, child = %name, node = %node_name, "child added");
        Ok(name)
    }

    /// Removes the child named `children.N`.
    pub fn remove_child(&self, name: &str) -> BlockResult<Child> {
        let mut c = self.children.write().map_err(|_| poisoned())?;
        let Some(pos) = c.list.iter().position(|x| x.name == name) else {
            return Err(BlockError::Config(format!(
                "quorum {}: no child named {name}",
                self.id
            )));
        };
        if c.list.len() - 1 < self.threshold {
            return Err(BlockError::Config(format!(
                "quorum {}: removing {name} would leave fewer children than the vote threshold {}",
                self.id, self.threshold
            )));
        }
        let child = Arc::make_mut(&mut c.list).remove(pos);
        // Only the last index may be reused (as QEMU does).
        if format!("children.{}", c.next_index - 1) == name {
            c.next_index -= 1;
        }
        tracing::info!(quorum = %self.id, child = %name, "child removed");
        Ok(child)
    }

    fn report_bad(
        events: &EventSink,
        kind: &str,
        node_name: &str,
        err: &BlockError,
        offset: u64,
        len: u64,
    ) {
        tracing::warn!(node = %node_name, "quorum child failed a {kind}: {err}");
        events(
            "QUORUM_REPORT_BAD",
            json!({"type": kind, "error": err.to_string(), "node-name": node_name,
                   "sector": offset / 512, "sectors-count": len.div_ceil(512)}),
        );
    }
}

impl BlockNode for QuorumNode {
    fn size(&self) -> u64 {
        self.size
    }

    fn driver(&self) -> &'static str {
        "quorum"
    }

    fn submits_async(&self) -> bool {
        self.children
            .read()
            .map(|c| c.list.iter().any(|x| x.node.submits_async()))
            .unwrap_or(true)
    }

    fn responsive(&self) -> bool {
        self.children
            .read()
            .map(|c| c.list.iter().all(|x| x.node.responsive()))
            .unwrap_or(false)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range("read", offset, buf.len() as u64, self.size)?;
        let children = self.snapshot();
        let len = buf.len() as u64;
        match self.pattern {
            ReadPattern::Fifo => {
                let mut last = None;
                for c in children.iter() {
                    match c.node.read_at(buf, offset) {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            Self::report_bad(&self.events, "read", &c.node_name, &e, offset, len);
                            last = Some(e);
                        }
                    }
                }
                self.events("QUORUM_FAILURE", offset, len);
                Err(BlockError::Quorum(format!(
                    "{}: every child failed the read: {}",
                    self.id,
                    last.map(|e| e.to_string()).unwrap_or_default()
                )))
            }
            ReadPattern::Quorum => {
                let mut results: Vec<(usize, Vec<u8>)> = Vec::new();
                let mut bufs = Vec::new();
                for c in children.iter() {
                    let mut b = vec![0u8; buf.len()];
                    match c.node.read_at(&mut b, offset) {
                        Ok(()) => bufs.push((c, b)),
                        Err(e) => {
                            Self::report_bad(&self.events, "read", &c.node_name, &e, offset, len)
                        }
                    }
                }
                for (_, b) in &bufs {
                    match results.iter_mut().find(|(_, v)| v == b) {
                        Some(r) => r.0 += 1,
                        None => results.push((1, b.clone())),
                    }
                }
                results.sort_by_key(|r| std::cmp::Reverse(r.0));
                match results.first() {
                    Some((votes, winner)) if *votes >= self.threshold => {
                        for (c, b) in &bufs {
                            if b != winner {
                                let e =
                                    BlockError::Quorum("content differs from the majority".into());
                                Self::report_bad(
                                    &self.events,
                                    "read",
                                    &c.node_name,
                                    &e,
                                    offset,
                                    len,
                                );
                            }
                        }
                        buf.copy_from_slice(winner);
                        Ok(())
                    }
                    _ => {
                        self.events("QUORUM_FAILURE", offset, len);
                        Err(BlockError::Quorum(format!(
                            "{}: no content reached {} votes",
                            self.id, self.threshold
                        )))
                    }
                }
            }
        }
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        if let Some((offset, len)) = op.range()
            && let Err(e) = check_range(op.name(), offset, len, self.size)
        {
            return Pending::Ready(Err(e));
        }
        let children = self.snapshot();
        // Children whose submit only sends the request (NBD, replication) start first, so the
        // network round trip overlaps the local write instead of following it. Started
        // requests are kept by child index: no per-write copy of names.
        let mut started: Vec<(usize, Pending)> = Vec::with_capacity(children.len());
        for remote in [true, false] {
            for (i, c) in children.iter().enumerate() {
                if c.node.submits_async() == remote {
                    started.push((i, c.node.submit(op)));
                }
            }
        }
        let threshold = self.threshold;
        let events = self.events.clone();
        let id = self.id.clone();
        let kind = if matches!(op, WriteOp::Flush) {
            "flush"
        } else {
            "write"
        };
        let (offset, len) = op.range().unwrap_or((0, 0));
        Pending::Wait(Box::new(move || {
            let mut ok = 0;
            let mut errors: Vec<BlockError> = Vec::new();
            for (i, p) in started {
                match p.wait() {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        let node_name = children.get(i).map_or("", |c| c.node_name.as_str());
                        QuorumNode::report_bad(&events, kind, node_name, &e, offset, len);
                        errors.push(e);
                    }
                }
            }
            if ok >= threshold {
                Ok(())
            } else {
                events(
                    "QUORUM_FAILURE",
                    json!({"reference": &*id, "sector": offset / 512, "sectors-count": len.div_ceil(512)}),
                );
                Err(errors.into_iter().next().unwrap_or_else(|| {
                    BlockError::Quorum(format!(
                        "{id}: only {ok} of {threshold} required children succeeded"
                    ))
                }))
            }
        }))
    }
}

impl QuorumNode {
    fn events(&self, name: &str, offset: u64, len: u64) {
        (self.events)(
            name,
            json!({"reference": &*self.id, "sector": offset / 512, "sectors-count": len.div_ceil(512)}),
        );
    }
}

/// A shared quorum.
pub type QuorumRef = Arc<QuorumNode>;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::block::mem::MemNode;

    struct Failing(u64);
    impl BlockNode for Failing {
        fn size(&self) -> u64 {
            self.0
        }
        fn driver(&self) -> &'static str {
            "failing"
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> BlockResult<()> {
            Err(BlockError::Remote("down".into()))
        }
        fn submit(&self, _: WriteOp<'_>) -> Pending {
            Pending::Ready(Err(BlockError::Remote("down".into())))
        }
    }

    fn sink() -> (EventSink, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (
            Arc::new(move |n: &str, _| l.lock().unwrap().push(n.to_owned())),
            log,
        )
    }

    #[test]
    fn threshold_one_survives_a_failing_child_and_reports_it() {
        let a = Arc::new(MemNode::new(1 << 16));
        let (ev, log) = sink();
        let q = QuorumNode::new(
            "colo-disk0",
            vec![("a".into(), a.clone())],
            1,
            ReadPattern::Fifo,
            ev,
        )
        .unwrap();
        assert_eq!(
            q.add_child("node0", Arc::new(Failing(1 << 16))).unwrap(),
            "children.1"
        );
        q.write_at(&[9; 512], 512, false).unwrap();
        assert_eq!(a.snapshot()[512..1024], [9; 512]);
        assert_eq!(log.lock().unwrap().as_slice(), ["QUORUM_REPORT_BAD"]);
        let mut b = [0u8; 512];
        q.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [9; 512]);
        assert!(q.add_child("small", Arc::new(MemNode::new(512))).is_err());
        q.remove_child("children.1").unwrap();
        assert!(
            q.remove_child("children.0").is_err(),
            "would drop below the threshold"
        );
        assert_eq!(
            q.add_child("node1", Arc::new(MemNode::new(1 << 16)))
                .unwrap(),
            "children.1"
        );
    }

    #[test]
    fn threshold_two_fails_when_one_child_fails_and_quorum_reads_vote() {
        let a = Arc::new(MemNode::new(4096));
        let b = Arc::new(MemNode::new(4096));
        let (ev, log) = sink();
        let q = QuorumNode::new(
            "q",
            vec![
                ("a".into(), a.clone()),
                ("b".into(), b.clone()),
                ("c".into(), Arc::new(Failing(4096))),
            ],
            2,
            ReadPattern::Quorum,
            ev,
        )
        .unwrap();
        q.write_at(&[5; 512], 0, false).unwrap();
        let mut buf = [0u8; 512];
        q.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [5; 512]);
        b.write_at(&[6; 512], 0, false).unwrap();
        assert!(
            q.read_at(&mut buf, 0).is_err(),
            "a and b disagree, c fails: no 2 votes"
        );
        assert!(log.lock().unwrap().iter().any(|e| e == "QUORUM_FAILURE"));
        let q2 = QuorumNode::new(
            "q2",
            vec![("a".into(), a), ("c".into(), Arc::new(Failing(4096)))],
            2,
            ReadPattern::Fifo,
            null_events_for_test(),
        )
        .unwrap();
        assert!(q2.write_at(&[1; 512], 0, false).is_err());
    }

    fn null_events_for_test() -> EventSink {
        crate::block::null_events()
    }
}
