//! Running an external program (nft, ip) as a child process: a script on its stdin, its
//! stdout back, and errors that say what it was run for, the command line and its stderr.

use crate::error::{Result, RuntimeError};
use std::io::{self, Write};
use std::process::{Command, Stdio};

/// Runs `cmd` (program and arguments set, and any `pre_exec` hook), feeding it `input`;
/// returns its stdout. `what` says what for, in errors; `needs` says which program is
/// missing and its Debian package, when it is not installed ("the network lock needs nft
/// (Debian package nftables)").
pub(crate) fn run(
    cmd: &mut Command,
    input: Option<&str>,
    what: &str,
    needs: &str,
) -> Result<Vec<u8>> {
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => RuntimeError::Unsupported(format!("{what}: {needs}: {e}")),
            _ => RuntimeError::sys("starting", format!("`{command}` for {what}"), e),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| RuntimeError::sys("writing to", format!("`{command}` for {what}"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RuntimeError::sys("waiting for", format!("`{command}` for {what}"), e))?;
    if !out.status.success() {
        return Err(RuntimeError::Command {
            what: what.to_string(),
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_goes_in_and_output_comes_back() {
        let out = run(
            &mut Command::new("cat"),
            Some("a script\n"),
            "testing",
            "n/a",
        )
        .unwrap();
        assert_eq!(out, b"a script\n");
    }

    #[test]
    fn a_missing_program_is_named_with_its_package() {
        let needs = "this needs stasis-no-such-program (Debian package none)";
        let e = run(
            &mut Command::new("stasis-no-such-program"),
            None,
            "testing",
            needs,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("testing: this needs") && e.contains("package none"),
            "{e}"
        );
    }

    #[test]
    fn a_failure_carries_the_command_its_status_and_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'Error: nope' >&2; exit 3"]);
        let e = run(&mut cmd, None, "doing x", "n/a").unwrap_err();
        let RuntimeError::Command {
            what,
            command,
            stderr,
            status,
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!((what.as_str(), stderr.as_str()), ("doing x", "Error: nope"));
        assert!(
            command.starts_with("sh -c echo") && status.contains('3'),
            "{e}"
        );
    }
}
