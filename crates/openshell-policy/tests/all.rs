//! One integration-test binary for openshell-policy.

mod suite;
