//! io_uring transport (in progress: until it lands, `probe` reports it
//! unavailable and nodes run on epoll).

pub use super::epoll::EpollTransport as UringTransport;

pub fn probe() -> Result<(), String> {
    Err("io_uring transport is not built yet".into())
}
