//! The JSON state section of snapshots and migration streams (`VmSnapshot`: shape, KVM
//! structures as hex strings, MSR lists, device states) and what a restore does with its device
//! part that needs no KVM: the serial console's registers and pending input
//! (`SerialDevice::restore`). Also vmm-min's small string parsers of user input:
//! `--incoming`/`migrate` URIs (`migrate::parse_tcp_uri`), `--serial` specs (`SerialSpec`),
//! `--qmp` specs (`QmpSpec`) and `--net`/`--disk` specs (`VhostUserSpec`).
//!
//! Input: arbitrary bytes, as JSON and as a (lossy UTF-8) string. Checks: no panic; a state
//! that parses serializes again and parses to the same JSON value; a serial restore either
//! fails with an error or leaves a console whose snapshot is the restored one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_min::devices::serial::{SerialDevice, SerialSpec, open};
use vmm_min::state::format::{DeviceState, VmSnapshot};
use vmm_min::virtio::vhost_user::{Kind, VhostUserSpec};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(hostport) = vmm_min::migrate::parse_tcp_uri(&s) {
        assert!(s.ends_with(hostport.as_str()));
    }
    let _ = s.parse::<SerialSpec>();
    let _ = s.parse::<vmm_min::qmp::QmpSpec>();
    for kind in [Kind::Net, Kind::Block] {
        if let Ok(spec) = VhostUserSpec::parse(kind, &s) {
            assert!(!spec.socket.as_os_str().is_empty());
        }
    }
    let Ok(snap) = serde_json::from_slice::<VmSnapshot>(data) else {
        return;
    };
    let _ = snap.check_consistent();
    let again = serde_json::to_vec(&snap).expect("a parsed state serializes");
    let back: VmSnapshot = serde_json::from_slice(&again).expect("and parses again");
    assert_eq!(
        serde_json::to_value(&back).expect("value"),
        serde_json::to_value(&snap).expect("value")
    );
    for d in &snap.devices {
        if let DeviceState::Serial { state, .. } = d {
            let (out, _input) = open(&SerialSpec::Null).expect("null serial");
            let irq = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
            let mut dev = SerialDevice::new(irq, out);
            if dev.restore(state).is_ok() {
                assert_eq!(&dev.snapshot(), state);
            }
        }
    }
});
