//! Write one gRPC request body to a file, for HTTP/2 load tools that send the same bytes on
//! every request (h2load's `-d`). `scripts/bench.sh` makes its bodies with it.
//!
//! ```text
//! cargo run --release --example grpc_body -- --out reserve.bin reserve --subject bench \
//!     --model gpt-4o --prompt-tokens 100 --max-output-tokens 100 --hold-ms 1
//! cargo run --release --example grpc_body -- --out usage.bin get-usage --subject bench
//! cargo run --release --example grpc_body -- --out health.bin health
//! h2load -n 1000 -c 1 -m 8 -H 'content-type: application/grpc' -H 'te: trailers' \
//!     -d reserve.bin http://127.0.0.1:50051/tollgate.v1.Quota/Reserve
//! ```
//!
//! A body is one gRPC length-prefixed message: a compressed flag (0), the message's length as
//! 4 bytes big-endian, then the protobuf encoding. The messages are the crate's own generated
//! types (and tonic-health's), so a body can never drift from `proto/`.
//!
//! Every request sent from one body is identical, so a Reserve body carries no idempotency key:
//! with one, every request after the first would be a replay of it, not a decision.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use prost::Message;

use tollgate::proto::{GetUsageRequest, ReserveRequest};

/// Write one gRPC request body (length-prefixed protobuf) to a file.
#[derive(Debug, Parser)]
struct Args {
    /// Where to write the body.
    #[arg(long)]
    out: PathBuf,
    #[command(subcommand)]
    request: Request,
}

#[derive(Debug, Subcommand)]
enum Request {
    /// A `tollgate.v1.Quota/Reserve` request.
    Reserve {
        #[arg(long)]
        subject: String,
        #[arg(long, default_value = "gpt-4o")]
        model: String,
        /// The prompt as a count (leave out to send `--prompt-bytes` of text instead).
        #[arg(long, conflicts_with = "prompt_bytes")]
        prompt_tokens: Option<u64>,
        /// The prompt as this many bytes of English-like text, counted by the server.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
        prompt_bytes: Option<u32>,
        #[arg(long)]
        max_output_tokens: Option<u64>,
        /// How long the hold lives, in milliseconds (leave out for the tier's default).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=604_800_000))]
        hold_ms: Option<u64>,
        /// Decide without holding anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// A `tollgate.v1.Quota/GetUsage` request.
    GetUsage {
        #[arg(long, default_value = "")]
        subject: String,
    },
    /// A `grpc.health.v1.Health/Check` request.
    Health {
        /// The service asked about ("" is the server as a whole).
        #[arg(long, default_value = "")]
        service: String,
    },
}

/// `bytes` of text made of whole words from a fixed sentence: the same every run, and
/// tokenized like prose (a run of one repeated character would be a tokenizer's worst case,
/// not a typical prompt).
fn prose(bytes: usize) -> String {
    const SENTENCE: &str = "The quick brown fox checks its token budget before every call, \
        and the ledger answers at once. ";
    let mut text = String::with_capacity(bytes + SENTENCE.len());
    while text.len() < bytes {
        text.push_str(SENTENCE);
    }
    // The sentence is ASCII, so any byte offset is a character boundary.
    text.truncate(bytes);
    text
}

/// One gRPC message frame: uncompressed flag, big-endian length, the encoded message.
fn frame(message: &impl Message) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let len = u32::try_from(message.encoded_len())?;
    let mut body = Vec::with_capacity(5 + len as usize);
    body.push(0);
    body.extend_from_slice(&len.to_be_bytes());
    message.encode(&mut body)?;
    Ok(body)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let body = match args.request {
        Request::Reserve {
            subject,
            model,
            prompt_tokens,
            prompt_bytes,
            max_output_tokens,
            hold_ms,
            dry_run,
        } => frame(&ReserveRequest {
            subject,
            model,
            prompt_tokens,
            prompt: prompt_bytes.map(|n| prose(n as usize)),
            max_output_tokens,
            hold: hold_ms.map(|ms| prost_types::Duration {
                seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
                nanos: i32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
            }),
            dry_run,
            ..Default::default()
        })?,
        Request::GetUsage { subject } => frame(&GetUsageRequest {
            subject,
            ..Default::default()
        })?,
        Request::Health { service } => frame(&tonic_health::pb::HealthCheckRequest { service })?,
    };
    std::fs::write(&args.out, &body)?;
    println!("{}: {} bytes", args.out.display(), body.len());
    Ok(())
}
