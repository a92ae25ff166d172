//! vhost-user-blk backend: a small block graph with quorum, COLO replication and NBD.
