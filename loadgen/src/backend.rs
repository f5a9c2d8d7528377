//! Where a started stage keeps its data: `STAGE@BACKEND` on the command line (`actor@postgres`;
//! a bare `actor` is `actor@sqlite`), and for PostgreSQL a fresh database per started stage,
//! created before the server starts and dropped once it has stopped.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

/// `--postgres-url` when neither the flag nor `POSTGRES_URL` says otherwise.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long reaching PostgreSQL may take before the stage is reported as skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stages the server only runs on SQLite.
const SQLITE_ONLY: &[&str] = &["monolith"];
/// Stages the server only runs on PostgreSQL: a bare name means `@postgres`.
const POSTGRES_ONLY: &[&str] = &["services", "saga"];

/// A storage backend of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == name)
    }

    /// The backend a running server's `GET /health` names: a `backend` field, else the one
    /// database among its `dependencies`.
    pub fn from_health(health: &serde_json::Value) -> Option<Self> {
        if let Some(name) = health.get("backend").and_then(|b| b.as_str()) {
            return Self::named(name);
        }
        let deps = health.get("dependencies")?.as_object()?;
        let found: Vec<Backend> = Self::ALL
            .into_iter()
            .filter(|b| deps.contains_key(b.as_str()))
            .collect();
        match found[..] {
            [one] => Some(one),
            _ => None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stage to start: its name (checked by the server binary, not here) and its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub stage: String,
    pub backend: Backend,
}

impl StageSpec {
    /// Parses `STAGE` or `STAGE@BACKEND`; `flag` names the flag in the error.
    pub fn parse(text: &str, flag: &str) -> Result<Self, String> {
        let text = text.trim();
        let (stage, backend) = match text.split_once('@') {
            None if POSTGRES_ONLY.contains(&text) => (text, Backend::Postgres),
            None => (text, Backend::Sqlite),
            Some((stage, name)) => {
                let backend = Backend::named(name.trim()).ok_or_else(|| {
                    format!(
                        "{flag} {text}: unknown backend '{}' (known: sqlite, postgres; \
                         e.g. actor@postgres)",
                        name.trim()
                    )
                })?;
                (stage.trim(), backend)
            }
        };
        if stage.is_empty() {
            return Err(format!(
                "{flag} {text}: no stage before '@' (e.g. actor@postgres)"
            ));
        }
        if backend != Backend::Sqlite && SQLITE_ONLY.contains(&stage) {
            return Err(format!(
                "{flag} {text}: the {stage} stage runs on SQLite only; use {stage} \
                 (= {stage}@sqlite)"
            ));
        }
        if backend != Backend::Postgres && POSTGRES_ONLY.contains(&stage) {
            return Err(format!(
                "{flag} {text}: the {stage} stage runs on PostgreSQL only; use {stage} \
                 (= {stage}@postgres)"
            ));
        }
        Ok(Self {
            stage: stage.to_owned(),
            backend,
        })
    }

    /// `STAGE@BACKEND`, the name the reports give this run.
    pub fn label(&self) -> String {
        label(&self.stage, Some(self.backend))
    }
}

/// `STAGE@BACKEND`, or the bare stage when the backend is not known (a `--target` server
/// that does not say).
pub fn label(stage: &str, backend: Option<Backend>) -> String {
    match backend {
        Some(b) => format!("{stage}@{b}"),
        None => stage.to_owned(),
    }
}

/// Checks `--postgres-url` before anything starts: a URL sqlx understands, `postgres://` or
/// `postgresql://`.
pub fn check_url(url: &str) -> Result<(), String> {
    admin_options(url).map(|_| ())
}

fn admin_options(url: &str) -> Result<PgConnectOptions, String> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("postgres" | "postgresql")) {
        return Err(format!(
            "--postgres-url {}: give a postgres:// URL, e.g. {DEFAULT_POSTGRES_URL}",
            redact(url)
        ));
    }
    PgConnectOptions::from_str(url).map_err(|e| format!("--postgres-url {}: {e}", redact(url)))
}

/// A database this process created for one started stage; [`TempDatabase::drop_database`]
/// removes it.
#[derive(Debug)]
pub struct TempDatabase {
    admin: PgConnectOptions,
    /// `--postgres-url` as given, password hidden (for messages).
    shown_admin: String,
    pub name: String,
    /// The server's `--db`.
    pub url: String,
    /// The same, password hidden (for the report).
    pub shown_url: String,
}

impl TempDatabase {
    /// Creates `loadgen_<random hex>` on the server `admin_url` names. The error is the
    /// stage's skip reason: it names the flag and says what to do.
    pub async fn create(admin_url: &str) -> Result<Self, String> {
        let admin = admin_options(admin_url)?;
        let shown_admin = redact(admin_url);
        let name = format!("loadgen_{:016x}", rand::random::<u64>());
        let url = with_database(admin_url, &name);
        let mut conn = connect(&admin, &shown_admin).await?;
        let created = sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        created.map_err(|e| {
            format!("--postgres-url {shown_admin}: cannot create database {name} ({e})")
        })?;
        Ok(Self {
            admin,
            shown_url: redact(&url),
            shown_admin,
            name,
            url,
        })
    }

    /// `DROP DATABASE … WITH (FORCE)` (PostgreSQL 13+): any session the server left is ended.
    pub async fn drop_database(&self) -> Result<(), String> {
        let fail = |e: String| {
            format!(
                "cannot drop database {} on {} ({e}); drop it by hand",
                self.name, self.shown_admin
            )
        };
        let mut conn = connect(&self.admin, &self.shown_admin)
            .await
            .map_err(fail)?;
        let dropped = sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
        dropped.map(|_| ()).map_err(|e| fail(e.to_string()))
    }
}

async fn connect(options: &PgConnectOptions, shown: &str) -> Result<PgConnection, String> {
    let unreachable = |why: String| {
        format!(
            "--postgres-url {shown}: cannot reach PostgreSQL ({why}); start PostgreSQL or \
             point --postgres-url (POSTGRES_URL) at it"
        )
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// `url` naming database `db` instead: the path replaced, the query kept (without a
/// `dbname=` that would override the path).
fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(a, _)| a);
    let query: Vec<&str> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty() && !kv.starts_with("dbname="))
        .collect();
    let mut out = format!("{scheme}://{authority}/{db}");
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query.join("&"));
    }
    out
}

/// The URL with its password (if any) shown as `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<StageSpec, String> {
        StageSpec::parse(s, "--stages")
    }

    #[test]
    fn a_bare_stage_is_sqlite_and_a_suffix_names_the_backend() {
        assert_eq!(
            parse("actor").unwrap(),
            StageSpec {
                stage: "actor".into(),
                backend: Backend::Sqlite
            }
        );
        assert_eq!(parse("actor@sqlite").unwrap(), parse("actor").unwrap());
        let pg = parse(" locked@postgres ").unwrap();
        assert_eq!(
            (pg.stage.as_str(), pg.backend),
            ("locked", Backend::Postgres)
        );
        assert_eq!(pg.label(), "locked@postgres");
        assert_eq!(parse("monolith").unwrap().label(), "monolith@sqlite");
        // stage names are the server's business: an unknown one is started and skipped there
        assert_eq!(parse("saga@postgres").unwrap().stage, "saga");
    }

    #[test]
    fn unknown_backends_empty_stages_and_monolith_on_postgres_are_refused_naming_the_flag() {
        let e = parse("actor@mysql").unwrap_err();
        assert!(
            e.starts_with("--stages actor@mysql: unknown backend 'mysql'"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = StageSpec::parse("actor@", "--stage").unwrap_err();
        assert!(e.starts_with("--stage actor@: unknown backend ''"), "{e}");
        let e = parse("@postgres").unwrap_err();
        assert!(e.contains("no stage before '@'"), "{e}");
        let e = parse("monolith@postgres").unwrap_err();
        assert!(e.contains("runs on SQLite only"), "{e}");
        assert!(parse("monolith@sqlite").is_ok());
        let e = parse("services@sqlite").unwrap_err();
        assert!(e.contains("PostgreSQL only"), "{e}");
        assert_eq!(parse("services").unwrap().label(), "services@postgres");
        let e = parse("saga@sqlite").unwrap_err();
        assert!(e.contains("PostgreSQL only"), "{e}");
        assert_eq!(parse("saga").unwrap().label(), "saga@postgres");
    }

    #[test]
    fn the_server_url_names_the_new_database_and_keeps_the_rest() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "loadgen_ab"),
            "postgres://postgres@127.0.0.1:5432/loadgen_ab"
        );
        assert_eq!(
            with_database("postgresql://u:p@h", "d"),
            "postgresql://u:p@h/d"
        );
        assert_eq!(
            with_database("postgres://h:1/x?sslmode=disable&dbname=y", "d"),
            "postgres://h:1/d?sslmode=disable"
        );
    }

    #[test]
    fn passwords_are_hidden_in_what_is_shown() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?sslmode=disable"),
            "postgres://u:***@h:5432/db?sslmode=disable"
        );
        assert_eq!(redact(DEFAULT_POSTGRES_URL), DEFAULT_POSTGRES_URL);
    }

    #[test]
    fn only_postgres_urls_are_accepted() {
        assert!(check_url(DEFAULT_POSTGRES_URL).is_ok());
        assert!(check_url("postgresql://h/db").is_ok());
        let e = check_url("mysql://u:pw@h/db").unwrap_err();
        assert!(
            e.contains("give a postgres:// URL") && !e.contains("pw"),
            "{e}"
        );
    }

    #[test]
    fn a_running_servers_health_may_name_its_backend() {
        let h = |v: serde_json::Value| Backend::from_health(&v);
        assert_eq!(
            h(serde_json::json!({"dependencies": {"sqlite": "ok"}})),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            h(serde_json::json!({"backend": "postgres", "dependencies": {"sqlite": "ok"}})),
            Some(Backend::Postgres)
        );
        assert_eq!(h(serde_json::json!({"stage": "actor"})), None);
    }
}
