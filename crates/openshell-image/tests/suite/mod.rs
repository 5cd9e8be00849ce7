mod registry;
mod unpack;
