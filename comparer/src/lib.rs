//! colo-compare: one comparison engine driven live over sockets or offline over pcap files.
pub mod live;
