//! A fault the real S3 server cannot produce on demand: archived (GLACIER) objects. A
//! proxy in front of SeaweedFS that forwards every request byte for byte (signatures
//! stay valid: the Host the client signed is the Host SeaweedFS reads), except for objects
//! under an archived prefix: their GET is refused as S3 refuses an archived object (403
//! InvalidObjectState), their HEAD says `x-amz-storage-class: GLACIER` and the restore's
//! state, and POST ?restore records a restore request. [`ColdProxy::finish_restores`]
//! plays the hours of a retrieval.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    archived: Vec<String>,
    /// Objects written with the archival tag, as a lifecycle rule's tag filter sees them.
    tagged: BTreeSet<String>,
    requested: BTreeSet<String>,
    ready: BTreeSet<String>,
}

pub struct ColdProxy {
    /// `http://127.0.0.1:PORT`: use it as the S3 endpoint.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl ColdProxy {
    /// A proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> ColdProxy {
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state: Arc<Mutex<State>> = Default::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (st, up) = (st.clone(), up.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &up, &st);
                });
            }
        });
        ColdProxy { endpoint, state }
    }

    /// Objects whose URL path (`/bucket/key`) starts with `prefix` (ending in `/`), or is
    /// it, are archived from now.
    pub fn archive(&self, prefix: &str) {
        self.state.lock().unwrap().archived.push(prefix.to_string());
    }

    /// Archives exactly the objects written with `x-amz-tagging` holding `tag` (what a
    /// lifecycle rule filtering on that tag moves); returns how many.
    pub fn archive_tagged(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        let t: Vec<String> = s.tagged.iter().cloned().collect();
        s.archived.extend(t.iter().cloned());
        t.len()
    }

    /// The URL paths written with the tag.
    pub fn tagged(&self) -> Vec<String> {
        self.state.lock().unwrap().tagged.iter().cloned().collect()
    }

    /// The URL paths a restore was requested for, in order.
    pub fn requested(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requested
            .iter()
            .cloned()
            .collect()
    }

    /// Every requested restore completes: those objects read again.
    pub fn finish_restores(&self) {
        let mut s = self.state.lock().unwrap();
        let done: Vec<String> = std::mem::take(&mut s.requested).into_iter().collect();
        s.ready.extend(done);
    }
}

fn respond(
    c: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let mut r = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    c.write_all(r.as_bytes())
}

fn serve(conn: TcpStream, upstream: &str, state: &Mutex<State>) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut head = vec![];
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let end = line == "\r\n";
            head.push(line);
            if end {
                break;
            }
        }
        let first: Vec<String> = head[0].split_whitespace().map(String::from).collect();
        let (method, target) = (first[0].clone(), first[1].clone());
        let len: usize = head
            .iter()
            .find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let tagged = head.iter().any(|h| {
            h.to_ascii_lowercase().starts_with("x-amz-tagging:")
                && h.contains("custos-tier=archival")
        });
        if method == "PUT" && tagged {
            state.lock().unwrap().tagged.insert(path.to_string());
        }
        let (archived, requested, ready) = {
            let s = state.lock().unwrap();
            (
                s.archived
                    .iter()
                    .any(|p| path == p || p.ends_with('/') && path.starts_with(p.as_str())),
                s.requested.contains(path),
                s.ready.contains(path),
            )
        };
        if archived && !ready {
            match method.as_str() {
                "GET" if !query.contains("retention") => {
                    respond(&mut out, "403 Forbidden", &[("content-type", "application/xml")],
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InvalidObjectState</Code><Message>The operation is not valid for the object's storage class</Message></Error>")?;
                    continue;
                }
                "POST" if query.contains("restore") => {
                    if requested {
                        respond(&mut out, "409 Conflict", &[("content-type", "application/xml")],
                            "<Error><Code>RestoreAlreadyInProgress</Code><Message>Object restore is already in progress</Message></Error>")?;
                    } else {
                        state.lock().unwrap().requested.insert(path.to_string());
                        respond(&mut out, "202 Accepted", &[], "")?;
                    }
                    continue;
                }
                _ => {}
            }
        }
        // Forwarded as it came, on a connection of its own that the server closes.
        let mut up = TcpStream::connect(upstream)?;
        for h in &head {
            if h == "\r\n" {
                up.write_all(b"connection: close\r\n\r\n")?;
            } else if !h.to_ascii_lowercase().starts_with("connection:") {
                up.write_all(h.as_bytes())?;
            }
        }
        up.write_all(&body)?;
        let mut resp = vec![];
        up.read_to_end(&mut resp)?;
        // The server closed its side: the client is told this connection ends too.
        let end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(resp.len(), |e| e + 2);
        let head_text = String::from_utf8_lossy(&resp[..end]).into_owned();
        let kept: String = head_text
            .split_inclusive("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect();
        let mut resp = [kept.as_bytes(), b"connection: close\r\n", &resp[end..]].concat();
        if archived && method == "HEAD" {
            let at = resp.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
            let restore = if ready {
                "x-amz-restore: ongoing-request=\"false\", expiry-date=\"Fri, 01 Jan 2100 00:00:00 GMT\"\r\n"
            } else if requested {
                "x-amz-restore: ongoing-request=\"true\"\r\n"
            } else {
                ""
            };
            let extra = format!("x-amz-storage-class: GLACIER\r\n{restore}");
            resp.splice(at..at, extra.into_bytes());
        }
        out.write_all(&resp)?;
        return Ok(());
    }
}
