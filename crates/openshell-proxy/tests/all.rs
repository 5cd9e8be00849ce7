//! Integration tests of the egress proxy: one binary, modules in `suite/`.

mod suite;
