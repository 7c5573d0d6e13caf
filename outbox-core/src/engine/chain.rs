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
//! rows are written then, once. On the in-memory store of the test harness
//! (no crash to survive) the rows are inserted right after the delete
//! landed.

use uuid::Uuid;

use crate::broker::Backend;
use crate::error::Error;
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

/// Deletes the inbound row (guarded by its token) and inserts the follow-on
/// rows in one transaction. `Rows(0)`: the lease was lost, nothing was
/// written. On an error the transaction is rolled back (by the server, when
/// the connection broke).
pub(crate) async fn ack(
    stmts: &Statements,
    conn: &mut Conn,
    a: &ChainedAck,
) -> Result<(Written, Inserted), sqlx::Error> {
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
            return Ok((done, inserted));
        }
        Conn::Pg(pg) => pg,
    };
    sqlx::raw_sql("BEGIN").execute(&mut *pg).await?;
    let done = async {
        let deleted = sql::q(&stmts.ack)
            .bind(a.id)
            .bind(a.token)
            .execute(&mut *pg)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Ok((0, Vec::new()));
        }
        let inserted = insert_pg(pg, &a.rows).await?;
        Ok::<_, sqlx::Error>((deleted, inserted))
    }
    .await;
    match done {
        Ok((0, _)) => {
            sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await?;
            Ok((Written::Rows(0), Vec::new()))
        }
        Ok((n, inserted)) => {
            sqlx::raw_sql("COMMIT").execute(&mut *pg).await?;
            Ok((Written::Rows(n), inserted))
        }
        Err(e) => {
            if !store::is_connection_error(&e) {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *pg).await;
            }
            Err(e)
        }
    }
}

/// Inserts a lot's follow-on rows in its open transaction (PostgreSQL), or
/// does nothing on an in-process store: there [`after_lot`] inserts them
/// once the lot ended.
pub(crate) async fn insert_in_lot(
    conn: &mut Conn,
    rows: &[Staged],
) -> Result<Inserted, sqlx::Error> {
    match conn {
        Conn::Pg(pg) if !rows.is_empty() => insert_pg(pg, rows).await,
        _ => Ok(Vec::new()),
    }
}

/// After a lot committed: on an in-process store, inserts its follow-on
/// rows (on PostgreSQL they are in the commit already).
pub(crate) fn after_lot(conn: &Conn, rows: &[Staged]) -> Inserted {
    match conn {
        Conn::Local(_) => insert_local(rows),
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

async fn insert_pg(pg: &mut sqlx::PgConnection, rows: &[Staged]) -> Result<Inserted, sqlx::Error> {
    let mut inserted = Vec::with_capacity(rows.len());
    for s in rows {
        let queue = s.insert.queue.clone();
        let id = crate::store::producer::insert_pg(
            s.broker.stmts(),
            s.broker.channel(),
            s.insert.clone(),
            pg,
        )
        .await
        .map_err(|e| match e {
            Error::Database(e) => e,
            other => sqlx::Error::Configuration(Box::new(other)),
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
