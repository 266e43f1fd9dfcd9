//! Writing page contents from the image into the new process.

use crate::error::RestoreError;
use stasis_image::proto::{self, RunKind, SpaceKind, VmaKind};
use stasis_image::{ChunkRef, Image};
use stasis_runtime::memory::{self, Remote};
use stasis_runtime::PAGE_SIZE;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Pages and bytes written.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    pub pages: u64,
    pub bytes: u64,
}

/// Where a page of a space lands in the new process.
fn locate(p: &proto::Process, space: SpaceKind, id: u64, addr: u64) -> Option<(u64, &proto::Vma)> {
    match space {
        SpaceKind::Process if id == p.pid as u64 => {
            let i = p.vmas.partition_point(|v| v.end <= addr);
            let v = p.vmas.get(i)?;
            (v.start <= addr).then_some((addr, v))
        }
        _ => None,
    }
}

/// Writes every chunk that belongs to process `p` into `child`, on several threads: the
/// new process's memory is fresh, and faulting it in is the bulk of restore, so both cores
/// share it.
pub fn write_pages(image: &Image, p: &proto::Process, child: i32) -> Result<Written, RestoreError> {
    let chunks = image.chunks();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
        .min(chunks.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Vec<Result<Written, RestoreError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let zero_page = vec![0u8; PAGE_SIZE as usize];
                    let mut remote: Vec<Remote> = Vec::new();
                    let mut written = Written::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = chunks.get(i) else {
                            return Ok(written);
                        };
                        let w = write_chunk(image, p, child, chunk, &zero_page, &mut remote)
                            .inspect_err(|_| next.store(usize::MAX / 2, Ordering::Relaxed))?;
                        written.pages += w.pages;
                        written.bytes += w.bytes;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(RestoreError::Invalid(
                        "a page writer thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut total = Written::default();
    for r in results {
        let w = r?;
        total.pages += w.pages;
        total.bytes += w.bytes;
    }
    Ok(total)
}

/// Writes one chunk (if it belongs to `p`).
fn write_chunk(
    image: &Image,
    p: &proto::Process,
    child: i32,
    chunk: &ChunkRef,
    zero_page: &[u8],
    remote: &mut Vec<Remote>,
) -> Result<Written, RestoreError> {
    let ours = match chunk.space {
        SpaceKind::Process => chunk.space_id == p.pid as u64,
        // Shared memory objects are filled once for the tree (see shmem.rs).
        _ => false,
    };
    if !ours {
        return Ok(Written::default());
    }
    let data = image.chunk_data(chunk)?;
    remote.clear();
    for run in &chunk.runs {
        // A run may span neighbouring mappings; write it piece by piece.
        let mut at = run.vaddr;
        let end = run
            .vaddr
            .checked_add(run.pages.saturating_mul(PAGE_SIZE))
            .ok_or_else(|| RestoreError::Invalid(format!("run at {:#x} overflows", run.vaddr)))?;
        while at < end {
            let (addr, vma) = locate(p, chunk.space, chunk.space_id, at).ok_or_else(|| {
                RestoreError::Invalid(format!(
                    "pages at {at:#x} of {:?} {} lie outside every mapping",
                    chunk.space, chunk.space_id
                ))
            })?;
            let len = end.min(vma.end) - at;
            match run.kind() {
                RunKind::Data => remote.push((addr, len as usize)),
                // Fresh anonymous memory is already zero; a private file page is not.
                RunKind::Zero if vma.kind() == VmaKind::FilePrivate => {
                    for i in 0..len / PAGE_SIZE {
                        memory::write_remote(
                            child,
                            &[(addr + i * PAGE_SIZE, PAGE_SIZE as usize)],
                            zero_page,
                        )?;
                    }
                }
                RunKind::Zero => {}
                RunKind::Parent | RunKind::Unspecified => {
                    return Err(RestoreError::Unsupported(
                        "pages stored in a parent image".into(),
                    ))
                }
            }
            at += len;
        }
    }
    let total: usize = remote.iter().map(|r| r.1).sum();
    if total != data.len() {
        return Err(RestoreError::Invalid(format!(
            "chunk {} has {} bytes of data for {} bytes of DATA runs",
            chunk.index,
            data.len(),
            total
        )));
    }
    memory::write_remote(child, remote, &data)?;
    Ok(Written {
        pages: chunk.data_pages,
        bytes: total as u64,
    })
}
