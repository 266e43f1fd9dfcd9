//! The cgroups module on fake hierarchies in a temporary directory: which files each limit
//! writes on v1 and on cgroup2, hybrid selection, reading limits and usage back, errors.

use super::*;
use std::fs;

const V1_MAX: &str = "9223372036854771712";
const M: u64 = 1 << 20;

/// A temporary directory holding fake hierarchies; each v1 root is `<tmp>/<controller>`,
/// cgroup2 is `<tmp>/unified`.
struct Fake {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    h: Hierarchy,
}

fn put(dir: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(dir).expect("mkdir");
    for (name, text) in files {
        fs::write(dir.join(name), text).expect("write fake file");
    }
}

/// `v2`: the cgroup2 root's `cgroup.controllers` (None: no cgroup2); `v1`: v1 controllers.
fn fake(v2: Option<&str>, v1: &[&str]) -> Fake {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let v2_root = v2.map(|controllers| {
        let r = root.join("unified");
        put(
            &r,
            &[
                ("cgroup.controllers", controllers),
                ("cgroup.subtree_control", ""),
                ("cgroup.procs", ""),
            ],
        );
        // The shared parent, as an earlier container would have left it.
        put(&r.join("stasis"), &[("cgroup.subtree_control", "")]);
        r
    });
    let v1 = v1
        .iter()
        .map(|c| {
            let r = root.join(c);
            put(&r, &[("cgroup.procs", "")]);
            (c.to_string(), r)
        })
        .collect();
    let h = Hierarchy::new(v2_root, v1).expect("hierarchy");
    Fake { _tmp: tmp, root, h }
}

/// The files a fresh kernel cgroup has, by hierarchy (the first component below the fake
/// root names it).
fn populate(f: &Fake, dir: &Path) {
    let kind = dir
        .strip_prefix(&f.root)
        .ok()
        .and_then(|p| p.iter().next())
        .and_then(|c| c.to_str())
        .unwrap_or_default();
    let mut files = vec![("cgroup.procs", "")];
    files.extend_from_slice(match kind {
        "unified" => &[
            ("cgroup.freeze", "0"),
            ("cgroup.events", "populated 0\nfrozen 0\n"),
            ("cgroup.kill", ""),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
            ),
            ("cpu.max", "max 100000"),
            ("cpu.weight", "100"),
            ("memory.max", "max"),
            ("memory.swap.max", "max"),
            ("memory.current", "4096"),
            ("memory.peak", "8192"),
            ("memory.swap.current", "0"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
            ("pids.max", "max"),
            ("pids.current", "3"),
            ("pids.peak", "5"),
            ("pids.events", "max 2\n"),
            ("io.max", ""),
            (
                "io.stat",
                "8:0 rbytes=4096 wbytes=512 rios=1 wios=1 dbytes=0 dios=0\n",
            ),
        ][..],
        "memory" => &[
            ("memory.limit_in_bytes", V1_MAX),
            ("memory.memsw.limit_in_bytes", V1_MAX),
            ("memory.usage_in_bytes", "4096"),
            ("memory.max_usage_in_bytes", "8192"),
            ("memory.memsw.usage_in_bytes", "6144"),
            ("memory.failcnt", "9"),
            ("memory.memsw.failcnt", "1"),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
        ],
        "cpu" => &[
            ("cpu.cfs_quota_us", "-1"),
            ("cpu.cfs_period_us", "100000"),
            ("cpu.shares", "1024"),
            (
                "cpu.stat",
                "nr_periods 10\nnr_throttled 4\nthrottled_time 5000\n",
            ),
        ],
        "cpuacct" => &[
            ("cpuacct.usage", "3000"),
            ("cpuacct.usage_user", "2000"),
            ("cpuacct.usage_sys", "1000"),
        ],
        "pids" => &[
            ("pids.max", "max"),
            ("pids.current", "1"),
            ("pids.events", "max 0\n"),
        ],
        "blkio" => &[
            ("blkio.throttle.read_bps_device", ""),
            ("blkio.throttle.write_bps_device", ""),
            ("blkio.throttle.read_iops_device", ""),
            ("blkio.throttle.write_iops_device", ""),
            (
                "blkio.throttle.io_service_bytes_recursive",
                "8:0 Read 8192\n8:0 Write 0\nTotal 8192\n",
            ),
            (
                "blkio.throttle.io_serviced_recursive",
                "8:0 Read 2\n8:0 Write 0\nTotal 2\n",
            ),
        ],
        "freezer" => &[("freezer.state", "THAWED")],
        _ => &[],
    });
    put(dir, &files);
}

/// A cgroup `rel` as the kernel would show it after it was made, opened.
fn existing(f: &Fake, rel: &str) -> Cgroup {
    let plan = Cgroup::plan(&f.h, rel).expect("plan");
    for d in &plan.dirs {
        populate(f, d);
    }
    Cgroup::open(&f.h, rel).expect("open")
}

fn text(path: PathBuf) -> String {
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

fn all_limits() -> Limits {
    Limits {
        memory: Some(64 * M),
        swap: Some(16 * M),
        cpus: Some(0.25),
        cpu_weight: Some(50),
        pids: Some(32),
        io: vec![IoLimit {
            dev: (8, 0),
            kind: IoKind::ReadBps,
            value: M,
        }],
    }
}

const ALL_V1: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "blkio", "freezer"];

#[test]
fn v2_files_written_and_read_back() {
    let f = fake(Some("cpu io memory pids"), &[]);
    let cg = existing(&f, "stasis/a");
    let d = f.root.join("unified/stasis/a");
    assert_eq!(cg.dirs(), std::slice::from_ref(&d));
    assert_eq!(cg.freezer(), Some(&Freezer::V2(d.clone())));
    cg.apply(&all_limits()).expect("apply");
    assert_eq!(text(d.join("memory.max")), (64 * M).to_string());
    assert_eq!(text(d.join("memory.swap.max")), (16 * M).to_string());
    assert_eq!(text(d.join("cpu.max")), "25000 100000");
    assert_eq!(text(d.join("cpu.weight")), "50");
    assert_eq!(text(d.join("pids.max")), "32");
    assert_eq!(text(d.join("io.max")), "8:0 rbps=1048576");
    // The kernel shows every key of a device in io.max.
    fs::write(
        d.join("io.max"),
        "8:0 rbps=1048576 wbps=max riops=max wiops=max\n",
    )
    .expect("write");
    assert_eq!(cg.read_limits().expect("read"), all_limits());

    // Lifting limits writes "max"; a CPU cap of 0 is no cap.
    cg.apply(&Limits {
        memory: Some(UNLIMITED),
        cpus: Some(0.0),
        pids: Some(UNLIMITED),
        io: vec![IoLimit {
            dev: (8, 0),
            kind: IoKind::ReadBps,
            value: UNLIMITED,
        }],
        ..Limits::default()
    })
    .expect("lift");
    assert_eq!(text(d.join("memory.max")), "max");
    assert_eq!(text(d.join("cpu.max")), "max 100000");
    assert_eq!(text(d.join("pids.max")), "max");
    assert_eq!(text(d.join("io.max")), "8:0 rbps=max");
    let back = cg.read_limits().expect("read");
    assert_eq!((back.memory, back.cpus, back.pids), (None, None, None));
    assert_eq!(back.swap, Some(16 * M), "untouched");
}

#[test]
fn v1_files_written_and_read_back() {
    let f = fake(None, &ALL_V1);
    let cg = existing(&f, "stasis/a");
    let dir = |c: &str| f.root.join(c).join("stasis/a");
    assert_eq!(
        cg.dirs(),
        &["memory", "cpu", "pids", "blkio", "cpuacct", "freezer"].map(dir)[..],
        "one directory per hierarchy"
    );
    assert_eq!(cg.freezer(), Some(&Freezer::V1(dir("freezer"))));
    cg.apply(&all_limits()).expect("apply");
    let mem = dir("memory");
    assert_eq!(
        text(mem.join("memory.limit_in_bytes")),
        (64 * M).to_string()
    );
    assert_eq!(
        text(mem.join("memory.memsw.limit_in_bytes")),
        (80 * M).to_string(),
        "memsw is memory + swap"
    );
    assert_eq!(text(dir("cpu").join("cpu.cfs_quota_us")), "25000");
    assert_eq!(text(dir("cpu").join("cpu.cfs_period_us")), "100000");
    assert_eq!(text(dir("cpu").join("cpu.shares")), "512");
    assert_eq!(text(dir("pids").join("pids.max")), "32");
    assert_eq!(
        text(dir("blkio").join("blkio.throttle.read_bps_device")),
        "8:0 1048576"
    );
    assert_eq!(cg.read_limits().expect("read"), all_limits());

    // A live change of memory alone keeps the 16 MiB of swap on top of it.
    cg.apply(&Limits {
        memory: Some(128 * M),
        ..Limits::default()
    })
    .expect("raise");
    assert_eq!(
        text(mem.join("memory.limit_in_bytes")),
        (128 * M).to_string()
    );
    assert_eq!(
        text(mem.join("memory.memsw.limit_in_bytes")),
        (144 * M).to_string()
    );
    assert_eq!(text(dir("pids").join("pids.max")), "32", "untouched");

    // An io throttle is lifted on v1 by writing 0.
    cg.apply(&Limits {
        io: vec![IoLimit {
            dev: (8, 0),
            kind: IoKind::ReadBps,
            value: UNLIMITED,
        }],
        ..Limits::default()
    })
    .expect("lift io");
    assert_eq!(
        text(dir("blkio").join("blkio.throttle.read_bps_device")),
        "8:0 0"
    );
}

/// cgroup2 lists only pids: pids goes there, the rest to v1; CPU time, freezer and kill are
/// cgroup2's.
#[test]
fn hybrid_uses_each_controller_where_it_is() {
    let f = fake(Some("pids"), &ALL_V1);
    let cg = existing(&f, "stasis/h");
    let v2 = f.root.join("unified/stasis/h");
    let dir = |c: &str| f.root.join(c).join("stasis/h");
    assert_eq!(
        cg.dirs(),
        &[v2.clone(), dir("memory"), dir("cpu"), dir("blkio")],
        "no v1 pids, cpuacct or freezer directory"
    );
    assert_eq!(cg.freezer(), Some(&Freezer::V2(v2.clone())));
    cg.apply(&all_limits()).expect("apply");
    assert_eq!(text(v2.join("pids.max")), "32");
    assert_eq!(
        text(dir("memory").join("memory.limit_in_bytes")),
        (64 * M).to_string()
    );
    assert_eq!(text(dir("cpu").join("cpu.cfs_quota_us")), "25000");
    let st = cg.stats().expect("stats");
    assert_eq!(st.cpu_usage_ns, Some(1_500_000), "from cgroup2 cpu.stat");
    assert_eq!(st.cpu_throttled_periods, Some(4), "from v1 cpu.stat");
    assert_eq!(st.pids_current, Some(3), "from cgroup2");
    assert_eq!(st.memory_limit, Some(64 * M), "from v1");
    assert_eq!(
        cg.procs_files(),
        cg.dirs()
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn stats_map_each_file() {
    let f = fake(Some("cpu io memory pids"), &[]);
    let st = existing(&f, "stasis/s").stats().expect("stats");
    assert_eq!(
        st,
        Stats {
            cpu_usage_ns: Some(1_500_000),
            cpu_user_ns: Some(1_000_000),
            cpu_system_ns: Some(500_000),
            cpu_throttled_periods: None,
            cpu_throttled_ns: None,
            memory_current: Some(4096),
            memory_peak: Some(8192),
            memory_limit: Some(UNLIMITED),
            memory_limit_hits: Some(7),
            oom_kills: Some(1),
            swap_current: Some(0),
            swap_limit: Some(UNLIMITED),
            pids_current: Some(3),
            pids_peak: Some(5),
            pids_limit: Some(UNLIMITED),
            pids_denied: Some(2),
            io_read_bytes: Some(4096),
            io_write_bytes: Some(512),
            io_read_ops: Some(1),
            io_write_ops: Some(1),
        }
    );
    let f = fake(None, &ALL_V1);
    let st = existing(&f, "stasis/s").stats().expect("stats");
    assert_eq!(
        (st.cpu_usage_ns, st.cpu_user_ns, st.cpu_system_ns),
        (Some(3000), Some(2000), Some(1000))
    );
    assert_eq!(st.cpu_throttled_ns, Some(5000));
    assert_eq!(
        (st.memory_current, st.memory_peak),
        (Some(4096), Some(8192))
    );
    assert_eq!(st.swap_current, Some(2048), "memsw usage - usage");
    assert_eq!((st.memory_limit_hits, st.oom_kills), (Some(10), Some(2)));
    assert_eq!(st.pids_peak, None, "an older kernel without pids.peak");
    assert_eq!((st.io_read_bytes, st.io_read_ops), (Some(8192), Some(2)));
}

#[test]
fn create_makes_every_directory_and_enables_cgroup2_controllers() {
    let f = fake(Some("cpu memory pids"), &["blkio", "freezer"]);
    let cg = Cgroup::create(&f.h, "stasis/new").expect("create");
    let v2 = f.root.join("unified/stasis/new");
    assert_eq!(
        cg.dirs()[..2],
        [v2.clone(), f.root.join("blkio/stasis/new")]
    );
    assert!(cg.dirs().iter().all(|d| d.is_dir()));
    for parent in ["unified", "unified/stasis"] {
        assert_eq!(
            text(f.root.join(parent).join("cgroup.subtree_control")),
            "+memory +cpu +pids",
            "{parent}"
        );
    }
    // Made again: refused, naming where it already is.
    let err = Cgroup::create(&f.h, "stasis/new").expect_err("exists");
    assert!(
        err.to_string().contains("already exists") && err.to_string().contains("stasis/new"),
        "{err}"
    );
    // A failure half-way removes what was made: here blkio's root is gone.
    fs::remove_dir_all(f.root.join("blkio")).expect("rm");
    fs::write(f.root.join("blkio"), "not a directory").expect("write");
    Cgroup::create(&f.h, "stasis/half").expect_err("blkio root is a file");
    assert!(!f.root.join("unified/stasis/half").exists(), "rolled back");
}

#[test]
fn errors_name_the_cgroup_and_the_file() {
    let f = fake(Some("memory"), &[]);
    let err = Cgroup::open(&f.h, "stasis/absent").expect_err("absent");
    let msg = err.to_string();
    assert!(
        msg.contains("stasis/absent") && msg.contains("does not exist"),
        "{msg}"
    );

    let cg = existing(&f, "stasis/e");
    let d = f.root.join("unified/stasis/e");
    fs::remove_file(d.join("memory.max")).expect("rm");
    let err = cg
        .apply(&Limits {
            memory: Some(M),
            ..Limits::default()
        })
        .expect_err("no memory.max");
    assert!(err
        .to_string()
        .contains(&format!("{}", d.join("memory.max").display())));
    assert!(
        !d.join("memory.max").exists(),
        "a cgroup file is never made"
    );

    // No pids controller anywhere.
    let err = cg
        .apply(&Limits {
            pids: Some(8),
            ..Limits::default()
        })
        .expect_err("no pids");
    assert!(err.to_string().contains("no pids controller"), "{err}");

    // Out-of-range values are refused before anything is written.
    let err = cg
        .apply(&Limits {
            memory: Some(M),
            cpu_weight: Some(0),
            ..Limits::default()
        })
        .expect_err("weight 0");
    assert!(err.to_string().contains("1..=10000"), "{err}");

    for bad in ["", "/abs", "a/../b", "a//b", "."] {
        assert!(Cgroup::open(&f.h, bad).is_err(), "{bad:?}");
    }
}
