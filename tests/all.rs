//! The behaviour suite: every sandbox capability, tried from inside a sandbox and checked from
//! outside, on every backend this build carries (see feature-matrix.md).
//!
//! Needs root, Landlock and network namespaces. Where one is missing the test says why it skips;
//! with `CI=true` such a skip is a failure.

#![allow(clippy::print_stderr)] // skips say why on stderr

mod suite;
