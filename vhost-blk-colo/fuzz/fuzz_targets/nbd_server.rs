//! Feeds arbitrary bytes as a client connection to the NBD server (negotiation and
//! transmission) over an in-memory stream, with a 1 MiB RAM export named "disk" (writable) and
//! "ro" (read-only). The server must never panic or hang: it answers or closes.
#![no_main]

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vhost_blk_colo::{
    block::mem::MemNode,
    nbd::{Export, server::serve_connection},
};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let node = Arc::new(MemNode::new(1 << 20));
        let mut t = BTreeMap::new();
        t.insert("disk".to_string(), Export { node: node.clone(), writable: true, description: String::new() });
        t.insert("ro".to_string(), Export { node, writable: false, description: String::new() });
        let table = Arc::new(RwLock::new(t));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(serve_connection(server, table));
        let input = data.to_vec();
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let writer = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let reader = async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        let both = async { tokio::join!(writer, reader) };
        tokio::time::timeout(std::time::Duration::from_secs(10), both).await.expect("NBD server hung");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), srv).await.expect("NBD server task hung");
    });
});
