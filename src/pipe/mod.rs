//! Pipe plumbing shared by the broker's bridges and the service SDK.
//!
//! - [`Outbox`]: the write side. Frames are encoded into a buffer as they are
//!   queued and a writer task puts everything queued so far into one `write`
//!   whenever it runs: coalescing without a timer.
//! - [`Batches`]: the read side. Every frame one read brought, decoded into
//!   one batch (one actor message for many frames).
//! - [`LogLines`]: a decoder for a child's stderr that never fails.
//! - [`WireCodec`]: envelopes or MessagePack-RPC, whichever the child speaks.
//! - [`set_pipe_size`]: 1 MiB pipes: a 64 KiB frame overflows the
//!   default pipe by 4 bytes).

mod batches;
mod log_lines;
mod outbox;
#[cfg(test)]
pub(crate) use outbox::tests as outbox_tests;
mod wire;

pub use batches::Batches;
pub use log_lines::{CUT_MARK, LogLines};
pub use outbox::{Outbox, OutboxError};
pub use wire::{Incoming, WireCodec};

use std::os::fd::AsFd;

/// The pipe size procbroker asks for on both ends of a child's stdio.
pub const PIPE_BYTES: usize = 1 << 20;

/// Grows a pipe to `bytes` (`F_SETPIPE_SZ`); returns the size in force.
/// Failure is not an error worth stopping for (the kernel caps unprivileged
/// sizes at `/proc/sys/fs/pipe-max-size`): the caller logs and goes on.
pub fn set_pipe_size(fd: impl AsFd, bytes: usize) -> std::io::Result<usize> {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    let set = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(bytes))?;
    Ok(usize::try_from(set).unwrap_or_default())
}
