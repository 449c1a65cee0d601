//! Whether the broker's open-files limit can hold more workers.
//!
//! Every child costs the broker a few descriptors for as long as it runs
//! (its stdin, stdout and stderr pipes, and the handle its exit is watched
//! through). A start past the limit fails with "Too many open files" one
//! worker at a time, after the others were started; so a `Scale` or `Spawn`
//! that cannot fit is refused up front, with the arithmetic in the message.

/// Descriptors the broker holds per running child (measured: three pipe
/// ends and the pidfd its exit is watched through).
pub const PER_WORKER: u64 = 4;

/// Descriptors kept free for everything else: admin connections, the
/// NATS client, log files, a `/proc` read.
pub const RESERVE: u64 = 64;

/// Why `new` more workers do not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{new} new workers need {needed} more open files ({PER_WORKER} each), but the broker's \
     open-files limit is {limit} with {open} in use and {RESERVE} kept in reserve, so {room} \
     are free (at most {fit} more workers); raise the limit (ulimit -n, systemd LimitNOFILE=) \
     or ask for fewer"
)]
pub struct NoRoom {
    /// Workers asked for.
    pub new: u64,
    /// Descriptors they need.
    pub needed: u64,
    /// The soft limit (`RLIMIT_NOFILE`).
    pub limit: u64,
    /// Descriptors open now.
    pub open: u64,
    /// Descriptors free beyond the reserve.
    pub room: u64,
    /// Workers that would fit.
    pub fit: u64,
}

/// The arithmetic alone: `new` workers against `limit` with `open` in use.
pub fn fits(new: u64, limit: u64, open: u64) -> Result<(), NoRoom> {
    let room = limit.saturating_sub(open).saturating_sub(RESERVE);
    let needed = new.saturating_mul(PER_WORKER);
    if needed <= room {
        return Ok(());
    }
    Err(NoRoom {
        new,
        needed,
        limit,
        open,
        room,
        fit: room / PER_WORKER,
    })
}

/// Whether `new` more workers fit this process's limit now. When the
/// limit or the open descriptors cannot be read, it does not refuse (the
/// start itself will say what went wrong).
pub fn check(new: u64) -> Result<(), NoRoom> {
    if new == 0 {
        return Ok(());
    }
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Ok(());
    };
    let open = entries.count() as u64;
    fits(new, soft, open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_within_the_room_left() {
        assert_eq!(fits(10, 1024, 100), Ok(()));
        // 1024 - 100 - 64 = 860 free: 215 workers of 4.
        assert_eq!(fits(215, 1024, 100), Ok(()));
        let e = fits(216, 1024, 100).expect_err("one too many");
        assert_eq!((e.needed, e.room, e.fit), (864, 860, 215));
        assert!(e.to_string().contains("at most 215 more workers"), "{e}");
    }

    #[test]
    fn a_limit_already_exceeded_leaves_no_room() {
        let e = fits(1, 50, 100).expect_err("none");
        assert_eq!((e.room, e.fit), (0, 0));
        assert_eq!(fits(0, 50, 100), Ok(()));
        assert!(fits(u64::MAX, u64::MAX, 0).is_err());
    }
}
