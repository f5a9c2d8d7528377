//! The SQLite group-commit writer's own connection: opened with the SQLite library sqlx links
//! (`libsqlite3-sys`, the one SQLite in the build), used by one thread only, its statements
//! prepared once and kept ([`Statements`]). sqlx's SQLite driver runs every statement on a
//! worker thread of its own behind a channel, and turns every argument into an `Any` value and
//! back; the writer pays neither here: a purchase's statements run on the writer's thread, a
//! few function calls each.
//!
//! Only what the writer needs: open, run a fixed set of statements, bind integers, text and
//! NULL, step, read integer columns. Every `unsafe` block is a call into SQLite on a handle this
//! module opened and has not closed, from the one thread that owns it ([`Lite`] is neither
//! `Send` nor `Sync`).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use chrono::Utc;
use libsqlite3_sys as ffi;
use uuid::Uuid;

use super::gateway::LedgerEntry;
use super::sql::NewOrder;
use super::writer::WriteOp;
use super::StoreError;
use crate::config::Durability;
use crate::domain::{timestamp, EventId, OrderStatus, PaymentStatus};

/// What SQLite said, or a write that found its row in another state than it expected.
#[derive(Debug, Clone)]
pub(super) enum LiteError {
    /// An SQLite result code (extended) and its message.
    Sqlite { code: c_int, message: String },
    /// The statement ran but touched another number of rows than the write requires.
    Unexpected(String),
}

impl std::fmt::Display for LiteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite { code, message } => write!(f, "{message} (SQLite code {code})"),
            Self::Unexpected(message) => f.write_str(message),
        }
    }
}

impl From<LiteError> for StoreError {
    /// The same classes sqlx's errors map to ([`StoreError::from`] on a `sqlx::Error`): the
    /// constraints a CHECK, UNIQUE, PRIMARY KEY, FOREIGN KEY or NOT NULL enforces, conflicts
    /// for a row found in another state, anything else internal.
    fn from(e: LiteError) -> Self {
        match e {
            LiteError::Sqlite { code, message } => match code {
                ffi::SQLITE_CONSTRAINT_CHECK
                | ffi::SQLITE_CONSTRAINT_FOREIGNKEY
                | ffi::SQLITE_CONSTRAINT_NOTNULL
                | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                | ffi::SQLITE_CONSTRAINT_UNIQUE => StoreError::Constraint(message),
                ffi::SQLITE_CANTOPEN | ffi::SQLITE_BUSY | ffi::SQLITE_LOCKED => {
                    StoreError::Unavailable(message)
                }
                _ => StoreError::Internal(message),
            },
            LiteError::Unexpected(message) => StoreError::Conflict(message),
        }
    }
}

pub(super) type LiteResult<T> = Result<T, LiteError>;

/// The writer connection's page cache, in KiB (SQLite's default is 2,000 KiB). Purchases insert
/// rows under random UUID keys into several indexes, so every batch touches pages all over
/// them: with the default cache a batch re-reads index pages from the file and spills dirty
/// ones to the WAL before its commit (`pagerStress`), which a profile of `benches/group_commit`
/// showed as about a third of the writer's time. A larger cache costs more at the end of each
/// transaction (SQLite walks the cache to truncate it); 8 MiB measured the same as this.
const WRITER_CACHE_KIB: u32 = 64 * 1024;

/// One connection, owned by the thread that opened it.
pub(super) struct Lite {
    db: *mut ffi::sqlite3,
    statements: Option<Statements>,
    /// The checkpointer this connection's WAL hook asks (kept alive while the hook is set).
    checkpointer: Option<Arc<Checkpointer>>,
    /// Not `Send`, not `Sync`: one thread opens, uses and closes it.
    _thread_bound: PhantomData<*mut ()>,
}

/// A prepared statement of [`Lite`]'s, reset after every use.
struct Statement {
    raw: *mut ffi::sqlite3_stmt,
}

/// The writer's statements, prepared once when the connection opens.
struct Statements {
    begin: Statement,
    commit: Statement,
    rollback: Statement,
    insert_order: Statement,
    insert_ticket: Statement,
    insert_payment: Statement,
    complete_key: Statement,
    finish_order: Statement,
    finish_tickets: Statement,
    settle_payment: Statement,
    add_available: Statement,
    insert_ledger: Statement,
}

/// A value bound to a statement's parameter.
#[derive(Clone, Copy)]
enum Value<'a> {
    Int(i64),
    Text(&'a str),
    Null,
}

impl Lite {
    /// Opens (creating if missing) the SQLite file at `path`, set up as the pool's connections
    /// are (WAL, `synchronous` per `durability`, `busy_timeout_ms`, foreign keys), and prepares
    /// the writer's statements. With a `checkpointer`, the connection checkpoints nothing
    /// itself: its WAL hook asks the checkpointer once the WAL is [`CHECKPOINT_PAGES`] long.
    pub(super) fn open(
        path: &Path,
        durability: Durability,
        busy_timeout_ms: u64,
        checkpointer: Option<Arc<Checkpointer>>,
    ) -> LiteResult<Self> {
        let mut lite = Self::connect(path, durability, busy_timeout_ms)?;
        if let Some(checkpointer) = checkpointer {
            // SAFETY: `db` is open; the hook's context is the checkpointer, which `lite`
            // keeps alive for as long as the connection (and so the hook) lives.
            unsafe {
                ffi::sqlite3_wal_hook(
                    lite.db,
                    Some(wal_written),
                    Arc::as_ptr(&checkpointer) as *mut c_void,
                );
            }
            lite.checkpointer = Some(checkpointer);
        }
        lite.prepare_statements()?;
        Ok(lite)
    }

    /// The connection alone, without statements.
    fn connect(path: &Path, durability: Durability, busy_timeout_ms: u64) -> LiteResult<Self> {
        let name = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            LiteError::Unexpected(format!("{}: a NUL byte in the path", path.display()))
        })?;
        let mut db = ptr::null_mut();
        let flags = ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_CREATE | ffi::SQLITE_OPEN_NOMUTEX;
        // SAFETY: `name` is a NUL-terminated string that outlives the call; `db` receives the
        // handle (also on failure, when it must still be closed).
        let rc = unsafe { ffi::sqlite3_open_v2(name.as_ptr(), &mut db, flags, ptr::null()) };
        let lite = Self {
            db,
            statements: None,
            checkpointer: None,
            _thread_bound: PhantomData,
        };
        if rc != ffi::SQLITE_OK {
            return Err(lite.error(rc));
        }
        // SAFETY: `db` is open.
        unsafe {
            ffi::sqlite3_extended_result_codes(db, 1);
            ffi::sqlite3_busy_timeout(db, busy_timeout_ms.min(c_int::MAX as u64) as c_int);
        }
        lite.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; \
             PRAGMA cache_size = -{WRITER_CACHE_KIB}; PRAGMA temp_store = MEMORY;",
            match durability {
                Durability::Normal => "NORMAL",
                Durability::Full => "FULL",
            }
        ))?;
        Ok(lite)
    }

    fn prepare_statements(&mut self) -> LiteResult<()> {
        let lite = &*self;
        let statements = Statements {
            begin: lite.prepare("BEGIN IMMEDIATE")?,
            commit: lite.prepare("COMMIT")?,
            rollback: lite.prepare("ROLLBACK")?,
            insert_order: lite.prepare(
                "INSERT INTO orders (id, event_id, user_id, quantity, amount_cents, status, idempotency_key, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7, ?7)",
            )?,
            insert_ticket: lite.prepare(
                "INSERT INTO tickets (id, order_id, event_id, user_id, purchase_date, price_cents, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending')",
            )?,
            insert_payment: lite.prepare(
                "INSERT INTO payments (id, order_id, user_id, amount_cents, status, idempotency_key, created_at)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6)",
            )?,
            complete_key: lite.prepare(
                "UPDATE idempotency_keys SET state = 'done', status = ?1, body = ?2, completed_at = ?3
                 WHERE user_id = ?4 AND key = ?5 AND state = 'in_flight'",
            )?,
            finish_order: lite.prepare(
                "UPDATE orders SET status = ?1, cancel_reason = ?2, updated_at = ?3
                 WHERE id = ?4 AND status = 'pending' RETURNING event_id, quantity",
            )?,
            finish_tickets: lite.prepare(
                "UPDATE tickets SET status = ?1, cancel_reason = ?2 WHERE order_id = ?3 AND status = 'pending'",
            )?,
            settle_payment: lite.prepare(
                "UPDATE payments SET status = ?1, processed_at = ?2 WHERE order_id = ?3 AND status = 'pending'",
            )?,
            add_available: lite.prepare(
                "UPDATE events SET available_tickets = available_tickets + ?1 WHERE id = ?2",
            )?,
            insert_ledger: lite.prepare(
                "INSERT INTO gateway_ledger (seq, payment_key, kind, amount_cents, charge_id, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?,
        };
        self.statements = Some(statements);
        Ok(())
    }

    fn statements(&self) -> &Statements {
        self.statements.as_ref().expect("prepared when opened")
    }

    /// The connection's last error, as `rc` reported it.
    fn error(&self, rc: c_int) -> LiteError {
        let message = if self.db.is_null() {
            "out of memory".to_owned()
        } else {
            // SAFETY: `db` is a handle sqlite3_open_v2 returned; the message is copied out
            // before any other call on it.
            unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(self.db)) }
                .to_string_lossy()
                .into_owned()
        };
        let code = if self.db.is_null() {
            rc
        } else {
            // SAFETY: as above.
            unsafe { ffi::sqlite3_extended_errcode(self.db) }
        };
        LiteError::Sqlite { code, message }
    }

    fn execute_batch(&self, sql: &str) -> LiteResult<()> {
        let sql = CString::new(sql).expect("no NUL in the writer's SQL");
        // SAFETY: `db` is open, `sql` NUL-terminated; no callback, no error string wanted.
        let rc = unsafe {
            ffi::sqlite3_exec(
                self.db,
                sql.as_ptr(),
                None,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        match rc {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(self.error(rc)),
        }
    }

    fn prepare(&self, sql: &str) -> LiteResult<Statement> {
        let mut raw = ptr::null_mut();
        // SAFETY: `db` is open; the text is passed with its length (no NUL needed) and SQLite
        // copies what it keeps.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                self.db,
                sql.as_ptr().cast(),
                sql.len() as c_int,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut raw,
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error(rc));
        }
        Ok(Statement { raw })
    }

    /// Runs `statement` with `values` to the end, and returns the rows changed and the first
    /// row's first two integer columns (for `RETURNING`), if it returned a row.
    fn run(&self, statement: &Statement, values: &[Value<'_>]) -> LiteResult<Ran> {
        let raw = statement.raw;
        let outcome = self.bind_and_step(raw, values);
        // SAFETY: `raw` is a live statement of this connection; resetting it ends its run and
        // releases its bindings' copies on the next bind.
        unsafe {
            ffi::sqlite3_reset(raw);
        }
        outcome
    }

    fn bind_and_step(&self, raw: *mut ffi::sqlite3_stmt, values: &[Value<'_>]) -> LiteResult<Ran> {
        for (i, value) in values.iter().enumerate() {
            let index = i as c_int + 1;
            // SAFETY: `raw` is a live, reset statement; text is copied by SQLite
            // (SQLITE_TRANSIENT) before the call returns.
            let rc = unsafe {
                match value {
                    Value::Int(v) => ffi::sqlite3_bind_int64(raw, index, *v),
                    Value::Text(s) => ffi::sqlite3_bind_text(
                        raw,
                        index,
                        s.as_ptr().cast(),
                        s.len() as c_int,
                        ffi::SQLITE_TRANSIENT(),
                    ),
                    Value::Null => ffi::sqlite3_bind_null(raw, index),
                }
            };
            if rc != ffi::SQLITE_OK {
                return Err(self.error(rc));
            }
        }
        let mut first_row = None;
        loop {
            // SAFETY: `raw` is a live statement with every parameter bound above.
            let rc = unsafe { ffi::sqlite3_step(raw) };
            match rc {
                ffi::SQLITE_ROW => {
                    if first_row.is_none() {
                        // SAFETY: the statement is on a row; columns 0 and 1 exist for the
                        // RETURNING statements that return rows.
                        first_row = Some(unsafe {
                            (
                                ffi::sqlite3_column_int64(raw, 0),
                                ffi::sqlite3_column_int64(raw, 1),
                            )
                        });
                    }
                }
                ffi::SQLITE_DONE => break,
                rc => return Err(self.error(rc)),
            }
        }
        // SAFETY: `db` is open.
        let changed = unsafe { ffi::sqlite3_changes64(self.db) };
        Ok(Ran {
            changed: changed.max(0) as u64,
            first_row,
        })
    }

    /// Whether a transaction is open (SQLite can end one on its own after some errors).
    fn in_transaction(&self) -> bool {
        // SAFETY: `db` is open.
        unsafe { ffi::sqlite3_get_autocommit(self.db) == 0 }
    }

    /// Writes `ops` in one transaction (`BEGIN IMMEDIATE` … `COMMIT`); on any error rolls it
    /// back and returns the error, having written nothing.
    pub(super) fn transaction(&self, ops: &[&WriteOp]) -> LiteResult<()> {
        let s = self.statements();
        self.run(&s.begin, &[])?;
        let outcome = self
            .apply(ops)
            .and_then(|()| self.run(&s.commit, &[]).map(drop));
        if outcome.is_err() && self.in_transaction() {
            // A failed COMMIT (SQLITE_BUSY) leaves the transaction open: roll it back too.
            let _ = self.run(&s.rollback, &[]);
        }
        outcome
    }

    /// The statements of `ops`, in order, and last each event's `available_tickets` moved once
    /// by its net change: what the event actor decided in sequence, so valid, where moving
    /// seats op by op in another order than the actor's could cross `0 <= available <= total`
    /// on the way (a seat returned and taken again in one batch).
    fn apply(&self, ops: &[&WriteOp]) -> LiteResult<()> {
        let s = self.statements();
        let now = timestamp(Utc::now());
        let mut net: Vec<(EventId, i64)> = Vec::new();
        let mut add = |event: EventId, delta: i64| match net.iter_mut().find(|(e, _)| *e == event) {
            Some((_, total)) => *total += delta,
            None => net.push((event, delta)),
        };
        for op in ops {
            match op {
                WriteOp::Hold(order) => {
                    self.insert(order)?;
                    add(order.event, -(order.tickets.len() as i64));
                }
                WriteOp::Confirm { order } => {
                    let id = order.0.to_string();
                    self.finish(&id, OrderStatus::Confirmed, None, &now)?;
                    self.settle(&id, PaymentStatus::Completed, &now)?;
                }
                WriteOp::Cancel {
                    order,
                    reason,
                    payment,
                    ..
                } => {
                    let id = order.0.to_string();
                    let (event, seats) =
                        self.finish(&id, OrderStatus::Cancelled, Some(reason.as_str()), &now)?;
                    if let Some(status) = payment {
                        self.settle(&id, *status, &now)?;
                    }
                    add(event, seats);
                }
                WriteOp::SettlePayment { order, status } => {
                    self.settle(&order.0.to_string(), *status, &now)?;
                }
                WriteOp::Ledger(lines) => {
                    for line in lines {
                        self.insert_ledger_line(line)?;
                    }
                }
                WriteOp::SagaSeats(_) => {
                    return Err(LiteError::Unexpected(
                        "saga seat writes need PostgreSQL (stage saga)".into(),
                    ))
                }
                WriteOp::Barrier => {}
            }
        }
        for (event, delta) in net {
            if delta != 0 {
                let ran = self.run(&s.add_available, &[Value::Int(delta), Value::Int(event.0)])?;
                expect_one(ran.changed, "event")?;
            }
        }
        Ok(())
    }

    /// The order, its tickets and its payment, all `pending`, and its key's answer.
    fn insert(&self, o: &NewOrder) -> LiteResult<()> {
        let s = self.statements();
        let id = o.order.0.to_string();
        let amount = o.amount_cents();
        let key = match o.idempotency_key() {
            Some(key) => Value::Text(key),
            None => Value::Null,
        };
        self.run(
            &s.insert_order,
            &[
                Value::Text(&id),
                Value::Int(o.event.0),
                Value::Text(&o.user),
                Value::Int(o.tickets.len() as i64),
                Value::Int(amount),
                key,
                Value::Text(&o.created_at),
            ],
        )?;
        for ticket in &o.tickets {
            self.run(
                &s.insert_ticket,
                &[
                    Value::Text(&ticket.0.to_string()),
                    Value::Text(&id),
                    Value::Int(o.event.0),
                    Value::Text(&o.user),
                    Value::Text(&o.created_at),
                    Value::Int(o.unit_price.cents()),
                ],
            )?;
        }
        self.run(
            &s.insert_payment,
            &[
                Value::Text(&Uuid::new_v4().to_string()),
                Value::Text(&id),
                Value::Text(&o.user),
                Value::Int(amount),
                Value::Text(&o.payment_key()),
                Value::Text(&o.created_at),
            ],
        )?;
        if let Some(key) = &o.idempotency {
            let now = timestamp(Utc::now());
            self.run(
                &s.complete_key,
                &[
                    Value::Int(i64::from(key.status)),
                    Value::Text(&(key.render)(&o.placed())),
                    Value::Text(&now),
                    Value::Text(&o.user),
                    Value::Text(&key.key),
                ],
            )?;
        }
        Ok(())
    }

    /// A `pending` order and its tickets moved to `status`; returns its event and seats.
    fn finish(
        &self,
        order: &str,
        status: OrderStatus,
        reason: Option<&str>,
        now: &str,
    ) -> LiteResult<(EventId, i64)> {
        let s = self.statements();
        let reason = reason.map_or(Value::Null, Value::Text);
        let ran = self.run(
            &s.finish_order,
            &[
                Value::Text(status.as_str()),
                reason,
                Value::Text(now),
                Value::Text(order),
            ],
        )?;
        let Some((event, seats)) = ran.first_row else {
            return Err(LiteError::Unexpected(
                "expected one pending order, found 0".into(),
            ));
        };
        self.run(
            &s.finish_tickets,
            &[Value::Text(status.as_str()), reason, Value::Text(order)],
        )?;
        Ok((EventId(event), seats))
    }

    /// One line of the gateway's books.
    fn insert_ledger_line(&self, line: &LedgerEntry) -> LiteResult<()> {
        let charge = line.charge_id.map(|id| id.to_string());
        self.run(
            &self.statements().insert_ledger,
            &[
                Value::Int(line.seq),
                Value::Text(&line.key),
                Value::Text(line.kind.as_str()),
                Value::Int(line.amount_cents),
                charge.as_deref().map_or(Value::Null, Value::Text),
                Value::Text(&line.at),
            ],
        )
        .map(drop)
    }

    /// A `pending` payment's outcome.
    fn settle(&self, order: &str, status: PaymentStatus, now: &str) -> LiteResult<()> {
        let ran = self.run(
            &self.statements().settle_payment,
            &[
                Value::Text(status.as_str()),
                Value::Text(now),
                Value::Text(order),
            ],
        )?;
        expect_one(ran.changed, "pending payment")
    }
}

impl Drop for Lite {
    fn drop(&mut self) {
        if let Some(statements) = self.statements.take() {
            drop(statements);
        }
        if !self.db.is_null() {
            // SAFETY: every statement was finalized above; nothing uses `db` after this.
            unsafe {
                ffi::sqlite3_close(self.db);
            }
        }
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: `raw` was prepared on a connection that is still open (statements are
        // dropped before their connection) and is not used after this.
        unsafe {
            ffi::sqlite3_finalize(self.raw);
        }
    }
}

/// What running a statement did.
struct Ran {
    changed: u64,
    first_row: Option<(i64, i64)>,
}

fn expect_one(affected: u64, what: &str) -> LiteResult<()> {
    if affected == 1 {
        Ok(())
    } else {
        Err(LiteError::Unexpected(format!(
            "expected one {what}, found {affected}"
        )))
    }
}

/// WAL pages after which the writer's connection asks for a checkpoint: ten times SQLite's
/// own default (`wal_autocheckpoint = 1000`, 4 MiB of 4 KiB pages). Purchases dirty the same
/// index pages again and again, batch after batch; a checkpoint copies only a page's last
/// version, so a longer WAL copies each page once for many commits instead of once for a few
/// (the checkpointing thread took a fifth of the server's CPU under a hot-event stampede at
/// the default). The cost is a WAL of up to about 40 MiB.
pub(super) const CHECKPOINT_PAGES: c_int = 10_000;

/// Checkpoints the WAL on a thread and a connection of its own, so that the writer's commits
/// never run one: SQLite would otherwise checkpoint inside the `COMMIT` that crossed
/// [`CHECKPOINT_PAGES`], on the writer's thread, with its page copies and the database file's
/// fsync. A checkpoint copies pages whose commits are already durable in the WAL, so when it
/// runs changes no acknowledgement. `PASSIVE`: it never waits for, nor blocks, the writer or
/// the readers; what it cannot copy yet is copied by the next one.
pub(super) struct Checkpointer {
    wanted: Mutex<Wanted>,
    wake: Condvar,
    /// Checkpoints run.
    pub(super) runs: AtomicU64,
}

#[derive(Default)]
struct Wanted {
    checkpoint: bool,
    stop: bool,
}

impl Checkpointer {
    /// Starts the checkpointing thread on its own connection to `path`.
    pub(super) fn start(
        path: PathBuf,
        durability: Durability,
        busy_timeout_ms: u64,
    ) -> std::io::Result<(Arc<Self>, std::thread::JoinHandle<()>)> {
        let checkpointer = Arc::new(Self {
            wanted: Mutex::new(Wanted::default()),
            wake: Condvar::new(),
            runs: AtomicU64::new(0),
        });
        let worker = Arc::clone(&checkpointer);
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || worker.run(&path, durability, busy_timeout_ms))?;
        Ok((checkpointer, thread))
    }

    /// Asks for a checkpoint; never waits.
    fn request(&self) {
        let mut wanted = self.wanted.lock().expect("checkpointer poisoned");
        if !wanted.checkpoint {
            wanted.checkpoint = true;
            self.wake.notify_one();
        }
    }

    /// Stops the thread (after a last checkpoint, if one was asked for).
    pub(super) fn stop(&self) {
        self.wanted.lock().expect("checkpointer poisoned").stop = true;
        self.wake.notify_one();
    }

    fn run(&self, path: &Path, durability: Durability, busy_timeout_ms: u64) {
        let lite = match Lite::connect(path, durability, busy_timeout_ms) {
            Ok(lite) => lite,
            Err(error) => {
                tracing::error!(%error, "the SQLite checkpointer cannot open the database; the pool's connections checkpoint instead");
                return;
            }
        };
        loop {
            {
                let mut wanted = self.wanted.lock().expect("checkpointer poisoned");
                while !wanted.checkpoint && !wanted.stop {
                    wanted = self.wake.wait(wanted).expect("checkpointer poisoned");
                }
                if !wanted.checkpoint {
                    return;
                }
                wanted.checkpoint = false;
            }
            // SAFETY: `lite.db` is open and used by this thread only.
            let rc = unsafe {
                ffi::sqlite3_wal_checkpoint_v2(
                    lite.db,
                    ptr::null(),
                    ffi::SQLITE_CHECKPOINT_PASSIVE,
                    ptr::null_mut(),
                    ptr::null_mut(),
                )
            };
            self.runs.fetch_add(1, Ordering::Relaxed);
            if rc != ffi::SQLITE_OK && rc != ffi::SQLITE_BUSY {
                let error = lite.error(rc);
                tracing::warn!(%error, "WAL checkpoint failed; the next one copies what it left");
            }
        }
    }
}

/// The writer connection's WAL hook: called after each commit with the WAL's length in pages.
unsafe extern "C" fn wal_written(
    checkpointer: *mut c_void,
    _db: *mut ffi::sqlite3,
    _name: *const c_char,
    pages: c_int,
) -> c_int {
    if pages >= CHECKPOINT_PAGES {
        // SAFETY: the context is the `Checkpointer` the connection keeps alive (`Lite::open`).
        let checkpointer = unsafe { &*(checkpointer as *const Checkpointer) };
        checkpointer.request();
    }
    ffi::SQLITE_OK
}
