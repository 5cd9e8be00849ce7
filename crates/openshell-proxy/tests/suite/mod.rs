mod connect;
mod forward;
mod live;
mod malformed;
mod support;
mod unix;
