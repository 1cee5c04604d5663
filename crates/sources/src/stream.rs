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
        let child = Command::new("sh")
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
