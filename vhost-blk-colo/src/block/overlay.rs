//! overlay (in progress).
