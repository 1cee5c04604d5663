//! Stream sources: standard input, or the standard output of a command run through
//! `sh -c` (for example `terraform state pull` or `pg_dump`). The command's success is
//! part of the backup: a non-zero exit fails it.

use std::io::Read;
use std::process::{Child, Command, Stdio};

use custos_model::{Error, Kind, Result};

pub struct CommandStream {
    child: Child,
    command: String,
}

impl CommandStream {
    pub fn spawn(command: &str) -> Result<CommandStream> {
        CommandStream::spawn_in(command, None)
    }

    /// Like `spawn`, in the folder `dir`.
    pub fn spawn_in(command: &str, dir: Option<&std::path::Path>) -> Result<CommandStream> {
        let mut c = Command::new("sh");
        if let Some(d) = dir {
            c.current_dir(d);
        }
        let child = c
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::new(Kind::Source, format!("cannot start `{command}`: {e}")))?;
        Ok(CommandStream {
            child,
            command: command.into(),
        })
    }

    pub fn stdout(&mut self) -> impl Read + '_ {
        self.child.stdout.as_mut().expect("piped")
    }

    /// Waits for the command; an unsuccessful exit is an error that fails the backup.
    pub fn finish(mut self) -> Result<()> {
        drop(self.child.stdout.take());
        let status = self
            .child
            .wait()
            .map_err(|e| Error::new(Kind::Source, format!("`{}`: {e}", self.command)))?;
        if !status.success() {
            return Err(Error::new(
                Kind::Source,
                format!(
                    "the command `{}` failed ({status}); nothing was recorded",
                    self.command
                ),
            )
            .hint("fix the command (its error output is above) and run the backup again"));
        }
        Ok(())
    }
}

/// Runs `command` through `sh -c` and returns its whole standard output (for small
/// outputs: a Terraform state, a list of secret names). A non-zero exit is an error.
pub fn capture(command: &str, dir: Option<&std::path::Path>) -> Result<Vec<u8>> {
    let mut c = CommandStream::spawn_in(command, dir)?;
    let mut out = vec![];
    c.stdout().read_to_end(&mut out).map_err(|e| {
        Error::new(
            Kind::Source,
            format!("reading the output of `{command}`: {e}"),
        )
    })?;
    c.finish()?;
    Ok(out)
}

/// `NAME=value` lines of an env file (`export` prefixes, comments, blank lines and
/// single or double quotes around a value are understood), in file order.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            v
        };
        out.push((k.trim().to_string(), v.to_string()));
    }
    out
}
