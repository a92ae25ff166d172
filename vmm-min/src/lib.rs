//! A minimal KVM VMM whose network and disks are vhost-user backends.
