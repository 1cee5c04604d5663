//! Repository locations: a local path (the default), `s3://bucket/prefix`, or
//! `<scheme>://` for another OpenDAL service configured in custos.toml.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use custos_model::{Error, Result};

use crate::local::LocalStorage;
use crate::remote::{RemoteStorage, S3Options};
use crate::DynStorage;

#[derive(Debug, Clone)]
pub enum Location {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
    Service { scheme: String, root: String },
}

impl Location {
    pub fn parse(url: &str) -> Result<Location> {
        if url.is_empty() {
            return Err(Error::config("the repository location is empty"));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::config(format!(
                    "`{url}` names no bucket; use s3://BUCKET/PREFIX"
                )));
            }
            // S3's rule; a store handed another name may misbehave quietly (SeaweedFS
            // accepted writes into a two-letter bucket that listings never showed).
            let ok_char =
                |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
            let ends_ok =
                |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !(3..=63).contains(&bucket.len())
                || !bucket.chars().all(ok_char)
                || !ends_ok(bucket.chars().next())
                || !ends_ok(bucket.chars().last())
            {
                return Err(Error::config(format!(
                    "`{bucket}` in `{url}` is not a valid S3 bucket name"
                ))
                .hint("bucket names are 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"));
            }
            return Ok(Location::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        if let Some(rest) = url.strip_prefix("file://") {
            return Ok(Location::Local(PathBuf::from(rest)));
        }
        if let Some((scheme, rest)) = url.split_once("://") {
            return Ok(Location::Service {
                scheme: scheme.into(),
                root: rest.into(),
            });
        }
        Ok(Location::Local(PathBuf::from(url)))
    }
}

/// Everything needed to open a location; filled by the CLI from config and environment.
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    pub s3: S3Options,
    /// Extra options for other OpenDAL services (`[storage.options]` in custos.toml).
    pub service: HashMap<String, String>,
    /// How long to wait for an object store ([storage] in custos.toml).
    pub timeouts: crate::remote::Timeouts,
    /// Vercel Blob's token (BLOB_READ_WRITE_TOKEN); never from a file.
    pub vercel_token: Option<String>,
    /// Object Lock ([object_lock] in custos.toml): S3 only.
    pub object_lock: Option<crate::objectlock::WriteLock>,
}

pub fn open(loc: &Location, opts: &StorageOptions) -> Result<DynStorage> {
    Ok(match loc {
        Location::Local(p) => Arc::new(LocalStorage::new(p.clone())),
        Location::S3 { bucket, prefix } => {
            let mut o = opts.s3.clone();
            o.timeouts = opts.timeouts;
            o.bucket = bucket.clone();
            o.root = prefix.clone();
            let s = RemoteStorage::s3(&o)?;
            match &opts.object_lock {
                Some(w) => Arc::new(s.with_object_lock(&o, w.clone())?),
                None => Arc::new(s),
            }
        }
        _ if opts.object_lock.is_some() => {
            return Err(Error::config(
                "[object_lock] is set in custos.toml but the repository is not on S3",
            )
            .hint("Object Lock is an S3 feature: put the repository in an s3:// bucket created with Object Lock, or remove [object_lock]"))
        }
        Location::Service { scheme, root } if scheme == "vercel_blob" => {
            Arc::new(crate::vercel::VercelBlob::new(
                opts.service.get("vercel_blob_api").map(String::as_str),
                opts.vercel_token.as_deref(),
                root,
                opts.timeouts,
            )?)
        }
        Location::Service { scheme, root } => {
            let mut o = opts.service.clone();
            o.entry("root".into()).or_insert_with(|| root.clone());
            Arc::new(RemoteStorage::service(scheme, o, opts.timeouts)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_locations() {
        assert!(matches!(
            Location::parse("/var/backups/repo").unwrap(),
            Location::Local(_)
        ));
        match Location::parse("s3://bucket/a/b/").unwrap() {
            Location::S3 { bucket, prefix } => {
                assert_eq!((bucket.as_str(), prefix.as_str()), ("bucket", "a/b"))
            }
            other => panic!("{other:?}"),
        }
        assert!(Location::parse("s3:///x").is_err());
        for bad in [
            "s3://dr/x",
            "s3://Backups/x",
            "s3://-bucket/x",
            "s3://bucket_1/x",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
        assert!(Location::parse("s3://dr-site.backups/x").is_ok());
        assert!(matches!(
            Location::parse("vercel_blob://docs").unwrap(),
            Location::Service { .. }
        ));
    }
}
