//! `wl-ghost`: files that have no name any more.
//!
//! A memfd `wl-ghost-memfd` (3 pages + 100 bytes, sealed SHRINK|GROW) held at fd 7 and mapped
//! MAP_SHARED, with page 1 written through the mapping; and a regular file deleted while open,
//! held at fd 8 at offset 5000 and mapped MAP_PRIVATE with page 0 modified (copy-on-write).
//! Checks: the /proc links and /proc/self/maps names ("/memfd:... (deleted)", "PATH
//! (deleted)"), sizes, every byte of both files, the seals, fd 8's offset, that the private
//! page kept its own change while the file did not, and that the memfd's mapping and fd are
//! still the same file (a write through the mapping is read back through the fd).

use stasis_workloads::{Ctx, Spec};

const PAGE: usize = 4096;
const MEMFD_SIZE: usize = 3 * PAGE + 100;
const FILE_SIZE: usize = 2 * PAGE + 10;

fn byte(seed: u64, kind: u64, i: usize) -> u8 {
    stasis_workloads::pattern::byte(seed ^ kind, i)
}

fn memfd_expected(seed: u64) -> Vec<u8> {
    (0..MEMFD_SIZE)
        .map(|i| {
            if (PAGE..2 * PAGE).contains(&i) {
                byte(seed, 2, i)
            } else {
                byte(seed, 1, i)
            }
        })
        .collect()
}

struct State {
    map_shared: *mut u8,
    map_private: *mut u8,
    path: String,
}

fn err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn setup(seed: u64, dir: &str) -> Result<State, String> {
    // SAFETY: plain syscalls on fds and mappings this function creates; buffers are locals.
    unsafe {
        let name = c"wl-ghost-memfd";
        let m = libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING);
        if m < 0 || libc::dup2(m, 7) != 7 {
            return Err(err("memfd_create/dup2"));
        }
        libc::close(m);
        let base: Vec<u8> = (0..MEMFD_SIZE).map(|i| byte(seed, 1, i)).collect();
        if libc::pwrite(7, base.as_ptr().cast(), base.len(), 0) != base.len() as isize {
            return Err(err("pwrite memfd"));
        }
        let map = libc::mmap(
            std::ptr::null_mut(),
            3 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            7,
            0,
        );
        if map == libc::MAP_FAILED {
            return Err(err("mmap memfd"));
        }
        let map = map.cast::<u8>();
        for i in PAGE..2 * PAGE {
            *map.add(i) = byte(seed, 2, i);
        }
        if libc::fcntl(
            7,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        ) != 0
        {
            return Err(err("F_ADD_SEALS"));
        }
        let path = format!("{dir}/stasis-wl-ghost-{}-{seed:x}.dat", libc::getpid());
        let content: Vec<u8> = (0..FILE_SIZE).map(|i| byte(seed, 3, i)).collect();
        std::fs::write(&path, &content).map_err(|e| format!("write {path}: {e}"))?;
        let cpath = std::ffi::CString::new(path.clone()).map_err(|e| e.to_string())?;
        let f = libc::open(cpath.as_ptr(), libc::O_RDWR);
        if f < 0 || libc::dup2(f, 8) != 8 {
            return Err(err("open/dup2 file"));
        }
        libc::close(f);
        if libc::lseek(8, 5000, libc::SEEK_SET) != 5000 {
            return Err(err("lseek"));
        }
        let pmap = libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            8,
            0,
        );
        if pmap == libc::MAP_FAILED {
            return Err(err("mmap file"));
        }
        let pmap = pmap.cast::<u8>();
        *pmap.add(17) ^= 0xff;
        if libc::unlink(cpath.as_ptr()) != 0 {
            return Err(err("unlink"));
        }
        Ok(State {
            map_shared: map,
            map_private: pmap,
            path,
        })
    }
}

fn pread_all(fd: i32, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf holds len bytes.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, 0) };
    if n != len as isize {
        return Err(format!(
            "pread fd {fd}: got {n} of {len}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(buf)
}

fn check(r: &mut stasis_workloads::Report, seed: u64, st: &State) {
    let link = |fd: i32| {
        std::fs::read_link(format!("/proc/self/fd/{fd}")).map(|p| p.to_string_lossy().into_owned())
    };
    r.eq(
        "fd 7 link",
        Ok("/memfd:wl-ghost-memfd (deleted)".to_string()),
        link(7).map_err(|e| e.to_string()),
    );
    r.eq(
        "fd 8 link",
        Ok(format!("{} (deleted)", st.path)),
        link(8).map_err(|e| e.to_string()),
    );
    let expected = memfd_expected(seed);
    if let Some(got) = r.ok(pread_all(7, MEMFD_SIZE)) {
        r.ensure(got == expected, || "memfd contents differ".into());
    }
    // SAFETY: fstat/fcntl/lseek on our own fds; the mappings are 3 pages and 1 page long.
    unsafe {
        let mut sb: libc::stat = std::mem::zeroed();
        if libc::fstat(7, &mut sb) == 0 {
            r.eq("memfd size", MEMFD_SIZE as i64, sb.st_size);
        }
        r.eq(
            "memfd seals",
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            libc::fcntl(7, libc::F_GET_SEALS),
        );
        let mapped = std::slice::from_raw_parts(st.map_shared, 3 * PAGE);
        r.ensure(mapped == &expected[..3 * PAGE], || {
            "memfd mapping differs from the file".into()
        });
        // Same file behind mapping and fd: write a byte through the mapping, read it back.
        let at = 2 * PAGE + 5;
        *st.map_shared.add(at) = expected[at];
        let mut b = [0u8; 1];
        libc::pread(7, b.as_mut_ptr().cast(), 1, at as i64);
        r.eq("memfd byte written through the mapping", expected[at], b[0]);
        r.eq("fd 8 offset", 5000, libc::lseek(8, 0, libc::SEEK_CUR));
        if libc::fstat(8, &mut sb) == 0 {
            r.eq("deleted file size", FILE_SIZE as i64, sb.st_size);
            r.eq("deleted file links", 0, sb.st_nlink as i64);
        }
        let file: Vec<u8> = (0..FILE_SIZE).map(|i| byte(seed, 3, i)).collect();
        if let Some(got) = r.ok(pread_all(8, FILE_SIZE)) {
            r.ensure(got == file, || "deleted file contents differ".into());
        }
        let private = std::slice::from_raw_parts(st.map_private, PAGE);
        let mut want = file[..PAGE].to_vec();
        want[17] ^= 0xff;
        r.ensure(private == &want[..], || {
            "private mapping of the deleted file differs".into()
        });
    }
    match std::fs::read_to_string("/proc/self/maps") {
        Ok(maps) => {
            r.ensure(maps.contains("/memfd:wl-ghost-memfd (deleted)"), || {
                "maps lacks the memfd".into()
            });
            r.ensure(maps.contains(&format!("{} (deleted)", st.path)), || {
                "maps lacks the deleted file".into()
            });
        }
        Err(e) => r.fail(format!("maps: {e}")),
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-ghost", &Spec::default());
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    let seed = ctx.seed;
    let st = setup(seed, &dir);
    let st = ctx.setup(st);
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        ctx.respond(cmd, |r| check(r, seed, &st));
    }
}
