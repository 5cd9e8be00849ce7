//! openshell-image's tests: unpacking (no network) and pulling from a real `docker-registry` on
//! loopback (skipped, with the reason, where it is not installed; a failure under CI=true).

#![allow(clippy::print_stderr)]

mod suite;
