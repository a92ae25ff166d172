//! quorum (in progress).
