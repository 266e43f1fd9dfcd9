//! Process trees: real multi-process programs checkpointed mid-work and restored, finishing
//! exactly as an uninterrupted run does, with the bytes sitting in their pipes delivered once.

mod common;

use common::*;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn shell_pipeline_mid_stream_finishes_with_the_same_digest() {
    init();
    let dir = scratch("pipeline");
    let script = "seq 1 4000000 | sort -rn | md5sum";
    let expected = shell(script, &dir).output().expect("reference run");
    let expected = String::from_utf8_lossy(&expected.stdout).into_owned();
    assert!(expected.ends_with("  -\n"), "{expected}");
    // Several tries: the pipe must hold bytes at the moment of the checkpoint.
    for attempt in 0..5 {
        let child = shell(script, &dir).spawn().expect("sh");
        let pid = child.id() as i32;
        assert!(wait_for_tree(pid, &["seq", "sort", "md5sum"], 3));
        std::thread::sleep(Duration::from_millis(100 + 60 * attempt));
        let img = dir.join(format!("p{attempt}.img"));
        let still_writing = descendants(pid).iter().any(|d| {
            std::fs::read_to_string(format!("/proc/{d}/comm")).is_ok_and(|c| c.trim() == "seq")
        });
        let got = checkpoint_kill_restore(child, &img);
        assert_eq!(
            got, expected,
            "the restored pipeline computed something else"
        );
        let (procs, buffered) = tree_facts(&img);
        assert_eq!(procs, 4, "sh, seq, sort and md5sum");
        eprintln!("attempt {attempt}: seq running {still_writing}, {buffered} bytes in pipes");
        if still_writing && buffered > 0 {
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    }
    panic!("never caught the pipeline with bytes in its pipe");
}

/// A C project whose files take a while to compile (so make is caught mid-build).
fn write_c_project(dir: &Path) {
    let mut main = String::from("#include <stdio.h>\n");
    let mut objs = Vec::new();
    for f in 0..4 {
        let mut src = String::new();
        for i in 0..400 {
            src.push_str(&format!(
                "static unsigned g{i}(unsigned x) {{ unsigned y = x * {} + {i}; \
                 for (int k = 0; k < 3; k++) y = (y << 3) ^ (y >> 5) ^ {}; return y; }}\n",
                2 * i + 3,
                f * 1000 + i
            ));
        }
        src.push_str(&format!("unsigned f{f}(unsigned x) {{\n"));
        for i in 0..400 {
            src.push_str(&format!("  x = g{i}(x) + {};\n", i % 7));
        }
        src.push_str("  return x;\n}\n");
        std::fs::write(dir.join(format!("f{f}.c")), src).expect("write source");
        main.push_str(&format!("unsigned f{f}(unsigned);\n"));
        objs.push(format!("f{f}.o"));
    }
    main.push_str("int main(void) { unsigned x = 1;\n");
    for f in 0..4 {
        main.push_str(&format!("  x = f{f}(x);\n"));
    }
    main.push_str("  printf(\"%u\\n\", x); return 0; }\n");
    std::fs::write(dir.join("main.c"), main).expect("write main");
    let makefile = format!(
        "CFLAGS = -O2\nprog: main.o {objs}\n\t$(CC) -o $@ $^\n%.o: %.c\n\t$(CC) $(CFLAGS) -c $<\n\
         clean:\n\trm -f *.o prog\n",
        objs = objs.join(" ")
    );
    std::fs::write(dir.join("Makefile"), makefile).expect("write Makefile");
}

#[test]
fn make_j2_mid_build_produces_the_same_program() {
    if !have("make") || !have("cc") {
        return;
    }
    init();
    let dir = scratch("make");
    write_c_project(&dir);
    let build = "make -s -j2 prog && ./prog && md5sum prog";
    let expected = shell(build, &dir).output().expect("reference build");
    let expected = String::from_utf8_lossy(&expected.stdout).into_owned();
    assert_eq!(expected.lines().count(), 2, "reference build: {expected}");
    assert!(shell("make -s clean", &dir)
        .status()
        .expect("clean")
        .success());

    let child = shell(build, &dir).spawn().expect("sh");
    let pid = child.id() as i32;
    // Two compilers at work: make -j2 is mid-build.
    assert!(
        wait_for_tree(pid, &["cc1"], 2),
        "make never ran two compilers"
    );
    let img = dir.join("make.img");
    let got = checkpoint_kill_restore(child, &img);
    assert_eq!(got, expected, "the restored build produced something else");
    let (procs, _) = tree_facts(&img);
    assert!(procs >= 5, "sh, make and the compilers: got {procs}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wl_tree_keeps_pipes_files_memory_sessions_and_zombies() {
    round_trip("wl-tree", &[], &[]);
}

#[test]
fn wl_tree_with_zstd() {
    round_trip("wl-tree", &[], &["--compress", "zstd"]);
}

/// Checkpointed right after READY, before any check has drained its pipes: the bytes sitting
/// in three pipes (3000, 6000 and 500) must arrive exactly once after the restore.
#[test]
fn wl_tree_pipes_keep_their_buffered_bytes() {
    let dir = scratch("wltree-fresh");
    let wl = start("wl-tree", &[]);
    let pid = wl.pid.to_string();
    let img = dir.join("1.img");
    let tree = descendants(wl.pid);
    let mut child = wl.child;
    stasis_ok(&["checkpoint", &pid, "-o", img.to_str().expect("utf8")]);
    child.wait().expect("reap original");
    reap_orphans(&tree);
    let v = inspect(&img);
    let mut buffered: Vec<u64> = v["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .flat_map(|p| p["pipes"].as_array().into_iter().flatten())
        .map(|x| x["buffered"].as_u64().unwrap_or(0))
        .filter(|b| *b > 0)
        .collect();
    buffered.sort_unstable();
    assert_eq!(
        buffered,
        vec![500, 3000, 6000],
        "bytes in the image's pipes"
    );
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("verify", "after restore");
    p.expect_pass("check", "after restore");
    assert!(r.wait().expect("stasis restore").success());
    let _ = std::fs::remove_dir_all(&dir);
}

const FIFO_PY: &str = r#"
import os, sys, hashlib
path = sys.argv[1]
os.mkfifo(path)
r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
w = os.open(path, os.O_WRONLY)
os.set_blocking(r, True)
os.write(w, bytes(range(256)) * 20)
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.read(go_r, 1)
    os.write(w, b"z" * 1000)
    os._exit(0)
os.close(w)
print("ready", flush=True)
sys.stdin.readline()
os.write(go_w, b"g")
data = b""
while len(data) < 6120:
    data += os.read(r, 6120 - len(data))
os.set_blocking(r, False)
try:
    extra = len(os.read(r, 100))
except BlockingIOError:
    extra = 0
_, st = os.waitpid(pid, 0)
print(len(data), extra, st, hashlib.sha256(data).hexdigest(), flush=True)
"#;

/// A FIFO holding 5120 bytes, its read end in the parent and its write end in a child: after
/// the restore the parent reads those bytes and the child's later 1000, exactly once.
#[test]
fn fifo_keeps_its_buffered_bytes_across_two_processes() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("fifo");
    let fifo = dir.join("f");
    let script = "exec python3 -c \"$0\" \"$1\"";
    let (child, _) = start_ready(script, &[FIFO_PY.as_ref(), fifo.as_ref()], &dir);
    let img = dir.join("fifo.img");
    let got = checkpoint_go(child, &img);
    let (procs, buffered) = tree_facts(&img);
    assert_eq!(
        (procs, buffered),
        (2, 5120),
        "parent and child; bytes in the FIFO"
    );
    let mut expected: Vec<u8> = (0..20).flat_map(|_| 0..=255u8).collect();
    expected.extend(std::iter::repeat_n(b'z', 1000));
    let digest = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(&expected)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    let digest = String::from_utf8_lossy(&digest.stdout);
    let digest = digest.split_whitespace().next().unwrap_or_default();
    assert_eq!(
        got.trim(),
        format!("6120 0 0 {digest}"),
        "what the restored reader got"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tree whose root's PID is free but one child's is taken is refused before any process
/// is created: no half-restored tree.
#[test]
fn a_taken_child_pid_refuses_the_whole_restore() {
    init();
    let dir = scratch("takenchild");
    let mut child = shell("sleep 100 & sleep 100 & wait", &dir)
        .spawn()
        .expect("sh");
    let pid = child.id() as i32;
    assert!(wait_for_tree(pid, &["sleep"], 2));
    let kids = descendants(pid);
    let img = dir.join("t.img");
    let imgs = img.to_str().expect("utf8");
    stasis_ok(&[
        "checkpoint",
        &pid.to_string(),
        "-o",
        imgs,
        "--leave-running",
    ]);
    // Only the root goes; its children run on (orphans of this test).
    kill(pid);
    child.wait().expect("reap root");
    let out = run_stasis(&["restore", imgs]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        kids.iter().any(|k| err.contains(&format!("PID {k}"))) && err.contains("in use"),
        "the error must name the taken PID: {err}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the root must not have been created"
    );
    for &k in &kids {
        assert!(running_untraced(k), "child {k} must be untouched");
        kill(k);
    }
    reap_orphans(&kids);
    let _ = std::fs::remove_dir_all(&dir);
}

const THREADS_PY: &str = r#"
import sys, threading, hashlib
results = {}
def work(i):
    h = hashlib.sha256()
    for k in range(400000):
        h.update(b"%d-%d" % (i, k))
    results[i] = h.hexdigest()
print("ready", flush=True)
sys.stdin.readline()
ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in ts: t.start()
for t in ts: t.join()
print(sorted(results.items()), flush=True)
"#;

/// A multithreaded CPython program as the child of a shell, caught while its threads
/// compute: the tree comes back and finishes with the same result.
#[test]
fn threaded_cpython_under_a_shell_finishes_the_same() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("pythreads");
    let script = "python3 -c \"$0\"; echo exit $?";
    let run = || {
        let mut cmd = shell(script, &dir);
        cmd.arg(THREADS_PY).stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("sh");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("read");
        assert_eq!(line.trim(), "ready");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("go");
        (child, out)
    };
    let (mut c, mut out) = run();
    let mut expected = String::new();
    out.read_to_string(&mut expected).expect("read");
    c.wait().expect("reap");
    assert!(expected.ends_with("exit 0\n"), "{expected}");
    let (c, _out) = run();
    // Caught while at least two of its worker threads compute.
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads_of = |p: i32| std::fs::read_dir(format!("/proc/{p}/task")).map_or(0, |d| d.count());
    while !descendants(c.id() as i32)
        .into_iter()
        .any(|d| threads_of(d) >= 3)
    {
        assert!(
            Instant::now() < deadline,
            "python never ran two worker threads at once"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let img = dir.join("py.img");
    let got = checkpoint_kill_restore(c, &img);
    let v = inspect(&img);
    let threads = v["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p["threads"].as_array().map_or(0, Vec::len))
        .max()
        .unwrap_or(0);
    assert!(threads >= 3, "python was caught with {threads} threads");
    assert_eq!(
        got, expected,
        "the restored threads computed something else"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const MEMFD_PY: &str = r#"
import os, sys, mmap
fd = os.memfd_create("shared-buf")
os.ftruncate(fd, 65536)
m = mmap.mmap(fd, 65536)
m[0:5] = b"start"
go_r, go_w = os.pipe()
done_r, done_w = os.pipe()
pid = os.fork()
if pid == 0:
    m[100:105] = b"child"
    os.read(go_r, 1)
    # After the restore: what the parent wrote must be visible here, through this mapping.
    seen = bytes(m[200:206])
    m[300:306] = b"answer"
    os.write(done_w, seen)
    os._exit(0)
while bytes(m[100:105]) != b"child":
    pass
print("ready", flush=True)
sys.stdin.readline()
m[200:206] = b"parent"
os.write(go_w, b"g")
seen = os.read(done_r, 6)
os.waitpid(pid, 0)
with open(f"/proc/self/fd/{fd}", "rb") as f:
    via_fd = f.read(5)
print(bytes(m[0:5]), bytes(m[100:105]), seen, bytes(m[300:306]), via_fd, flush=True)
"#;

/// A memfd mapped shared by a parent and its child (and held as an fd): restored once, so
/// both still see each other's writes after the restore.
#[test]
fn memfd_shared_by_two_processes_stays_shared() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("memfd");
    let (child, _) = start_ready("exec python3 -c \"$0\"", &[MEMFD_PY.as_ref()], &dir);
    let got = checkpoint_go(child, &dir.join("memfd.img"));
    assert_eq!(
        got.trim(),
        "b'start' b'child' b'parent' b'answer' b'start'",
        "writes must cross between the restored processes"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const SHARED_FD_TABLE_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static char stack[65536];
static int p2c[2], c2p[2];
static int child(void *arg) {
    (void)arg;
    char b[16];
    int n = read(p2c[0], b, sizeof b - 1);
    if (n <= 0) _exit(2);
    b[n] = 0;
    int fd = atoi(b);
    char ok = fcntl(fd, F_GETFD) >= 0 ? 'Y' : 'N';
    close(fd);
    write(c2p[1], &ok, 1);
    _exit(0);
}
int main(void) {
    if (pipe(p2c) || pipe(c2p)) return 4;
    int pid = clone(child, stack + sizeof stack, CLONE_FILES | SIGCHLD, 0);
    printf("ready %d\n", pid);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 3;
    int fd = open("/dev/null", O_RDONLY);
    char b[16];
    int n = snprintf(b, sizeof b, "%d", fd);
    write(p2c[1], b, n);
    char ok = 0;
    read(c2p[0], &ok, 1);
    int closed = fcntl(fd, F_GETFD) < 0;
    int st;
    waitpid(pid, &st, __WALL);
    printf("child saw %c, closed by child %d, status %d\n", ok, closed, st);
    return 0;
}
"#;

/// A parent and a child made with clone(CLONE_FILES) share one fd table: after the restore
/// an fd the parent opens is there for the child, and the child's close closes it for both.
#[test]
fn an_fd_table_shared_with_a_child_stays_shared() {
    if !have("cc") {
        return;
    }
    init();
    let dir = scratch("clonefiles");
    std::fs::write(dir.join("c.c"), SHARED_FD_TABLE_C).expect("write");
    let ok = Command::new("cc")
        .args(["-o", "clonefiles", "c.c"])
        .current_dir(&dir)
        .status()
        .expect("cc");
    assert!(ok.success());
    let start = || {
        let mut cmd = shell("exec ./clonefiles", &dir);
        cmd.stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("clonefiles");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("read");
        assert!(line.starts_with("ready "), "{line}");
        (child, out)
    };
    let expected = "child saw Y, closed by child 1, status 0\n";
    let (mut c, mut out) = start();
    {
        use std::io::Write;
        c.stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("go");
    }
    let mut reference = String::new();
    out.read_to_string(&mut reference).expect("read");
    c.wait().expect("reap");
    assert_eq!(reference, expected, "uninterrupted run");

    let (c, _out) = start();
    let img = dir.join("x.img");
    let (r, mut pipes) = checkpoint_and_restore(c, &img);
    let v = inspect(&img);
    let shared = v["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["files_shared_with_parent"].as_bool() == Some(true))
        .count();
    assert_eq!(shared, 1, "the child's table is its parent's");
    pipes.send("go");
    let got = output_of(r, pipes);
    assert_eq!(got, expected, "after the restore");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `wl-tree` inside a new cgroup (cgroup2 or the v1 freezer hierarchy) and checks the
/// checkpoint stops the tree through that cgroup's freezer, then restores it.
fn tree_in_own_cgroup(hierarchy: &str) {
    let base = Path::new("/sys/fs/cgroup").join(hierarchy);
    let probe = if hierarchy == "unified" {
        "cgroup.freeze"
    } else {
        "freezer.state"
    };
    let cg = base.join(format!("stasis-test-{}", std::process::id()));
    if std::fs::create_dir(&cg).is_err() || !cg.join(probe).exists() {
        common::skip(
            module_path!(),
            &format!(
                "cannot make a cgroup with a freezer under {}",
                base.display()
            ),
        );
        let _ = std::fs::remove_dir(&cg);
        return;
    }
    let _cg_guard = CgroupDir(cg.clone());
    let procs =
        std::ffi::CString::new(cg.join("cgroup.procs").to_str().expect("utf8")).expect("path");
    let dir = scratch(&format!("cg{hierarchy}"));
    let wl = start_with("wl-tree", &[], |cmd| {
        // SAFETY: runs between fork and exec; open/write/close are async-signal-safe and
        // `procs` was built before the fork. Writing "0" moves the writer itself.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    });
    let pid = wl.pid.to_string();
    let img = dir.join("1.img");
    let tree = descendants(wl.pid);
    let mut child = wl.child;
    let out = stasis_ok(&[
        "checkpoint",
        &pid,
        "-o",
        img.to_str().expect("utf8"),
        "--json",
    ]);
    child.wait().expect("reap original");
    reap_orphans(&tree);
    let stats: serde_json::Value = serde_json::from_str(&out).expect("json");
    let freezer = stats["freezer"].as_str().unwrap_or_default().to_string();
    assert!(
        freezer.contains(cg.to_str().expect("utf8")),
        "the tree must be stopped through its cgroup, not {freezer:?}"
    );
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("verify", "after restore");
    p.expect_pass("check", "after restore");
    assert!(r.wait().expect("stasis restore").success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cgroup directory this test made: what is still in it (the test's own workload, a
/// failing test's restored tree) is killed, by PID, and the directory removed when dropped.
struct CgroupDir(std::path::PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            // A frozen task dies only once thawed.
            let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
            let _ = std::fs::write(self.0.join("cgroup.freeze"), "0");
            for &p in &pids {
                kill(p);
            }
            reap_orphans(&pids);
            if std::fs::remove_dir(&self.0).is_ok()
                || !self.0.exists()
                || Instant::now() >= deadline
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn tree_in_a_cgroup2_is_frozen_through_it() {
    tree_in_own_cgroup("unified");
}

#[test]
fn tree_in_a_v1_freezer_cgroup_is_frozen_through_it() {
    tree_in_own_cgroup("freezer");
}
