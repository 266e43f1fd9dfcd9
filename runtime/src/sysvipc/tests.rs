//! Checks of [`validate`], the content bound and the limits raised for a recreate; the
//! kernel side is tested for real in the workspace's tests/sysvipc.rs.

use super::*;

fn perm(key: i32, id: i32) -> IpcPerm {
    IpcPerm {
        key,
        id,
        mode: 0o600,
        uid: 0,
        gid: 0,
        cuid: 0,
        cgid: 0,
    }
}

fn limits() -> IpcLimits {
    IpcLimits {
        shmmax: u64::MAX >> 1,
        shmall: u64::MAX >> 1,
        shmmni: 4096,
        shm_rmid_forced: 0,
        msgmax: 8192,
        msgmnb: 16384,
        msgmni: 32000,
        sem: [32000, 1024000000, 500, 32000],
    }
}

fn sample() -> IpcObjects {
    IpcObjects {
        version: IPC_OBJECTS_VERSION,
        limits: limits(),
        shm: vec![
            ShmSegment {
                perm: perm(0x1234, 32769),
                size: 10_000,
                data: vec![1, 2, 3],
                attached: 1,
            },
            ShmSegment {
                perm: IpcPerm {
                    mode: 0o640 | SHM_DEST | SHM_LOCKED,
                    ..perm(0, 2)
                },
                size: 1,
                data: vec![],
                attached: 0,
            },
        ],
        sem: vec![SemSet {
            perm: perm(0x1234, 0),
            values: vec![0, 1, SEMVMX],
        }],
        msg: vec![MsgQueue {
            perm: perm(0, 65536),
            qbytes: 100,
            messages: vec![
                Message {
                    mtype: 2,
                    text: b"two".to_vec(),
                },
                Message {
                    mtype: 1,
                    text: vec![],
                },
            ],
        }],
    }
}

fn refused(objs: &IpcObjects) -> String {
    validate(objs).expect_err("should be refused").to_string()
}

#[test]
fn a_good_set_of_objects_passes() {
    validate(&sample()).unwrap();
    // The same key and id in different kinds are different objects.
    assert_eq!(sample().sem[0].perm.key, sample().shm[0].perm.key);
}

#[test]
fn repeated_ids_and_keys_are_refused() {
    let mut o = sample();
    o.shm[1].perm.id = 32769;
    assert!(refused(&o).contains("shm id 32769 key 0x00000000: a negative or repeated id"));
    let mut o = sample();
    o.shm[1].perm.key = 0x1234;
    assert!(refused(&o).contains("shm id 2 key 0x00001234: the key of another shm"));
    // Many private objects are fine.
    let mut o = sample();
    o.shm[0].perm.key = 0;
    validate(&o).unwrap();
}

#[test]
fn values_the_kernel_would_refuse_are_refused() {
    type Spoil = fn(&mut IpcObjects);
    let cases: [(Spoil, &str); 10] = [
        (|o| o.version = 2, "layout version 2"),
        (|o| o.shm[0].perm.id = -1, "a negative or repeated id"),
        (|o| o.sem[0].perm.mode = 0o1600, "mode 1600"),
        (|o| o.msg[0].perm.cgid = u32::MAX, "uid or gid -1"),
        (|o| o.shm[0].size = 2, "3 bytes of contents for a size of 2"),
        (|o| o.sem[0].values.clear(), "0 semaphores"),
        (|o| o.sem[0].values[0] = 40000, "value 40000 is over 32767"),
        (|o| o.msg[0].messages[1].mtype = 0, "message 1 has type 0"),
        (|o| o.msg[0].qbytes = 1 << 31, "msg_qbytes 2147483648"),
        (|o| o.limits.shm_rmid_forced = 2, "limits out of range"),
    ];
    for (spoil, what) in cases {
        let mut o = sample();
        spoil(&mut o);
        let e = refused(&o);
        assert!(e.contains(what), "{what:?} not in {e:?}");
    }
}

#[test]
fn contents_over_the_bound_are_refused_naming_the_object() {
    let mut o = sample();
    // Just fits: 3 bytes of shm, 6 of semaphores, 2 messages of 8 + 3 and 8 + 0.
    let used = 3 + 6 + 8 + 3 + 8;
    o.shm[1].data = vec![7; (MAX_CONTENT_BYTES - used) as usize];
    o.shm[1].size = MAX_CONTENT_BYTES;
    validate(&o).unwrap();
    o.msg[0].messages[1].text.push(0);
    let e = refused(&o);
    assert!(
        e.contains("msg id 65536 key 0x00000000 has 20 bytes of contents: over the limit"),
        "{e}"
    );
    assert!(
        e.contains("(32 MiB)") && e.contains("of which 19 were left"),
        "{e}"
    );
}

#[test]
fn the_budget_counts_down() {
    let mut b = Budget::new();
    b.take("a", MAX_CONTENT_BYTES - 10).unwrap();
    b.room("b", 10).unwrap();
    assert!(b
        .take("b", 11)
        .unwrap_err()
        .to_string()
        .starts_with("b has 11 bytes"));
    b.take("b", 10).unwrap();
    b.take("c", 0).unwrap();
}

#[test]
fn a_queue_gets_room_for_all_its_messages_while_they_are_sent() {
    let mut q = sample().msg.remove(0);
    assert_eq!(q.room(), 100);
    q.qbytes = 2; // lowered after 3 bytes were queued
    assert_eq!(q.room(), 3);
    q.messages = vec![
        Message {
            mtype: 1,
            text: vec![]
        };
        5
    ];
    assert_eq!(q.room(), 5); // msgsnd also counts messages against msg_qbytes
}

#[test]
fn limits_are_raised_only_where_the_objects_need_it() {
    let mut o = sample();
    o.limits = IpcLimits {
        shmmax: 4096,
        shmall: 1,
        shmmni: 1,
        shm_rmid_forced: 1,
        msgmax: 2,
        msgmnb: 50,
        msgmni: 5,
        sem: [2, 2, 7, 0],
    };
    let raised = o.limits.raised_for(&o);
    assert_eq!(
        raised,
        IpcLimits {
            shmmax: 10_000,
            shmall: 4, // 3 pages for 10000 bytes, 1 for 1
            shmmni: 2,
            shm_rmid_forced: 1,
            msgmax: 3,
            msgmnb: 100,
            msgmni: 5,
            sem: [3, 3, 7, 1],
        }
    );
    // Raising never lowers.
    assert_eq!(limits().raised_for(&o), limits());
}

#[test]
fn the_sysctls_written_leave_shm_rmid_forced_to_finish() {
    let names: Vec<&str> = limits().settings().iter().map(|(n, _)| *n).collect();
    assert!(!names.contains(&"shm_rmid_forced"));
    assert_eq!(limits().settings()[6].1, "32000 1024000000 500 32000");
}

#[test]
fn objects_round_trip_through_json() {
    let o = sample();
    let text = serde_json::to_string(&o).unwrap();
    assert_eq!(serde_json::from_str::<IpcObjects>(&text).unwrap(), o);
}
