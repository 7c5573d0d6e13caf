//! A child process running an `App` (for the SIGTERM drain test): relays the
//! queue given in `OUTBOX_CHILD_QUEUE` of the table `OUTBOX_CHILD_SCHEMA`.
//! `OUTBOX_CHILD_TABLE`, handling each row in 300 ms, until SIGTERM. With
//! `OUTBOX_CHILD_HOLD_STARTUP` set, its startup never finishes instead (an
//! `on_startup` hook prints `starting` and waits forever, as a connection
//! being retried would): for the SIGTERM-while-starting test.

#![allow(missing_docs)]

use std::time::Duration;

use outbox_core::{App, AppContext, BoxError, Message, OutboxBroker, OutboxTable, Route};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).map_err(|_| anyhow::anyhow!("{k} is not set"));
    let pool = sqlx::PgPool::connect(&tests::database_url()).await?;
    let table =
        OutboxTable::new(&var("OUTBOX_CHILD_TABLE")?)?.schema(&var("OUTBOX_CHILD_SCHEMA")?)?;
    let broker = OutboxBroker::new(pool, table);
    let route = Route::builder([var("OUTBOX_CHILD_QUEUE")?])
        .fetch_batch_size(20)
        .min_fetch_interval(Duration::from_millis(20))
        .max_fetch_interval(Duration::from_millis(200))
        .handler(|m: Message, _| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            println!("handled {}", m.id());
        });
    let mut app = App::new(broker).without_discovery().subscriber(route);
    if std::env::var_os("OUTBOX_CHILD_HOLD_STARTUP").is_some() {
        app = app.on_startup(|_ctx: AppContext| async {
            println!("starting");
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        });
    }
    app.after_startup(|_ctx: AppContext| async {
        println!("ready");
        Ok::<(), BoxError>(())
    })
    .after_shutdown(|_ctx: AppContext| async {
        println!("stopped");
    })
    .run()
    .await?;
    Ok(())
}
