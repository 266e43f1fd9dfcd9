//! Shared helpers: sample records, a sample image, and a hand builder for hostile images.
#![allow(dead_code)]

use stasis_image::frame::{encode_file_header, EndPayload, FrameHeader, FrameKind};
use stasis_image::proto::{self, PageRun, RunKind, SpaceKind};
use stasis_image::{Compression, ImageWriter};

pub const PAGE: u64 = 4096;

pub fn inventory(parent: bool) -> proto::Inventory {
    proto::Inventory {
        tool: "stasis-image tests".into(),
        created_unix_ns: 1_700_000_000_123_456_789,
        kind: proto::WorkloadKind::ProcessTree as i32,
        parent: parent.then(|| proto::ParentRef {
            image_id: "00112233445566778899aabbccddeeff".into(),
            path_hint: "/tmp/parent.img".into(),
        }),
        kernel_release: "6.18.0".into(),
        hostname: "testhost".into(),
        root_pid: 100,
        xcr0: 0x2e7,
        ..Default::default()
    }
}

pub fn process(pid: u32, threads: u32) -> proto::Process {
    proto::Process {
        pid,
        ppid: if pid == 100 { 1 } else { 100 },
        pgid: 100,
        sid: 100,
        comm: format!("proc{pid}"),
        exe_path: "/usr/bin/sleep".into(),
        threads: (0..threads)
            .map(|t| proto::Thread {
                tid: pid + t,
                regs: Some(proto::X86Regs {
                    rip: 0x5555_5555_1000 + u64::from(t),
                    rsp: 0x7ffe_0000_0000,
                    rax: u64::MAX,
                    ..Default::default()
                }),
                xstate: vec![0xab; 64 * (t as usize + 1)],
                sigmask: 1 << 9,
                rseq: Some(proto::Rseq {
                    abi_pointer: 0x7f00_0000_1000,
                    abi_size: 32,
                    flags: 0,
                    signature: 0x5305_3053,
                }),
                name: format!("worker-{t}"),
                sigaltstack: Some(proto::SigAltStack {
                    sp: 0x7f00_0010_0000,
                    flags: 0,
                    size: 65536,
                }),
                pending: vec![proto::PendingSignal {
                    signo: 10,
                    siginfo: vec![10, 0, 0, 0],
                }],
                clear_child_tid: 0x7f00_0000_2d10 + u64::from(t),
                robust_list: 0x7f00_0000_2a20,
                robust_list_len: 24,
                seccomp_mode: 2,
                seccomp_filters: vec![proto::SeccompFilter {
                    insns: vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f],
                    flags: 2,
                }],
            })
            .collect(),
        mm: Some(proto::MmState {
            start_code: 0x5555_5555_0000,
            end_code: 0x5555_5556_0000,
            brk: 0x5555_5600_0000,
            auxv: [6u64, 4096, 0, 0]
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect(),
            ..Default::default()
        }),
        vmas: vec![
            proto::Vma {
                start: 0x5555_5555_0000,
                end: 0x5555_5556_0000,
                prot: 5,
                kind: proto::VmaKind::FilePrivate as i32,
                path: "/usr/bin/sleep".into(),
                name: "/usr/bin/sleep".into(),
                vm_flags: vec!["rd".into(), "ex".into()],
                file: Some(proto::FileId {
                    dev: 0x803,
                    ino: 1234,
                    size: 35_000,
                    mtime_ns: 1,
                    mode: 0o100755,
                }),
                ..Default::default()
            },
            proto::Vma {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0010_0000,
                prot: 3,
                kind: proto::VmaKind::AnonPrivate as i32,
                name: "[heap]".into(),
                ..Default::default()
            },
        ],
        fds: vec![
            proto::Fd {
                fd: 0,
                kind: proto::FdKind::Inherited as i32,
                inherited_from: "/dev/pts/0".into(),
                flags: 0o2,
                ..Default::default()
            },
            proto::Fd {
                fd: 3,
                kind: proto::FdKind::Regular as i32,
                path: "/tmp/log".into(),
                flags: 0o2001,
                offset: 77,
                ..Default::default()
            },
        ],
        sigactions: vec![proto::SigAction {
            signo: 15,
            handler: 0x5555_5555_2000,
            flags: 0x0400_0000,
            restorer: 0x7f00_0000_3000,
            mask: 0,
        }],
        rlimits: vec![proto::Rlimit {
            resource: 7,
            soft: 1024,
            hard: 4096,
        }],
        umask: 0o22,
        cwd: "/".into(),
        root: "/".into(),
        vdso_hash: vec![9; 32],
        creds: Some(proto::Credentials {
            uids: vec![0; 4],
            gids: vec![0; 4],
            groups: vec![],
            cap_permitted: 0x1ff_ffff_ffff,
            cap_effective: 0x1ff_ffff_ffff,
            cap_bounding: 0x1ff_ffff_ffff,
            securebits: 4,
            ..Default::default()
        }),
        cmdline: vec!["sleep".into(), "1000".into()],
        itimers: vec![proto::Itimer {
            which: 0,
            interval_us: 7_000_000,
            value_us: 599_000_000,
        }],
        sched: Some(proto::SchedState {
            nice: 7,
            policy: 3,
            priority: 0,
        }),
        oom_score_adj: -17,
        no_new_privs: true,
        shared_pending: vec![proto::PendingSignal {
            signo: 39,
            siginfo: vec![39, 0, 0, 0],
        }],
        ..Default::default()
    }
}

pub fn run(vaddr: u64, pages: u64, kind: RunKind) -> PageRun {
    PageRun {
        vaddr,
        pages,
        kind: kind as i32,
    }
}

/// Deterministic page contents: `compressible` pages repeat a pattern, others are noise.
pub fn pages(n: u64, seed: u64, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity((n * PAGE) as usize);
    for i in 0..n * PAGE / 8 {
        let v = if compressible {
            (i % 64) ^ seed
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A chunk the sample image contains.
#[derive(Debug, Clone)]
pub struct SampleChunk {
    pub space: SpaceKind,
    pub space_id: u64,
    pub runs: Vec<PageRun>,
    pub data: Vec<u8>,
}

pub fn sample_chunks(parent: bool) -> Vec<SampleChunk> {
    let mut v = vec![
        SampleChunk {
            space: SpaceKind::Process,
            space_id: 100,
            runs: vec![
                run(0x7f00_0000_0000, 3, RunKind::Data),
                run(0x7f00_0000_3000, 2, RunKind::Zero),
                run(0x7f00_0000_8000, 1, RunKind::Data),
            ],
            data: pages(4, 1, false),
        },
        SampleChunk {
            space: SpaceKind::Process,
            space_id: 100,
            runs: vec![run(0x7f00_0001_0000, 4, RunKind::Data)],
            data: pages(4, 2, true),
        },
        SampleChunk {
            space: SpaceKind::Process,
            space_id: 100,
            runs: vec![run(0x7f00_0002_0000, 16, RunKind::Zero)],
            data: vec![],
        },
        SampleChunk {
            space: SpaceKind::SharedMemory,
            space_id: 7,
            runs: vec![run(0, 2, RunKind::Data)],
            data: pages(2, 3, true),
        },
        SampleChunk {
            space: SpaceKind::Process,
            space_id: 101,
            runs: vec![run(0x1000, 1, RunKind::Zero), run(0x2000, 2, RunKind::Data)],
            data: pages(2, 4, false),
        },
    ];
    if parent {
        v.push(SampleChunk {
            space: SpaceKind::Process,
            space_id: 101,
            runs: vec![
                run(0x10_0000, 2, RunKind::Parent),
                run(0x10_2000, 1, RunKind::Data),
            ],
            data: pages(1, 5, true),
        });
    }
    v
}

pub fn sample_processes() -> Vec<proto::Process> {
    vec![process(100, 3), process(101, 1)]
}

/// Writes the sample image (processes interleaved with chunks) into a Vec.
pub fn sample_image(compression: Compression, parent: bool) -> Vec<u8> {
    let procs = sample_processes();
    let chunks = sample_chunks(parent);
    let mut w = match ImageWriter::new(Vec::new(), &inventory(parent), compression) {
        Ok(w) => w,
        Err(e) => panic!("writer: {e}"),
    };
    let split = chunks.len() / 2;
    let write_chunk = |w: &mut ImageWriter<Vec<u8>>, c: &SampleChunk| {
        if let Err(e) = w.write_chunk(c.space, c.space_id, &c.runs, &c.data) {
            panic!("write_chunk: {e}");
        }
    };
    for c in &chunks[..split] {
        write_chunk(&mut w, c);
    }
    for p in &procs {
        if let Err(e) = w.write_process(p) {
            panic!("write_process: {e}");
        }
    }
    for c in &chunks[split..] {
        write_chunk(&mut w, c);
    }
    match w.finish() {
        Ok((v, _)) => v,
        Err(e) => panic!("finish: {e}"),
    }
}

/// Frame boundaries of a well-formed image (offsets of every frame header, and the file end).
pub fn frame_offsets(img: &[u8]) -> Vec<usize> {
    let mut out = vec![];
    let mut off = 64usize;
    while off + 64 <= img.len() {
        out.push(off);
        let mut len = [0u8; 8];
        len.copy_from_slice(&img[off + 16..off + 24]);
        off += 64 + u64::from_le_bytes(len) as usize;
    }
    out.push(img.len());
    out
}

/// Encodes one frame with correct hashes.
pub fn frame(kind: u32, payload: &[u8]) -> Vec<u8> {
    frame_with_len(kind, payload, payload.len() as u64)
}

/// Encodes a frame header claiming `len` bytes (with a valid check), followed by `payload`.
pub fn frame_with_len(kind: u32, payload: &[u8], len: u64) -> Vec<u8> {
    let known = FrameKind::from_u32(kind).unwrap_or(FrameKind::Pad);
    let hdr = FrameHeader {
        kind: known,
        len,
        payload_hash: *blake3::hash(payload).as_bytes(),
    };
    let mut b = hdr.encode().to_vec();
    if FrameKind::from_u32(kind).is_none() {
        // Re-encode with the unknown kind and a fresh check.
        b[4..8].copy_from_slice(&kind.to_le_bytes());
        let check = blake3::hash(&b[..56]);
        b[56..64].copy_from_slice(&check.as_bytes()[..8]);
    }
    b.extend_from_slice(payload);
    b
}

/// Builds images frame by frame, with no validation, for hostile tests.
pub struct RawBuilder {
    pub buf: Vec<u8>,
    pub frames: u64,
    pub index: proto::ImageIndex,
}

impl RawBuilder {
    pub fn new(inv: &proto::Inventory) -> Self {
        use prost::Message;
        let mut inv = inv.clone();
        inv.format_major = 1;
        inv.page_size = 4096;
        let mut b = Self {
            buf: encode_file_header().to_vec(),
            frames: 0,
            index: proto::ImageIndex {
                inventory_offset: 64,
                ..Default::default()
            },
        };
        b.push(FrameKind::Inventory as u32, &inv.encode_to_vec());
        b
    }

    pub fn pos(&self) -> u64 {
        self.buf.len() as u64
    }

    pub fn push(&mut self, kind: u32, payload: &[u8]) -> u64 {
        let at = self.pos();
        self.buf.extend_from_slice(&frame(kind, payload));
        self.frames += 1;
        at
    }

    pub fn process(&mut self, p: &proto::Process) {
        use prost::Message;
        let at = self.push(FrameKind::Process as u32, &p.encode_to_vec());
        self.index.process_offsets.push(at);
    }

    /// Pads so that a PAGE_CHUNK of `record_len` bytes puts its data payload on a page boundary.
    pub fn align_for(&mut self, record_len: usize) {
        let fixed = 128 + record_len as u64;
        let mut gap = (PAGE - (self.pos() + fixed) % PAGE) % PAGE;
        if gap != 0 && gap < 64 {
            gap += PAGE;
        }
        if gap != 0 {
            self.push(FrameKind::Pad as u32, &vec![0u8; (gap - 64) as usize]);
        }
    }

    /// Appends a chunk with an arbitrary record, indexing it with `entry` fields derived from the
    /// record (as an honest writer would).
    pub fn chunk(&mut self, rec: &proto::PageChunk, data: &[u8], align: bool) {
        use prost::Message;
        let bytes = rec.encode_to_vec();
        if align {
            self.align_for(bytes.len());
        }
        let chunk_offset = self.push(FrameKind::PageChunk as u32, &bytes);
        let data_frame = self.push(FrameKind::PageData as u32, data);
        let start = rec.runs.first().map_or(0, |r| r.vaddr);
        let end = rec
            .runs
            .last()
            .map_or(0, |r| r.vaddr.wrapping_add(r.pages.wrapping_mul(PAGE)));
        self.index.chunks.push(proto::ChunkIndexEntry {
            space: rec.space,
            space_id: rec.space_id,
            vaddr_start: start,
            vaddr_end: end,
            chunk_offset,
            data_offset: data_frame + 64,
            data_len: data.len() as u64,
            encoding: rec.encoding,
            raw_len: rec.raw_len,
        });
    }

    /// Appends INDEX and END and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        use prost::Message;
        let index = self.index.encode_to_vec();
        let index_offset = self.push(FrameKind::Index as u32, &index);
        let end = EndPayload {
            index_offset,
            frames: self.frames + 1,
        };
        self.push(FrameKind::End as u32, &end.encode());
        self.buf
    }
}

/// A raw PageChunk record for `data` covering `runs`.
pub fn raw_record(space_id: u64, runs: Vec<PageRun>, data: &[u8]) -> proto::PageChunk {
    proto::PageChunk {
        space: SpaceKind::Process as i32,
        space_id,
        runs,
        encoding: proto::Encoding::Raw as i32,
        raw_len: data.len() as u64,
        stored_len: data.len() as u64,
        raw_hash: blake3::hash(data).as_bytes().to_vec(),
    }
}
