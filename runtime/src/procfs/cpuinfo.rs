//! /proc/cpuinfo: the CPU's feature flags.

use crate::error::{Result, RuntimeError};

/// The feature flags of a /proc/cpuinfo text (its first `flags` line), in its order.
pub fn cpu_flags_in(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The feature flags of the CPU as `path` (normally /proc/cpuinfo) lists them; an error if
/// it lists none.
pub fn cpu_flags(path: &str) -> Result<Vec<String>> {
    let text = super::read_text(path)?;
    let flags = cpu_flags_in(&text);
    if flags.is_empty() {
        return Err(RuntimeError::Protocol {
            op: "read CPU flags",
            pid: 0,
            what: format!("{path} lists no flags"),
        });
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_flags_line_is_read() {
        let text = "processor\t: 0\nflags\t\t: fpu vme sse2\nprocessor\t: 1\nflags\t\t: fpu\n";
        assert_eq!(cpu_flags_in(text), ["fpu", "vme", "sse2"]);
        assert!(cpu_flags_in("processor : 0\n").is_empty());
    }
}
