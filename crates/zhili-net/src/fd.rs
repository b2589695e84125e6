//! The open-file limit: each connection is a file descriptor, and a soft limit of 1,024 lets a
//! thousand idle sockets lock every other client out. The soft limit is raised to the hard one.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (soft before, soft after, hard).
// rlim_t is u64 on 64-bit Linux but not on every target.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; the resource constant is valid.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur as u64;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we own; raising soft up to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok((before, lim.rlim_cur as u64, lim.rlim_max as u64))
}

#[cfg(test)]
mod tests {
    #[test]
    fn soft_limit_reaches_hard() {
        let (before, after, hard) = super::raise_open_file_limit().expect("rlimit");
        assert!(after >= before);
        assert_eq!(after, hard);
    }
}
