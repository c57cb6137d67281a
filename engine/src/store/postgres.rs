//! The PostgreSQL store: several engine processes share one database (G9).
//!
//! Built on tokio-postgres with a deadpool pool rather than sqlx: no query macros that
//! need a database at build time, explicit control over transactions and pipelining
//! (one group commit is one transaction whose statements go out back to back), and a
//! smaller dependency tree. The store runs its own small tokio runtime, so its
//! synchronous [`SagaLog`] calls can be made from any thread; the engine makes them off
//! its runtime's threads ([`SagaLog::remote`]).
//!
//! One row per saga in `sagas` holds its summary and every index the other stores keep
//! as separate keys (status, timer, start key, finish time), plus its lease (owner,
//! epoch, expiry by the database's clock). Log records are rows of `log`. Since a
//! summary and its indexes are columns of one row, they cannot disagree; the check at
//! open looks only for logs without a summary.
//!
//! Every write is one statement that updates the saga's row only if the writer holds its
//! epoch, and inserts the log rows only if it did: a fenced write changes nothing and is
//! answered [`Refused::Fenced`] while the rest of its batch commits. A commit is durable
//! when `COMMIT` returns (PostgreSQL's default `synchronous_commit = on`), so
//! [`SagaLog::sync`] has nothing left to do.

use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use crate::clock::Timestamp;
use crate::ids::{Lsn, SagaId, StartKey};
use crate::machine::SagaStatus;
use crate::store::check::{Finding, Report};
use crate::store::codec;
use crate::store::inbox::{Delivered, Delivery, Inbox};
use crate::store::lease::{Answer, Changes, Lease, Leases, OwnerId, Refused, Request};
use crate::store::{Error, Result, SagaLog, SagaMeta, Write, WriteResult};

/// The newest schema version this engine knows.
pub const SCHEMA_VERSION: i32 = 3;

/// How to open a [`PgLog`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PgOptions {
    /// The schema the engine's tables live in (created if missing).
    pub schema: String,
    /// How long a lease lasts after it is taken or renewed.
    pub lease_ttl: Duration,
    /// Connections in the pool.
    pub pool_size: usize,
}

impl Default for PgOptions {
    /// Schema `sagaflow`, 10 s leases, 8 connections.
    fn default() -> Self {
        PgOptions {
            schema: "sagaflow".into(),
            lease_ttl: Duration::from_secs(10),
            pool_size: 8,
        }
    }
}

impl PgOptions {
    /// Sets [`PgOptions::schema`].
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets [`PgOptions::lease_ttl`].
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Sets [`PgOptions::pool_size`].
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n.max(1);
        self
    }
}

/// A [`SagaLog`] on PostgreSQL, shared by every engine process opened on the same
/// database and schema.
pub struct PgLog {
    pool: Pool,
    lease_pool: Pool,
    runtime: Option<tokio::runtime::Runtime>,
    schema: String,
    ttl: Duration,
    sql: Sql,
    /// Statements sent (queries, plus BEGIN and COMMIT): what an idle engine costs.
    statements: std::sync::atomic::AtomicU64,
    /// The NOTIFY channel of this schema.
    channel: String,
    requests: tokio::sync::watch::Sender<u64>,
    outcomes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for PgLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLog")
            .field("schema", &self.schema)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Drop for PgLog {
    fn drop(&mut self) {
        // Never blocks: the store may be dropped on an async runtime's thread.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(e.to_string())
}

/// A schema name is put into SQL text: only plain identifiers are accepted.
fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

fn lsn_param(saga: SagaId, lsn: Lsn) -> Result<i64> {
    i64::try_from(lsn.0).map_err(|_| Error::Corrupt {
        saga,
        what: format!("log record {}", lsn.0),
        reason: "lsn beyond what the PostgreSQL store can hold (2^63 - 1)".into(),
    })
}

fn millis_param(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

fn millis_of(v: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(v).unwrap_or(0))
}

fn saga_of(bytes: &[u8]) -> Result<SagaId> {
    <[u8; 16]>::try_from(bytes)
        .map(SagaId::from_bytes)
        .map_err(|_| Error::CorruptIndex(format!("a saga id of {} bytes", bytes.len())))
}

fn epoch_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A lease from a row of (id, epoch).
fn lease_of(r: &tokio_postgres::Row) -> Result<Lease> {
    Ok(Lease {
        saga: saga_of(r.get::<_, &[u8]>(0))?,
        epoch: epoch_of(r.get(1)),
    })
}

/// A stored lsn, which a bigint holds: a negative one is damage, not a number to wrap.
fn lsn_from(saga: SagaId, lsn: i64) -> Result<Lsn> {
    u64::try_from(lsn).map(Lsn).map_err(|_| Error::Corrupt {
        saga,
        what: "log key".into(),
        reason: format!("negative lsn {lsn}"),
    })
}

/// The SQL texts, with the schema filled in.
struct Sql {
    insert_first: String,
    update: String,
    why_refused: String,
    read: String,
    meta: String,
    /// The summaries of several sagas: `$1` is an array of ids.
    metas: String,
    with_status: String,
    find_key: String,
    due: String,
    finished: String,
    claim: String,
    acquire: String,
    renew: String,
    release: String,
    holder: String,
    request: String,
    requests_for: String,
    answer: String,
    answer_of: String,
    page_up: String,
    page_down: String,
    counts: String,
    drifted: String,
    position: String,
    set_position: String,
}

impl Sql {
    fn new(s: &str) -> Sql {
        let active = format!(
            "({}, {})",
            SagaStatus::Running.code(),
            SagaStatus::Compensating.code()
        );
        // $1 id, $2 owner, $3 epoch, $4 status, $5 due, $6 finished_at, $7 meta,
        // $8 active, $9 lsns, $10 values; a first write also $11 start key, $12 lease
        // in milliseconds, $13 definition.
        let log_rows = format!(
            "ins AS (INSERT INTO {s}.log (saga, lsn, value) \
             SELECT ok.id, t.l, t.v FROM ok, unnest($9::bigint[], $10::bytea[]) AS t(l, v) RETURNING 1) \
             SELECT (SELECT count(*) FROM ok)::bigint"
        );
        Sql {
            insert_first: format!(
                "WITH ok AS (INSERT INTO {s}.sagas \
                 (id, status, start_key, due, finished_at, meta, owner, epoch, lease_until, definition) \
                 VALUES ($1, $4, $11, $5, $6, $7, CASE WHEN $8 THEN $2 END, $3, \
                 clock_timestamp() + $12 * interval '1 millisecond', $13) \
                 ON CONFLICT DO NOTHING RETURNING id), {log_rows}"
            ),
            update: format!(
                "WITH ok AS (UPDATE {s}.sagas SET status = $4, due = $5, finished_at = $6, \
                 meta = $7, owner = CASE WHEN $8 THEN owner END, drifts = $11 \
                 WHERE id = $1 AND owner = $2 AND epoch = $3 RETURNING id), {log_rows}"
            ),
            why_refused: format!(
                "SELECT (SELECT id FROM {s}.sagas WHERE start_key = $2 AND $2 IS NOT NULL), \
                 (SELECT epoch FROM {s}.sagas WHERE id = $1)"
            ),
            read: format!("SELECT lsn, value FROM {s}.log WHERE saga = $1 ORDER BY lsn"),
            meta: format!("SELECT meta FROM {s}.sagas WHERE id = $1"),
            metas: format!("SELECT id, meta FROM {s}.sagas WHERE id = ANY($1)"),
            with_status: format!("SELECT id FROM {s}.sagas WHERE status = $1 ORDER BY id"),
            find_key: format!("SELECT id FROM {s}.sagas WHERE start_key = $1"),
            due: format!(
                "SELECT due, id FROM {s}.sagas WHERE due IS NOT NULL AND due <= $1 ORDER BY due, id"
            ),
            finished: format!(
                "SELECT finished_at, id FROM {s}.sagas WHERE finished_at IS NOT NULL \
                 AND finished_at <= $1 AND (finished_at, id) > ($2, $3) \
                 ORDER BY finished_at, id LIMIT $4"
            ),
            claim: format!(
                "UPDATE {s}.sagas SET owner = $1, epoch = epoch + 1, \
                 lease_until = clock_timestamp() + $3 * interval '1 millisecond', wake_at = NULL \
                 WHERE id IN (SELECT id FROM {s}.sagas WHERE status IN {active} \
                 AND definition = ANY($4) AND \
                 ((owner IS NULL AND (wake_at IS NULL OR wake_at <= (extract(epoch FROM now()) * 1000)::bigint)) \
                 OR (owner <> $1 AND lease_until < now())) \
                 ORDER BY lease_until NULLS FIRST LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, epoch"
            ),
            acquire: format!(
                "UPDATE {s}.sagas SET owner = $1, epoch = epoch + 1, \
                 lease_until = clock_timestamp() + $3 * interval '1 millisecond', wake_at = NULL \
                 WHERE id = $2 AND (owner IS NULL OR owner = $1 OR lease_until < now()) \
                 RETURNING epoch"
            ),
            // Rows a group commit of this process is writing are skipped (renewed at
            // the next round): renewals never wait for, or deadlock with, a batch.
            renew: format!(
                "UPDATE {s}.sagas SET lease_until = clock_timestamp() + $2 * interval '1 millisecond' \
                 WHERE id IN (SELECT id FROM {s}.sagas WHERE owner = $1 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, epoch"
            ),
            release: format!(
                "UPDATE {s}.sagas SET owner = NULL, wake_at = $4 \
                 WHERE id = $2 AND owner = $1 AND epoch = $3"
            ),
            holder: format!(
                "SELECT owner, epoch FROM {s}.sagas WHERE id = $1 AND owner IS NOT NULL \
                 AND lease_until >= now()"
            ),
            request: format!(
                "WITH r AS (INSERT INTO {s}.requests (saga, action, operator, reason) \
                 VALUES ($1, $2, $3, $4) RETURNING id) \
                 SELECT r.id, pg_notify($5, 'request') FROM r"
            ),
            requests_for: format!(
                "SELECT r.id, r.saga, r.action, r.operator, r.reason FROM {s}.requests r \
                 JOIN {s}.sagas g ON g.id = r.saga WHERE r.answer IS NULL AND g.owner = $1 \
                 ORDER BY r.id"
            ),
            answer: format!(
                "WITH u AS (UPDATE {s}.requests SET answer = $2 WHERE id = $1 AND answer IS NULL \
                 RETURNING id) SELECT count(*), (SELECT pg_notify($3, 'outcome') FROM u) FROM u"
            ),
            answer_of: format!("SELECT answer FROM {s}.requests WHERE id = $1"),
            page_up: format!(
                "SELECT id, meta FROM {s}.sagas WHERE ($1::smallint IS NULL OR status = $1) \
                 AND id > $2 ORDER BY id LIMIT $3"
            ),
            page_down: format!(
                "SELECT id, meta FROM {s}.sagas WHERE ($1::smallint IS NULL OR status = $1) \
                 AND ($2::bytea IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
            ),
            counts: format!(
                "SELECT status, definition, count(*) FROM {s}.sagas GROUP BY status, definition"
            ),
            drifted: format!(
                "SELECT id, meta FROM {s}.sagas WHERE drifts AND id > $1 ORDER BY id LIMIT $2"
            ),
            position: format!("SELECT at, saga FROM {s}.positions WHERE name = $1"),
            set_position: format!(
                "INSERT INTO {s}.positions (name, at, saga) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET at = excluded.at, saga = excluded.saga \
                 WHERE ({s}.positions.at, {s}.positions.saga) < (excluded.at, excluded.saga)"
            ),
        }
    }
}

/// The migrations, in order: migration `i` brings the schema to version `i + 1`.
fn migrations(s: &str) -> Vec<String> {
    let active = format!(
        "({}, {})",
        SagaStatus::Running.code(),
        SagaStatus::Compensating.code()
    );
    vec![format!(
        "CREATE TABLE {s}.sagas (
            id bytea PRIMARY KEY,
            status smallint NOT NULL,
            definition text NOT NULL,
            start_key text UNIQUE,
            due bigint,
            finished_at bigint,
            meta bytea NOT NULL,
            owner text,
            epoch bigint NOT NULL DEFAULT 0,
            lease_until timestamptz,
            wake_at bigint
        );
        CREATE TABLE {s}.log (
            saga bytea NOT NULL,
            lsn bigint NOT NULL,
            value bytea NOT NULL,
            PRIMARY KEY (saga, lsn)
        );
        CREATE TABLE {s}.requests (
            id bigserial PRIMARY KEY,
            saga bytea NOT NULL,
            action text NOT NULL,
            operator text NOT NULL,
            reason text NOT NULL,
            answer text,
            asked_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX sagas_status ON {s}.sagas (status, id);
        CREATE INDEX sagas_counts ON {s}.sagas (status, definition);
        CREATE INDEX sagas_due ON {s}.sagas (due, id) WHERE due IS NOT NULL;
        CREATE INDEX sagas_finished ON {s}.sagas (finished_at, id) WHERE finished_at IS NOT NULL;
        CREATE INDEX sagas_claimable ON {s}.sagas (lease_until NULLS FIRST) WHERE status IN {active};
        CREATE INDEX sagas_owner ON {s}.sagas (owner) WHERE owner IS NOT NULL;
        CREATE INDEX requests_open ON {s}.requests (saga) WHERE answer IS NULL;"
    ),
    // 2: the inbox of await steps (G10).
    format!(
        "CREATE TABLE {s}.inbox (
            key text NOT NULL,
            id text NOT NULL,
            payload bytea NOT NULL,
            received_at bigint NOT NULL,
            taken_by bytea,
            PRIMARY KEY (key, id)
        );
        CREATE INDEX inbox_received ON {s}.inbox (received_at);"
    ),
    // 3: reconciliation: the drift index and the reconciler's durable cursor.
    format!(
        "ALTER TABLE {s}.sagas ADD COLUMN drifts boolean NOT NULL DEFAULT false;
        CREATE INDEX sagas_drifts ON {s}.sagas (id) WHERE drifts;
        CREATE TABLE {s}.positions (
            name text PRIMARY KEY,
            at bigint NOT NULL,
            saga bytea NOT NULL
        );"
    )]
}

impl PgLog {
    /// Connects to the database at `url` (a `postgres://` URL or a key-value string),
    /// creates or migrates the schema, and returns the store. Blocks; call it from a
    /// blocking context (the engine builder's `open_postgres` does).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if the database cannot be reached, the schema name is not a
    /// plain identifier, or the schema was written by a newer engine (its version is
    /// higher than [`SCHEMA_VERSION`]).
    pub fn connect(url: &str, options: PgOptions) -> Result<PgLog> {
        if !valid_schema(&options.schema) {
            return Err(Error::Backend(format!(
                "schema name `{}`: use lowercase letters, digits and underscores",
                options.schema
            )));
        }
        let config: tokio_postgres::Config = url.parse().map_err(backend)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sagaflow-pg")
            .enable_all()
            .build()?;
        let make_pool = |size: usize| {
            let manager = Manager::from_config(
                config.clone(),
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let _guard = runtime.enter();
            Pool::builder(manager)
                .max_size(size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(30)))
                .create_timeout(Some(Duration::from_secs(10)))
                .build()
                .map_err(backend)
        };
        let pool = make_pool(options.pool_size)?;
        // The lease operations have connections of their own: a pool kept busy by
        // writes and reads never delays a renewal past the lease.
        let lease_pool = make_pool(2)?;
        let channel = format!("sagaflow_{}", options.schema);
        let requests = tokio::sync::watch::channel(0).0;
        let outcomes = tokio::sync::watch::channel(0).0;
        runtime.spawn(listen(
            url.to_string(),
            channel.clone(),
            requests.clone(),
            outcomes.clone(),
        ));
        let store = PgLog {
            pool,
            lease_pool,
            runtime: Some(runtime),
            sql: Sql::new(&options.schema),
            schema: options.schema,
            ttl: options.lease_ttl,
            statements: std::sync::atomic::AtomicU64::new(0),
            channel,
            requests,
            outcomes,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Statements this store has sent to the database (queries, plus BEGIN and COMMIT
    /// of each group commit; the LISTEN connection's one LISTEN is not counted).
    pub fn statements(&self) -> u64 {
        self.statements.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, n: u64) {
        self.statements
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `fut` on the store's runtime and waits for it. Counts one statement: calls
    /// that send more count the rest themselves.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.count(1);
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::Backend("store closed".into()))?;
        let (tx, rx) = mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::Backend("the store's runtime stopped".into()))?
    }

    fn migrate(&self) -> Result<()> {
        let pool = self.pool.clone();
        let s = self.schema.clone();
        self.run(async move {
            let mut client = pool.get().await.map_err(backend)?;
            let tx = client.transaction().await.map_err(backend)?;
            // "already exists, skipping" notices at every open are noise in the logs.
            tx.batch_execute("SET LOCAL client_min_messages = warning")
                .await
                .map_err(backend)?;
            // One migrator at a time across processes.
            tx.execute("SELECT pg_advisory_xact_lock(7244011)", &[])
                .await
                .map_err(backend)?;
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL);"
            ))
            .await
            .map_err(backend)?;
            let row = tx
                .query_opt(&format!("SELECT max(version) FROM {s}.schema_version"), &[])
                .await
                .map_err(backend)?;
            let current: i32 = row.and_then(|r| r.get::<_, Option<i32>>(0)).unwrap_or(0);
            if current > SCHEMA_VERSION {
                return Err(Error::Backend(format!(
                    "schema `{s}` is at version {current}, written by a newer engine; this one \
                     knows up to {SCHEMA_VERSION} and will not touch it"
                )));
            }
            for (i, m) in migrations(&s)
                .iter()
                .enumerate()
                .skip(current.max(0) as usize)
            {
                tx.batch_execute(m).await.map_err(backend)?;
                let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
                tx.execute(
                    &format!("INSERT INTO {s}.schema_version (version) VALUES ($1)"),
                    &[&v],
                )
                .await
                .map_err(backend)?;
                tracing::info!(schema = %s, version = v, "PostgreSQL schema migrated");
            }
            tx.commit().await.map_err(backend)
        })
    }

    /// The schema's version, as stored.
    ///
    /// # Errors
    ///
    /// A backend error.
    pub fn schema_version(&self) -> Result<i32> {
        let pool = self.pool.clone();
        let q = format!("SELECT max(version) FROM {}.schema_version", self.schema);
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let row = client.query_one(&q, &[]).await.map_err(backend)?;
            Ok(row.get::<_, Option<i32>>(0).unwrap_or(0))
        })
    }

    /// The schema this store's tables live in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Deletes the schema and everything in it: for tests that made one of their own.
    ///
    /// # Errors
    ///
    /// A backend error.
    pub fn drop_schema(&self) -> Result<()> {
        let pool = self.pool.clone();
        let q = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            client.batch_execute(&q).await.map_err(backend)
        })
    }

    #[cfg(test)]
    pub(crate) fn bump_schema_version_for_test(&self, v: i32) -> Result<()> {
        let pool = self.pool.clone();
        let q = format!(
            "INSERT INTO {}.schema_version (version) VALUES ($1)",
            self.schema
        );
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            client.execute(&q, &[&v]).await.map(|_| ()).map_err(backend)
        })
    }

    /// Runs one query on a connection of `pool` and returns its rows.
    fn rows(
        &self,
        pool: &Pool,
        q: &str,
        params: Vec<Box<dyn ToSql + Send + Sync>>,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let pool = pool.clone();
        let q = q.to_string();
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            client.query(&q, &refs).await.map_err(backend)
        })
    }

    fn query_ids(&self, q: &str, params: Vec<Box<dyn ToSql + Send + Sync>>) -> Result<Vec<SagaId>> {
        self.rows(&self.pool, q, params)?
            .iter()
            .map(|r| saga_of(r.get::<_, &[u8]>(0)))
            .collect()
    }

    fn timed(
        &self,
        q: &str,
        params: Vec<Box<dyn ToSql + Send + Sync>>,
    ) -> Result<Vec<(Timestamp, SagaId)>> {
        self.rows(&self.pool, q, params)?
            .iter()
            .map(|r| Ok((millis_of(r.get(0)), saga_of(r.get::<_, &[u8]>(1))?)))
            .collect()
    }

    fn ttl_ms(&self) -> f64 {
        self.ttl.as_millis() as f64
    }
}

/// One write, as the parameters of its statement.
struct Prepared {
    saga: SagaId,
    /// Inbox deliveries the write takes: marked in its transaction, if it is accepted.
    taken: Vec<(String, String)>,
    first: bool,
    owner: String,
    epoch: i64,
    status: i16,
    due: Option<i64>,
    finished: Option<i64>,
    meta: Vec<u8>,
    active: bool,
    drifts: bool,
    lsns: Vec<i64>,
    values: Vec<Vec<u8>>,
    start_key: Option<String>,
    definition: String,
}

fn prepare(w: Write) -> Result<std::result::Result<Prepared, Refused>> {
    let Some(fence) = w.fence else {
        // A shared store takes no write from outside the lease protocol.
        return Ok(Err(Refused::Fenced {
            saga: w.saga,
            carried: 0,
            current: 0,
        }));
    };
    let mut lsns = Vec::with_capacity(w.records.len());
    let mut values = Vec::with_capacity(w.records.len());
    for r in &w.records {
        lsns.push(lsn_param(w.saga, r.lsn)?);
        values.push(codec::encode_record(r)?);
    }
    Ok(Ok(Prepared {
        saga: w.saga,
        taken: w.taken.into_iter().map(|t| (t.key, t.id)).collect(),
        // A saga's first write creates its row at epoch 1. A write without a previous
        // summary under a later epoch is to a row that exists (a saga claimed or adopted
        // whose summary did not decode): an update, fenced like any other.
        first: w.previous.is_none() && fence.epoch <= 1,
        owner: fence.owner.as_str().to_string(),
        epoch: i64::try_from(fence.epoch).unwrap_or(i64::MAX),
        status: i16::from(w.meta.status.code()),
        due: w.meta.due.map(millis_param),
        finished: w.meta.finished_at.map(millis_param),
        meta: codec::encode_meta(&w.meta)?,
        active: w.meta.status.is_active(),
        drifts: w.meta.open_drifts > 0,
        lsns,
        values,
        start_key: w.meta.start_key.as_ref().map(|k| k.to_string()),
        definition: w.meta.definition.clone(),
    }))
}

/// The summaries in rows of (id, meta): one that does not decode is skipped with a
/// warning, so that one bad saga does not hide the others.
fn metas_of(rows: &[tokio_postgres::Row]) -> Result<Vec<SagaMeta>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id = saga_of(r.get::<_, &[u8]>(0))?;
        match codec::decode_meta(id, r.get::<_, &[u8]>(1)) {
            Ok(m) => out.push(m),
            Err(e) => tracing::warn!(saga_id = %id, error = %e, "summary does not decode"),
        }
    }
    Ok(out)
}

impl SagaLog for PgLog {
    fn inbox(&self) -> &dyn Inbox {
        self
    }

    fn append(&self, writes: Vec<Write>) -> Result<()> {
        for r in self.append_each(writes)? {
            r.map_err(backend)?;
        }
        Ok(())
    }

    fn append_each(&self, writes: Vec<Write>) -> Result<Vec<WriteResult>> {
        let mut prepared = Vec::with_capacity(writes.len());
        for w in writes {
            prepared.push(prepare(w)?);
        }
        let pool = self.pool.clone();
        let (insert, update, why) = (
            self.sql.insert_first.clone(),
            self.sql.update.clone(),
            self.sql.why_refused.clone(),
        );
        let ttl = self.ttl_ms();
        // A saga that ends wakes whoever waits for it in another process.
        let ends = prepared.iter().any(|p| p.as_ref().is_ok_and(|p| !p.active));
        let channel = self.channel.clone();
        let take = format!(
            "UPDATE {}.inbox SET taken_by = $1 WHERE key = $2 AND id = $3",
            self.schema
        );
        let takes: u64 = prepared
            .iter()
            .map(|p| p.as_ref().map_or(0, |p| p.taken.len() as u64))
            .sum();
        // BEGIN, one statement per write (and per delivery taken), COMMIT, and the
        // NOTIFY.
        self.count(prepared.len() as u64 + takes + 1 + u64::from(ends));
        self.run(async move {
            let mut client = pool.get().await.map_err(backend)?;
            let insert = client.prepare_cached(&insert).await.map_err(backend)?;
            let update = client.prepare_cached(&update).await.map_err(backend)?;
            let tx = client.transaction().await.map_err(backend)?;
            // Every statement of the batch goes out at once (tokio-postgres pipelines
            // them); none can fail on its own, since a fenced write matches no row.
            let futures = prepared.iter().map(|p| {
                let tx = &tx;
                let (insert, update) = (&insert, &update);
                async move {
                    let Ok(p) = p else {
                        return Ok(0);
                    };
                    let key: Option<&str> = p.start_key.as_deref();
                    let params: [&(dyn ToSql + Sync); 13] = [
                        &p.saga.as_bytes().as_slice(),
                        &p.owner,
                        &p.epoch,
                        &p.status,
                        &p.due,
                        &p.finished,
                        &p.meta,
                        &p.active,
                        &p.lsns,
                        &p.values,
                        &key,
                        &ttl,
                        &p.definition,
                    ];
                    // A first write creates the row (and its lease); a later one updates
                    // it, which takes the first ten parameters and whether the saga has
                    // open drifts (a new saga has none).
                    let row = if p.first {
                        tx.query_one(insert, &params).await?
                    } else {
                        let mut update_params = params[..10].to_vec();
                        update_params.push(&p.drifts);
                        tx.query_one(update, &update_params).await?
                    };
                    Ok::<i64, tokio_postgres::Error>(row.get(0))
                }
            });
            let counts = futures_util::future::join_all(futures).await;
            let mut results = Vec::with_capacity(prepared.len());
            for (p, n) in prepared.iter().zip(counts) {
                let n = n.map_err(|e| match e.code() {
                    Some(c) if *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION => {
                        Error::Backend(format!("refusing to overwrite a log record: {e}"))
                    }
                    _ => backend(e),
                })?;
                results.push(match p {
                    Err(refused) => Err(refused.clone()),
                    Ok(_) if n == 1 => Ok(()),
                    Ok(p) => {
                        let row = tx
                            .query_one(&why, &[&p.saga.as_bytes().as_slice(), &p.start_key])
                            .await
                            .map_err(backend)?;
                        let holder: Option<Vec<u8>> = row.get(0);
                        let current: Option<i64> = row.get(1);
                        match (holder, &p.start_key, p.first) {
                            (Some(h), Some(k), true) if h.as_slice() != p.saga.as_bytes() => {
                                Err(Refused::StartKeyTaken {
                                    key: StartKey::new(k.clone()).map_err(backend)?,
                                    existing: saga_of(&h)?,
                                })
                            }
                            _ => Err(Refused::Fenced {
                                saga: p.saga,
                                carried: epoch_of(p.epoch),
                                current: current.map_or(0, epoch_of),
                            }),
                        }
                    }
                });
            }
            // What the accepted writes take from the inbox, in their transaction.
            for (p, r) in prepared.iter().zip(&results) {
                if let (Ok(p), Ok(())) = (p, r) {
                    for (key, id) in &p.taken {
                        tx.execute(&take, &[&p.saga.as_bytes().as_slice(), key, id])
                            .await
                            .map_err(backend)?;
                    }
                }
            }
            if ends {
                // Delivered at commit, to every process listening (this one too).
                tx.execute("SELECT pg_notify($1, 'outcome')", &[&channel])
                    .await
                    .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)?;
            Ok(results)
        })
    }

    fn sync(&self) -> Result<()> {
        // Each append commits its transaction, durable once COMMIT returns.
        Ok(())
    }

    fn read(&self, saga: SagaId) -> Result<Vec<(Lsn, Vec<u8>)>> {
        self.rows(
            &self.pool,
            &self.sql.read,
            vec![Box::new(saga.as_bytes().to_vec())],
        )?
        .iter()
        .map(|r| Ok((lsn_from(saga, r.get(0))?, r.get::<_, Vec<u8>>(1))))
        .collect()
    }

    fn meta(&self, saga: SagaId) -> Result<Option<SagaMeta>> {
        self.rows(
            &self.pool,
            &self.sql.meta,
            vec![Box::new(saga.as_bytes().to_vec())],
        )?
        .first()
        .map(|r| codec::decode_meta(saga, r.get::<_, &[u8]>(0)))
        .transpose()
    }

    fn with_status(&self, status: SagaStatus) -> Result<Vec<SagaId>> {
        self.query_ids(
            &self.sql.with_status,
            vec![Box::new(i16::from(status.code()))],
        )
    }

    fn page(
        &self,
        status: Option<SagaStatus>,
        after: Option<SagaId>,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<SagaMeta>> {
        let pool = self.pool.clone();
        let q = if newest_first {
            self.sql.page_down.clone()
        } else {
            self.sql.page_up.clone()
        };
        let status = status.map(|s| i16::from(s.code()));
        let cursor: Option<Vec<u8>> = match (after, newest_first) {
            (Some(a), _) => Some(a.as_bytes().to_vec()),
            (None, true) => None,
            // Every id is above the empty byte string.
            (None, false) => Some(Vec::new()),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let rows = client
                .query(&q, &[&status, &cursor, &limit])
                .await
                .map_err(backend)?;
            metas_of(&rows)
        })
    }

    fn metas(&self, sagas: &[SagaId]) -> Result<Vec<SagaMeta>> {
        let pool = self.pool.clone();
        let ids: Vec<Vec<u8>> = sagas.iter().map(|s| s.as_bytes().to_vec()).collect();
        let q = self.sql.metas.clone();
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let rows = client.query(&q, &[&ids]).await.map_err(backend)?;
            metas_of(&rows)
        })
    }

    fn load(&self, sagas: &[SagaId]) -> Result<Vec<crate::store::Loaded>> {
        let pool = self.pool.clone();
        let ids: Vec<Vec<u8>> = sagas.iter().map(|s| s.as_bytes().to_vec()).collect();
        let order: Vec<SagaId> = sagas.to_vec();
        let (logs_q, metas_q) = (
            format!(
                "SELECT saga, lsn, value FROM {}.log WHERE saga = ANY($1) ORDER BY saga, lsn",
                self.schema
            ),
            self.sql.metas.clone(),
        );
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let (logs, metas) = futures_util::future::join(
                client.query(&logs_q, &[&ids]),
                client.query(&metas_q, &[&ids]),
            )
            .await;
            let mut by_saga: std::collections::HashMap<SagaId, crate::store::Loaded> = order
                .iter()
                .map(|&saga| {
                    (
                        saga,
                        crate::store::Loaded {
                            saga,
                            log: Vec::new(),
                            meta: None,
                        },
                    )
                })
                .collect();
            for r in logs.map_err(backend)? {
                let saga = saga_of(r.get::<_, &[u8]>(0))?;
                let lsn = lsn_from(saga, r.get(1))?;
                if let Some(l) = by_saga.get_mut(&saga) {
                    l.log.push((lsn, r.get::<_, Vec<u8>>(2)));
                }
            }
            for r in metas.map_err(backend)? {
                let saga = saga_of(r.get::<_, &[u8]>(0))?;
                if let Some(l) = by_saga.get_mut(&saga) {
                    l.meta = codec::decode_meta(saga, r.get::<_, &[u8]>(1)).ok();
                }
            }
            Ok(order.iter().filter_map(|s| by_saga.remove(s)).collect())
        })
    }

    fn counts(&self) -> Result<crate::store::Counts> {
        let pool = self.pool.clone();
        let q = self.sql.counts.clone();
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let rows = client.query(&q, &[]).await.map_err(backend)?;
            let mut c = crate::store::Counts::default();
            for r in rows {
                let code: i16 = r.get(0);
                let status = u8::try_from(code)
                    .ok()
                    .and_then(SagaStatus::from_code)
                    .ok_or_else(|| Error::CorruptIndex(format!("status code {code}")))?;
                let n = u64::try_from(r.get::<_, i64>(2)).unwrap_or(0);
                *c.by_status.entry(status).or_default() += n;
                *c.by_definition
                    .entry(r.get::<_, String>(1))
                    .or_default()
                    .entry(status)
                    .or_default() += n;
            }
            Ok(c)
        })
    }

    fn find_start_key(&self, key: &StartKey) -> Result<Option<SagaId>> {
        Ok(self
            .query_ids(&self.sql.find_key, vec![Box::new(key.to_string())])?
            .into_iter()
            .next())
    }

    fn due(&self, until: Timestamp) -> Result<Vec<(Timestamp, SagaId)>> {
        self.timed(&self.sql.due, vec![Box::new(millis_param(until))])
    }

    fn finished_before(
        &self,
        until: Timestamp,
        after: Option<(Timestamp, SagaId)>,
        limit: usize,
    ) -> Result<Vec<(Timestamp, SagaId)>> {
        let (t, id) = after.map_or((i64::MIN, Vec::new()), |(t, id)| {
            (millis_param(t), id.as_bytes().to_vec())
        });
        self.timed(
            &self.sql.finished,
            vec![
                Box::new(millis_param(until)),
                Box::new(t),
                Box::new(id),
                Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
            ],
        )
    }

    fn remove(&self, saga: SagaId) -> Result<()> {
        self.remove_batch(&[saga])
    }

    fn drifted(&self, after: Option<SagaId>, limit: usize) -> Result<Vec<SagaMeta>> {
        let pool = self.pool.clone();
        let q = self.sql.drifted.clone();
        // Every id is above the empty byte string.
        let cursor: Vec<u8> = after.map_or_else(Vec::new, |a| a.as_bytes().to_vec());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let rows = client
                .query(&q, &[&cursor, &limit])
                .await
                .map_err(backend)?;
            metas_of(&rows)
        })
    }

    fn position(&self, name: &str) -> Result<Option<(Timestamp, SagaId)>> {
        let pool = self.pool.clone();
        let q = self.sql.position.clone();
        let name = name.to_string();
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let Some(row) = client.query_opt(&q, &[&name]).await.map_err(backend)? else {
                return Ok(None);
            };
            let at = u64::try_from(row.get::<_, i64>(0))
                .map_err(|_| Error::CorruptIndex(format!("position `{name}`: a negative time")))?;
            let saga = saga_of(row.get::<_, &[u8]>(1))?;
            Ok(Some((Timestamp::from_millis(at), saga)))
        })
    }

    fn set_position(&self, name: &str, at: (Timestamp, SagaId)) -> Result<()> {
        let pool = self.pool.clone();
        let q = self.sql.set_position.clone();
        let name = name.to_string();
        let (t, id) = (millis_param(at.0), at.1.as_bytes().to_vec());
        self.count(1);
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            client
                .execute(&q, &[&name, &t, &id])
                .await
                .map_err(backend)?;
            Ok(())
        })
    }

    fn remove_batch(&self, sagas: &[SagaId]) -> Result<()> {
        let ids: Vec<Vec<u8>> = sagas.iter().map(|s| s.as_bytes().to_vec()).collect();
        let pool = self.pool.clone();
        let s = self.schema.clone();
        self.run(async move {
            let mut client = pool.get().await.map_err(backend)?;
            let tx = client.transaction().await.map_err(backend)?;
            tx.execute(
                &format!("DELETE FROM {s}.log WHERE saga = ANY($1)"),
                &[&ids],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                &format!("DELETE FROM {s}.requests WHERE saga = ANY($1)"),
                &[&ids],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                &format!("DELETE FROM {s}.sagas WHERE id = ANY($1)"),
                &[&ids],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)
        })
    }

    fn check(&self) -> Result<Report> {
        // A summary and its index entries are one row, so they cannot disagree; what can
        // go wrong is a log whose summary row is missing (a partial restore).
        let pool = self.pool.clone();
        let s = self.schema.clone();
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let sagas: i64 = client
                .query_one(&format!("SELECT count(*) FROM {s}.sagas"), &[])
                .await
                .map_err(backend)?
                .get(0);
            let orphans = client
                .query(
                    &format!(
                        "SELECT DISTINCT l.saga FROM {s}.log l \
                         WHERE NOT EXISTS (SELECT 1 FROM {s}.sagas g WHERE g.id = l.saga)"
                    ),
                    &[],
                )
                .await
                .map_err(backend)?;
            let mut report = Report {
                sagas: usize::try_from(sagas).unwrap_or(0),
                ..Report::default()
            };
            for r in orphans {
                let id = saga_of(r.get::<_, &[u8]>(0))?;
                let problem = "a log without a summary row".to_string();
                tracing::warn!(saga_id = %id, %problem, "store check");
                report.findings.push(Finding {
                    saga: Some(id),
                    problem: problem.clone(),
                    action: "left for an operator: resolve or restore it".into(),
                });
                report.damaged.push((id, problem));
            }
            Ok(report)
        })
    }

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }

    fn remote(&self) -> bool {
        true
    }
}

impl Leases for PgLog {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn claim(&self, owner: &OwnerId, limit: usize, definitions: &[String]) -> Result<Vec<Lease>> {
        self.rows(
            &self.lease_pool,
            &self.sql.claim,
            vec![
                Box::new(owner.as_str().to_string()),
                Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
                Box::new(self.ttl_ms()),
                Box::new(definitions.to_vec()),
            ],
        )?
        .iter()
        .map(lease_of)
        .collect()
    }

    fn acquire(&self, owner: &OwnerId, saga: SagaId) -> Result<Option<Lease>> {
        let pool = self.pool.clone();
        let q = self.sql.acquire.clone();
        let (owner, ttl) = (owner.as_str().to_string(), self.ttl_ms());
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let row = client
                .query_opt(&q, &[&owner, &saga.as_bytes().as_slice(), &ttl])
                .await
                .map_err(backend)?;
            Ok(row.map(|r| Lease {
                saga,
                epoch: epoch_of(r.get(0)),
            }))
        })
    }

    fn renew(&self, owner: &OwnerId) -> Result<Vec<Lease>> {
        self.rows(
            &self.lease_pool,
            &self.sql.renew,
            vec![
                Box::new(owner.as_str().to_string()),
                Box::new(self.ttl_ms()),
            ],
        )?
        .iter()
        .map(lease_of)
        .collect()
    }

    fn release(&self, owner: &OwnerId, lease: Lease, wake_at: Option<Timestamp>) -> Result<()> {
        let pool = self.lease_pool.clone();
        let q = self.sql.release.clone();
        let owner = owner.as_str().to_string();
        let epoch = i64::try_from(lease.epoch).unwrap_or(i64::MAX);
        let wake = wake_at.map(millis_param);
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            client
                .execute(
                    &q,
                    &[&owner, &lease.saga.as_bytes().as_slice(), &epoch, &wake],
                )
                .await
                .map_err(backend)?;
            Ok(())
        })
    }

    fn holder(&self, saga: SagaId) -> Result<Option<(OwnerId, u64)>> {
        Ok(self
            .rows(
                &self.lease_pool,
                &self.sql.holder,
                vec![Box::new(saga.as_bytes().to_vec())],
            )?
            .first()
            .map(|r| (OwnerId::new(r.get::<_, String>(0)), epoch_of(r.get(1)))))
    }

    fn request(&self, saga: SagaId, action: &str, operator: &str, reason: &str) -> Result<u64> {
        let pool = self.pool.clone();
        let q = self.sql.request.clone();
        let (a, o, r) = (action.to_string(), operator.to_string(), reason.to_string());
        let channel = self.channel.clone();
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let row = client
                .query_one(&q, &[&saga.as_bytes().as_slice(), &a, &o, &r, &channel])
                .await
                .map_err(backend)?;
            Ok(epoch_of(row.get(0)))
        })
    }

    fn requests_for(&self, owner: &OwnerId) -> Result<Vec<Request>> {
        self.rows(
            &self.lease_pool,
            &self.sql.requests_for,
            vec![Box::new(owner.as_str().to_string())],
        )?
        .iter()
        .map(|r| {
            Ok(Request {
                id: epoch_of(r.get(0)),
                saga: saga_of(r.get::<_, &[u8]>(1))?,
                action: r.get(2),
                operator: r.get(3),
                reason: r.get(4),
            })
        })
        .collect()
    }

    fn answer(&self, id: u64, answer: &Answer) -> Result<bool> {
        let pool = self.pool.clone();
        let q = self.sql.answer.clone();
        let json = serde_json::to_string(answer).map_err(backend)?;
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        let channel = self.channel.clone();
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let row = client
                .query_one(&q, &[&id, &json, &channel])
                .await
                .map_err(backend)?;
            Ok(row.get::<_, i64>(0) == 1)
        })
    }

    fn changes(&self) -> Option<Changes> {
        Some(Changes {
            requests: self.requests.subscribe(),
            outcomes: self.outcomes.subscribe(),
        })
    }

    fn answer_of(&self, id: u64) -> Result<Option<Answer>> {
        let pool = self.pool.clone();
        let q = self.sql.answer_of.clone();
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        self.run(async move {
            let client = pool.get().await.map_err(backend)?;
            let row = client.query_opt(&q, &[&id]).await.map_err(backend)?;
            match row.and_then(|r| r.get::<_, Option<String>>(0)) {
                None => Ok(None),
                Some(json) => serde_json::from_str(&json)
                    .map(Some)
                    .map_err(|e| Error::Backend(format!("a stored answer does not decode: {e}"))),
            }
        })
    }
}

/// Listens on the schema's NOTIFY channel on a connection of its own and turns each
/// notification into a bump of the matching hint; reconnects after a second if the
/// connection drops. Hints only: nothing is lost while it is down (waiters poll).
async fn listen(
    url: String,
    channel: String,
    requests: tokio::sync::watch::Sender<u64>,
    outcomes: tokio::sync::watch::Sender<u64>,
) {
    loop {
        match tokio_postgres::connect(&url, NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
                        match m {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                if tx.send(n.payload().to_string()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                let listening = client
                    .batch_execute(&format!("LISTEN {channel}"))
                    .await
                    .is_ok();
                if listening {
                    // A notification may have been missed while not listening.
                    requests.send_modify(|n| *n += 1);
                    outcomes.send_modify(|n| *n += 1);
                    while let Some(kind) = rx.recv().await {
                        let hint = if kind == "request" {
                            &requests
                        } else {
                            &outcomes
                        };
                        hint.send_modify(|n| *n += 1);
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::debug!(error = %e, "NOTIFY listener could not connect"),
        }
        // A reconnect pause against a real network, on the store's own runtime: real
        // time by nature, not an engine decision (those take the injected clock).
        #[allow(clippy::disallowed_methods)]
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A delivery from an inbox row: key, id, value (encoded), received_at, taken_by.
fn delivery_of(r: &tokio_postgres::Row) -> Result<Delivery> {
    let key: String = r.get(0);
    let id: String = r.get(1);
    let payload: &[u8] = r.get(2);
    let taken: Option<&[u8]> = r.get(4);
    // The same value encoding as the other stores (it holds the time received, which
    // is also a column for the purge); the key and id are columns.
    codec::decode_delivery(&codec::inbox_key(&key, &id)?, payload, taken)
}

impl Inbox for PgLog {
    fn deliver(
        &self,
        key: &str,
        id: &str,
        payload: &serde_json::Value,
        at: Timestamp,
    ) -> Result<Delivered> {
        // Checked as the other stores check them, so that every store takes the same.
        codec::inbox_key(key, id)?;
        let value = codec::encode_delivery(payload, at)?;
        let (pool, channel) = (self.pool.clone(), self.channel.clone());
        let q = format!(
            "INSERT INTO {}.inbox (key, id, payload, received_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            self.schema
        );
        let (key, id, at) = (key.to_string(), id.to_string(), millis_param(at));
        self.count(4);
        self.run(async move {
            let mut client = pool.get().await.map_err(backend)?;
            let tx = client.transaction().await.map_err(backend)?;
            let n = tx
                .execute(&q, &[&key, &id, &value, &at])
                .await
                .map_err(backend)?;
            if n == 1 {
                // Wakes the await steps waiting in every process, at commit.
                tx.execute("SELECT pg_notify($1, 'inbox')", &[&channel])
                    .await
                    .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)?;
            Ok(if n == 1 {
                Delivered::New
            } else {
                Delivered::Duplicate
            })
        })
    }

    fn waiting(&self, key: &str) -> Result<Vec<Delivery>> {
        // A key no store takes has no deliveries (and PostgreSQL's text refuses a NUL).
        if crate::store::inbox::check_id("correlation key", key).is_err() {
            return Ok(Vec::new());
        }
        let q = format!(
            "SELECT key, id, payload, received_at, taken_by FROM {}.inbox \
             WHERE key = $1 AND taken_by IS NULL ORDER BY received_at, id",
            self.schema
        );
        self.rows(&self.pool, &q, vec![Box::new(key.to_string())])?
            .iter()
            .map(delivery_of)
            .collect()
    }

    fn deliveries(&self, after: Option<(&str, &str)>, limit: usize) -> Result<Vec<Delivery>> {
        if let Some((k, i)) = after {
            // As the other stores: a cursor no store could hold is refused.
            codec::inbox_key(k, i)?;
        }
        let (k, i) = after.unwrap_or(("", ""));
        let q = format!(
            "SELECT key, id, payload, received_at, taken_by FROM {}.inbox \
             WHERE (key, id) > ($1, $2) ORDER BY key, id LIMIT $3",
            self.schema
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.rows(
            &self.pool,
            &q,
            vec![
                Box::new(k.to_string()),
                Box::new(i.to_string()),
                Box::new(limit),
            ],
        )?
        .iter()
        .map(delivery_of)
        .collect()
    }

    fn purge(&self, before: Timestamp) -> Result<usize> {
        let q = format!(
            "WITH gone AS (DELETE FROM {}.inbox WHERE received_at < $1 RETURNING 1) \
             SELECT count(*) FROM gone",
            self.schema
        );
        let rows = self.rows(&self.pool, &q, vec![Box::new(millis_param(before))])?;
        let n: i64 = rows.first().map_or(0, |r| r.get(0));
        Ok(usize::try_from(n).unwrap_or(0))
    }
}
