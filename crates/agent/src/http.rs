//! The agent's HTTP endpoints (hyper, HTTP/1.1): `/metrics`, `/healthz`, `/readyz` and the
//! status page at `/`. On a loopback address they are open; on any other address every
//! request needs `Authorization: Bearer <token>` (the CLI refuses to listen beyond the
//! loopback without a token), except `/healthz` and `/readyz`, which say only whether
//! the agent is up and ready. Only GET and HEAD; nothing writes.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};

use crate::observe::RepoHandle;
use crate::Shared;

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff")
        .header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
        )
        .body(Full::new(body.into()))
        .expect("a valid response")
}

/// Constant-time comparison of the presented token with the configured one.
fn token_ok(req: &Request<hyper::body::Incoming>, token: &str) -> bool {
    let Some(h) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = h.strip_prefix("Bearer ") else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Mutex<Shared>>,
    repo: Arc<RepoHandle>,
) -> Result<Resp, Infallible> {
    let (token, loopback) = {
        let s = shared.lock().unwrap();
        (s.cfg.token.clone(), s.cfg.listen.ip().is_loopback())
    };
    // Health and readiness say only ok or not: open to the kubelet's probes. The page
    // and the metrics need the token beyond the loopback.
    let open = matches!(req.uri().path(), "/healthz" | "/readyz");
    if !open && (!loopback || token.is_some()) && !token.as_ref().is_some_and(|t| token_ok(&req, t))
    {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain; charset=utf-8",
            "a bearer token is needed\n",
        );
        r.headers_mut().insert(
            "www-authenticate",
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return Ok(r);
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n",
        ));
    }
    let now = {
        let s = shared.lock().unwrap();
        if s.simulated {
            s.now
        } else {
            chrono::Utc::now()
        }
    };
    Ok(match req.uri().path() {
        "/metrics" => {
            let body = crate::metrics::render(&shared.lock().unwrap(), now);
            let open = req
                .headers()
                .get("accept")
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            if open {
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                )
            } else {
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    crate::metrics::to_classic(&body),
                )
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => {
            let (jobs, repo_err, stopping) = {
                let s = shared.lock().unwrap();
                (s.cfg.jobs.len(), s.observed.repo_error.clone(), s.stopping)
            };
            // Reachable now: the open repository's config object can be read.
            let reach = tokio::task::spawn_blocking(move || {
                repo.get()
                    .and_then(|r| custos_repo::Repository::read_config(&r.storage).map(|_| ()))
            })
            .await;
            match (reach, repo_err, stopping) {
                (_, _, true) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "stopping\n",
                ),
                (Ok(Ok(())), _, false) => reply(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    format!("ready: repository reachable, {jobs} job(s) scheduled\n"),
                ),
                (Ok(Err(e)), _, _) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!(
                        "not ready: the repository cannot be reached (E{:02} {})\n",
                        e.kind.code(),
                        e.kind.name()
                    ),
                ),
                (Err(_), _, _) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "not ready\n",
                ),
            }
        }
        "/" | "/index.html" => {
            let body = crate::page::status_html(&shared.lock().unwrap(), now);
            reply(StatusCode::OK, "text/html; charset=utf-8", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: /, /metrics, /healthz, /readyz\n",
        ),
    })
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Mutex<Shared>>,
    repo: Arc<RepoHandle>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (shared, repo) = (shared.clone(), repo.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc =
                hyper::service::service_fn(move |req| handle(req, shared.clone(), repo.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, svc)
                .await;
        });
    }
}
