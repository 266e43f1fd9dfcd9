//! An image's security state is trusted only once validated: a restore (a migration's
//! receiving side, say) recreates what a stranger sent. Images with missing or malformed
//! credentials, capability sets, securebits or no_new_privs are crafted here from a real
//! checkpoint (decoded, altered, re-encoded with correct hashes) and each must be refused
//! with exit 3 and a message naming the file and the field, before any process is created.

mod common;

use common::*;
use stasis_image::proto::{self, SecurityState};
use stasis_image::{Compression, Image, ImageWriter};
use std::path::Path;

const BAD_IMAGE: i32 = 3;

/// `image` re-encoded (fresh frames and hashes) with every process record passed through
/// `edit`.
fn rewrite(image: &Image, edit: &dyn Fn(&mut proto::Process)) -> Vec<u8> {
    let mut w =
        ImageWriter::new(Vec::new(), image.inventory(), Compression::None).expect("start an image");
    for p in image.processes() {
        let mut p = p.clone();
        edit(&mut p);
        w.write_process(&p).expect("write a process");
    }
    for c in image.chunks() {
        let data = image.chunk_data(c).expect("read a chunk");
        w.write_chunk(c.space, c.space_id, &c.runs, &data)
            .expect("write a chunk");
    }
    w.finish().expect("finish the image").0
}

fn creds(p: &mut proto::Process) -> &mut proto::Credentials {
    p.creds.as_mut().expect("the real image has credentials")
}

type Edit = Box<dyn Fn(&mut proto::Process)>;

fn cases() -> Vec<(&'static str, Edit)> {
    vec![
        ("creds: missing", Box::new(|p| p.creds = None)),
        (
            "creds: missing",
            Box::new(|p| {
                p.security_recorded
                    .retain(|&k| k != SecurityState::Credentials as i32)
            }),
        ),
        (
            "no_new_privs: missing",
            Box::new(|p| {
                p.security_recorded
                    .retain(|&k| k != SecurityState::NoNewPrivs as i32)
            }),
        ),
        (
            "seccomp: missing",
            Box::new(|p| {
                p.security_recorded
                    .retain(|&k| k != SecurityState::Seccomp as i32)
            }),
        ),
        (
            "seccomp: mode 2 with 0 filters",
            Box::new(|p| {
                if let Some(t) = p.threads.first_mut() {
                    t.seccomp_mode = 2;
                    t.seccomp_filters.clear();
                }
            }),
        ),
        (
            "security_recorded: entry 3 is 77",
            Box::new(|p| p.security_recorded.push(77)),
        ),
        ("uids has 3 ids", Box::new(|p| creds(p).uids.truncate(3))),
        ("gids has 0 ids", Box::new(|p| creds(p).gids.clear())),
        ("uids[1] is -1", Box::new(|p| creds(p).uids[1] = u32::MAX)),
        (
            "groups has 70000 entries",
            Box::new(|p| creds(p).groups = vec![100; 70000]),
        ),
        (
            "cap_effective",
            Box::new(|p| {
                let c = creds(p);
                c.cap_permitted = 0;
                c.cap_effective = 1 << 21;
            }),
        ),
        (
            "cap_ambient",
            Box::new(|p| {
                let c = creds(p);
                c.cap_inheritable = 0;
                c.cap_ambient = 1;
            }),
        ),
        (
            "cap_bounding",
            Box::new(|p| creds(p).cap_bounding = u64::MAX),
        ),
        (
            "securebits",
            Box::new(|p| creds(p).securebits = 0x8000_0000),
        ),
    ]
}

#[test]
fn missing_or_malformed_security_state_is_refused_before_anything_is_created() {
    let dir = ScratchDir::new("hostilesec");
    let (pid, bytes) = sleeper_image("hostilesec-real");
    let real = Image::from_bytes(bytes).expect("read the real image");
    let bad = dir.0.join("bad.img");
    let bads = bad.to_str().expect("utf8");
    for (needle, edit) in cases() {
        std::fs::write(&bad, rewrite(&real, &*edit)).expect("write the crafted image");
        let out = run_stasis(&["restore", "--detach", bads]);
        if out.status.success() {
            // Restored from a hostile image: end it (it is ours) before failing.
            kill(pid);
            reap_orphans(&[pid]);
            panic!("{needle}: restore accepted the image");
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(BAD_IMAGE), "{needle}: {err}");
        assert!(
            err.contains(needle) && err.contains(&format!("image {bads} is invalid")),
            "expected {needle:?} and the file's name in: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one message: {err}");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{needle}: a process was created from the refused image"
        );
    }
    // The same rewrite without a change restores: the refusals above are the edits'.
    std::fs::write(&bad, rewrite(&real, &|_| {})).expect("write the rewritten image");
    let (mut r, mut p) = restore(&bad, false);
    p.expect_pass("check", "after restoring the unchanged rewrite");
    assert!(r.wait().expect("stasis restore").success());
}
