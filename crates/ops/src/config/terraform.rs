//! Terraform: the state as `terraform state pull` prints it (the command is the
//! interface, and configurable) and the configuration folder, in one snapshot that
//! records the state's `serial`, `lineage` and Terraform version. A serial lower than the
//! last snapshot's, or another lineage, is warned about: someone pushed an older state,
//! or this is another state under the same name.

use std::path::PathBuf;

use custos_model::{Error, Kind, Result};
use custos_repo::snapshot::SourceKind;
use custos_repo::Repository;
use serde::{Deserialize, Serialize};

use crate::backup::{BackupOptions, BackupReport};

pub struct TerraformOptions {
    pub name: String,
    /// Prints the state (default `terraform state pull`), run in `dir`.
    pub command: String,
    /// The configuration folder (backed up too).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TerraformFacts {
    pub serial: u64,
    pub lineage: String,
    pub terraform_version: String,
    pub resources: usize,
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TerraformReport {
    pub backup: BackupReport,
    pub facts: TerraformFacts,
}

pub fn facts_of(s: &custos_repo::Snapshot) -> Option<TerraformFacts> {
    crate::backup::facts(s, SourceKind::Terraform)
}

pub fn backup_terraform(
    repo: &Repository,
    o: &TerraformOptions,
    opts: &BackupOptions,
) -> Result<TerraformReport> {
    if !o.dir.is_dir() {
        return Err(Error::config(format!(
            "terraform source `{}`: {} is not a folder",
            o.name,
            o.dir.display()
        ))
        .hint("`dir` names the Terraform configuration folder, where the command runs"));
    }
    let state = custos_sources::stream::capture(&o.command, Some(&o.dir))?;
    let v: serde_json::Value = serde_json::from_slice(&state).map_err(|e| {
        Error::new(
            Kind::Source,
            format!(
                "`{}` did not print a Terraform state (JSON): {e}",
                o.command
            ),
        )
    })?;
    let serial = v["serial"].as_u64().ok_or_else(|| {
        Error::new(
            Kind::Source,
            format!("the state `{}` printed has no serial", o.command),
        )
    })?;
    let lineage = v["lineage"].as_str().unwrap_or("").to_string();
    let mut facts = TerraformFacts {
        serial,
        lineage,
        terraform_version: v["terraform_version"].as_str().unwrap_or("").to_string(),
        resources: v["resources"].as_array().map(|a| a.len()).unwrap_or(0),
        warnings: vec![],
    };
    let last = repo
        .snapshots_for_reading()?
        .into_iter()
        .rev()
        .find(|s| s.summary.kind == SourceKind::Terraform && s.summary.source == o.name)
        .and_then(|s| facts_of(&s));
    if let Some(l) = last {
        if l.lineage != facts.lineage {
            facts.warnings.push(format!(
                "the state's lineage changed from {} to {}: this is another state than the one backed up before under `{}`",
                l.lineage, facts.lineage, o.name
            ));
        } else if facts.serial < l.serial {
            facts.warnings.push(format!(
                "the state's serial went backwards, from {} to {}: an older state was pushed over a newer one",
                l.serial, facts.serial
            ));
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("custos-terraform-")
        .tempdir()
        .map_err(|e| Error::internal(format!("cannot make a temporary folder: {e}")))?;
    let state_path = tmp.path().join("terraform.tfstate");
    std::fs::write(&state_path, &state)
        .map_err(|e| Error::internal(format!("writing the pulled state: {e}")))?;
    let backup = crate::files::backup::backup_tree(
        repo,
        &[state_path, o.dir.clone()],
        opts,
        SourceKind::Terraform,
        Some(o.name.clone()),
        Some(serde_json::to_value(&facts).expect("serializable")),
    )?;
    Ok(TerraformReport { backup, facts })
}
