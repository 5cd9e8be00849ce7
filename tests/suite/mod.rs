mod common;

mod api;
mod bad_input;
mod cleanup;
mod egress;
mod filesystem;
mod identity;
mod image;
mod lifecycle;
mod limits;
mod network;
mod protected;
mod rootfs;
mod seccomp;
mod ssh;
mod stdio;
mod template;
