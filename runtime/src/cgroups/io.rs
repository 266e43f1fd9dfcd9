//! Block I/O throttles: cgroup2 `io.max` ("MAJ:MIN rbps=N wbps=N riops=N wiops=N"), v1
//! `blkio.throttle.{read,write}_{bps,iops}_device` ("MAJ:MIN N").

use super::stats::{blkio_sums, io_stat_sums};
use super::{read, write, Dir, IoKind, IoLimit, Limits, Stats, UNLIMITED};
use crate::cgroups::hierarchy::Version;
use crate::error::{Result, RuntimeError};

pub(super) fn apply(d: &Dir, io: &[IoLimit]) -> Result<()> {
    for l in io {
        let (maj, min) = l.dev;
        match d.version {
            Version::V2 => write(
                &d.file("io.max"),
                &format!(
                    "{maj}:{min} {}={}",
                    l.kind.v2_key(),
                    super::max_text(l.value)
                ),
            )?,
            // v1 removes a throttle when it is set to 0.
            Version::V1 => {
                let v = if l.value == UNLIMITED { 0 } else { l.value };
                write(&d.file(l.kind.v1_file()), &format!("{maj}:{min} {v}"))?
            }
        }
    }
    Ok(())
}

fn parse_dev(file: &std::path::Path, dev: &str) -> Result<(u32, u32)> {
    let bad = || RuntimeError::Parse {
        path: file.display().to_string(),
        what: format!("expected MAJ:MIN, got {dev:?}"),
    };
    let (maj, min) = dev.split_once(':').ok_or_else(bad)?;
    Ok((
        maj.parse().map_err(|_| bad())?,
        min.parse().map_err(|_| bad())?,
    ))
}

pub(super) fn read_limits(d: &Dir, out: &mut Limits) -> Result<()> {
    let mut io = Vec::new();
    match d.version {
        Version::V2 => {
            let file = d.file("io.max");
            for line in read(&file)?.lines() {
                let mut fields = line.split_whitespace();
                let Some(dev) = fields.next() else {
                    continue;
                };
                let dev = parse_dev(&file, dev)?;
                for field in fields {
                    let Some((key, value)) = field.split_once('=') else {
                        continue;
                    };
                    let kind = IoKind::ALL.into_iter().find(|k| k.v2_key() == key);
                    if let (Some(kind), Ok(value)) = (kind, value.parse::<u64>()) {
                        io.push(IoLimit { dev, kind, value });
                    }
                }
            }
        }
        Version::V1 => {
            for kind in IoKind::ALL {
                let file = d.file(kind.v1_file());
                for line in read(&file)?.lines() {
                    let mut fields = line.split_whitespace();
                    let (Some(dev), Some(value)) = (fields.next(), fields.next()) else {
                        continue;
                    };
                    let dev = parse_dev(&file, dev)?;
                    if let Ok(value) = value.parse::<u64>() {
                        io.push(IoLimit { dev, kind, value });
                    }
                }
            }
        }
    }
    io.sort();
    out.io = io;
    Ok(())
}

pub(super) fn stats(d: &Dir, out: &mut Stats) -> Result<()> {
    let [rb, wb, ro, wo] = match d.version {
        Version::V2 => io_stat_sums(
            &read(&d.file("io.stat"))?,
            ["rbytes", "wbytes", "rios", "wios"],
        ),
        Version::V1 => {
            let file = |base: &str| {
                let rec = d.file(&format!("{base}_recursive"));
                if rec.exists() {
                    rec
                } else {
                    d.file(base)
                }
            };
            let (rb, wb) = blkio_sums(&read(&file("blkio.throttle.io_service_bytes"))?);
            let (ro, wo) = blkio_sums(&read(&file("blkio.throttle.io_serviced"))?);
            [rb, wb, ro, wo]
        }
    };
    out.io_read_bytes = Some(rb);
    out.io_write_bytes = Some(wb);
    out.io_read_ops = Some(ro);
    out.io_write_ops = Some(wo);
    Ok(())
}
