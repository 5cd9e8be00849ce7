//! The runtime's integration tests that need no sandbox: each runs the real thing as root
//! (see each module). Where root is missing a test says why it skips; with `CI=true` such a
//! skip is a failure.

#![allow(clippy::print_stderr)] // skips say why on stderr

mod suite;
