//! Cross-thread wake-up of a parked core: an eventfd the core's transport
//! watches alongside its sockets.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::eventfd::{EfdFlags, EventFd};

pub struct Waker {
    fd: EventFd,
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Waker { fd })
    }

    pub fn wake(&self) {
        // An overflowing counter (EAGAIN) still leaves the fd readable: nothing to do.
        let _ = self.fd.write(1);
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Clears pending wake-ups (for a consumer that polls the fd itself).
    pub fn drain(&self) {
        // Nothing pending (EAGAIN) is as good as drained.
        let _ = self.fd.read();
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Waker> for OwnedFd {
    fn from(w: Waker) -> OwnedFd {
        w.fd.into()
    }
}
