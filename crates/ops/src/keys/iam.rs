//! AWS IAM policies that enforce the roles at the storage layer, so that a stolen
//! credential is bounded by the bucket as well as by the keys: backup writes but never
//! reads packs nor deletes (except its own locks); restore reads everything and deletes
//! only when granted; audit reads the trail and the listing. Nobody may delete the trail.

use serde_json::{json, Value};

pub fn policy(role: &str, bucket: &str, prefix: &str, allow_delete: bool) -> Value {
    let p = prefix.trim_matches('/');
    let obj = |dir: &str| -> String {
        match (p.is_empty(), dir) {
            (true, d) => format!("arn:aws:s3:::{bucket}/{d}"),
            (false, d) => format!("arn:aws:s3:::{bucket}/{p}/{d}"),
        }
    };
    let list_prefix = if p.is_empty() {
        "*".to_string()
    } else {
        format!("{p}/*")
    };
    // Versions are listed to delete an object on an Object Lock bucket (every version).
    let list = json!({
        "Sid": "List",
        "Effect": "Allow",
        "Action": ["s3:ListBucket", "s3:ListBucketVersions"],
        "Resource": [format!("arn:aws:s3:::{bucket}")],
        "Condition": {"StringLike": {"s3:prefix": [list_prefix, p]}}
    });
    let res = |dirs: &[&str]| -> Vec<String> { dirs.iter().map(|d| obj(d)).collect() };
    let mut st = vec![list];
    match role {
        "backup" => {
            st.push(json!({"Sid": "ReadWhatDedupNeeds", "Effect": "Allow", "Action": ["s3:GetObject"],
                "Resource": res(&["config", "keys/*", "index/*", "snapshots/*", "locks/*", "wal/*", "audit/*"])}));
            st.push(json!({"Sid": "AddData", "Effect": "Allow", "Action": ["s3:PutObject"],
                "Resource": res(&["data/*", "index/*", "snapshots/*", "locks/*", "wal/*", "audit/*"])}));
            st.push(
                json!({"Sid": "RemoveOwnLocks", "Effect": "Allow", "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": res(&["locks/*"])}),
            );
            // Object Lock: writes carry their retain-until date.
            st.push(
                json!({"Sid": "DateWrites", "Effect": "Allow", "Action": ["s3:PutObjectRetention"],
                "Resource": res(&["data/*", "index/*", "snapshots/*", "wal/*", "audit/*"])}),
            );
            st.push(
                json!({"Sid": "NeverReadPacks", "Effect": "Deny", "Action": ["s3:GetObject"],
                "Resource": res(&["data/*"])}),
            );
            st.push(json!({"Sid": "NeverDelete", "Effect": "Deny",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "NotResource": res(&["locks/*"])}));
        }
        "restore" => {
            st.push(
                json!({"Sid": "ReadAll", "Effect": "Allow", "Action": ["s3:GetObject"],
                "Resource": res(&["*"])}),
            );
            st.push(
                json!({"Sid": "LocksTrailKeys", "Effect": "Allow", "Action": ["s3:PutObject"],
                "Resource": res(&["locks/*", "audit/*", "keys/*"])}),
            );
            st.push(
                json!({"Sid": "RemoveOwnLocks", "Effect": "Allow", "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": res(&["locks/*"])}),
            );
            // Object Lock: `lock status` reads dates, `lock refresh` extends them (never
            // s3:BypassGovernanceRetention: nobody shortens one), `--request-cold` brings
            // archived packs back.
            st.push(json!({"Sid": "ObjectLockDates", "Effect": "Allow",
                "Action": ["s3:GetObjectRetention", "s3:PutObjectRetention", "s3:RestoreObject"],
                "Resource": res(&["data/*", "index/*", "snapshots/*", "wal/*", "audit/*"])}));
            if allow_delete {
                st.push(json!({"Sid": "ForgetAndPrune", "Effect": "Allow",
                    "Action": ["s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion"],
                    "Resource": res(&["data/*", "index/*", "snapshots/*", "wal/*", "keys/*"])}));
            } else {
                st.push(json!({"Sid": "NoDeleteUnlessGranted", "Effect": "Deny",
                    "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                    "NotResource": res(&["locks/*"])}));
            }
        }
        "audit" => {
            st.push(
                json!({"Sid": "ReadTrailAndListing", "Effect": "Allow", "Action": ["s3:GetObject"],
                "Resource": res(&["config", "keys/*", "snapshots/*", "audit/*"])}),
            );
            st.push(
                json!({"Sid": "RecordOwnReads", "Effect": "Allow", "Action": ["s3:PutObject"],
                "Resource": res(&["audit/*"])}),
            );
            st.push(
                json!({"Sid": "NeverReadData", "Effect": "Deny", "Action": ["s3:GetObject"],
                "Resource": res(&["data/*", "wal/*", "index/*"])}),
            );
            st.push(json!({"Sid": "NeverDelete", "Effect": "Deny",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"], "Resource": res(&["*"])}));
        }
        _ => unreachable!("role checked by the caller"),
    }
    // The trail is write-once for everyone (pair with S3 Object Lock for six years).
    st.push(json!({"Sid": "TrailIsWriteOnce", "Effect": "Deny",
        "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"], "Resource": res(&["audit/*"])}));
    json!({"Version": "2012-10-17", "Statement": st})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statements(v: &Value) -> &Vec<Value> {
        v["Statement"].as_array().unwrap()
    }

    fn allows(v: &Value, action: &str, resource: &str) -> bool {
        let matches = |pat: &str| {
            pat == resource
                || pat
                    .strip_suffix('*')
                    .is_some_and(|p| resource.starts_with(p))
        };
        let hit = |s: &Value, key: &str| {
            s[key]
                .as_array()
                .is_some_and(|a| a.iter().any(|r| matches(r.as_str().unwrap())))
        };
        let mut allowed = false;
        for s in statements(v) {
            if !s["Action"].as_array().unwrap().iter().any(|a| a == action) {
                continue;
            }
            let applies = if s.get("NotResource").is_some() {
                !hit(s, "NotResource")
            } else {
                hit(s, "Resource")
            };
            if applies && s["Effect"] == "Deny" {
                return false;
            }
            allowed |= applies && s["Effect"] == "Allow";
        }
        allowed
    }

    #[test]
    fn roles_are_enforced_by_the_policy() {
        let b = policy("backup", "bk", "prod/db", false);
        let pack = "arn:aws:s3:::bk/prod/db/data/ab/abcd";
        let snap = "arn:aws:s3:::bk/prod/db/snapshots/ff";
        let trail = "arn:aws:s3:::bk/prod/db/audit/0000000000000001";
        assert!(allows(&b, "s3:PutObject", pack));
        assert!(!allows(&b, "s3:GetObject", pack));
        assert!(!allows(&b, "s3:DeleteObject", snap));
        assert!(allows(
            &b,
            "s3:DeleteObject",
            "arn:aws:s3:::bk/prod/db/locks/1"
        ));
        let r = policy("restore", "bk", "prod/db", false);
        assert!(allows(&r, "s3:GetObject", pack));
        assert!(!allows(&r, "s3:DeleteObject", pack));
        let rd = policy("restore", "bk", "prod/db", true);
        assert!(allows(&rd, "s3:DeleteObject", pack));
        assert!(!allows(&rd, "s3:DeleteObject", trail));
        let a = policy("audit", "bk", "prod/db", false);
        assert!(allows(&a, "s3:GetObject", trail));
        assert!(allows(&a, "s3:GetObject", snap));
        assert!(!allows(&a, "s3:GetObject", pack));
        assert!(!allows(&a, "s3:PutObject", pack));
        assert!(!allows(&a, "s3:DeleteObject", trail));
    }
}
