//! Integration tests of the guest agent, run on the host in `--test-mode`: each test starts the
//! built agent with a Unix control socket and speaks the vm protocol to it.
//!
//! Tests that launch restricted processes need root (the privilege drop); without it they print
//! SKIP, and with `CI=true` such a skip is a failure.

#![cfg(target_os = "linux")]

mod suite;
