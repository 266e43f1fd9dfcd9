//! PostgreSQL (Debian's server) as a plain process tree: the postmaster and its background
//! processes, with anonymous shared memory, a System V segment attached in every process
//! (its interlock), a unix socket and a TCP listener. Checkpointed, killed and restored, it
//! answers again with its data, takes writes, and shuts down cleanly.
//!
//! The cluster lives in the test's scratch directory, owned by the `postgres` user, on a free
//! 127.0.0.1 port; the postmaster is killed by PID if the test fails.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The newest installed server's bin directory, and the `postgres` user's uid and gid.
fn server() -> Option<(PathBuf, u32, u32)> {
    let why = "PostgreSQL's server is not installed (/usr/lib/postgresql/*/bin/postgres)";
    let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    bins.retain(|b| b.join("postgres").is_file() && b.join("initdb").is_file());
    bins.sort_by_key(|b| {
        b.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    let Some(bin) = bins.pop() else {
        skip("postgres", why);
        return None;
    };
    // SAFETY: getpwnam with a NUL-terminated name; the fields are copied out at once, before
    // any other call could reuse the static buffer.
    let ids = unsafe {
        let pw = libc::getpwnam(c"postgres".as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    };
    let Some((uid, gid)) = ids else {
        skip("postgres", "there is no postgres user");
        return None;
    };
    if !have("psql") {
        return None;
    }
    Some((bin, uid, gid))
}

/// `psql` as the postgres role on the cluster's unix socket in `dir` (or on 127.0.0.1 with
/// `tcp`); the unaligned, tuples-only output.
fn psql(dir: &Path, port: u16, tcp: bool, sql: &str) -> Result<String, String> {
    let host = if tcp {
        "127.0.0.1".to_string()
    } else {
        dir.display().to_string()
    };
    let out = Command::new("psql")
        .args(["-h", &host, "-p", &port.to_string(), "-U", "postgres"])
        .args([
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn psql_ok(dir: &Path, port: u16, tcp: bool, sql: &str) -> String {
    psql(dir, port, tcp, sql).unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
}

/// Waits until the server answers on its unix socket.
fn wait_ready(dir: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match psql(dir, port, false, "select 1") {
            Ok(one) if one == "1" => return,
            r => assert!(Instant::now() < deadline, "postgres never answered: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The children's command lines (their names, e.g. "postgres: checkpointer"), sorted.
fn names(pids: &[i32]) -> Vec<String> {
    let mut names: Vec<String> = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).ok())
        .map(|c| c.trim_end_matches('\0').replace('\0', " "))
        .collect();
    names.sort();
    names
}

#[test]
fn postgres_keeps_its_data_across_checkpoint_kill_restore() {
    let Some((bin, uid, gid)) = server() else {
        return;
    };
    init();
    let dir = scratch("postgres");
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown scratch");
    let data = dir.join("data");
    let as_postgres = |program: &str| {
        let mut c = clean(bin.join(program).to_str().expect("path"));
        c.uid(uid)
            .gid(gid)
            .current_dir(&dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    };
    let init = as_postgres("initdb")
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data)
        .status()
        .expect("initdb");
    assert!(init.success(), "initdb failed");
    let port = free_port();
    let mut child = as_postgres("postgres")
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(&dir)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        // No autovacuum workers coming and going around the checkpoint.
        .args(["-c", "autovacuum=off"])
        .spawn()
        .expect("starting postgres");
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    wait_ready(&dir, port);
    psql_ok(
        &dir,
        port,
        false,
        "create table t(x int); insert into t select generate_series(1, 10000)",
    );
    // The backend of the last psql session exits on its own shortly after it, and is
    // reaped by the postmaster (a zombie's command line is empty).
    let deadline = Instant::now() + Duration::from_secs(10);
    while names(&descendants(pid))
        .iter()
        .any(|n| n.is_empty() || n.contains("[local]"))
    {
        assert!(Instant::now() < deadline, "the psql backend stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tree = descendants(pid);
    let before = names(&tree);
    assert!(before.len() >= 4, "background processes: {before:?}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    assert!(
        maps.contains("/SYSV"),
        "the postmaster has its System V segment attached"
    );

    let img = dir.join("postgres.img");
    checkpoint_idle(pid, &img, &[]);
    child.wait().expect("reap the original");
    // Its killed children were reparented to us (the tests' subreaper).
    reap_orphans(&tree);
    let out = run_stasis(&["restore", img.to_str().expect("path"), "--detach"]);
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pid.to_string());

    assert!(running_untraced(pid), "the restored postmaster runs");
    assert_eq!(
        names(&descendants(pid)),
        before,
        "the same background processes"
    );
    assert_eq!(
        psql_ok(&dir, port, false, "select count(*), sum(x) from t"),
        "10000|50005000"
    );
    psql_ok(&dir, port, true, "insert into t values (-1)");
    assert_eq!(
        psql_ok(&dir, port, true, "select count(*), min(x) from t"),
        "10001|-1"
    );
    // A fast shutdown: the restored postmaster stops its children and exits.
    // SAFETY: kill takes no pointers; pid is the postmaster this test restored.
    unsafe { libc::kill(pid, libc::SIGINT) };
    reap_orphans(&[pid]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "postgres did not shut down");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
