//! A real Linux guest for the VM tests: a Debian cloud kernel fetched with apt (cached
//! under target/, never committed) and a busybox initramfs built at test time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The Debian package whose dependency names the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Where fetched kernels are kept: target/linux-guest.
fn cache_dir() -> PathBuf {
    let bin = Path::new(super::stasis());
    bin.parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .join("linux-guest")
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned kernel package the meta package depends on.
fn kernel_package() -> Result<String, String> {
    let find = || -> Result<String, String> {
        let deps = run(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_string)
            .ok_or_else(|| format!("{KERNEL_META} depends on no linux-image package"))
    };
    find().or_else(|_| {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        find()
    })
}

fn cached_kernel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// A real Debian bzImage, downloaded once (apt-get download + dpkg-deb) and cached; the
/// error says why it could not be had.
pub fn debian_kernel() -> Result<PathBuf, String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = cache_dir();
    if let Some(k) = cached_kernel(&dir) {
        return Ok(k);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let pkg = kernel_package()?;
    run(Command::new("apt-get")
        .args(["download", "-qq", &pkg])
        .current_dir(&dir))?;
    let deb = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {pkg} left no .deb"))?;
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/vmlinuz-*'",
        deb.display(),
        dir.display()
    );
    let extracted = run(Command::new("sh").args(["-c", &script]));
    let _ = std::fs::remove_file(&deb);
    extracted?;
    cached_kernel(&dir).ok_or_else(|| format!("no /boot/vmlinuz-* in {pkg}"))
}

/// Zero bytes up to a multiple of 4, as newc aligns names and data.
fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// One newc cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// A newc initramfs with busybox (from busybox-static, which scripts/test installs) and an
/// /init shell script.
pub fn initramfs(init_script: &str) -> Result<Vec<u8>, String> {
    let busybox =
        std::fs::read("/bin/busybox").map_err(|e| format!("/bin/busybox (busybox-static): {e}"))?;
    let mut out = Vec::new();
    let dir = 0o040_755;
    cpio_entry(&mut out, 1, "bin", dir, (0, 0), &[]);
    cpio_entry(&mut out, 2, "dev", dir, (0, 0), &[]);
    cpio_entry(&mut out, 3, "proc", dir, (0, 0), &[]);
    cpio_entry(&mut out, 4, "dev/console", 0o020_600, (5, 1), &[]);
    cpio_entry(&mut out, 5, "bin/busybox", 0o100_755, (0, 0), &busybox);
    cpio_entry(
        &mut out,
        6,
        "init",
        0o100_755,
        (0, 0),
        init_script.as_bytes(),
    );
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    Ok(out)
}
