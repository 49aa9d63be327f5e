//! Container output: one file per container instance under the pod's
//! directory (`logs/<container>/<restartCount>.log`, rotated by copy and
//! truncate to `<n>.log.1`), and the HTTP server the API server proxies
//! `kubectl logs` to: `GET /containerLogs/{namespace}/{pod}/{container}`
//! with `follow`, `tailLines`, `previous`, `limitBytes`; plus `/healthz`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};

/// Files kept beside the current one: the previous instance's log.
pub fn log_path(pod_dir: &Path, container: &str, instance: i32) -> PathBuf {
    pod_dir
        .join("logs")
        .join(container)
        .join(format!("{instance}.log"))
}

/// Instance numbers with a log file, ascending.
pub fn instances(pod_dir: &Path, container: &str) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(pod_dir.join("logs").join(container))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Deletes the logs of instances older than `keep_from`.
pub fn prune(pod_dir: &Path, container: &str, keep_from: i32) {
    for n in instances(pod_dir, container) {
        if n < keep_from {
            let p = log_path(pod_dir, container, n);
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(p.with_extension("log.1"));
        }
    }
}

/// Copy-and-truncate rotation once the file exceeds `max` bytes (the writer
/// holds it open with O_APPEND, so it continues at the new end).
pub fn rotate_if_needed(path: &Path, max: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(_) => return Ok(false),
    };
    if len <= max {
        return Ok(false);
    }
    std::fs::copy(path, path.with_extension("log.1"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// The last `n` lines of `data`.
pub fn tail_lines(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &data[data.len()..];
    }
    let mut count = 0;
    let end = if data.ends_with(b"\n") {
        data.len() - 1
    } else {
        data.len()
    };
    for i in (0..end).rev() {
        if data[i] == b'\n' {
            count += 1;
            if count == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

/// The whole log of one instance (rotated part first).
pub fn read_instance(path: &Path) -> Vec<u8> {
    let mut out = std::fs::read(path.with_extension("log.1")).unwrap_or_default();
    out.extend(std::fs::read(path).unwrap_or_default());
    out
}

/// What the log server knows about each pod: its directory, and which
/// containers are running now (a follow ends when its container stops).
#[derive(Clone, Default)]
pub struct LogRegistry {
    inner: Arc<Mutex<HashMap<(String, String), PodLogs>>>,
}

#[derive(Clone, Debug, Default)]
pub struct PodLogs {
    pub dir: PathBuf,
    /// container → (current instance, running)
    pub containers: HashMap<String, (i32, bool)>,
}

impl LogRegistry {
    pub fn set(&self, namespace: &str, pod: &str, logs: PodLogs) {
        self.inner
            .lock()
            .unwrap()
            .insert((namespace.into(), pod.into()), logs);
    }

    pub fn remove(&self, namespace: &str, pod: &str, dir: &Path) {
        let mut m = self.inner.lock().unwrap();
        let key = (namespace.to_string(), pod.to_string());
        if m.get(&key).is_some_and(|p| p.dir == dir) {
            m.remove(&key);
        }
    }

    pub fn get(&self, namespace: &str, pod: &str) -> Option<PodLogs> {
        self.inner
            .lock()
            .unwrap()
            .get(&(namespace.into(), pod.into()))
            .cloned()
    }
}

/// Parsed query of a containerLogs request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogQuery {
    pub follow: bool,
    pub previous: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<usize>,
}

impl LogQuery {
    pub fn parse(query: &str) -> Result<LogQuery, String> {
        let mut q = LogQuery::default();
        let flag = |v: &str| v.is_empty() || v == "true" || v == "1";
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "follow" => q.follow = flag(&v),
                "previous" => q.previous = flag(&v),
                "tailLines" => {
                    let n: i64 = v.parse().map_err(|_| format!("invalid tailLines {v:?}"))?;
                    q.tail_lines = (n >= 0).then_some(n as usize);
                }
                "limitBytes" => {
                    let n: i64 = v.parse().map_err(|_| format!("invalid limitBytes {v:?}"))?;
                    if n <= 0 {
                        return Err("limitBytes must be positive".into());
                    }
                    q.limit_bytes = Some(n as usize);
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(text.into())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
    r
}

fn decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Answers one request.
pub async fn handle(reg: LogRegistry, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return full(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return full(StatusCode::OK, "ok");
    }
    let Some(rest) = path.strip_prefix("/containerLogs/") else {
        return full(StatusCode::NOT_FOUND, "404 page not found\n");
    };
    let parts: Vec<String> = rest.split('/').map(decode).collect();
    let [ns, pod, container] = parts.as_slice() else {
        return full(
            StatusCode::NOT_FOUND,
            "expected /containerLogs/{namespace}/{pod}/{container}\n",
        );
    };
    let q = match LogQuery::parse(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return full(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let Some(info) = reg.get(ns, pod) else {
        return full(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} is not on this node\n"),
        );
    };
    let Some(&(current, running)) = info.containers.get(container.as_str()) else {
        return full(
            StatusCode::NOT_FOUND,
            format!("container {container:?} is not valid for pod {pod}\n"),
        );
    };
    let have = instances(&info.dir, container);
    let instance = if q.previous {
        match have.iter().rev().find(|n| **n < current) {
            Some(n) => *n,
            None => {
                return full(
                    StatusCode::BAD_REQUEST,
                    format!(
                    "previous terminated container \"{container}\" in pod \"{pod}\" not found\n"
                ),
                )
            }
        }
    } else {
        current
    };
    let path = log_path(&info.dir, container, instance);
    let mut data = read_instance(&path);
    if let Some(n) = q.tail_lines {
        data = tail_lines(&data, n).to_vec();
    }
    if let Some(n) = q.limit_bytes {
        data.truncate(n);
    }
    if !q.follow || q.previous || !running {
        return full(StatusCode::OK, data);
    }
    // Follow: what is there, then new output until the container stops.
    let start = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let container = container.clone();
    let (ns, pod) = (ns.clone(), pod.clone());
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(Bytes::from(data)))).await.is_err() {
            return;
        }
        let mut pos = start;
        let mut idle_after_stop = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let chunk = tokio::task::spawn_blocking({
                let path = path.clone();
                move || read_from(&path, &mut pos).map(|b| (b, pos))
            })
            .await;
            let Ok(Ok((bytes, newpos))) = chunk else {
                break;
            };
            pos = newpos;
            if !bytes.is_empty() && tx.send(Ok(Frame::data(Bytes::from(bytes)))).await.is_err() {
                return;
            }
            if tx.is_closed() {
                return;
            }
            let still = reg
                .get(&ns, &pod)
                .and_then(|p| p.containers.get(&container).copied())
                .is_some_and(|(n, r)| n == instance && r);
            if !still {
                idle_after_stop += 1;
                if idle_after_stop > 2 {
                    return;
                }
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
    r
}

/// New bytes of `path` from `*pos`; after a rotation (the file shrank) the
/// rest of the rotated copy first.
fn read_from(path: &Path, pos: &mut u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len < *pos {
        if let Ok(mut f) = std::fs::File::open(path.with_extension("log.1")) {
            f.seek(SeekFrom::Start(*pos))?;
            f.read_to_end(&mut out)?;
        }
        *pos = 0;
    }
    if let Ok(mut f) = std::fs::File::open(path) {
        f.seek(SeekFrom::Start(*pos))?;
        let n = f.take(1 << 20).read_to_end(&mut out)?;
        *pos += n as u64;
    }
    Ok(out)
}

/// Serves the log endpoints on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, reg: LogRegistry) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving container logs");
    serve_on(listener, reg).await
}

pub async fn serve_on(listener: tokio::net::TcpListener, reg: LogRegistry) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("logs server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let reg = reg.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let reg = reg.clone();
                async move { Ok::<_, Infallible>(handle(reg, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("logs connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn tails() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail_lines(b"a\nb\n", 0), b"");
        assert_eq!(tail_lines(b"", 3), b"");
    }

    #[test]
    fn queries() {
        assert_eq!(
            LogQuery::parse("follow=true&tailLines=10&previous=false").unwrap(),
            LogQuery {
                follow: true,
                previous: false,
                tail_lines: Some(10),
                limit_bytes: None
            }
        );
        assert!(LogQuery::parse("tailLines=x").is_err());
        assert!(LogQuery::parse("limitBytes=0").is_err());
        assert_eq!(LogQuery::parse("tailLines=-1").unwrap().tail_lines, None);
    }

    #[test]
    fn rotation_and_instances() {
        let d = tempfile::tempdir().unwrap();
        let p0 = log_path(d.path(), "c", 0);
        std::fs::create_dir_all(p0.parent().unwrap()).unwrap();
        std::fs::write(&p0, b"0123456789\n").unwrap();
        assert!(!rotate_if_needed(&p0, 100).unwrap());
        assert!(rotate_if_needed(&p0, 5).unwrap());
        assert_eq!(std::fs::read(&p0).unwrap(), b"");
        std::fs::write(&p0, b"more\n").unwrap();
        assert_eq!(read_instance(&p0), b"0123456789\nmore\n");
        std::fs::write(log_path(d.path(), "c", 1), b"one\n").unwrap();
        std::fs::write(log_path(d.path(), "c", 2), b"two\n").unwrap();
        assert_eq!(instances(d.path(), "c"), [0, 1, 2]);
        prune(d.path(), "c", 1);
        assert_eq!(instances(d.path(), "c"), [1, 2]);
        assert!(!p0.with_extension("log.1").exists());
        let mut pos = 3;
        std::fs::write(log_path(d.path(), "c", 1), b"one-two\n").unwrap();
        assert_eq!(
            read_from(&log_path(d.path(), "c", 1), &mut pos).unwrap(),
            b"-two\n"
        );
        assert_eq!(pos, 8);
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let code = crate::probe::status_code(text.as_bytes()).unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    #[tokio::test]
    async fn server_answers_logs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("logs/app")).unwrap();
        std::fs::write(log_path(d.path(), "app", 0), b"old1\nold2\n").unwrap();
        std::fs::write(log_path(d.path(), "app", 1), b"l1\nl2\nl3\n").unwrap();
        let reg = LogRegistry::default();
        reg.set(
            "default",
            "web",
            PodLogs {
                dir: d.path().into(),
                containers: [("app".to_string(), (1, true))].into(),
            },
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_on(l, reg.clone()));
        assert_eq!(get(addr, "/healthz").await, (200, "ok".into()));
        assert_eq!(
            get(addr, "/containerLogs/default/web/app").await.1,
            "l1\nl2\nl3\n"
        );
        assert_eq!(
            get(addr, "/containerLogs/default/web/app?tailLines=1")
                .await
                .1,
            "l3\n"
        );
        assert_eq!(
            get(addr, "/containerLogs/default/web/app?previous=true")
                .await
                .1,
            "old1\nold2\n"
        );
        assert_eq!(get(addr, "/containerLogs/default/web/nope").await.0, 404);
        assert_eq!(get(addr, "/containerLogs/default/other/app").await.0, 404);
        assert_eq!(get(addr, "/nope").await.0, 404);
        // follow: existing output, appended output, then the end when the container stops.
        let reg2 = reg.clone();
        let dir = d.path().to_path_buf();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(log_path(&dir, "app", 1))
                .unwrap();
            f.write_all(b"l4\n").unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            reg2.set(
                "default",
                "web",
                PodLogs {
                    dir,
                    containers: [("app".to_string(), (1, false))].into(),
                },
            );
        });
        let (code, body) = get(
            addr,
            "/containerLogs/default/web/app?follow=true&tailLines=1",
        )
        .await;
        assert_eq!(code, 200);
        assert!(
            body.contains("l3\n") && body.contains("l4\n") && !body.contains("l2"),
            "{body:?}"
        );
    }
}
