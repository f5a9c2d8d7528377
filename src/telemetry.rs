//! Logging with `tracing`: human-readable by default, JSON on request; `RUST_LOG` filters.
//!
//! Colours only on a terminal: a log sent to a file or a pipe carries no ANSI escape codes
//! (and `NO_COLOR` turns them off on a terminal too). Every request runs in a `request` span
//! (see [`crate::meter::observe`]) with its `request_id` and, once known, the `event_id`,
//! `order_id` and `user_id`; the JSON format puts that span's fields on each line, under
//! `span`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Whether log lines may be coloured: stderr is a terminal and `NO_COLOR` is not set.
pub fn colours() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    std::io::stderr().is_terminal() && !no_color
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.with_ansi(colours()).try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
