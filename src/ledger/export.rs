//! The Admin `Export` call: an export written on a blocking thread (the store's reads and JSON
//! are synchronous work) into a bounded channel of chunks that the response streams.
//!
//! Bounded: at most [`CHANNEL_CHUNKS`] chunks of about [`CHUNK_BYTES`] wait for a slow client;
//! past that the export waits (and its reader keeps what the writer overwrites meanwhile, up to
//! its own bound). A client that goes away ends the export at its next chunk.

use std::io::{self, Write};

use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::ledger::LocalLedger;
use crate::proto::ExportChunk;
use crate::store::export::{write_export, ExportError};
use crate::store::StoreError;

/// Bytes of whole lines per chunk (a chunk ends at the first line end past this).
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks waiting for the client at most.
pub const CHANNEL_CHUNKS: usize = 4;

/// What the response streams.
pub type ExportChunks = tokio_stream::wrappers::ReceiverStream<Result<ExportChunk, Status>>;

/// Buffers the export and sends it in chunks of whole lines.
struct ChunkSink {
    tx: mpsc::Sender<Result<ExportChunk, Status>>,
    buf: Vec<u8>,
}

impl ChunkSink {
    fn send(&mut self, upto: usize) -> io::Result<()> {
        let rest = self.buf.split_off(upto);
        let data = std::mem::replace(&mut self.buf, rest);
        self.tx
            .blocking_send(Ok(ExportChunk { data }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            if let Some(end) = self.buf.iter().rposition(|&b| b == b'\n') {
                self.send(end + 1)?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send(self.buf.len())?;
        }
        Ok(())
    }
}

/// The status of a failed export.
fn status(e: &ExportError) -> Status {
    let code = match e {
        ExportError::Store(StoreError::ReadBusy) => Code::Aborted,
        ExportError::Store(StoreError::ReadOverflow(_)) => Code::ResourceExhausted,
        ExportError::Store(StoreError::Corrupt { .. } | StoreError::ReadInconsistent { .. }) => {
            Code::DataLoss
        }
        ExportError::Store(_) | ExportError::Io(_) => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

/// Start streaming an export of `ledger`'s store. The reader is started on a blocking thread:
/// a networked store connects to start one.
pub async fn start(ledger: &LocalLedger) -> Result<ExportChunks, Status> {
    let store = std::sync::Arc::clone(ledger.store());
    let mut reader = tokio::task::spawn_blocking(move || store.reader())
        .await
        .map_err(|e| Status::unavailable(format!("starting the export: {e}")))?
        .map_err(|e| status(&e.into()))?;
    let now_us = ledger.now_micros();
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let sink = ChunkSink {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK_BYTES + 4096),
        };
        match write_export(reader.as_mut(), sink, now_us) {
            Ok(summary) => tracing::info!(
                records = summary.counts.records,
                batch = ?summary.batch,
                "export streamed"
            ),
            Err(ExportError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                tracing::info!("export abandoned: the client went away");
            }
            Err(e) => {
                tracing::warn!(error = %e, "export failed");
                let _ = tx.blocking_send(Err(status(&e)));
            }
        }
    });
    Ok(ExportChunks::new(rx))
}
