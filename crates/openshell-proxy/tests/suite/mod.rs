mod approval;
mod connect;
mod forward;
mod holes;
mod live;
mod malformed;
mod support;
#[cfg(feature = "terminate")]
mod terminate;
mod unix;
