//! `tollgate export` and `tollgate import`: back a ledger up (from a stopped data directory,
//! or from a running server through its Admin `Export` call) and restore it into an empty one.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tollgate::clock::{Clock, SystemClock};
use tollgate::proto::admin_client::AdminClient;
use tollgate::proto::ExportRequest;
use tollgate::store::export::{write_export, ExportSummary, Line};
use tollgate::store::postgres::PostgresStore;
use tollgate::store::sled::restore::import as import_file;
use tollgate::store::sled::SledStore;
use tollgate::store::{Recovery, Store};

/// Where an export goes: stdout, or a file written under a temporary name and renamed into
/// place once complete, so a failed export never leaves a file that looks like a backup.
enum Output {
    Stdout(io::StdoutLock<'static>),
    File {
        path: PathBuf,
        tmp: PathBuf,
        file: BufWriter<File>,
    },
}

impl Output {
    fn open(out: &Path) -> io::Result<Self> {
        if out == Path::new("-") {
            return Ok(Output::Stdout(io::stdout().lock()));
        }
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let tmp = out.with_file_name(name);
        Ok(Output::File {
            path: out.to_path_buf(),
            file: BufWriter::new(File::create(&tmp)?),
            tmp,
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stdout(s) => s,
            Output::File { file, .. } => file,
        }
    }

    /// The export is complete: make it the file (or, failing that, leave nothing).
    fn commit(self) -> io::Result<()> {
        match self {
            Output::Stdout(mut s) => s.flush(),
            Output::File { path, tmp, file } => {
                let done = file
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| f.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &path));
                if done.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                done
            }
        }
    }

    /// The export failed: leave nothing that looks like one.
    fn abandon(self) {
        if let Output::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// `tollgate export`: from a stopped data directory, or from the server at `addr`.
pub fn export(
    data_dir: Option<PathBuf>,
    store: Option<String>,
    addr: Option<(String, Option<tollgate::relay::UpstreamTls>)>,
    admin_token: Option<String>,
    out: &Path,
) -> ExitCode {
    let mut output = match Output::open(out) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tollgate: cannot write {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
    };
    let result = match (data_dir, store, addr) {
        (Some(dir), _, _) => export_stopped(&dir, output.writer()),
        (None, Some(url), _) => export_postgres(&url, output.writer()),
        (None, None, Some((addr, tls))) => {
            export_running(&addr, tls.as_ref(), admin_token, output.writer())
        }
        (None, None, None) => Err(
            "give --data-dir (a stopped server's), --store (a database) or --addr (a running server)"
                .into(),
        ),
    };
    let result = match result {
        Ok(summary) => output
            .commit()
            .map(|()| summary)
            .map_err(|e| format!("cannot write {}: {e}", out.display())),
        Err(e) => {
            output.abandon();
            Err(e)
        }
    };
    match result {
        Ok(summary) => {
            eprintln!(
                "tollgate: exported {} records ({} scopes, {} reservations, {} assignments){}",
                summary.records,
                summary.scopes,
                summary.reservations,
                summary.assignments,
                summary
                    .batch
                    .map_or_else(String::new, |b| format!(" as of batch {b}"))
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: export failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What an export wrote, as the command reports it.
struct Summary {
    records: u64,
    scopes: u64,
    reservations: u64,
    assignments: u64,
    batch: Option<u64>,
}

impl From<ExportSummary> for Summary {
    fn from(s: ExportSummary) -> Self {
        Self {
            records: s.counts.records,
            scopes: s.counts.scopes,
            reservations: s.counts.reservations,
            assignments: s.counts.assignments,
            batch: s.batch,
        }
    }
}

fn export_stopped(dir: &Path, out: &mut dyn Write) -> Result<Summary, String> {
    let store = SledStore::open_existing(dir).map_err(|e| {
        let text = e.to_string();
        if text.contains("could not acquire lock") {
            format!("{} is in use by a running tollgate: export from it with --addr (its Admin Export call)", dir.display())
        } else {
            format!("cannot open {}: {text}", dir.display())
        }
    })?;
    // The reader of a stopped store also runs the start-up check on what it read.
    let mut reader = store.reader().map_err(|e| e.to_string())?;
    write_export(reader.as_mut(), out, SystemClock.now_micros())
        .map(Summary::from)
        .map_err(|e| e.to_string())
}

/// From a PostgreSQL store: one REPEATABLE READ snapshot, servers running or not.
fn export_postgres(url: &str, out: &mut dyn Write) -> Result<Summary, String> {
    let store = PostgresStore::connect(url, Recovery::Refuse).map_err(|e| e.to_string())?;
    let mut reader = store.reader().map_err(|e| e.to_string())?;
    write_export(reader.as_mut(), out, SystemClock.now_micros())
        .map(Summary::from)
        .map_err(|e| e.to_string())
}

fn export_running(
    addr: &str,
    tls: Option<&tollgate::relay::UpstreamTls>,
    admin_token: Option<String>,
    out: &mut dyn Write,
) -> Result<Summary, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let channel = super::usage::connect(addr, tls).await?;
        let mut request = tonic::Request::new(ExportRequest {});
        if let Some(token) = admin_token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "the admin token is not valid header text".to_string())?;
            request.metadata_mut().insert("authorization", value);
        }
        let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
        let mut stream = AdminClient::new(channel)
            .export(request)
            .await
            .map_err(status)?
            .into_inner();
        let mut batch = None;
        let mut last = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(status)? {
            out.write_all(&chunk.data)
                .map_err(|e| format!("writing: {e}"))?;
            if last.is_empty() {
                if let Some(Ok(Line::Header(h))) =
                    chunk.data.split(|&b| b == b'\n').next().map(Line::parse)
                {
                    batch = h.batch;
                }
            }
            last = chunk.data;
        }
        // The stream ended cleanly: its last line must be the end line, else it is no backup.
        let text = String::from_utf8_lossy(&last);
        match text
            .trim_end()
            .rsplit('\n')
            .next()
            .map(|l| Line::parse(l.as_bytes()))
        {
            Some(Ok(Line::End(end))) => Ok(Summary {
                records: end.records,
                scopes: end.scopes,
                reservations: end.reservations,
                assignments: end.assignments,
                batch,
            }),
            _ => Err("the server's stream ended without the export's end line".into()),
        }
    })
}

/// `tollgate import --store`: restore `file` into a PostgreSQL store, in one transaction.
pub fn import_postgres(file: &Path, url: &str, replace: bool) -> ExitCode {
    match tollgate::store::postgres::import(file, url, replace) {
        Ok(summary) => {
            let c = summary.counts;
            eprintln!(
                "tollgate: imported {} records ({} scopes, {} reservations, {} assignments) into the database",
                c.records, c.scopes, c.reservations, c.assignments,
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate import`: restore `file` into `data_dir`.
pub fn import(file: &Path, data_dir: &Path, replace: bool) -> ExitCode {
    match import_file(file, data_dir, replace) {
        Ok(summary) => {
            let c = summary.counts;
            eprintln!(
                "tollgate: imported {} records ({} scopes, {} reservations, {} assignments) into {}",
                c.records,
                c.scopes,
                c.reservations,
                c.assignments,
                data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}
