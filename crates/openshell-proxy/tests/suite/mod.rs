mod connect;
mod forward;
mod holes;
mod live;
mod malformed;
mod support;
mod unix;
