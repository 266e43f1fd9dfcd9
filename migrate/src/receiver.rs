//! The destination side of one migration (run by a worker process of `stasis receive`):
//! hears the source out, stores the image it is sent (bounded), opens it with the reader
//! that protects `restore`, builds the workload and holds it stopped until the source
//! commits, then resumes it and says so. Anything else (an abort, a source that goes away
//! or stalls, a bad image, a build that fails) leaves nothing of the workload here.

use crate::incoming::{
    incoming_container_marker, incoming_dir, incoming_image, incoming_rootfs, receive_files,
    rootfs_dir, Incoming, RootfsIncoming,
};
use crate::process_pages::ProcessPages;
use crate::protocol::{self, Frame, Message};
use crate::tls::Conn;
use crate::MigrateError;
use serde::Serialize;
use stasis_runtime::container::StateDir;
use stasis_workload::{BuildOptions, Go, Held, Kind, Restored, WorkloadError};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub state: StateDir,
    /// The largest image accepted.
    pub max_image_bytes: u64,
    /// Restored process trees get this process's standard input, output and error where
    /// their image marks them inherited; otherwise /dev/null.
    pub inherit_stdio: bool,
    /// This host's CPU feature flags: a workload that may use one it lacks is refused.
    pub cpu_flags: Vec<String>,
    /// Received containers' cgroups go below this one (None: stasis's default parent).
    pub cgroup_parent: Option<String>,
}

/// What one received migration did.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub workload: String,
    pub kind: Kind,
    /// Its PID here (a tree's root, a VM's VMM).
    pub pid: i32,
    pub image_bytes: u64,
    /// Bytes of pages received in pre-copy rounds (their frames' payloads).
    pub page_bytes: u64,
    /// From the end of the image until it was held.
    pub build_us: u64,
    pub total_us: u64,
    /// Bytes of a tree's memory this process held for it (received in pre-copy rounds,
    /// then the restored processes' own): part of its peak RSS that is the workload's.
    pub held_bytes: u64,
}

/// Receives one migration over `conn` (from `peer`; its read timeout bounds each wait for
/// the source).
pub fn receive_one(
    conn: Box<dyn Conn>,
    peer: &str,
    opts: &ReceiveOptions,
) -> Result<Received, MigrateError> {
    let t0 = Instant::now();
    let peer = peer.to_string();
    let protocol_err = |source| MigrateError::Protocol {
        peer: peer.clone(),
        source,
    };
    // Frames are read a header and a payload at a time: one system call each, unbuffered.
    let mut conn: Box<dyn Conn> = Box::new(crate::tls::ReadBuffered::new(conn));
    let hello = match protocol::recv_control(&mut conn, "hello") {
        // A source of another version may speak a hello this one cannot read: it hears why
        // (the source then exits as refused, nothing frozen) instead of a dropped connection.
        Err(protocol::ProtocolError::BadFrame(what)) => {
            let reason = format!(
                "this receiver speaks {} version {} and cannot read that greeting ({what})",
                protocol::PROTOCOL,
                protocol::VERSION
            );
            let _ = protocol::send(&mut conn, &Message::Refused { reason });
            return Err(protocol_err(protocol::ProtocolError::BadFrame(what)));
        }
        other => other.map_err(protocol_err)?,
    };
    let (spoken, kind, workload, name, cpu_flags, rootfs) = match hello {
        Message::Hello {
            protocol: p,
            version,
            kind,
            workload,
            name,
            cpu_flags,
            rootfs,
        } => ((p, version), kind, workload, name, cpu_flags, rootfs),
        m => {
            return Err(protocol_err(protocol::ProtocolError::Unexpected {
                got: protocol::name_of(&m),
                expected: "hello",
            }))
        }
    };
    let fail = |what: String| MigrateError::Receive {
        workload: workload.clone(),
        peer: peer.clone(),
        what,
    };
    let refused = other_protocol(spoken)
        .or_else(|| missing_cpu_flags(opts, &cpu_flags))
        .or_else(|| refusal(opts, kind, name.as_deref()))
        .or_else(|| rootfs_refusal(opts, kind, name.as_deref(), rootfs));
    if let Some(reason) = refused {
        let _ = protocol::send(
            &mut conn,
            &Message::Refused {
                reason: reason.clone(),
            },
        );
        return Err(fail(format!("refused: {reason}")));
    }
    protocol::send(&mut conn, &Message::Ready).map_err(protocol_err)?;

    // A root file system that comes along is received into STATE/incoming/PID.rootfs,
    // then moved to STATE/rootfs/NAME for the build.
    let rootfs = match (rootfs, name.as_deref()) {
        (true, Some(n)) => Some(rootfs_dir(&opts.state, n)),
        _ => None,
    };
    let stored = store(&mut conn, opts, kind, rootfs.is_some()).and_then(|mut s| {
        if let (Some(r), Some(at)) = (s.rootfs.as_mut(), rootfs) {
            r.settle(at).map_err(Stored::Bad)?;
        }
        Ok(s)
    });
    let mut stream = match stored {
        Ok(v) => v,
        Err(Stored::Aborted(reason)) => return Err(fail(format!("the source aborted: {reason}"))),
        Err(Stored::Protocol(e)) => return Err(protocol_err(e)),
        Err(Stored::Bad(what)) => {
            let _ = protocol::send(
                &mut conn,
                &Message::Failed {
                    reason: what.clone(),
                },
            );
            return Err(fail(what));
        }
    };
    let tb = Instant::now();
    let shared = Arc::new(Mutex::new(conn));
    let built = build(&shared, opts, &stream, kind, name.as_deref());
    let build_us = tb.elapsed().as_micros() as u64;
    let (image_bytes, page_bytes) = (stream.image_bytes, stream.page_bytes);
    // Pre-copied pages are the restored processes' now; letting go of them (unmapping a
    // region takes a while) waits until the source heard that it runs.
    let held = stream.precopied.take();
    let held_bytes = held.as_ref().map_or(0, |h| {
        h.procs
            .values()
            .flatten()
            .flat_map(|m| m.data.iter().map(|(s, e)| e - s))
            .sum()
    });
    // A root file system is kept once the commit came (see `build`); removed otherwise.
    drop(stream);
    let mut conn = shared
        .lock()
        .map_err(|_| fail("the connection's lock was poisoned".into()))?;
    let pid = match built {
        Ok(Restored::Tree(s)) | Ok(Restored::Container(s, _)) => s.pid,
        Ok(Restored::Vm(s)) => s.record.as_ref().map_or(0, |r| r.pid),
        Err(WorkloadError::Restore(stasis_restore::RestoreError::Discarded(why))) => {
            return Err(fail(format!("discarded before it ran: {why}")))
        }
        Err(e) => {
            let reason = e.to_string();
            let _ = protocol::send(
                &mut *conn,
                &Message::Failed {
                    reason: reason.clone(),
                },
            );
            return Err(fail(reason));
        }
    };
    stasis_runtime::failpoints::hit("receive-resumed");
    protocol::send(&mut *conn, &Message::Resumed).map_err(protocol_err)?;
    drop(held);
    Ok(Received {
        workload,
        kind,
        pid,
        image_bytes,
        page_bytes,
        build_us,
        total_us: t0.elapsed().as_micros() as u64,
        held_bytes,
    })
}

/// A source speaking another protocol or version than this receiver, as a refusal.
fn other_protocol((p, version): (String, u32)) -> Option<String> {
    (p != protocol::PROTOCOL || version != protocol::VERSION).then(|| {
        format!(
            "this receiver speaks {} version {}, not {p} version {version}",
            protocol::PROTOCOL,
            protocol::VERSION
        )
    })
}

/// The CPU flags the source's workload may use that this host lacks, as a refusal.
fn missing_cpu_flags(opts: &ReceiveOptions, theirs: &[String]) -> Option<String> {
    let missing: Vec<&str> = theirs
        .iter()
        .filter(|f| !opts.cpu_flags.contains(f))
        .map(String::as_str)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "this host's CPU lacks {} that the workload may use: {}",
            match missing.len() {
                1 => "a feature".to_string(),
                n => format!("{n} features"),
            },
            missing.join(" ")
        )
    })
}

/// Why a workload must be refused before the source freezes it, if it must.
fn refusal(opts: &ReceiveOptions, kind: Kind, name: Option<&str>) -> Option<String> {
    match (kind, name) {
        (Kind::ProcessTree, None) => None,
        (Kind::ProcessTree, Some(n)) => Some(format!("a process tree takes no name ({n})")),
        (Kind::Container | Kind::Vm, None) => Some(format!("a {kind} needs a name")),
        (Kind::Container, Some(n)) => stasis_runtime::container::running(&opts.state, n)
            .is_ok()
            .then(|| format!("a container named {n} runs here")),
        (Kind::Vm, Some(n)) => stasis_runtime::kvm::vmm::running(&opts.state, n)
            .is_ok()
            .then(|| format!("a VM named {n} runs here")),
    }
}

/// A root file system that cannot be taken, as a refusal.
fn rootfs_refusal(
    opts: &ReceiveOptions,
    kind: Kind,
    name: Option<&str>,
    rootfs: bool,
) -> Option<String> {
    match (rootfs, kind, name) {
        (false, _, _) => None,
        (true, Kind::Container, Some(n)) => {
            let dir = rootfs_dir(&opts.state, n);
            dir.exists()
                .then(|| format!("a root file system for {n} exists here ({})", dir.display()))
        }
        (true, _, _) => Some(format!("a {kind} brings no root file system")),
    }
}

/// Why storing the image stopped.
pub(crate) enum Stored {
    Aborted(String),
    Protocol(protocol::ProtocolError),
    /// The image is not acceptable (too large, cut short, not what was announced).
    Bad(String),
}

/// What was received before the build: the stored image and, after pre-copy rounds, the
/// memory they filled.
struct Stream {
    image: Incoming,
    image_bytes: u64,
    page_bytes: u64,
    memory: Option<Arc<File>>,
    /// After a tree's pre-copy rounds, the pages they sent.
    precopied: Option<Arc<stasis_restore::Precopied>>,
    /// A container's root file system, if one came along.
    rootfs: Option<RootfsIncoming>,
}

/// Stores the pages frames of the pre-copy rounds (into the memory announced for them) and
/// the image frames, up to `image-end`, and checks them against it. Memory and image
/// together stay within `max_image_bytes`.
fn store(
    conn: &mut Box<dyn Conn>,
    opts: &ReceiveOptions,
    kind: Kind,
    rootfs: bool,
) -> Result<Stream, Stored> {
    use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
    // Images hold the workloads' memory: for root's eyes only.
    let dir = incoming_dir(&opts.state);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Stored::Bad(format!("creating {}: {e}", dir.display())))?;
    let path = incoming_image(&dir, std::process::id());
    let incoming = Incoming(path.clone());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Stored::Bad(format!("creating {}: {e}", path.display())))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hash = blake3::Hasher::new();
    let (mut bytes, mut page_bytes, mut file_bytes) = (0u64, 0u64, 0u64);
    let mut memory: Option<(File, u64)> = None;
    let mut procs: Option<ProcessPages> = None;
    let mut root: Option<RootfsIncoming> = None;
    let too_large = || {
        Stored::Bad(format!(
            "the workload is larger than this receiver takes ({} bytes)",
            opts.max_image_bytes
        ))
    };
    loop {
        match protocol::recv(conn).map_err(Stored::Protocol)? {
            Frame::Control(Message::Memory { bytes: size }) => {
                if memory.is_some() || bytes > 0 || kind != Kind::Vm {
                    return Err(Stored::Bad(format!(
                        "memory rounds announced for a {kind}, twice, or after the image began"
                    )));
                }
                if size > opts.max_image_bytes {
                    return Err(too_large());
                }
                let f = stasis_runtime::kvm::memory::memory_file("incoming", size)
                    .map_err(|e| Stored::Bad(format!("the announced memory: {e}")))?;
                memory = Some((f, size));
            }
            Frame::Control(Message::Process { pid }) => {
                if kind == Kind::Vm || bytes > 0 {
                    return Err(Stored::Bad(format!(
                        "pages of a process announced for a {kind}, or after the image began"
                    )));
                }
                procs
                    .get_or_insert_with(|| ProcessPages::new(opts.max_image_bytes))
                    .process(pid)
                    .map_err(Stored::Bad)?;
            }
            Frame::Ranges(payload) => {
                let (op, ranges) = protocol::ranges_of(&payload).map_err(Stored::Protocol)?;
                let Some(p) = procs.as_mut().filter(|_| bytes == 0) else {
                    return Err(Stored::Bad(
                        "ranges sent before a process was named, or after the image began".into(),
                    ));
                };
                hash.update(&payload);
                page_bytes += payload.len() as u64;
                p.ranges(op, ranges).map_err(Stored::Bad)?;
                if p.bytes().saturating_add(file_bytes) > opts.max_image_bytes {
                    return Err(too_large());
                }
            }
            Frame::Pages(payload) if procs.is_some() => {
                let (addr, data) = protocol::pages_of(&payload).map_err(Stored::Protocol)?;
                let Some(p) = procs.as_mut().filter(|_| bytes == 0) else {
                    return Err(Stored::Bad("pages sent after the image began".into()));
                };
                hash.update(&payload);
                page_bytes += payload.len() as u64;
                p.pages(addr, data).map_err(Stored::Bad)?;
            }
            Frame::Pages(payload) => {
                let (addr, data) = protocol::pages_of(&payload).map_err(Stored::Protocol)?;
                let Some((mem, size)) = &memory else {
                    return Err(Stored::Bad("pages sent without memory announced".into()));
                };
                if bytes > 0
                    || addr
                        .checked_add(data.len() as u64)
                        .is_none_or(|e| e > *size)
                {
                    return Err(Stored::Bad(format!(
                        "{} bytes of pages at {addr:#x}: outside the {size} bytes of memory, or after the image began",
                        data.len()
                    )));
                }
                hash.update(&payload);
                page_bytes += payload.len() as u64;
                mem.write_all_at(data, addr)
                    .map_err(|e| Stored::Bad(format!("storing pages at {addr:#x}: {e}")))?;
            }
            Frame::Files(first) => {
                if !rootfs {
                    return Err(Stored::Bad(
                        "files sent without a root file system announced".into(),
                    ));
                }
                if bytes > 0 {
                    return Err(Stored::Bad("files sent after the image began".into()));
                }
                let r = match root.as_mut() {
                    Some(r) => r,
                    None => {
                        let d = incoming_rootfs(&dir, std::process::id());
                        std::fs::create_dir(&d)
                            .map_err(|e| Stored::Bad(format!("creating {}: {e}", d.display())))?;
                        root.insert(RootfsIncoming {
                            dir: d,
                            marker: None,
                            kept: Arc::default(),
                        })
                    }
                };
                let memory_size = memory.as_ref().map_or(0, |m| m.1)
                    + procs.as_ref().map_or(0, ProcessPages::bytes);
                let limit = opts
                    .max_image_bytes
                    .saturating_sub(memory_size + page_bytes);
                receive_files(conn, first, &mut hash, &mut file_bytes, limit, &r.dir)?;
            }
            Frame::Image(data) => {
                bytes += data.len() as u64;
                let memory_size = memory.as_ref().map_or(0, |m| m.1)
                    + procs.as_ref().map_or(0, ProcessPages::bytes);
                if bytes.saturating_add(memory_size).saturating_add(file_bytes)
                    > opts.max_image_bytes
                {
                    return Err(too_large());
                }
                hash.update(&data);
                out.write_all(&data)
                    .map_err(|e| Stored::Bad(format!("storing the image: {e}")))?;
            }
            Frame::Control(Message::ImageEnd {
                bytes: said,
                pages,
                files,
                blake3,
            }) => {
                if said != bytes
                    || pages != page_bytes
                    || files != file_bytes
                    || blake3 != hash.finalize().to_hex().as_str()
                {
                    return Err(Stored::Bad(format!(
                        "what arrived is not what was sent ({bytes} image and {page_bytes} page bytes received, {said} and {pages} announced, or the hash differs)"
                    )));
                }
                out.flush()
                    .map_err(|e| Stored::Bad(format!("storing the image: {e}")))?;
                return Ok(Stream {
                    image: incoming,
                    image_bytes: bytes,
                    page_bytes,
                    memory: memory.map(|(f, _)| Arc::new(f)),
                    precopied: procs.map(|p| Arc::new(p.finish())),
                    rootfs: root,
                });
            }
            Frame::Control(Message::Abort { reason }) => return Err(Stored::Aborted(reason)),
            Frame::Control(m) => {
                return Err(Stored::Protocol(protocol::ProtocolError::Unexpected {
                    got: protocol::name_of(&m),
                    expected: "memory, process, pages, ranges, image bytes or image-end",
                }))
            }
        }
    }
}

/// Builds the workload of the stored image and holds it until the source commits.
fn build(
    conn: &Arc<Mutex<Box<dyn Conn>>>,
    opts: &ReceiveOptions,
    stream: &Stream,
    kind: Kind,
    name: Option<&str>,
) -> Result<Restored, WorkloadError> {
    let path = stream.image.0.as_path();
    let refused = |why: String| WorkloadError::Workflow {
        workload: path.display().to_string(),
        why,
    };
    let image = stasis_image::Image::open(path)
        .map_err(|e| refused(format!("the image is invalid: {e}")))?;
    let image_kind = stasis_workload::destination::kind_of(&image);
    if image_kind != kind {
        return Err(refused(format!(
            "the source announced a {kind} but sent an image of a {image_kind}"
        )));
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| refused(format!("opening /dev/null: {e}")))?;
    let mut tree = stasis_restore::Options {
        container_cgroup_parent: opts.cgroup_parent.clone(),
        container_rootfs: stream.rootfs.as_ref().map(|r| r.dir.clone()),
        precopied: stream.precopied.clone(),
        ..Default::default()
    };
    if !opts.inherit_stdio {
        for fd in 0..3 {
            tree.inherit_fds.insert(fd, null.as_raw_fd());
        }
    }
    let conn = conn.clone();
    let keep = stream.rootfs.as_ref().map(RootfsIncoming::keeper);
    let on_held: stasis_workload::OnHeld = Arc::new(move |held: &Held| {
        let Ok(mut conn) = conn.lock() else {
            return Go::Discard("the connection's lock was poisoned".into());
        };
        stasis_runtime::failpoints::hit("receive-held");
        if let Err(e) = protocol::send(&mut *conn, &Message::Held { pid: held.pid }) {
            return Go::Discard(format!("telling the source it is held: {e}"));
        }
        match protocol::recv_control(&mut *conn, "commit") {
            Ok(Message::Commit) => {
                if let Some(keep) = &keep {
                    keep();
                }
                Go::Resume
            }
            Ok(Message::Abort { reason }) => Go::Discard(format!("the source aborted: {reason}")),
            Ok(m) => Go::Discard(format!("the source sent {}", protocol::name_of(&m))),
            Err(e) => Go::Discard(format!("no commit from the source: {e}")),
        }
    });
    let opts_build = BuildOptions {
        name,
        tree,
        vm_memory: None,
        vm_detach: true,
        vm_quiet: true,
        vm_verify_first: true,
        started: Instant::now(),
        memory: stream.memory.clone(),
    };
    // A container's build leaves a cgroup if this worker is killed: say where.
    // (A container always comes with a name: see `refusal`.)
    let marker = name.filter(|_| kind == Kind::Container).map(|name| {
        let rel = stasis_runtime::container::cgroup_path(opts.cgroup_parent.as_deref(), name);
        let m = incoming_container_marker(&incoming_dir(&opts.state), std::process::id());
        let _ = std::fs::write(&m, format!("{rel}\n{name}"));
        m
    });
    let built = stasis_workload::build(
        &opts.state,
        Arc::new(image),
        path,
        opts_build,
        Some(on_held),
    );
    if let Some(m) = marker {
        let _ = std::fs::remove_file(m);
    }
    built
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_greeting_it_cannot_read_is_answered_with_a_refusal() {
        let (mut source, dest) = UnixStream::pair().expect("socketpair");
        // A newer source's kind of workload this version does not know.
        let hello = br#"{"type":"hello","protocol":"stasis-migrate","version":4,"kind":"pod","workload":"pod web","name":"web"}"#;
        protocol::write_frame(&mut source, protocol::FRAME_CONTROL, hello).expect("send");
        let state = std::env::temp_dir().join(format!("stasis-rx-unit-{}", std::process::id()));
        let opts = ReceiveOptions {
            state: StateDir::new(&state),
            max_image_bytes: 1 << 20,
            inherit_stdio: false,
            cpu_flags: Vec::new(),
            cgroup_parent: None,
        };
        let got = receive_one(Box::new(dest), "a test", &opts);
        assert!(matches!(got, Err(MigrateError::Protocol { .. })), "{got:?}");
        match protocol::recv_control(&mut source, "refused") {
            Ok(Message::Refused { reason }) => {
                assert!(reason.contains("version 3"), "{reason}");
            }
            other => panic!("the source heard {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&state);
    }
}
