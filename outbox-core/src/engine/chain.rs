//! Queue chaining, exactly once: the follow-on rows an
//! [`OutboxTransport`](crate::OutboxTransport) staged on a delivery
//! ([`Staged`]) are inserted in the transaction that deletes the inbound
//! row, so both land or neither does.
//!
//! - [`ClaimMode::Lease`](crate::ClaimMode::Lease): [`ack`] runs `BEGIN;
//!   DELETE` the inbound row guarded by its lease token; `INSERT` the
//!   follow-on rows; `COMMIT`. A lost lease (the `DELETE` finds no row)
//!   rolls back: nothing is inserted, the current holder of the row writes
//!   its own follow-on rows. Such acks bypass the batched acker.
//! - [`ClaimMode::Transaction`](crate::ClaimMode::Transaction): [`insert_in_lot`]
//!   inserts them in the lot's transaction, which holds the inbound rows'
//!   locks and deletes them before it commits.
//!
//! A crash, a killed backend or a lost connection before the `COMMIT` rolls
//! everything back: the inbound row is delivered again and its follow-on
//! rows are written then, once. Follow-on rows the database refuses (a
//! missing table, a permission) are rolled back and the delivery fails as a
//! failed publish would: the retry strategy, then the dead-letter table. On the in-memory store of the test harness
//! (no crash to survive) the rows are inserted right after the delete
//! landed.

use uuid::Uuid;

use crate::broker::Backend;
use crate::error::{BoxError, Error};
use crate::store::conn::{self as store, Conn, Written};
use crate::store::sql::{self, Statements};
use crate::transport::outbox::Staged;

/// A lease-mode ack that carries follow-on rows.
#[derive(Debug)]
pub(crate) struct ChainedAck {
    /// The inbound row.
    pub(crate) id: i64,
    /// Its lease token.
    pub(crate) token: Uuid,
    /// The follow-on rows, in the order they were staged.
    pub(crate) rows: Vec<Staged>,
}

/// Of each follow-on row: its queue, and whether it was inserted (a timer
/// that already existed is not).
pub(crate) type Inserted = Vec<(String, bool)>;

/// What the follow-on rows of one delivery came to: inserted, or refused by
/// the database for another reason than a broken connection (a missing
/// table, a permission): the error a failed publish would have been
/// ([`Error::Transport`] naming the transport and the queue), for the
/// delivery's retry strategy; its transaction part was rolled back.
pub(crate) type Chained = Result<Inserted, BoxError>;

/// Deletes the inbound row (guarded by its token) and inserts the follow-on
/// rows in one transaction. `Rows(0)`: the lease was lost, nothing was
/// written. `Rows(1)` with an `Err`: the follow-on rows were refused and the
/// transaction rolled back (the row is still leased: record a failure). On
/// an error the transaction is rolled back (by the server, when the
/// connection broke).
pub(crate) async fn ack(
    stmts: &Statements,
    conn: &mut Conn,
    a: &ChainedAck,
) -> Result<(Written, Chained), sqlx::Error> {
    let pg = match conn {
        Conn::Local(_) => {
            let delete = store::Write::Delete {
                id: a.id,
                token: a.token,
            };
            let done = store::execute(stmts, conn, &delete).await?;
            let inserted = match done {
                Written::Rows(n) if n > 0 => insert_local(&a.rows),
                _ => Vec::new(),
            };
            return Ok((done, Ok(inserted)));
        }
        Conn::Pg(pg) => pg,
    };
    sqlx::raw_sql("BEGIN").execute(&mut *pg).await?;
    let deleted = sql::q(&stmts.ack)
        .bind(a.id)
        .bind(a.token)
        .execute(&mut *pg)
        .await
        .map(|r| r.rows_affected());
    let n = match deleted {
        Ok(n) => n,
        Err(e) => {
            if !store::is_connection_error(&e) {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await;
            }
            return Err(e);
        }
    };
    if n == 0 {
        sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await?;
        return Ok((Written::Rows(0), Ok(Vec::new())));
    }
    match insert_pg(pg, &a.rows).await {
        Ok(inserted) => {
            sqlx::raw_sql("COMMIT").execute(&mut *pg).await?;
            Ok((Written::Rows(n), Ok(inserted)))
        }
        Err((at, e)) if !store::is_connection_error(&e) => {
            sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await?;
            Ok((Written::Rows(n), Err(refused(&a.rows[at], e))))
        }
        Err((_, e)) => Err(e),
    }
}

/// Inserts the follow-on rows of a lot's acked deliveries (`groups`, one
/// per delivery) in its open transaction, on PostgreSQL; nothing on an
/// in-process store (there [`after_lot`] inserts them once the lot ended).
/// A group the database refuses (not a connection problem) is rolled back
/// alone, to a savepoint, and its slot says why; the others stay. A
/// connection error is returned (the lot is lost).
pub(crate) async fn insert_in_lot(
    conn: &mut Conn,
    groups: &[Vec<Staged>],
) -> Result<(Inserted, Vec<Option<BoxError>>), sqlx::Error> {
    let mut slots: Vec<Option<BoxError>> = groups.iter().map(|_| None).collect();
    let pg = match conn {
        Conn::Pg(pg) if !groups.is_empty() => pg,
        _ => return Ok((Vec::new(), slots)),
    };
    // Fast path: all at once, one savepoint to come back to.
    sqlx::raw_sql("SAVEPOINT outbox_chain")
        .execute(&mut *pg)
        .await?;
    let mut inserted = Vec::new();
    let mut failed = false;
    for g in groups {
        match insert_pg(pg, g).await {
            Ok(i) => inserted.extend(i),
            Err((_, e)) if store::is_connection_error(&e) => return Err(e),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    if !failed {
        return Ok((inserted, slots));
    }
    // A group was refused: again, one savepoint per group.
    sqlx::raw_sql("ROLLBACK TO SAVEPOINT outbox_chain")
        .execute(&mut *pg)
        .await?;
    let mut inserted = Vec::new();
    for (g, slot) in groups.iter().zip(&mut slots) {
        sqlx::raw_sql("SAVEPOINT outbox_chain_one")
            .execute(&mut *pg)
            .await?;
        match insert_pg(pg, g).await {
            Ok(i) => inserted.extend(i),
            Err((_, e)) if store::is_connection_error(&e) => return Err(e),
            Err((at, e)) => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT outbox_chain_one")
                    .execute(&mut *pg)
                    .await?;
                *slot = Some(refused(&g[at], e));
            }
        }
    }
    Ok((inserted, slots))
}

/// After a lot committed: on an in-process store, inserts its follow-on
/// rows (on PostgreSQL they are in the commit already).
pub(crate) fn after_lot(conn: &Conn, groups: &[Vec<Staged>]) -> Inserted {
    match conn {
        Conn::Local(_) => groups.iter().flat_map(|g| insert_local(g)).collect(),
        Conn::Pg(_) => Vec::new(),
    }
}

/// Reports follow-on rows that landed, as a publish does (the `published`
/// counter).
pub(crate) fn landed(inserted: &Inserted) {
    for (queue, done) in inserted {
        crate::instrument::published(queue, "success", u64::from(*done));
    }
}

/// The error of a refused follow-on row: what its transport's publish
/// would have returned.
fn refused(row: &Staged, e: sqlx::Error) -> BoxError {
    Box::new(Error::Transport {
        transport: row.transport.clone(),
        destination: row.insert.queue.clone(),
        source: Box::new(Error::Database(e)),
    })
}

/// Inserts `rows` in order; on an error, the index of the row that failed.
async fn insert_pg(
    pg: &mut sqlx::PgConnection,
    rows: &[Staged],
) -> Result<Inserted, (usize, sqlx::Error)> {
    let mut inserted = Vec::with_capacity(rows.len());
    for (i, s) in rows.iter().enumerate() {
        let queue = s.insert.queue.clone();
        let id = crate::store::producer::insert_pg(
            s.broker.stmts(),
            s.broker.channel(),
            s.insert.clone(),
            pg,
        )
        .await
        .map_err(|e| match e {
            Error::Database(e) => (i, e),
            other => (i, sqlx::Error::Configuration(Box::new(other))),
        })?;
        inserted.push((queue, id.is_some()));
    }
    Ok(inserted)
}

/// Inserts into the follow-on rows' in-process store (the subscriber's: the
/// transport staged them because it is the same store).
fn insert_local(rows: &[Staged]) -> Inserted {
    let mut inserted = Vec::with_capacity(rows.len());
    for s in rows {
        let queue = s.insert.queue.clone();
        let done = match s.broker.backend() {
            Backend::Local(target) => target.insert(s.insert.clone()).is_some(),
            Backend::Postgres(_) => {
                tracing::error!(
                    queue = %queue,
                    "a follow-on row staged for an in-process store belongs to a PostgreSQL \
                     outbox; it is not written"
                );
                false
            }
        };
        if done {
            s.broker.observer().inserted(&queue);
        }
        inserted.push((queue, done));
    }
    inserted
}
