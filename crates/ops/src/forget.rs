//! Forget: retention applied per source, as a plan that says why each snapshot is kept or
//! removed, then carried out by deleting the removed snapshots' objects. Data is freed
//! later by prune.

use custos_model::retention::{self, Candidate, Decision, RetentionPolicy};
use custos_model::{Result, SnapshotId};
use custos_repo::{paths, Repository};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct GroupPlan {
    pub kind: String,
    pub source: String,
    pub host: String,
    pub decisions: Vec<Decision<SnapshotId>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForgetPlan {
    pub policy: RetentionPolicy,
    pub groups: Vec<GroupPlan>,
}

impl ForgetPlan {
    pub fn removed(&self) -> Vec<SnapshotId> {
        self.groups
            .iter()
            .flat_map(|g| g.decisions.iter().filter(|d| !d.keep).map(|d| d.item))
            .collect()
    }
}

pub fn plan(repo: &Repository, policy: &RetentionPolicy) -> Result<ForgetPlan> {
    let snaps = repo.snapshots()?;
    let mut groups: std::collections::BTreeMap<
        (String, String, String),
        Vec<Candidate<SnapshotId>>,
    > = Default::default();
    for s in snaps {
        groups
            .entry((
                s.summary.kind.as_str().to_string(),
                s.summary.source.clone(),
                s.summary.host.clone(),
            ))
            .or_default()
            .push(Candidate {
                item: s.id,
                time: s.summary.time,
            });
    }
    Ok(ForgetPlan {
        policy: policy.clone(),
        groups: groups
            .into_iter()
            .map(|((kind, source, host), c)| GroupPlan {
                kind,
                source,
                host,
                decisions: retention::apply(policy, c),
            })
            .collect(),
    })
}

pub fn execute(repo: &Repository, plan: &ForgetPlan) -> Result<usize> {
    repo.require_delete("forget snapshots")?;
    let _lock = repo.lock(false, "forget")?;
    let removed = plan.removed();
    for id in &removed {
        repo.storage.delete(&paths::snapshot(id))?;
    }
    Ok(removed.len())
}
