//! Faults the real S3 server cannot produce on demand, from a proxy in front of SeaweedFS
//! that forwards every request byte for byte (signatures stay valid: the Host the client
//! signed is the Host SeaweedFS reads):
//! - archived (GLACIER) objects: under an archived prefix a GET is refused as S3 refuses an
//!   archived object (403 InvalidObjectState), a HEAD says `x-amz-storage-class: GLACIER`
//!   and the restore's state, and POST ?restore records a restore request;
//!   [`S3Proxy::finish_restores`] plays the hours of a retrieval;
//! - a throttling or flaky store ([`S3Proxy::faults`]): chosen writes answered `503
//!   SlowDown`, cut off half-way through their body, or carried out with the answer lost
//!   (the object stored, the client never told).

use std::collections::{BTreeSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What the proxy does to one write (PUT or POST).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answered `503 Slow Down` (S3's throttling) without reaching the store.
    SlowDown,
    /// Half the body read, then the connection closed: the store never sees the request.
    DropRequest,
    /// Forwarded whole and carried out by the store, then the connection closed before
    /// the answer: the client cannot know it succeeded.
    DropResponse,
}

#[derive(Default)]
struct State {
    /// Faults for the writes to come: every `every`-th write of an object not faulted
    /// before takes the next one in turn.
    faults: VecDeque<Fault>,
    every: usize,
    writes: usize,
    faulted: BTreeSet<String>,
    /// Only writes under this URL path prefix meet faults.
    only: String,
    /// Every write answered `503 Slow Down`.
    throttle: bool,
    /// Faults dealt so far, in order, with the URL path (`/bucket/key`) each met.
    dealt: Vec<(Fault, String)>,
    archived: Vec<String>,
    /// Objects written with the archival tag, as a lifecycle rule's tag filter sees them.
    tagged: BTreeSet<String>,
    requested: BTreeSet<String>,
    ready: BTreeSet<String>,
}

pub struct S3Proxy {
    /// `http://127.0.0.1:PORT`: use it as the S3 endpoint.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl S3Proxy {
    /// A proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> S3Proxy {
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
        S3Proxy { endpoint, state }
    }

    /// From now on every `every`-th write (PUT or POST) meets the next of `faults`, in
    /// turn, until they are used up; an object meets one fault of a call at most, so its
    /// retry passes.
    pub fn faults(&self, every: usize, faults: &[Fault]) {
        self.faults_on("", every, faults)
    }

    /// As [`S3Proxy::faults`], for writes whose URL path (`/bucket/key`) starts with
    /// `prefix` only.
    pub fn faults_on(&self, prefix: &str, every: usize, faults: &[Fault]) {
        let mut s = self.state.lock().unwrap();
        s.only = prefix.to_string();
        s.faulted.clear();
        s.every = every.max(1);
        s.writes = 0;
        s.faults = faults.iter().copied().collect();
    }

    /// While on, every write is answered `503 Slow Down`.
    pub fn throttle(&self, on: bool) {
        self.state.lock().unwrap().throttle = on;
    }

    /// The faults dealt so far, in order, with the URL path (`/bucket/key`) each met.
    pub fn dealt(&self) -> Vec<(Fault, String)> {
        self.state.lock().unwrap().dealt.clone()
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
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let fault = if method == "PUT" || method == "POST" {
            let mut s = state.lock().unwrap();
            if s.throttle {
                Some(Fault::SlowDown)
            } else if s.faulted.contains(path) || !path.starts_with(s.only.as_str()) {
                None
            } else {
                s.writes += 1;
                let f = if s.writes.is_multiple_of(s.every.max(1)) {
                    s.faults.pop_front()
                } else {
                    None
                };
                if let Some(f) = f {
                    s.dealt.push((f, path.to_string()));
                    s.faulted.insert(path.to_string());
                }
                f
            }
        } else {
            None
        };
        if fault == Some(Fault::DropRequest) {
            let mut half = vec![0; len / 2];
            r.read_exact(&mut half)?;
            return Ok(());
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        if fault == Some(Fault::SlowDown) {
            respond(&mut out, "503 Slow Down", &[("content-type", "application/xml")],
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")?;
            continue;
        }
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
        if fault == Some(Fault::DropResponse) {
            return Ok(());
        }
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
