//! Ticketflow: an event-ticketing server built as a concurrency lab.
//!
//! # Layout
//! - [`domain`]: events, tickets, payments and the value types that keep them valid.
//! - [`inventory`]: the pure inventory core, a state machine with the time passed in.
//! - [`event_core`]: the event actor's decisions (reserve, settle, expire) as a pure step
//!   function over one event's inventory, yielding the writes to make; the actor is a shell.
//! - [`sim`]: the deterministic simulator (`ticketflow simulate`): the event core under a seeded
//!   scheduler in simulated time, with payments, the writer, crashes, and the invariants.
//! - [`payments`]: the simulated payment gateway, a pool of payment actors whose books (every
//!   charge, decline and refund) are group-committed to the database and survive restarts; in
//!   stage `services` it runs in the payments node ([`payments::service`]), which the other
//!   nodes call over HTTP ([`payments::remote`]).
//! - [`saga`]: stage `saga`'s pure core: an order as an orchestrated saga, its typed and
//!   versioned events, and the orchestrator's decision `(state, reply) -> (events, commands)`;
//!   [`saga::seats`] the inventory participant's seat book, which an inventory node of stage
//!   `services` applies the saga's seat commands with ([`stages::saga_seats`]).
//! - [`store`]: storage on SQLite or PostgreSQL behind one contract (a trait per capability),
//!   the migrations of each, the group-commit writer, (`store::changes`) who is told when an
//!   event's availability changes, (`store::shards`) the shard leases and epoch fence of
//!   stage `services`, and (`store::saga`) stage `saga`'s event log, outbox, inboxes and
//!   projections.
//! - [`idempotency`]: the Idempotency-Key protocol (claim, run once, store, replay, recover).
//! - [`lock`]: the `locked` stage's Redis lock per event, with fencing tokens.
//! - [`queue`]: the `locked` stage's Redis-backed payment queue (apalis).
//! - [`cache`]: the `locked` stage's read-through Redis cache of event reads.
//! - [`stages`]: the purchase contract ([`stages::Stage`]) and one module per stage.
//! - [`audit`]: the invariants of SPEC section 5, checked against storage and the ledger.
//! - [`api`]: the thin actix-web front, API v1 and v2 (a file per resource under [`api::v2`]),
//!   admin routes, problem documents, and the OpenAPI document ([`api::openapi`]).
//! - [`limits`]: the connection cap, the request-body deadline, and the hang-up watch of a
//!   streaming connection.
//! - [`meter`]: Prometheus metrics (`GET /metrics`) and the per-request span of the logs.
//! - [`replay`]: `ticketflow replay`, stage `saga`'s projections rebuilt from its log and
//!   compared with the live tables.
//! - [`server`]: assembles storage, gateway, stage and HTTP into a running server.
//! - [`supervisor`]: `serve --stage services`, the nodes of stage `services` as child
//!   processes, and the payments and inventory nodes `serve --stage saga` keeps (the gateway, catalog and inventory nodes are [`stages::gateway`],
//!   [`stages::catalog`] and [`stages::services`]; their calls are [`api::internal`]).
//! - [`config`], [`cli`], [`telemetry`], [`demo`]: settings, the command line, logs, demo data.

pub mod api;
pub mod audit;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod domain;
pub mod event_core;
pub mod idempotency;
pub mod inventory;
pub mod limits;
pub mod lock;
pub mod meter;
pub mod payments;
pub mod queue;
pub mod replay;
pub mod saga;
pub mod server;
pub mod sim;
pub mod stages;
pub mod store;
pub mod supervisor;
pub mod telemetry;
