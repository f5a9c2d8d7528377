//! `ticketflow replay --db postgres://…`: the projections of stage `saga` rebuilt from the
//! event log alone, compared with the live tables row by row.

use std::io::Write;

use crate::cli::DbArgs;
use crate::store::{backend, Backend, DatabaseUrl, Store};

/// Rows shown at most; the count of the rest follows.
const SHOWN_DIFFERENCES: usize = 100;

/// Runs the check and prints the result: `Ok(true)` when the projections equal the log's,
/// `Ok(false)` (each difference printed) when not, `Err` with one line for a wrong setting.
pub async fn run(db: &DbArgs, out: &mut impl Write) -> Result<bool, String> {
    let shown = backend::redacted(&db.database);
    let url = DatabaseUrl::parse(&db.database, db.synchronous)
        .map_err(|e| backend::open_failure(&db.database, &e))?;
    if url.backend != Backend::Postgres {
        return Err(format!(
            "--db {shown}: replay reads stage saga's event log, which lives in PostgreSQL only; \
             give --db postgres://USER@HOST:PORT/DATABASE"
        ));
    }
    match url.exists().await {
        Ok(true) => {}
        Ok(false) => {
            return Err(format!(
                "--db {shown}: no such database; name the database a saga server ran on"
            ))
        }
        Err(e) => return Err(backend::open_failure(&db.database, &e)),
    }
    let store = Store::open(&db.database, db.synchronous)
        .await
        .map_err(|e| backend::open_failure(&db.database, &e))?;
    let report = store.compare_projections().await;
    store.close().await;
    let report = report.map_err(|e| format!("--db {shown}: reading the log failed: {e}"))?;
    let compared: Vec<String> = report
        .compared
        .iter()
        .map(|(table, n)| format!("{n} {table}"))
        .collect();
    let io = |e: std::io::Error| e.to_string();
    writeln!(
        out,
        "replayed {} events of {} sagas; rebuilt {}",
        report.events,
        report.sagas,
        compared.join(", ")
    )
    .map_err(io)?;
    if report.differences.is_empty() {
        writeln!(out, "the live projections equal the log's, row for row").map_err(io)?;
        return Ok(true);
    }
    for line in report.differences.iter().take(SHOWN_DIFFERENCES) {
        writeln!(out, "differs: {line}").map_err(io)?;
    }
    if report.differences.len() > SHOWN_DIFFERENCES {
        writeln!(
            out,
            "… and {} more",
            report.differences.len() - SHOWN_DIFFERENCES
        )
        .map_err(io)?;
    }
    writeln!(
        out,
        "{} rows differ between the live projections and the log",
        report.differences.len()
    )
    .map_err(io)?;
    Ok(false)
}
