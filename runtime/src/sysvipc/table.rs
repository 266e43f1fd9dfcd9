//! The three kinds of SysV IPC object and their tables in /proc/sysvipc/{shm,sem,msg}.
//!
//! Each table is a header line naming the columns, then one line per object of the reading
//! thread's IPC namespace. Columns are found by name, so a kernel that adds one does not
//! break this. Keys and ids are signed decimal, `perms` is octal (the whole mode: SHM_DEST
//! and SHM_LOCKED included), uids and gids are as seen from the reader's user namespace.

use super::IpcPerm;
use crate::error::{Result, RuntimeError};
use std::fmt;

/// A kind of SysV IPC object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Shm,
    Sem,
    Msg,
}

impl Kind {
    pub(super) const ALL: [Kind; 3] = [Kind::Shm, Kind::Sem, Kind::Msg];

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Shm => "shm",
            Kind::Sem => "sem",
            Kind::Msg => "msg",
        }
    }

    pub(super) fn proc_path(self) -> &'static str {
        match self {
            Kind::Shm => "/proc/sysvipc/shm",
            Kind::Sem => "/proc/sysvipc/sem",
            Kind::Msg => "/proc/sysvipc/msg",
        }
    }

    /// The sysctl (in /proc/sys/kernel) that picks the id of the next object created.
    pub(super) fn next_id_sysctl(self) -> &'static str {
        match self {
            Kind::Shm => "shm_next_id",
            Kind::Sem => "sem_next_id",
            Kind::Msg => "msg_next_id",
        }
    }

    /// Columns: the id, the size (shm bytes, sem count of semaphores, msg bytes queued) and
    /// a count (shm nattch, msg messages queued; none for sem).
    fn columns(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            Kind::Shm => ("shmid", "size", Some("nattch")),
            Kind::Sem => ("semid", "nsems", None),
            Kind::Msg => ("msqid", "cbytes", Some("qnum")),
        }
    }
}

/// One object as a /proc/sysvipc table shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Row {
    pub perm: IpcPerm,
    /// shm: size in bytes; sem: number of semaphores; msg: bytes queued.
    pub size: u64,
    /// shm: nattch; msg: messages queued; sem: 0.
    pub count: u64,
}

/// An object named for errors: "shm id 32769 key 0x00001234".
pub(super) struct Name<'a>(pub Kind, pub &'a IpcPerm);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} id {} key {:#010x}",
            self.0.name(),
            self.1.id,
            self.1.key as u32
        )
    }
}

/// Parses the text of /proc/sysvipc/KIND.
pub(super) fn parse(kind: Kind, text: &str) -> Result<Vec<Row>> {
    let path = kind.proc_path();
    let bad = |what: String| RuntimeError::Parse {
        path: path.to_string(),
        what,
    };
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| bad("no header line".into()))?
        .split_whitespace()
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| bad(format!("no column {name:?} in {header:?}")))
    };
    let (id_col, size_col, count_col) = kind.columns();
    let [key, id, perms, uid, gid, cuid, cgid, size] = [
        "key", id_col, "perms", "uid", "gid", "cuid", "cgid", size_col,
    ]
    .map(col);
    let (key, id, perms, size) = (key?, id?, perms?, size?);
    let (uid, gid, cuid, cgid) = (uid?, gid?, cuid?, cgid?);
    let count = count_col.map(col).transpose()?;
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != header.len() {
            return Err(bad(format!(
                "line {}: {} fields for {} columns: {line:?}",
                n + 2,
                fields.len(),
                header.len()
            )));
        }
        let field = |i: usize, radix: u32| {
            i64::from_str_radix(fields[i], radix).map_err(|_| {
                bad(format!(
                    "line {}: column {:?} is not a number: {:?}",
                    n + 2,
                    header[i],
                    fields[i]
                ))
            })
        };
        let int = |i: usize, radix: u32, min: i64, max: i64| {
            let v = field(i, radix)?;
            match (min..=max).contains(&v) {
                true => Ok(v),
                false => Err(bad(format!(
                    "line {}: column {:?} out of range: {v}",
                    n + 2,
                    header[i]
                ))),
            }
        };
        let id32 = |i: usize| int(i, 10, 0, u32::MAX as i64).map(|v| v as u32);
        rows.push(Row {
            perm: IpcPerm {
                key: int(key, 10, i32::MIN as i64, i32::MAX as i64)? as i32,
                id: int(id, 10, 0, i32::MAX as i64)? as i32,
                mode: int(perms, 8, 0, 0o177777)? as u32,
                uid: id32(uid)?,
                gid: id32(gid)?,
                cuid: id32(cuid)?,
                cgid: id32(cgid)?,
            },
            size: int(size, 10, 0, i64::MAX)? as u64,
            count: match count {
                Some(c) => int(c, 10, 0, i64::MAX)? as u64,
                None => 0,
            },
        });
    }
    Ok(rows)
}

/// Reads and parses /proc/sysvipc/KIND of the calling thread's IPC namespace.
pub(super) fn read(kind: Kind) -> Result<Vec<Row>> {
    parse(kind, &crate::procfs::read_text(kind.proc_path())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on this kernel (6.18) in a namespace where `ipcmk` and a test made objects.
    const SHM: &str = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
-1300470160          0   644                  8192  4297     0      0     0     0     0     0          0          0 1796073770                     0                     0
      4660      32769  3640              41943040  4092  4092      2  1000  1001     0     0 1796073666 1796073666 1796073666                  4096                     0
";
    const SEM: &str =
        "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime
 955389802          0   640          3     0     0  1234    55          0 1796073770
";
    const MSG: &str = "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid      stime      rtime      ctime
-1735537101          0   644           0          0     0     0     0     0     0     0          0          0 1796073770
 -16757939          1   600        9001          4     7     0    65    66     0     0          0          0 1796073770
";

    fn perm(key: i32, id: i32, mode: u32, ids: [u32; 4]) -> IpcPerm {
        let [uid, gid, cuid, cgid] = ids;
        IpcPerm {
            key,
            id,
            mode,
            uid,
            gid,
            cuid,
            cgid,
        }
    }

    #[test]
    fn shm_table() {
        let rows = parse(Kind::Shm, SHM).unwrap();
        assert_eq!(
            rows,
            vec![
                Row {
                    perm: perm(-1300470160, 0, 0o644, [0; 4]),
                    size: 8192,
                    count: 0
                },
                Row {
                    // 03640: SHM_LOCKED | SHM_DEST | 0640.
                    perm: perm(0x1234, 32769, 0o3640, [1000, 1001, 0, 0]),
                    size: 40 << 20,
                    count: 2
                },
            ]
        );
        assert_eq!(
            Name(Kind::Shm, &rows[1].perm).to_string(),
            "shm id 32769 key 0x00001234"
        );
        assert_eq!(
            Name(Kind::Shm, &rows[0].perm).to_string(),
            "shm id 0 key 0xb27c6670"
        );
    }

    #[test]
    fn sem_table() {
        let rows = parse(Kind::Sem, SEM).unwrap();
        assert_eq!(
            rows,
            vec![Row {
                perm: perm(955389802, 0, 0o640, [0, 0, 1234, 55]),
                size: 3,
                count: 0
            }]
        );
    }

    #[test]
    fn msg_table() {
        let rows = parse(Kind::Msg, MSG).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[1],
            Row {
                perm: perm(-16757939, 1, 0o600, [65, 66, 0, 0]),
                size: 9001,
                count: 4
            }
        );
    }

    #[test]
    fn an_empty_table_is_no_objects() {
        let header = SEM.lines().next().unwrap();
        assert_eq!(parse(Kind::Sem, header).unwrap(), vec![]);
        assert_eq!(parse(Kind::Sem, &format!("{header}\n\n")).unwrap(), vec![]);
    }

    #[test]
    fn bad_tables_are_errors_naming_the_problem() {
        let err = |kind, text: &str| parse(kind, text).unwrap_err().to_string();
        assert!(err(Kind::Shm, "").contains("no header"));
        // The sem table read as if it were shm: no shmid column.
        assert!(err(Kind::Shm, SEM).contains("\"shmid\""));
        let short = SEM.replace("1796073770", "");
        assert!(err(Kind::Sem, &short).contains("9 fields for 10 columns"));
        let octal = SEM.replace(" 640 ", " 680 ");
        assert!(err(Kind::Sem, &octal).contains("\"perms\" is not a number"));
        let negative_id = SEM.replace("  0   640", " -1   640");
        assert!(err(Kind::Sem, &negative_id).contains("\"semid\" out of range"));
        let huge_key = SEM.replace("955389802", "4294967296");
        assert!(err(Kind::Sem, &huge_key).contains("\"key\" out of range"));
    }
}
