//! vhost-user-net backend: netdevs (tap, stream/dgram sockets, user) and the COLO filter chain.
