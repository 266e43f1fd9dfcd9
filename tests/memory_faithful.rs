//! Memory state beyond page contents, restored exactly: mlock/MAP_LOCKED, madvise flags
//! (wipe-on-fork, dont-fork, dont-dump, huge pages, access patterns, KSM), MAP_DROPPABLE,
//! MAP_NORESERVE, guard pages, private mappings of a memfd that keep following it, shared
//! file mappings that can still be made writable, and PR_SET_THP_DISABLE. The workload
//! checks every piece itself (see wl-mmflags).

mod common;

use common::*;

#[test]
fn mapping_flags_guards_and_memfd_private_mappings_survive_two_rounds() {
    init();
    round_trip("wl-mmflags", &[], &[]);
}
