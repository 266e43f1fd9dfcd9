//! Where an image goes: a file (written to a temporary name, synced, then renamed into
//! place) or any forward-only stream.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A byte sink for an image that can be committed once the image is complete.
pub trait ImageSink: Write + Send {
    /// Makes the image durable and visible under its final name.
    fn commit(&mut self) -> io::Result<()>;
}

/// Writes `PATH.partial`, then fsyncs and renames it to `PATH` on commit. Dropped
/// uncommitted, it removes the partial file.
pub struct FileSink {
    out: Option<BufWriter<File>>,
    partial: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl FileSink {
    /// Creates `PATH.partial` (replacing a stale one).
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial)?;
        Ok(FileSink {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            partial,
            path: path.to_path_buf(),
            committed: false,
        })
    }

    fn out(&mut self) -> io::Result<&mut BufWriter<File>> {
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
        let file = out.into_inner().map_err(|e| e.into_error())?;
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
