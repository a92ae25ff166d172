//! The option parsers of vhost-net-colo: `-object`/`-netdev` specs (`ObjectSpec::parse_cli`),
//! QMP `object-add` arguments (`ObjectSpec::from_qmp`), building a filter from a spec
//! (`filter::build`), the netdev options that are parsed before anything is opened
//! (`queues=`, `hostfwd=`, the `user` netdev's addresses), `-chardev` specs (`ChardevSpec`)
//! and `--mac`.
//!
//! Input: arbitrary bytes as a (lossy UTF-8) string. Checks: no panic, every refusal is an
//! error value; a parsed spec keeps its type and id non-empty; a built filter's id and netdev
//! are the spec's. `filter-dump` gets `file=/dev/null` so that nothing is created.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhost_net_colo::filter::{ChardevLookup, ObjectSpec, Outdev, build};
use vhost_net_colo::netdev::take_queues;
use vhost_net_colo::netdev::user::HostFwd;

struct NullOut;

impl Outdev for NullOut {
    fn send_parts(&self, _: &[u8], _: &[u8], _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn name(&self) -> String {
        "null".into()
    }
}

/// Knows every chardev id except those starting with `x`.
struct Lookup;

impl ChardevLookup for Lookup {
    fn outdev(&self, id: &str) -> Option<Arc<dyn Outdev>> {
        (!id.starts_with('x')).then(|| Arc::new(NullOut) as Arc<dyn Outdev>)
    }
}

fn check_spec(mut spec: ObjectSpec) {
    assert!(!spec.qom_type.is_empty());
    // Netdev options read before a netdev opens anything.
    let mut nd = spec.clone();
    if let Ok(n) = take_queues(&mut nd) {
        assert!(n >= 1);
    }
    for (k, v) in &spec.props {
        if k.starts_with("hostfwd") {
            let _ = HostFwd::parse(v);
        }
        match k.as_str() {
            "net" => {
                let _ = v.parse::<smoltcp::wire::Ipv4Cidr>();
            }
            "host" | "guest" | "dhcpstart" | "dns" => {
                let _ = v.parse::<std::net::Ipv4Addr>();
            }
            "mac" => {
                let _ = vhost_net_colo::app::parse_mac(v);
            }
            _ => {}
        }
    }
    if spec.qom_type == "filter-dump" {
        spec.props.insert("file".into(), "/dev/null".into());
    }
    let (id, netdev) = (spec.id.clone(), spec.props.get("netdev").cloned());
    if let Ok(b) = build(spec, &Lookup) {
        assert_eq!(b.entry.id, id);
        assert_eq!(Some(b.netdev), netdev);
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(spec) = ObjectSpec::parse_cli(&s) {
        check_spec(spec);
    }
    if let Ok(serde_json::Value::Object(args)) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(spec) = ObjectSpec::from_qmp(&args)
    {
        if !spec.qom_type.is_empty() {
            check_spec(spec);
        }
    }
    let _ = s.parse::<colo_proto::chardev::ChardevSpec>();
    let _ = HostFwd::parse(&s);
    let _ = vhost_net_colo::app::parse_mac(&s);
});
