//! Ticketflow's load generator: drive the server, measure, audit, compare the stages.
//!
//! # Layout
//! - `cli`      — the command line (`run`, `compare`, `scenarios`), flags and thresholds.
//! - `app`      — what the commands do: settings, stages, load, audit, report, exit status.
//! - `scenario` — scenarios, their presets and the scenario file (TOML); resolved `Settings`.
//! - `driver`   — the load models (open, closed) and each scenario's iteration; the seed.
//! - `http`     — a minimal keep-alive HTTP/1.1 client (cheap on a shared machine).
//! - `metrics`  — per-worker HDR histograms and answer counts, merged at the end.
//! - `audit`    — I1-I8: the server's audit, the ledger, and the client's record (I7).
//! - `server`   — starting a stage fresh on a free port with a fresh database; SIGTERM.
//! - `chaos`    — `--chaos`: faults on a seeded schedule (the server, its own Redis or
//!   PostgreSQL), signalled only to processes loadgen started.
//! - `backend`  — `STAGE@BACKEND`, and the PostgreSQL database made for (and dropped after)
//!   each `STAGE@postgres` started.
//! - `report`   — the versioned report: terminal table, JSON, Markdown.
//! - `html`     — the self-contained HTML report with inline SVG charts.
//! - `lesson`   — `loadgen lesson`: the seed's problems as ready experiments, break and fix.
//! - `bench`    — `loadgen bench`: every SPEC §9 ratio in one invocation, on fresh servers.

pub mod app;
pub mod audit;
pub mod backend;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod driver;
pub mod html;
pub mod http;
pub mod lesson;
pub mod metrics;
pub mod report;
pub mod scenario;
pub mod server;
