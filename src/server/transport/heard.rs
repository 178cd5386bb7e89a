//! What a connection has heard from its peer: whether its HTTP/2 preface has arrived, and when
//! it last sent anything, seen from the bytes hyper reads.
//!
//! hyper exposes neither. A peer that connects and sends nothing (or less than the 24-byte
//! preface) would hold its descriptor, its slot and the shutdown drain forever; one that stops
//! answering after GOAWAY would hold the drain too. The stream is wrapped to count what is read
//! until the preface length is reached (h2 itself checks the bytes) and to note the time of
//! every read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`: what a client sends first.
const PREFACE_LEN: usize = 24;

/// A connection's stream, noting what is read from it.
#[derive(Debug)]
pub(super) struct Listened {
    stream: TcpStream,
    read: usize,
    heard: Arc<Heard>,
}

/// What the connection's task can ask about its peer.
#[derive(Debug)]
pub(super) struct Heard {
    preface: AtomicBool,
    opened: Instant,
    /// When bytes were last read, in ms since `opened`.
    last_read_ms: AtomicU64,
}

impl Listened {
    pub(super) fn new(stream: TcpStream) -> (Self, Arc<Heard>) {
        let heard = Arc::new(Heard {
            preface: AtomicBool::new(false),
            opened: Instant::now(),
            last_read_ms: AtomicU64::new(0),
        });
        let listened = Self {
            stream,
            read: 0,
            heard: heard.clone(),
        };
        (listened, heard)
    }
}

impl Heard {
    pub(super) fn preface_arrived(&self) -> bool {
        self.preface.load(Ordering::Acquire)
    }

    /// Completes if the preface has not arrived `within` from now; never otherwise.
    pub(super) async fn preface_missed(&self, within: Duration) {
        tokio::time::sleep(within).await;
        if self.preface_arrived() {
            std::future::pending::<()>().await;
        }
    }

    /// When the peer last sent something (the opening of the connection if never).
    pub(super) fn last_read(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_read_ms.load(Ordering::Acquire))
    }
}

impl AsyncRead for Listened {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let ms = u64::try_from(self.heard.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.heard.last_read_ms.store(ms, Ordering::Release);
            if self.read < PREFACE_LEN {
                self.read += n;
                if self.read >= PREFACE_LEN {
                    self.heard.preface.store(true, Ordering::Release);
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Listened {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
