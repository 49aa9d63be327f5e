//! ferry-bench's own tokio load generator and echo servers. Every loop is bounded by
//! a count and a deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

pub const MSG: usize = 64;

/// TCP echo server: every connection gets back whatever it sends, until EOF.
pub async fn tcp_echo_server(addr: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// UDP echo server.
pub async fn udp_echo_server(addr: SocketAddr) -> Result<()> {
    let s = UdpSocket::bind(addr).await?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, peer) = s.recv_from(&mut buf).await?;
        let _ = s.send_to(&buf[..n], peer).await;
    }
}

/// Request/response over one persistent connection: RTTs in µs.
pub async fn tcp_rr(target: SocketAddr, dur: Duration, max: usize) -> Result<Vec<f64>> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target))
        .await
        .context("connect timed out")??;
    s.set_nodelay(true)?;
    let req = [7u8; MSG];
    let mut resp = [0u8; MSG];
    let mut out = Vec::with_capacity(max.min(200_000));
    // Warm-up.
    for _ in 0..100 {
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
    }
    let deadline = Instant::now() + dur;
    while out.len() < max && Instant::now() < deadline {
        let t = Instant::now();
        s.write_all(&req).await?;
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut resp))
            .await
            .context("response timed out")??;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// New connections per second: `conc` tasks each connect, send one request, read
/// the response and close. Returns (completed, errors, seconds).
pub async fn tcp_crr(
    target: SocketAddr,
    conc: usize,
    dur: Duration,
    max: usize,
) -> Result<(usize, usize, f64)> {
    let done = Arc::new(AtomicUsize::new(0));
    let errs = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (done, errs) = (done.clone(), errs.clone());
        tasks.push(tokio::spawn(async move {
            let req = [9u8; MSG];
            let mut resp = [0u8; MSG];
            while Instant::now() < deadline && done.load(Ordering::Relaxed) < max {
                let one = async {
                    let sock = TcpSocket::new_v4()?;
                    let mut s = sock.connect(target).await?;
                    s.set_nodelay(true)?;
                    s.write_all(&req).await?;
                    s.read_exact(&mut resp).await?;
                    anyhow::Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(1), one).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => errs.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok((
        done.load(Ordering::Relaxed),
        errs.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
    ))
}

/// UDP request/response rate: `conc` sockets each send one datagram and wait for the
/// reply (100 ms timeout counts as lost). Returns (replies, lost, seconds).
pub async fn udp_rr(
    target: SocketAddr,
    conc: usize,
    dur: Duration,
    max: usize,
) -> Result<(usize, usize, f64)> {
    let done = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (done, lost) = (done.clone(), lost.clone());
        let s = UdpSocket::bind("0.0.0.0:0").await?;
        s.connect(target).await?;
        tasks.push(tokio::spawn(async move {
            let req = [5u8; MSG];
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline && done.load(Ordering::Relaxed) < max {
                if s.send(&req).await.is_err() {
                    lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match tokio::time::timeout(Duration::from_millis(100), s.recv(&mut buf)).await {
                    Ok(Ok(_)) => done.fetch_add(1, Ordering::Relaxed),
                    _ => lost.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok((
        done.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
    ))
}

/// One TCP request/response, to check a path works.
pub async fn tcp_ping(target: SocketAddr) -> Result<()> {
    let mut s = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(target))
        .await
        .context("connect timed out")??;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut b))
        .await
        .context("no reply")??;
    anyhow::ensure!(&b == b"ping", "wrong reply");
    Ok(())
}
