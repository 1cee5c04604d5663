//! Vercel Blob, read as a backup source (`backup files vercel_blob://PREFIX`), through its
//! documented HTTP API: `GET /?prefix=&limit=&cursor=` lists blobs a page at a time (each
//! with its `pathname`, `size` and download `url`), and a blob's bytes come from its
//! `url`. The token goes in the `Authorization` header of API requests only, never to a
//! download URL (which a listing names and could point anywhere).
//!
//! OpenDAL's `vercel_blob` service is not used: in 0.54 its lister never sends the cursor
//! back (a store of more than one page lists its first page forever) and its endpoint
//! cannot be changed. Writing is not supported: Vercel Blob is a source, not a repository.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use custos_model::{Error, Kind, Result};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{Entry, PutMode, PutOutcome, Storage};

/// The API's address unless `vercel_blob_api` says otherwise.
pub const DEFAULT_API: &str = "https://blob.vercel-storage.com";

pub struct VercelBlob {
    api: String,
    token: Zeroizing<String>,
    prefix: String,
    client: reqwest::blocking::Client,
    /// Download URLs from the last listing, by path relative to `prefix`.
    urls: Mutex<HashMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    has_more: bool,
    blobs: Vec<Blob>,
}

#[derive(Deserialize)]
struct Blob {
    url: String,
    pathname: String,
    size: u64,
}

impl VercelBlob {
    pub fn new(
        api: Option<&str>,
        token: Option<&str>,
        prefix: &str,
        timeouts: crate::remote::Timeouts,
    ) -> Result<VercelBlob> {
        let token = token.ok_or_else(|| {
            Error::config("reading Vercel Blob needs its token in BLOB_READ_WRITE_TOKEN")
                .hint("set BLOB_READ_WRITE_TOKEN (the store's read-write token from the Vercel dashboard) in the environment, never in a file custos reads")
        })?;
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.io.max(Duration::from_secs(60)))
            .build()
            .map_err(|e| Error::internal(format!("cannot build the HTTP client: {e}")))?;
        Ok(VercelBlob {
            api: api.unwrap_or(DEFAULT_API).trim_end_matches('/').to_string(),
            token: Zeroizing::new(token.to_string()),
            prefix: prefix.trim_matches('/').to_string(),
            client,
            urls: Mutex::new(HashMap::new()),
        })
    }

    fn full(&self, path: &str) -> String {
        let p = path.trim_start_matches('/');
        if self.prefix.is_empty() {
            p.to_string()
        } else if p.is_empty() {
            format!("{}/", self.prefix)
        } else {
            format!("{}/{p}", self.prefix)
        }
    }

    fn relative<'a>(&self, pathname: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            pathname
        } else {
            pathname
                .strip_prefix(&self.prefix)
                .map(|p| p.trim_start_matches('/'))
                .unwrap_or(pathname)
        }
    }

    fn page(&self, prefix: &str, cursor: Option<&str>) -> Result<Page> {
        let mut req = self
            .client
            .get(format!("{}/", self.api))
            .query(&[("prefix", prefix), ("limit", "1000")])
            .bearer_auth(self.token.as_str());
        if let Some(c) = cursor {
            req = req.query(&[("cursor", c)]);
        }
        let resp = req.send().map_err(|e| {
            Error::new(
                Kind::Storage,
                format!(
                    "cannot reach Vercel Blob at {}: {}",
                    self.api,
                    e.without_url()
                ),
            )
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::FORBIDDEN || status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Error::new(
                Kind::Authentication,
                format!("Vercel Blob refused the token ({status})"),
            )
            .hint("check BLOB_READ_WRITE_TOKEN: it must be the read-write token of this store"));
        }
        if !status.is_success() {
            return Err(Error::new(
                Kind::Storage,
                format!("Vercel Blob answered {status} to a listing"),
            ));
        }
        let body = resp.bytes().map_err(|e| {
            Error::new(
                Kind::Storage,
                format!("reading Vercel Blob's listing: {}", e.without_url()),
            )
        })?;
        serde_json::from_slice::<Page>(&body).map_err(|e| {
            Error::new(
                Kind::Storage,
                format!("Vercel Blob's listing is not what its API documents: {e}"),
            )
        })
    }

    fn list_all(&self, prefix: &str) -> Result<Vec<Blob>> {
        let mut out = vec![];
        let mut cursor: Option<String> = None;
        loop {
            let page = self.page(prefix, cursor.as_deref())?;
            out.extend(page.blobs);
            match page.cursor {
                Some(c) if page.has_more => {
                    if cursor.as_deref() == Some(c.as_str()) {
                        return Err(Error::new(
                            Kind::Storage,
                            "Vercel Blob returned the same cursor twice: the listing does not advance",
                        ));
                    }
                    cursor = Some(c);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    fn url_of(&self, path: &str) -> Result<String> {
        if let Some(u) = self.urls.lock().unwrap().get(path) {
            return Ok(u.clone());
        }
        let full = self.full(path);
        self.list_all(&full)?
            .into_iter()
            .find(|b| b.pathname == full)
            .map(|b| b.url)
            .ok_or_else(|| Error::new(Kind::NotFound, format!("no blob {full} in Vercel Blob")))
    }
}

fn read_only() -> Error {
    Error::config("Vercel Blob is read as a backup source only; a repository cannot be kept there")
}

impl Storage for VercelBlob {
    fn location(&self) -> String {
        format!("vercel_blob://{}", self.prefix)
    }

    fn put(&self, _: &str, _: &[u8], _: PutMode) -> Result<PutOutcome> {
        Err(read_only())
    }

    fn get(&self, path: &str) -> Result<Vec<u8>> {
        let url = self.url_of(path)?;
        // No Authorization header: the URL came from a listing and is not the API.
        let resp = self.client.get(&url).send().map_err(|e| {
            Error::new(
                Kind::Storage,
                format!("downloading {path} from Vercel Blob: {}", e.without_url()),
            )
        })?;
        match resp.status() {
            s if s.is_success() => resp.bytes().map(|b| b.to_vec()).map_err(|e| {
                Error::new(
                    Kind::Storage,
                    format!("downloading {path}: {}", e.without_url()),
                )
            }),
            reqwest::StatusCode::NOT_FOUND => Err(Error::new(
                Kind::NotFound,
                format!("{path} was deleted from Vercel Blob after it was listed"),
            )),
            s => Err(Error::new(
                Kind::Storage,
                format!("Vercel Blob answered {s} to downloading {path}"),
            )),
        }
    }

    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let all = self.get(path)?;
        let start = (offset as usize).min(all.len());
        let end = (start + len as usize).min(all.len());
        Ok(all[start..end].to_vec())
    }

    fn size(&self, path: &str) -> Result<Option<u64>> {
        let full = self.full(path);
        Ok(self
            .list_all(&full)?
            .into_iter()
            .find(|b| b.pathname == full)
            .map(|b| b.size))
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let blobs = self.list_all(&self.full(dir))?;
        let mut urls = self.urls.lock().unwrap();
        let mut out = vec![];
        for b in blobs {
            if b.pathname.ends_with('/') {
                continue;
            }
            let rel = self.relative(&b.pathname).to_string();
            urls.insert(rel.clone(), b.url);
            out.push(Entry {
                path: rel,
                size: b.size,
                modified: None,
                md5: None,
            });
        }
        Ok(out)
    }

    fn delete(&self, _: &str) -> Result<()> {
        Err(read_only())
    }
}
