//! The plan of an exactly-once lane's claim on a large backlog (real
//! PostgreSQL, no broker): it must read about `lanes x lot` rows in id order
//! on the primary key and stop, never the whole backlog.
//!
//! Found by the exactly-once benchmark: on 50,000 waiting rows the planner
//! read the whole table and sorted it (it assumes the lane filter keeps 0.5 %
//! of the rows, where it keeps `1/lanes`), 15 ms per claim alone and 60-100 ms
//! with four lanes claiming at once, a cost that grows with the backlog.

#![allow(clippy::unwrap_used)]

use tests::TestDb;

type R = anyhow::Result<()>;

const QUEUE: &str = "lanes";
const LANES: u32 = 4;
const LOT: usize = 500;

/// Fills the outbox with `unkeyed` rows without a key, then `keyed` rows over
/// 100 keys, all due.
async fn fill(db: &TestDb, unkeyed: i64, keyed: i64) -> anyhow::Result<()> {
    db.exec(format!(
        "INSERT INTO {} (queue, payload) SELECT '{QUEUE}', convert_to(repeat('x', 200), 'UTF8') \
         FROM generate_series(1, {unkeyed})",
        db.t()
    ))
    .await?;
    db.exec(format!(
        "INSERT INTO {} (queue, payload, ordering_key) \
         SELECT '{QUEUE}', convert_to(repeat('y', 200), 'UTF8'), 'key-' || (g % 100) \
         FROM generate_series(1, {keyed}) g",
        db.t()
    ))
    .await?;
    Ok(())
}

/// Asserts the claim's plan for every lane: the primary key in id order, no
/// sequential or bitmap scan, no sort, a full lot, and at most `max_read`
/// rows read and thrown away by the filters.
async fn assert_claims_read_their_lot(db: &TestDb, max_read: u64) -> R {
    let pkey = format!("{}_pkey", db.table.name());
    for lane in 0..LANES {
        let plan = db
            .broker
            .lane_claim_plan(&[QUEUE.to_owned()], LOT, LANES, lane)
            .await?
            .join("\n");
        for bad in ["Seq Scan", "Bitmap Heap Scan", "Sort"] {
            assert!(!plan.contains(bad), "lane {lane}: {bad} in\n{plan}");
        }
        assert!(
            plan.contains(&format!("Index Scan using {pkey} on")),
            "lane {lane}: not the primary key in id order:\n{plan}"
        );
        let lock_rows = plan
            .lines()
            .find(|l| l.contains("LockRows"))
            .unwrap_or_else(|| panic!("no LockRows in\n{plan}"));
        assert!(
            lock_rows.contains(&format!("rows={LOT} ")),
            "lane {lane}: not a full lot: {lock_rows}"
        );
        let removed: u64 = plan
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Rows Removed by Filter: "))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .sum();
        assert!(
            removed <= max_read,
            "lane {lane}: {removed} rows read and dropped for a lot of {LOT} (at most \
             {max_read}):\n{plan}"
        );
        println!("lane {lane}: {removed} rows dropped by the filters");
    }
    Ok(())
}

/// Without statistics (a fresh table, as the benchmark's, whose autovacuum
/// is off) and after ANALYZE: the same plan.
#[tokio::test]
async fn a_lane_claim_reads_its_lot_not_the_backlog() -> R {
    let db = TestDb::new().await?;
    fill(&db, 50_000, 5_000).await?;
    // Lane `l` of 4 holds every 4th unkeyed id: about 3 other rows per lot
    // row at the head of the table.
    assert_claims_read_their_lot(&db, 4 * LOT as u64).await?;
    db.exec(format!("ANALYZE {}", db.t())).await?;
    assert_claims_read_their_lot(&db, 4 * LOT as u64).await?;
    Ok(())
}

/// Relayed rows at the head of the table (deleted, not vacuumed) are not
/// read as rows, and lanes whose rows are all keyed (hashed over 100 keys)
/// still get their lots in id order, reading a bounded share of the backlog.
#[tokio::test]
async fn a_lane_claim_after_deletes_and_among_keys() -> R {
    let db = TestDb::new().await?;
    fill(&db, 20_000, 50_000).await?;
    // Every unkeyed row relayed: the head of the table is dead tuples.
    db.exec(format!("DELETE FROM {} WHERE ordering_key IS NULL", db.t()))
        .await?;
    db.exec(format!("ANALYZE {}", db.t())).await?;
    // A lane holds the keys that hash to it (a quarter of them, give or
    // take): a lot reads a few lots' worth, never the 50,000 waiting.
    assert_claims_read_their_lot(&db, 20 * LOT as u64).await?;
    Ok(())
}
