mod egress;
mod forward;
mod frames;
mod harness;
mod spawn;
