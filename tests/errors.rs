//! Error paths: every refusal names the problem, and the workload (or the image) is left
//! exactly as it was.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const REFUSED: i32 = 4;
const BAD_IMAGE: i32 = 3;
const FAILED: i32 = 1;

/// Starts `python3 -c CODE`, waits for it to print "ready".
fn python(code: &str) -> Option<std::process::Child> {
    let mut child = match clean("python3")
        .args(["-c", code])
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            common::skip(module_path!(), &format!("python3 is not available ({e})"));
            return None;
        }
    };
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "ready");
    Some(child)
}

#[test]
fn no_such_pid() {
    stasis_fails(
        &["checkpoint", "4999999", "-o", "/tmp/stasis-none.img"],
        REFUSED,
        "no process with PID 4999999",
    );
    assert!(!std::path::Path::new("/tmp/stasis-none.img").exists());
}

#[test]
fn socket_fd_is_refused_and_left_running() {
    init();
    // A netlink socket: a kind stasis cannot recreate (unconnected TCP sockets it can).
    let code = "import socket,time\ns=socket.socket(socket.AF_NETLINK,socket.SOCK_RAW,0)\n\
                print('ready',flush=True)\ntime.sleep(300)";
    let Some(mut child) = python(code) else {
        return;
    };
    let pid = child.id().to_string();
    let err = stasis_fails(
        &["checkpoint", &pid, "-o", "/tmp/stasis-sock.img"],
        REFUSED,
        "is a netlink socket",
    );
    assert!(err.contains("fd 3"), "the error must name the fd: {err}");
    assert!(running_untraced(child.id() as i32));
    child.kill().expect("kill");
    child.wait().expect("reap");
}

#[test]
fn taken_pid_is_refused_and_original_untouched() {
    let dir = scratch("taken");
    let mut wl = start("wl-files", &[]);
    let pid = wl.pid.to_string();
    let img = dir.join("t.img");
    let imgs = img.to_str().expect("utf8");
    stasis_ok(&["checkpoint", &pid, "-o", imgs, "--leave-running"]);
    assert!(running_untraced(wl.pid));
    wl.pipes
        .expect_pass("verify", "after --leave-running checkpoint");
    let err = stasis_fails(&["restore", imgs], REFUSED, &format!("PID {pid}"));
    assert!(err.contains("in use"), "{err}");
    wl.pipes
        .expect_pass("check", "original after refused restore");
    assert!(wl.child.wait().expect("reap").success());
}

#[test]
fn corrupt_and_truncated_images_are_refused_before_anything_is_created() {
    let dir = scratch("corrupt");
    let mut wl = start("wl-memory", &["--mib", "4"]);
    let pid = wl.pid.to_string();
    let img = dir.join("good.img");
    let imgs = img.to_str().expect("utf8");
    stasis_ok(&["checkpoint", &pid, "-o", imgs]);
    wl.child.wait().expect("reap original");
    let good = std::fs::read(&img).expect("read image");

    let bad = dir.join("bad.img");
    let bads = bad.to_str().expect("utf8");
    // A flipped byte in page data, in a record, in the header; a truncation; not an image.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("page data", flip(&good, good.len() / 2)),
        ("record", flip(&good, 64 + 64 + 3)),
        ("header", flip(&good, 9)),
        ("truncated", good[..good.len() - 100].to_vec()),
        ("truncated at half", good[..good.len() / 2].to_vec()),
        ("garbage", vec![0x5a; 8192]),
    ];
    for (what, bytes) in cases {
        std::fs::write(&bad, &bytes).expect("write bad image");
        let out = run_stasis(&["restore", bads]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(BAD_IMAGE), "{what}: {err}");
        assert!(err.contains("image"), "{what}: {err}");
        let out = run_stasis(&["image", "verify", bads]);
        assert_eq!(out.status.code(), Some(BAD_IMAGE), "verify {what}");
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_err(),
            "{what}: a process was created from a bad image"
        );
    }
    assert_eq!(
        std::fs::read(&img).expect("reread"),
        good,
        "the good image must be unchanged"
    );
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("check", "restore of the good image");
    assert!(r.wait().expect("restore").success());
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= 0x40;
    v
}

#[test]
fn failed_checkpoint_resumes_a_sleeping_process_intact() {
    // The image goes to /dev/full: writing fails after the process was frozen and syscalls
    // were injected. It must come back exactly as it was, its nanosleep restarting cleanly.
    let mut wl = start("wl-sleep", &[]);
    let pid = wl.pid.to_string();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(stasis())
        .args(["checkpoint", &pid, "-o", "-"])
        .stdout(Stdio::from(full))
        .stderr(Stdio::piped())
        .output()
        .expect("run stasis");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(FAILED), "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert!(running_untraced(wl.pid));
    std::thread::sleep(std::time::Duration::from_millis(700));
    wl.pipes.expect_pass("check", "after a failed checkpoint");
    assert!(wl.child.wait().expect("reap").success());
}

#[test]
fn leave_running_then_restore_the_image_later() {
    let dir = scratch("leave");
    let mut wl = start("wl-regs", &[]);
    let pid = wl.pid.to_string();
    let img = dir.join("r.img");
    let imgs = img.to_str().expect("utf8");
    let out = stasis_ok(&["checkpoint", &pid, "-o", imgs, "--leave-running", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("checkpoint --json");
    assert_eq!(v["process"], "running");
    assert!(v["frozen_us"].as_u64().is_some() && v["image_bytes"].as_u64() > Some(0));
    wl.pipes.expect_pass("verify", "after --leave-running");
    kill(wl.pid);
    wl.child.wait().expect("reap");
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("check", "restored from a --leave-running image");
    assert!(r.wait().expect("restore").success());
}

#[test]
fn inspect_json_shows_the_process() {
    let dir = scratch("inspect");
    let mut wl = start("wl-memory", &["--mib", "2"]);
    let pid = wl.pid.to_string();
    let img = dir.join("i.img");
    let imgs = img.to_str().expect("utf8");
    stasis_ok(&["checkpoint", &pid, "-o", imgs, "--leave-running"]);
    wl.pipes.expect_pass("check", "after --leave-running");
    wl.child.wait().expect("reap");
    let out = stasis_ok(&["image", "inspect", imgs, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect --json");
    let text = v.to_string();
    assert!(
        text.contains(&format!("\"pid\":{pid}")),
        "inspect lacks the pid"
    );
    assert!(text.contains("wl-memory"), "inspect lacks the exe");
    assert!(
        text.contains("[stack]") && text.contains("[vdso]"),
        "inspect lacks VMAs"
    );
    let human = stasis_ok(&["image", "inspect", imgs]);
    assert!(human.contains(&pid));
}

#[test]
fn checkpoint_streams_through_a_pipe() {
    // The writer is forward-only: an image streamed through a pipe verifies on the far side.
    let mut wl = start("wl-memory", &["--mib", "4"]);
    let pid = wl.pid.to_string();
    let mut ckpt = Command::new(stasis())
        .args([
            "checkpoint",
            &pid,
            "-o",
            "-",
            "--leave-running",
            "--compress",
            "zstd",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("checkpoint");
    let pipe = ckpt.stdout.take().expect("stdout");
    let verify = Command::new(stasis())
        .args(["image", "verify", "-", "--json"])
        .stdin(Stdio::from(pipe))
        .output()
        .expect("verify");
    assert!(ckpt.wait().expect("checkpoint").success());
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("json");
    assert!(v["data_pages"].as_u64() > Some(1000), "{v}");
    wl.pipes.expect_pass("check", "after streaming checkpoint");
    assert!(wl.child.wait().expect("reap").success());
}

#[test]
fn missing_file_is_refused_before_anything_is_created() {
    let dir = scratch("missingfile");
    let tmp = dir.join("wl");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    // wl-files keeps its files in $TMPDIR; give it a private one we can empty.
    let tag = "missingfile";
    let mut child = Command::new(workload("wl-files"))
        .args(["--tag", tag])
        .env("STASIS_WL_TAG", tag)
        .env("TMPDIR", &tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wl-files");
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), format!("READY {pid}"));
    let img = dir.join("f.img");
    let imgs = img.to_str().expect("utf8");
    stasis_ok(&["checkpoint", &pid.to_string(), "-o", imgs]);
    child.wait().expect("reap");
    let victim = std::fs::read_dir(&tmp)
        .expect("readdir")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with("rw.dat"))
        .expect("wl-files data file")
        .path();
    // Moved away (and back later, same inode, as the workload checks its file's identity).
    let aside = dir.join("aside.dat");
    std::fs::rename(&victim, &aside).expect("move aside");
    let err = stasis_fails(&["restore", imgs], REFUSED, "rw.dat");
    assert!(err.contains("fd 3"), "{err}");
    assert!(
        std::fs::metadata(format!("/proc/{pid}")).is_err(),
        "nothing may be created"
    );
    // Put it back: the same image restores.
    std::fs::rename(&aside, &victim).expect("move back");
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("check", "after the file came back");
    assert!(r.wait().expect("restore").success());
}

#[test]
fn restore_waits_for_the_original_zombie_to_be_reaped() {
    // A killed original may still be an unreaped zombie: restore waits (bounded) for its PID.
    let dir = scratch("zombie");
    let mut wl = start("wl-pipe-read", &[]);
    let pid = wl.pid.to_string();
    let img = dir.join("z.img");
    stasis_ok(&["checkpoint", &pid, "-o", img.to_str().expect("utf8")]);
    // SAFETY: kill with signal 0 only checks that the PID is still taken (by the zombie).
    let taken = unsafe { libc::kill(wl.pid, 0) } == 0;
    assert!(taken, "the original should be an unreaped zombie");
    let reaper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(800));
        wl.child.wait().expect("reap")
    });
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("check", "after waiting for the zombie");
    assert!(r.wait().expect("restore").success());
    reaper.join().expect("reaper");
}

#[test]
fn ctrl_c_during_checkpoint_abandons_it_and_resumes_the_process() {
    let dir = scratch("sigint");
    let mut wl = start("wl-memory", &["--mib", "384"]);
    let pid = wl.pid.to_string();
    let img = dir.join("s.img");
    let imgs = img.to_str().expect("utf8");
    let mut interrupted = false;
    for delay_ms in [40u64, 80, 20, 150] {
        let child = Command::new(stasis())
            .args(["checkpoint", &pid, "-o", imgs, "--leave-running"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        // SAFETY: kill takes no pointers; the pid is our own stasis child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            running_untraced(wl.pid),
            "the workload must run on, untraced"
        );
        if out.status.code() == Some(130) {
            assert!(err.contains("interrupted"), "{err}");
            assert!(!img.exists(), "an abandoned checkpoint leaves no image");
            let partial = dir.join("s.img.partial");
            assert!(
                !partial.exists(),
                "an abandoned checkpoint leaves no partial image"
            );
            interrupted = true;
            break;
        }
        // Too early (killed before it froze anything) or too late (finished): try again.
        let _ = std::fs::remove_file(&img);
    }
    assert!(
        interrupted,
        "never managed to interrupt a checkpoint in its frozen window"
    );
    wl.pipes
        .expect_pass("check", "after an interrupted checkpoint");
    assert!(wl.child.wait().expect("reap").success());
}

#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    // `stasis image inspect IMG --json | head -1`: the reader goes away early.
    let dir = scratch("epipe");
    let mut wl = start("wl-memory", &["--mib", "2"]);
    let img = dir.join("e.img");
    let imgs = img.to_str().expect("utf8");
    stasis_ok(&[
        "checkpoint",
        &wl.pid.to_string(),
        "-o",
        imgs,
        "--leave-running",
    ]);
    wl.pipes.expect_pass("check", "after --leave-running");
    wl.child.wait().expect("reap");
    let mut child = Command::new(stasis())
        .args(["image", "inspect", imgs, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("inspect");
    drop(child.stdout.take()); // close the read end at once
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        matches!(out.status.code(), Some(0) | Some(141)),
        "{:?}: {err}",
        out.status
    );
}

#[test]
fn a_child_with_a_socket_is_refused_and_the_tree_left_running() {
    init();
    let code = "import subprocess,time\n\
                c = subprocess.Popen(['python3', '-c', \
                  'import socket,time\\ns=socket.socket(socket.AF_NETLINK,socket.SOCK_RAW,0)\\n\
                  print(1,flush=True)\\ntime.sleep(300)'], \
                  stdout=subprocess.PIPE)\n\
                c.stdout.readline()\n\
                print('ready',flush=True)\ntime.sleep(300)";
    let Some(mut child) = python(code) else {
        return;
    };
    let pid = child.id() as i32;
    let kids =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).expect("children");
    let kid: i32 = kids.trim().parse().expect("one child");
    let err = stasis_fails(
        &["checkpoint", &pid.to_string(), "-o", "/tmp/stasis-tree.img"],
        REFUSED,
        "is a netlink socket",
    );
    assert!(
        err.contains(&format!("PID {kid}")) && err.contains("fd 3"),
        "the error must name the child and its fd: {err}"
    );
    assert!(!std::path::Path::new("/tmp/stasis-tree.img").exists());
    assert!(running_untraced(pid), "the parent must run on, untraced");
    assert!(running_untraced(kid), "the child must run on, untraced");
    kill(kid);
    child.kill().expect("kill");
    child.wait().expect("reap");
}

#[test]
fn a_process_already_traced_is_refused_and_left_alone() {
    // As if a debugger were attached: this test thread seizes the workload first.
    let mut wl = start("wl-pipe-read", &[]);
    let pid = wl.pid;
    // SAFETY: PTRACE_SEIZE of our own child; no pointers.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, 0usize) };
    assert_eq!(rc, 0, "seize: {}", std::io::Error::last_os_error());
    let err = stasis_fails(
        &[
            "checkpoint",
            &pid.to_string(),
            "-o",
            "/tmp/stasis-traced.img",
        ],
        REFUSED,
        "ptrace is not permitted",
    );
    assert!(err.contains(&pid.to_string()), "{err}");
    // Let go of it again: interrupt, wait for the stop, detach.
    // SAFETY: ptrace requests on our own tracee; status is a valid c_int.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0usize, 0usize), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, pid, 0usize, 0usize), 0);
    }
    wl.pipes
        .expect_pass("check", "after a refused checkpoint of a traced process");
    assert!(wl.child.wait().expect("reap").success());
}

/// Each kind of socket (and io_uring and userfaultfd) stasis cannot restore yet is refused by
/// name, and the process is left running.
#[test]
fn unsupported_fd_kinds_are_refused_by_name() {
    init();
    let kinds = [
        (
            "socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0)); \
             s.sendto(b'x', s.getsockname())",
            "UDP socket on 127.0.0.1",
        ),
        (
            "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)",
            "a netlink socket",
        ),
        (
            "socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)",
            "a packet socket",
        ),
        (
            "socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
            "a raw IPv4 socket",
        ),
        (
            // io_uring_setup(4 entries, zeroed params).
            "__import__('ctypes').CDLL(None).syscall(425, 4, \
             __import__('ctypes').create_string_buffer(120))",
            "an io_uring instance",
        ),
        (
            // userfaultfd(O_CLOEXEC).
            "__import__('ctypes').CDLL(None).syscall(323, 0o2000000)",
            "a userfaultfd",
        ),
    ];
    for (make, name) in kinds {
        let code =
            format!("import socket,time\ns={make}\nprint('ready',flush=True)\ntime.sleep(300)");
        let Some(mut child) = python(&code) else {
            return;
        };
        let pid = child.id().to_string();
        let err = stasis_fails(
            &["checkpoint", &pid, "-o", "/tmp/stasis-kinds.img"],
            REFUSED,
            name,
        );
        assert!(err.contains("fd 3"), "the error must name the fd: {err}");
        assert!(running_untraced(child.id() as i32));
        child.kill().expect("kill");
        child.wait().expect("reap");
    }
}

/// A file in flight on a unix socket (SCM_RIGHTS) that nobody in the tree holds and that
/// cannot be opened again (a UDP socket, an eventfd), and credentials in flight, are refused
/// naming the socket's fd and what is in flight; the process runs on.
#[test]
fn unsupported_files_in_flight_are_refused_by_name() {
    init();
    let cases = [
        (
            "x = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
            "x.fileno()",
            "a UDP (IPv4) socket",
        ),
        ("x = os.eventfd(3)", "x", "anon_inode:[eventfd]"),
        (
            "b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)",
            "",
            "SCM_CREDENTIALS",
        ),
    ];
    for (make, fd, name) in cases {
        // a, b are fds 3 and 4; what is sent is closed after sending.
        let send = if fd.is_empty() {
            "a.send(b'c')".to_string()
        } else {
            format!(
                "a.sendmsg([b'm'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, \
                 array.array('i', [{fd}]))]); os.close({fd})"
            )
        };
        let code = format!(
            "import array,os,socket,time\na, b = socket.socketpair()\n{make}\n{send}\n\
             print('ready',flush=True)\ntime.sleep(300)"
        );
        let Some(mut child) = python(&code) else {
            return;
        };
        let pid = child.id().to_string();
        let err = stasis_fails(
            &["checkpoint", &pid, "-o", "/tmp/stasis-inflight.img"],
            REFUSED,
            name,
        );
        assert!(
            err.contains("unix socket fd 4") && err.contains(&format!("PID {pid}")),
            "the error must name the socket fd and the process: {err}"
        );
        if !fd.is_empty() {
            assert!(err.contains("in flight"), "{err}");
        }
        assert!(!std::path::Path::new("/tmp/stasis-inflight.img").exists());
        assert!(running_untraced(child.id() as i32));
        child.kill().expect("kill");
        child.wait().expect("reap");
    }
}

/// A pipe whose other end is held by a process outside the tree (an orphaned grandchild
/// now belongs to the test) is refused, naming the fd, and both processes run on.
#[test]
fn a_pipe_to_a_process_outside_the_tree_is_refused() {
    init();
    let code = "import os,time\n\
                r, w = os.pipe()\n\
                if os.fork() == 0:\n\
                \x20   if os.fork() == 0:\n\
                \x20       os.close(w); time.sleep(300)\n\
                \x20   os._exit(0)\n\
                os.close(r); os.wait()\n\
                print('ready', w, flush=True)\n\
                time.sleep(300)";
    let mut cmd = clean("python3");
    let mut child = cmd
        .args(["-c", code])
        .stdin(Stdio::null())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let fd = line
        .trim()
        .strip_prefix("ready ")
        .expect("ready FD")
        .to_string();
    let pid = child.id() as i32;
    let err = stasis_fails(
        &[
            "checkpoint",
            &pid.to_string(),
            "-o",
            "/tmp/stasis-outside.img",
        ],
        REFUSED,
        "whose other end is outside the checkpointed tree",
    );
    assert!(err.contains(&format!("fd {fd} is the write end")), "{err}");
    assert!(running_untraced(pid), "the process must run on, untraced");
    // The grandchild is this test's (a subreaper) now: end it too.
    let outside: Vec<i32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&p: &i32| {
            p != pid
                && std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| s.contains(&format!(") S {} ", std::process::id())))
                && std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains("import os,time"))
        })
        .collect();
    for p in &outside {
        kill(*p);
    }
    reap_orphans(&outside);
    child.kill().expect("kill");
    child.wait().expect("reap");
}
