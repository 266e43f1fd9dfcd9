//! Fault injection for tests: with the `failpoints` feature, [`hit`]`("name")` marks a point
//! where a test can make stasis die (SIGKILL to itself, exactly what the OOM killer or an
//! operator does) by running it with FAILPOINTS="name=return" (the `fail` crate's syntax;
//! "name=1*return" dies at the first hit only, "name=3*off->return" at the fourth). Without
//! the feature, [`hit`] does nothing.

/// A point where a test may kill stasis (see the module documentation).
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::eval(name, |_| {
        // SAFETY: kill takes no pointers.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    });
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Reads the FAILPOINTS environment variable (stasis's main calls this first).
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}
