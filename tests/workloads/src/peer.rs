//! A forked helper process the workload asks over a pipe pair: one byte asks, "1" (all
//! well) or "0<what is wrong>" answers.

use crate::{sys, Ctx};

/// A process answering over a pipe pair: one byte asks, "1" or "0<why>" answers.
pub struct Peer {
    /// Its PID.
    pub pid: i32,
    cmd: i32,
    res: i32,
}

impl Peer {
    /// Asks once; Err says what it found wrong (or that it did not answer).
    pub fn ask(&self) -> Result<(), String> {
        sys::write_all(self.cmd, b"c")?;
        let mut buf = [0u8; 512];
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::read(self.res, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n >= 1 && buf[0] == b'1' => Ok(()),
            n if n >= 1 => Err(String::from_utf8_lossy(&buf[1..n as usize]).into_owned()),
            _ => Err(sys::os_err("no answer")),
        }
    }
}

/// Two pipes (command, result).
fn pipes(ctx: &mut Ctx) -> ([i32; 2], [i32; 2]) {
    let mut cmd = [0i32; 2];
    let mut res = [0i32; 2];
    // SAFETY: valid arrays for pipe2.
    let ok = unsafe {
        libc::pipe2(cmd.as_mut_ptr(), libc::O_CLOEXEC) == 0
            && libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC) == 0
    };
    if !ok {
        let e = sys::os_err("pipe2");
        ctx.fail_exit(&format!("setup: {e}"));
    }
    (cmd, res)
}

/// Forks a peer (it dies with its parent, PR_SET_PDEATHSIG) running `serve(cmd_read, res_write)` (which never returns).
pub fn fork_peer(ctx: &mut Ctx, serve: impl FnOnce(i32, i32)) -> Peer {
    let (cmd, res) = pipes(ctx);
    // SAFETY: the child only runs `serve`, then _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = sys::os_err("fork");
        ctx.fail_exit(&format!("setup: {e}"));
    }
    if pid == 0 {
        // SAFETY: closing the parent's ends in the child; prctl takes no pointers.
        unsafe {
            libc::close(cmd[1]);
            libc::close(res[0]);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        }
        serve(cmd[0], res[1]);
        // SAFETY: ends the child.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closing our copies of the child's ends.
    unsafe {
        libc::close(cmd[0]);
        libc::close(res[1]);
    }
    Peer {
        pid,
        cmd: cmd[1],
        res: res[0],
    }
}

/// The answer of a peer whose checks found `bad` (nothing: all well).
pub fn answer(bad: &[String]) -> String {
    if bad.is_empty() {
        "1".to_string()
    } else {
        format!("0{}", bad.join("; "))
    }
}
