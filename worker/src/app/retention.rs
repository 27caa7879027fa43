//! Retention of processed inbox rows.

use sqlx::{AssertSqlSafe, PgPool};
use std::time::Duration;

use crate::ident::TableName;

/// Deletes processed rows of `table` older than `age`, in chunks of
/// `chunk` rows so that no statement holds many locks or a long
/// transaction; returns how many were deleted. Unprocessed and parked rows
/// are never deleted. Deleting a row forgets its dedup key: a message
/// redelivered after that would be stored again, so keep `age` well above
/// the subscription's retention (7 days by default) and any republishing
/// window.
pub async fn delete_processed(
    pool: &PgPool,
    table: &TableName,
    age: Duration,
    chunk: i64,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} \
             WHERE processed_at < clock_timestamp() - $1::float8 * interval '1 second' \
             ORDER BY processed_at LIMIT $2)",
        t = table.quoted()
    );
    let mut total = 0;
    loop {
        let done = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(age.as_secs_f64())
            .bind(chunk.max(1))
            .execute(pool)
            .await?
            .rows_affected();
        total += done;
        if done < chunk.max(1) as u64 {
            return Ok(total);
        }
    }
}
