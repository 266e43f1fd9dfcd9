//! Where an image goes: a file (written to a temporary name, synced, then renamed into
//! place) or any forward-only stream.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A byte sink for an image that can be committed once the image is complete.
pub trait ImageSink: Write + Send {
    /// Makes the image durable and visible under its final name.
    fn commit(&mut self) -> io::Result<()>;

    /// Whether to send what is written on to the device while the rest is still being
    /// written (on by default where it applies). A checkpoint that kills the workload waits
    /// for a durable image anyway, and this overlaps that wait with the pages phase; one
    /// that leaves it running resumes it before the image is synced, and would only be
    /// held up by the device's speed.
    fn write_behind(&mut self, _on: bool) {}
}

/// A sink lent for a while (the workload interface writes through `&mut dyn ImageSink` and
/// its caller commits).
impl<T: ImageSink + ?Sized> ImageSink for &mut T {
    fn commit(&mut self) -> io::Result<()> {
        (**self).commit()
    }

    fn write_behind(&mut self, on: bool) {
        (**self).write_behind(on)
    }
}

/// Where the pages of a pre-copy round go: one page-transfer interface with a backend per
/// destination (as CRIU's page_xfer has a local image and a page server). A migration
/// sends them over its connection; a local copy keeps them in memory.
pub trait PageSink {
    /// `data` (whole pages) is the workload's memory at `addr` (a VM's guest-physical
    /// address, or a virtual address of the process named last by [`PageSink::process`]).
    fn pages(&mut self, addr: u64, data: &[u8]) -> io::Result<()>;

    /// What follows is of process `pid` (its PID as the image names it). A sink for a VM's
    /// memory has no processes.
    fn process(&mut self, pid: i32) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this page sink takes no pages of processes (process {pid})"),
        ))
    }

    /// `ranges` of the current process's memory: its mappings whose pages the rounds send
    /// (a new one starts zero, one not listed is dropped), or ranges of them that read zero
    /// now. Ascending, page-aligned, apart.
    fn ranges(&mut self, kind: Ranges, ranges: &[(u64, u64)]) -> io::Result<()> {
        let _ = ranges;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this page sink takes no {kind:?} ranges of processes"),
        ))
    }
}

/// What a [`PageSink::ranges`] call says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranges {
    /// The mappings the rounds send pages of.
    Mappings,
    /// Ranges of them that read zero now.
    Zero,
}

/// A sink lent for a while.
impl<T: PageSink + ?Sized> PageSink for &mut T {
    fn pages(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        (**self).pages(addr, data)
    }

    fn process(&mut self, pid: i32) -> io::Result<()> {
        (**self).process(pid)
    }

    fn ranges(&mut self, kind: Ranges, ranges: &[(u64, u64)]) -> io::Result<()> {
        (**self).ranges(kind, ranges)
    }
}

/// Pages kept in a file at their addresses (a memfd, or any file): the local backend.
pub struct FilePages<'a>(pub &'a File);

impl PageSink for FilePages<'_> {
    fn pages(&mut self, addr: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.write_all_at(data, addr)
    }
}

/// Bytes written between two starts of writeback.
const WRITE_BEHIND_WINDOW: u64 = 8 << 20;

/// A file whose dirty pages are sent to the device every [`WRITE_BEHIND_WINDOW`] bytes
/// (sync_file_range), so the fsync of a commit finds little left to write.
struct WriteBehind {
    file: File,
    /// Bytes written.
    pos: u64,
    /// Bytes whose writeback was started.
    started: u64,
    on: bool,
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.pos += n as u64;
        if self.on && self.pos - self.started >= WRITE_BEHIND_WINDOW {
            let end = self.pos - self.pos % WRITE_BEHIND_WINDOW;
            // Only a hint: a file system without it still gets its fsync at commit.
            if stasis_runtime::sys::start_writeback(&self.file, self.started, end - self.started)
                .is_ok()
            {
                self.started = end;
            } else {
                self.on = false;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `PATH.partial`, then fsyncs and renames it to `PATH` on commit. Dropped
/// uncommitted, it removes the partial file.
pub struct FileSink {
    out: Option<BufWriter<WriteBehind>>,
    partial: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl FileSink {
    /// Creates `PATH.partial` (replacing a stale one), readable by its owner only: an image
    /// holds the workload's memory.
    pub fn create(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        let file = WriteBehind {
            file,
            pos: 0,
            started: 0,
            on: true,
        };
        Ok(FileSink {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            partial,
            path: path.to_path_buf(),
            committed: false,
        })
    }

    fn out(&mut self) -> io::Result<&mut BufWriter<WriteBehind>> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("image file already committed"))
    }
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out()?.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out()?.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out()?.flush()
    }
}

impl ImageSink for FileSink {
    fn commit(&mut self) -> io::Result<()> {
        let out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("image file already committed"))?;
        let file = out.into_inner().map_err(|e| e.into_error())?.file;
        file.sync_all()?;
        std::fs::rename(&self.partial, &self.path)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
        self.committed = true;
        Ok(())
    }

    fn write_behind(&mut self, on: bool) {
        if let Some(out) = self.out.as_mut() {
            out.get_mut().on = on;
        }
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if !self.committed {
            self.out = None;
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Any forward-only stream (a pipe, stdout, a socket); commit flushes it.
pub struct StreamSink<W: Write + Send>(pub BufWriter<W>);

impl<W: Write + Send> StreamSink<W> {
    pub fn new(w: W) -> Self {
        StreamSink(BufWriter::with_capacity(1 << 20, w))
    }
}

impl<W: Write + Send> Write for StreamSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write + Send> ImageSink for StreamSink<W> {
    fn commit(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes whose writeback was started, of a sink not yet committed.
    fn started(s: &FileSink) -> u64 {
        s.out.as_ref().map_or(0, |o| o.get_ref().started)
    }

    fn write_mib(s: &mut FileSink, mib: usize) {
        let piece = vec![7u8; 1 << 20];
        for _ in 0..mib {
            s.write_all(&piece).expect("write");
        }
    }

    #[test]
    fn writeback_starts_every_window_only_while_on_and_the_image_is_whole() {
        let dir = std::env::temp_dir().join(format!("stasis-sink-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("img");
        let mut s = FileSink::create(&path).expect("create");
        // Writes as large as the buffer go straight to the file: 20 MiB there, 16 started.
        write_mib(&mut s, 20);
        assert_eq!(started(&s), 16 << 20);
        s.write_behind(false);
        write_mib(&mut s, 20);
        assert_eq!(started(&s), 16 << 20, "writeback started while off");
        s.write_behind(true);
        write_mib(&mut s, 1);
        assert_eq!(started(&s), 40 << 20, "writeback did not catch up once on");
        s.commit().expect("commit");
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(len, 41 << 20);
    }
}
