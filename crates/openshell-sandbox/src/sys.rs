//! The CLI's one `unsafe` call outside the probe: reading a terminal's window size.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// The window size (rows, columns) of the terminal `fd`.
pub fn window_size(fd: BorrowedFd<'_>) -> nix::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize structure, which lives on this stack frame for the
    // duration of the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCGWINSZ as _,
            &mut ws as *mut libc::winsize,
        )
    };
    Errno::result(r).map(|_| (ws.ws_row, ws.ws_col))
}
