//! Every self-checking workload is checkpointed and restored twice in a row and must
//! verify all of its own state after each restore.

mod common;

#[test]
fn memory_patterns_over_many_vmas() {
    common::round_trip("wl-memory", &[], &[]);
}

#[test]
fn memory_with_zstd() {
    common::round_trip("wl-memory", &[], &["--compress", "zstd"]);
}

#[test]
fn registers_x87_sse_avx() {
    common::round_trip("wl-regs", &[], &[]);
}

#[test]
fn nanosleep_restarts() {
    common::round_trip("wl-sleep", &[], &[]);
}

#[test]
fn pipe_read_restarts() {
    common::round_trip("wl-pipe-read", &[], &[]);
}

#[test]
fn vdso_clocks() {
    common::round_trip("wl-vdso", &[], &[]);
}

#[test]
fn signal_handlers() {
    common::round_trip("wl-signal", &[], &[]);
}

#[test]
fn files_offsets_and_flags() {
    common::round_trip("wl-files", &[], &[]);
}

#[test]
fn counter_with_data() {
    common::round_trip("wl-counter", &["--mib", "16", "--quiet"], &[]);
}

#[test]
fn timers_sched_creds_altstack_and_pending_signals() {
    common::round_trip("wl-state", &[], &[]);
}

/// Uid, gid, groups and capability lines of /proc/PID/status.
fn identity(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .filter(|l| {
            ["Uid:", "Gid:", "Groups:", "Cap"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn non_root_process_keeps_its_ids_groups_and_capabilities() {
    use std::os::unix::process::CommandExt;
    let dir = common::scratch("nobody");
    let mut wl = common::start_as_other_user("wl-pipe-read", &[], |c| {
        c.current_dir("/tmp");
        // SAFETY: setgroups/setgid/setuid between fork and exec are async-signal-safe; the
        // array is static.
        unsafe {
            c.pre_exec(|| {
                static GROUPS: [libc::gid_t; 2] = [65534, 100];
                if libc::setgroups(2, GROUPS.as_ptr()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let before = identity(wl.pid);
    assert!(
        before
            .iter()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{before:?}"
    );
    let pid = wl.pid.to_string();
    let img = dir.join("n.img");
    common::stasis_ok(&["checkpoint", &pid, "-o", img.to_str().expect("utf8")]);
    wl.child.wait().expect("reap");
    let (mut r, mut p) = common::restore(&img, true);
    assert_eq!(p.expect_line(&[&pid]), pid);
    assert!(r.wait().expect("restore").success());
    assert_eq!(
        identity(wl.pid),
        before,
        "credentials changed across restore"
    );
    p.expect_pass("check", "restored as nobody");
    common::reap(wl.pid);
}

#[test]
fn deleted_files_and_memfds_keep_their_contents() {
    common::round_trip("wl-ghost", &[], &[]);
}

/// A bind mount of / that is unmounted when dropped (also on panic).
struct BindRoot(std::path::PathBuf);

impl Drop for BindRoot {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn chrooted_process_keeps_its_root_and_cwd() {
    use std::os::unix::process::CommandExt;
    let root = std::env::temp_dir().join(format!("stasis-chroot-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("mkdir");
    let st = std::process::Command::new("mount")
        .arg("--rbind")
        .arg("/")
        .arg(&root)
        .status();
    if !st.is_ok_and(|s| s.success()) {
        common::skip(
            module_path!(),
            "cannot bind-mount / (needs root and mount(8))",
        );
        return;
    }
    let _guard = BindRoot(root.clone());
    let dir = common::scratch("chroot");
    let croot = std::ffi::CString::new(root.to_str().expect("utf8")).expect("cstr");
    let mut wl = common::start_with("wl-pipe-read", &[], move |c| {
        // SAFETY: chroot/chdir between fork and exec are async-signal-safe; croot lives in
        // the closure.
        unsafe {
            c.pre_exec(move || {
                if libc::chroot(croot.as_ptr()) != 0 || libc::chdir(c"/tmp".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let link =
        |what: &str| std::fs::read_link(format!("/proc/{}/{what}", wl.pid)).expect("readlink");
    let (root_before, cwd_before) = (link("root"), link("cwd"));
    assert_eq!(root_before, root);
    let pid = wl.pid.to_string();
    let img = dir.join("c.img");
    common::stasis_ok(&["checkpoint", &pid, "-o", img.to_str().expect("utf8")]);
    wl.child.wait().expect("reap");
    let (mut r, mut p) = common::restore(&img, true);
    assert_eq!(p.expect_line(&[&pid]), pid);
    assert!(r.wait().expect("restore").success());
    assert_eq!((link("root"), link("cwd")), (root_before, cwd_before));
    p.expect_pass("check", "restored inside its chroot");
    common::reap(wl.pid);
}

#[test]
fn threads_keep_their_ids_names_tls_masks_and_altstacks() {
    common::round_trip("wl-threads", &[], &[]);
}

#[test]
fn every_thread_of_a_non_root_process_drops_root() {
    use std::os::unix::process::CommandExt;
    // Credentials are per thread: each worker checks its own uid/gid after restore.
    let dir = common::scratch("threads-nobody");
    let mut wl = common::start_as_other_user("wl-threads", &[], |c| {
        c.current_dir("/tmp");
        // SAFETY: setgroups/setgid/setuid between fork and exec are async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let pid = wl.pid.to_string();
    let img = dir.join("t.img");
    common::stasis_ok(&["checkpoint", &pid, "-o", img.to_str().expect("utf8")]);
    wl.child.wait().expect("reap");
    let (mut r, mut p) = common::restore(&img, false);
    p.expect_pass("check", "every thread restored as nobody");
    assert!(r.wait().expect("restore").success());
}

/// The state letter of /proc/PID/stat.
fn state_of(pid: i32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.trim_start().chars().next())
        })
        .unwrap_or('?')
}

fn wait_state(pid: i32, want: char) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while state_of(pid) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} state {} != {want}",
            state_of(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn a_stopped_process_stays_stopped() {
    let dir = common::scratch("stopped");
    let mut wl = common::start("wl-sleep", &[]);
    let pid = wl.pid.to_string();
    common::stasis_ok(&[
        "checkpoint",
        &pid,
        "-o",
        dir.join("a.img").to_str().expect("utf8"),
    ]);
    wl.child.wait().expect("reap");
    // Restored, then stopped by job control, then checkpointed twice while stopped.
    let (mut r, mut p) = common::restore(&dir.join("a.img"), true);
    assert_eq!(p.expect_line(&[&pid]), pid);
    assert!(r.wait().expect("restore").success());
    // SAFETY: kill takes no pointers; the pid is the workload this test restored.
    unsafe { libc::kill(wl.pid, libc::SIGSTOP) };
    wait_state(wl.pid, 'T');
    let img = dir.join("s.img");
    let imgs = img.to_str().expect("utf8");
    common::stasis_ok(&["checkpoint", &pid, "-o", imgs, "--leave-running"]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        state_of(wl.pid),
        'T',
        "--leave-running must leave it stopped"
    );
    common::stasis_ok(&["checkpoint", &pid, "-o", imgs]);
    common::reap(wl.pid);
    let (mut r, mut p) = common::restore(&img, true);
    assert_eq!(p.expect_line(&[&pid]), pid);
    assert!(r.wait().expect("restore").success());
    wait_state(wl.pid, 'T');
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        state_of(wl.pid),
        'T',
        "the restored process must stay stopped"
    );
    // SAFETY: as above.
    unsafe { libc::kill(wl.pid, libc::SIGCONT) };
    std::thread::sleep(std::time::Duration::from_millis(700));
    p.expect_pass("check", "continued after restore");
    common::reap(wl.pid);
}

#[test]
fn a_signal_pending_and_unblocked_in_the_image_is_delivered_once_after_restore() {
    // A job-control-stopped process takes no signal but SIGKILL and SIGCONT: one sent to it
    // now waits in its queue, unblocked, and is saved so. Restored, it must be delivered once
    // the process is continued (the restore once lost it: the main thread got its final mask
    // before its last injected calls, took the signal at one of them, and the injector
    // suppressed it).
    let dir = common::scratch("pending-unblocked");
    let mut wl = common::start("wl-signal", &[]);
    let pid = wl.pid.to_string();
    wl.pipes.expect_pass("verify", "before the checkpoint");
    // SAFETY: kill takes no pointers; the pid is the workload this test started.
    unsafe { libc::kill(wl.pid, libc::SIGSTOP) };
    wait_state(wl.pid, 'T');
    // SAFETY: as above.
    unsafe { libc::kill(wl.pid, libc::SIGUSR1) };
    let img = dir.join("p.img");
    common::stasis_ok(&["checkpoint", &pid, "-o", img.to_str().expect("utf8")]);
    wl.child.wait().expect("reap");
    let (mut r, mut p) = common::restore(&img, true);
    assert!(r.wait().expect("restore").success());
    wait_state(wl.pid, 'T');
    // SAFETY: as above (the restored process has the same pid).
    unsafe { libc::kill(wl.pid, libc::SIGCONT) };
    p.send("verify");
    let info = p.expect_line(&["INFO ", "PASS ", "FAIL "]);
    let line = p.expect_line(&["PASS ", "FAIL "]);
    assert!(line.starts_with("PASS "), "after the restore: {line}");
    assert!(
        info.contains("SIGUSR1 handled 3 times") && info.contains("(1 from outside)"),
        "the SIGUSR1 pending in the image was not delivered exactly once: {info}"
    );
    p.send("check");
    let _ = p.expect_line(&["PASS ", "FAIL "]);
    common::reap(wl.pid);
}
