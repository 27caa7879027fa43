//! Child processes that die with us.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Spawns `command` so that the kernel kills it when this process exits, even
/// on a panic or `kill -9` of the test runner (Linux's parent-death signal).
pub fn spawn_tied(command: &mut Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Sends `signal` to a child.
pub fn signal(child: &Child, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: plain syscall on a pid we own.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
