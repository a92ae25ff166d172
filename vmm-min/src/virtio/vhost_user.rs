//! vhost-user frontend (in progress).
